"""Configs from calibration on the embedded real model: the SPEC+outliers config validates and runs; the searched
config under a perplexity budget is verified on held-out calibration text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tpcomp import calibration
from megatron_tpcomp.config import CompressionConfig

pytestmark = pytest.mark.megatron


def test_written_config_validates_and_runs(result: dict, tmp_path: Path) -> None:
    from megatron_tpcomp import evaluation

    data = calibration.to_config(result, "int4:g32")
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps(data))
    cfg = CompressionConfig.load(path)
    cfg.check_model(30, 576, 3)
    setting = cfg.setting_for("mlp", 11)
    assert setting.spec.startswith("int4:g32") and "+outliers" in setting.spec
    assert list(setting.outlier_channels) == result["sites"]["layer11.mlp"]["outlier_channels"]
    assert data["meta"]["tokens"] == 512 and data["model"]["tp_size"] == 3
    report = evaluation.evaluate(
        result["checkpoint"], 3, ["none"], configs=[str(path)], tokens=256, context=256, gen_tokens=0, progress=False
    )
    rec = {r["spec"]: r for r in report["records"]}["calibrated"]
    # 9 of 576 channels in bf16, the rest int4 g32 with fp16 scales: (9 x 16 + 567 x 4.5) / 576 = 4.68 bits.
    assert 0.0 < rec["kld"] < 1.0 and rec["bits_per_value"] == pytest.approx(4.68, abs=0.01)


def test_ppl_budget_search_verifies_on_heldout_calibration_text(result: dict) -> None:
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.tokenizer import TextTokenizer

    # Sensitivities given (the --sensitivity-json path; their measurement is tested above), so that the plan
    # changes with the KL budget; the verification on held-out text is real.
    sites = [f"layer{i}.{b}" for i in range(30) for b in ("attention", "mlp")]
    # +chscale: the verification builds each site's codec from the calibrated channel scales.
    given = {s: {"int4:g32+had+chscale": 0.001 * (1 + i % 5), "int8:g32": 1e-5} for i, s in enumerate(sites)}
    with pytest.raises(ValueError, match="lack 60 site/candidate pairs"):
        calibration.search_config(result, ["int4:g32+had+chscale", "fp8"], 0.01, sensitivity=given, progress=False)
    config, sens = calibration.search_config(
        result,
        ["int4:g32+had+chscale", "int8:g32"],
        0.01,
        tokens=32,
        context=32,
        ppl_budget=2.0,
        verify_tokens=128,
        steps=3,
        sensitivity=given,
        progress=False,
    )
    assert sens == given
    CompressionConfig.from_dict({k: v for k, v in config.items() if k != "meta"}).check_model(30, 576, 3)
    meta, budget = config["meta"], config["meta"]["budget"]
    assert budget["type"] == "ppl" and budget["ppl_budget_pct"] == 2.0 and config["algo"] == "one-shot"
    assert meta["sensitivity_reused"] is True
    scaled = [v for blocks in config["layers"].values() for v in blocks.values() if isinstance(v, dict)]
    assert scaled and all(len(v["channel_scale_exponents"]) == 576 for v in scaled)
    steps = budget["steps"]
    assert sum(not s["reused"] for s in steps) == 3 and steps[0]["kl_budget"] == 0.01
    for s in steps:
        assert s["within"] == (s["ppl_increase_pct"] <= 2.0) and 0.0 <= s["top1_agreement"] <= 1.0
        assert s["kld"] > -1e-6 and s["predicted_kl"] <= s["kl_budget"] + 1e-12
    # Real damage: int4 on about ten sites (int8 on the rest) is measurable on 128 tokens.
    assert max(s["kld"] for s in steps) > 1e-3
    v = budget["verification"]
    ids = TextTokenizer.from_checkpoint(read_metadata(result["checkpoint"])).tokenize(assets.calibration_text())
    # Held out: after every calibration token (statistics: 512, sensitivities: 32), ending at the text's end.
    assert v["tokens"] == 128 and v["first_token"] >= 512 and v["first_token"] + 129 == len(ids)
    assert v["baseline_ppl"] > 1.0
    if budget["met"]:
        assert v["ppl_increase_pct"] <= 2.0
        assert meta["predicted_bits_per_value"] == min(s["bits_per_value"] for s in steps if s["within"])
    assert meta["predicted_kl"] <= meta["kl_budget"] + 1e-12
