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


def _metrics_worker(rank: int, world_size: int, ckpt: str, ids: list[int]) -> tuple:
    import torch
    from megatron.core import parallel_state

    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.evaluation import _window_metrics
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M
    from megatron_tpcomp.search import sharded_logprobs, sharded_window_metrics

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, _ = load_model(ckpt, dtype=torch.float32)
    group = parallel_state.get_tensor_model_parallel_group()
    t = torch.tensor(ids)
    pos = torch.arange(len(ids) - 1)[None]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            full = model(t[None, :-1], pos, attention_mask=None, runtime_gather_output=True)[0]
            shard = model(t[None, :-1], pos, attention_mask=None, runtime_gather_output=False)[0]
        return torch.log_softmax(full.float(), dim=-1), sharded_logprobs(shard, group)

    base_full, base_shard = both()
    intercept.enable(model, "int4:g32")  # every layer: a KL of ~0.1, some argmax flips
    full, shard = both()
    intercept.disable(model)
    return _window_metrics(base_full, full, t[1:]), sharded_window_metrics(base_shard, shard, t[1:], group)


def test_sharded_metrics_match_the_gathered_evaluation(real_ckpt) -> None:
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    ids = TextTokenizer.from_checkpoint(read_metadata(real_ckpt)).tokenize(assets.calibration_text())[:97]
    out = run_distributed(_metrics_worker, 3, str(real_ckpt), ids, timeout_s=600)
    (nll, kl, top1), sharded = out[0]
    assert all(o[1] == sharded for o in out)  # every rank takes the same decisions from the same numbers
    # Same logits, log-sum-exp over shards instead of one row: fp32 rounding only (nll ~ 300 nats here).
    assert sharded[0] == pytest.approx(nll, rel=1e-5) and sharded[1] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert sharded[2] == top1 and 0 < top1 < 96 and kl > 1.0  # int4 everywhere: real damage, measured alike


def test_replayed_prefix_gives_the_same_sensitivity_and_two_shot_costs_more(real_ckpt) -> None:
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.search import measure_sensitivity
    from megatron_tpcomp.tokenizer import TextTokenizer

    ids = TextTokenizer.from_checkpoint(read_metadata(real_ckpt)).tokenize(assets.calibration_text())[:48]
    sites = ["layer0.attention", "layer14.mlp", "layer29.mlp"]
    cands = ["int4:g32+had", "int4:g32+had@two-shot"]
    fast = measure_sensitivity(str(real_ckpt), 3, [ids], cands, sites=sites, progress=False)
    full = measure_sensitivity(str(real_ckpt), 3, [ids], cands, sites=sites, replay=False, progress=False)
    assert set(fast) == set(sites)
    for site in sites:
        for c in cands:
            # Replaying the unchanged layers is the same computation: equal up to fp32 reordering (none seen).
            assert fast[site][c] == pytest.approx(full[site][c], rel=1e-6, abs=1e-9), (site, c)
    # Two-shot requantizes the reduced chunk: FACTS.md measured about twice the damage (1.3x is the floor here).
    assert fast["layer29.mlp"]["int4:g32+had@two-shot"] > 1.3 * fast["layer29.mlp"]["int4:g32+had"] > 0


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


def test_channel_scales_cut_the_damage_at_a_massive_activation_site(result: dict, real_ckpt) -> None:
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.codecs.chscale import exponents_from_rms
    from megatron_tpcomp.search import measure_sensitivity
    from megatron_tpcomp.tokenizer import TextTokenizer

    ids = TextTokenizer.from_checkpoint(read_metadata(real_ckpt)).tokenize(assets.calibration_text())[:64]
    scales = {k: exponents_from_rms(s["rms"]) for k, s in result["sites"].items()}
    assert min(scales["layer11.mlp"]) <= -4  # its massive channel (~24,000) is scaled down by 16x or more
    cands = ["int4:g64:se4m3+had", "int4:g64:se4m3+had+chscale"]
    sens = measure_sensitivity(str(real_ckpt), 3, [ids], cands, scales=scales, sites=["layer11.mlp"], progress=False)
    kl = sens["layer11.mlp"]
    # 512 calibration tokens measured 0.0064 -> 0.0022; on 64 tokens demand half.
    assert 0 < kl["int4:g64:se4m3+had+chscale"] < 0.5 * kl["int4:g64:se4m3+had"]


def test_cli_rejects_bad_search_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.json"
    for extra, message in (
        (["--candidates", "int4:g32@auto"], "algo 'auto'"),
        (["--ppl-budget", "-1"], "argument --ppl-budget: expected a finite number >= 0, got '-1'"),
        (["--ppl-budget", "1", "--kl-budget", "0"], "> 0 to start --ppl-budget"),
        (["--candidates", "int4:gq"], "int4:gq"),
    ):
        try:
            rc = calibration.main(["--out", str(out), "--search", *extra])
        except SystemExit as exc:  # a bad number is a usage error of the parser itself
            rc = exc.code
        assert rc == 2
        assert message in capsys.readouterr().err and not out.exists()
