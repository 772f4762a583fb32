"""Calibration on the embedded real model: statistics merged across TP ranks, outlier channels, a config that
validates and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tpcomp import calibration
from megatron_tpcomp.config import CompressionConfig

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def result(real_assets: None) -> dict:
    return calibration.calibrate(tokens=512, heldout_tokens=256, context=256)


def test_statistics_cover_every_layer_and_find_the_massive_outliers(result: dict) -> None:
    sites = result["sites"]
    assert result["k"] == 576 // 64 == 9
    assert {f"layer{i}.{b}" for i in range(30) for b in ("attention", "mlp")} <= set(sites)
    for s in sites.values():
        assert len(s["outlier_channels"]) == 9 and len(set(s["outlier_channels"])) == 9
        assert all(0 <= c < 576 for c in s["outlier_channels"])
        assert 0.0 <= s["window_overlap"] <= 1.0 and 0.0 <= s["heldout_overlap"] <= 1.0
        assert len(s["absmax"]) == len(s["rms"]) == 576
    # FACTS.md: layer 11's down projection carries the model's massive activations (max/median ~10^4 per
    # element there); its outlier set is stable across texts. Mid-network attention blocks have no such peaks.
    assert sites["layer11.mlp"]["peak_ratio"] > 100 and sites["layer11.mlp"]["heldout_overlap"] >= 0.8
    assert sites["layer11.mlp"]["absmax_max"] > 100 * sites["layer5.attention"]["absmax_max"]


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
    # 9 of 576 channels in bf16, the rest int4 g32 with fp16 scales: 4.68 bits (FACTS.md table).
    assert 0.0 < rec["kld"] < 1.0 and rec["bits_per_value"] == pytest.approx(4.68, abs=0.01)


def test_cli_refuses_to_overwrite_and_rejects_bad_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    out.write_text("{}")
    assert calibration.main(["--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert calibration.main(["--out", str(tmp_path / "d.json"), "--spec", "int4:gq"]) == 2
    assert "int4:gq" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


def test_single_site_sensitivity_finds_the_sensitive_blocks(real_ckpt) -> None:
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.search import measure_sensitivity
    from megatron_tpcomp.tokenizer import TextTokenizer

    ids = TextTokenizer.from_checkpoint(read_metadata(real_ckpt)).tokenize(assets.calibration_text())[:32]
    sens = measure_sensitivity(str(real_ckpt), 3, [ids], ["int4:g32+had"], progress=False)
    assert set(sens) == {f"layer{i}.{b}" for i in range(30) for b in ("attention", "mlp")}
    kl = {site: v["int4:g32+had"] for site, v in sens.items()}
    assert min(kl.values()) > -1e-6  # a KL divergence, up to fp32 rounding
    # FACTS.md: the down projections of layers 29, 0 and 11 are by far the most sensitive collectives.
    assert max(kl, key=kl.get) in {"layer29.mlp", "layer0.mlp", "layer11.mlp"}
