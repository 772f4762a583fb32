"""Megatron-style flags: parsing, help, and applying them to a real TP=2 model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import megatron_tpcomp
from megatron_tpcomp.config import ConfigError
from megatron_tpcomp.launch import run_distributed
from megatron_tpcomp.megatron.args import config_from_args

pytestmark = pytest.mark.megatron


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)  # a Megatron flag beside ours
    megatron_tpcomp.add_arguments(parser)
    return parser.parse_args(argv)


def test_off_by_default() -> None:
    assert config_from_args(parse([])) is None


def test_spec_flag_and_overrides() -> None:
    cfg = config_from_args(
        parse(
            [
                "--tp-comm-compression",
                "int4:g32+had",
                "--tp-comm-compression-min-bytes",
                "65536",
                "--tp-comm-compression-algo",
                "two-shot",
            ]
        )
    )
    assert cfg.default.spec == "int4:g32:sfp16+had:b32" and cfg.min_bytes == 65536 and cfg.algo == "two-shot"
    assert cfg.embedding.spec == "none" and cfg.logits.spec == "none"


def test_config_file_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"default": "fp8", "layers": {"1": {"mlp": "none"}}, "min_bytes": 8}))
    cfg = config_from_args(parse(["--tp-comm-compression", "int8", "--tp-comm-compression-config", str(path)]))
    assert cfg.default.spec.startswith("fp8") and cfg.codec_for("mlp", 1) is None and cfg.min_bytes == 8


def test_bad_values_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="int4:g7"):
        config_from_args(parse(["--tp-comm-compression", "int4:g7"]))
    with pytest.raises(SystemExit):
        parse(["--tp-comm-compression-algo", "ring"])
    assert "invalid choice: 'ring'" in capsys.readouterr().err


def test_help_explains_the_flags() -> None:
    parser = argparse.ArgumentParser()
    megatron_tpcomp.add_arguments(parser)
    text = parser.format_help()
    for flag in (
        "--tp-comm-compression SPEC",
        "--tp-comm-compression-config FILE",
        "--tp-comm-compression-min-bytes",
        "one-shot",
        "mxfp4",
    ):
        assert flag in text


def _apply(rank: int, world_size: int, argv: list[str]) -> dict:
    from megatron_tpcomp.megatron import intercept
    from tests.megatron.test_intercept import _setup

    gpt, tokens, positions = _setup(world_size, False)
    args = parse(argv)
    megatron_tpcomp.apply_args(gpt, args, telemetry=True)
    intercept.reset_counts()
    with torch.no_grad():
        gpt(tokens, positions, attention_mask=None)
    records = sorted({(site, s.spec) for site, s in intercept.telemetry_records})
    megatron_tpcomp.disable(gpt)
    return {"records": records}


def test_apply_args_on_a_real_model() -> None:
    results = run_distributed(_apply, 2, ["--tp-comm-compression", "fp8"], timeout_s=120)
    assert results[0]["records"] == [
        (f"layer{i}.{b}", "fp8-e4m3:b128:sfp32") for i in range(2) for b in ("attention", "mlp")
    ]
