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


def test_bad_values_fail_while_parsing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """argparse ``type=`` checks: a bad value exits 2 naming the flag, before any model is built."""
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"default": "int4:g7"}))
    cases = [
        (["--tp-comm-compression", "int4:g7"], "argument --tp-comm-compression: 'int4:g7'"),
        (["--tp-comm-compression", str(bad_config)], "int4:g7"),  # a config path, recognised by its suffix
        (["--tp-comm-compression-config", str(tmp_path / "none.yaml")], "none.yaml"),
        (["--tp-comm-compression-min-bytes", "-5"], "must be >= 0 bytes, got -5"),
        (["--tp-comm-compression-min-bytes", "lots"], "'lots' is not an integer"),
        (["--tp-comm-compression-algo", "ring"], "invalid choice: 'ring'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            parse(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv
    # config_from_args itself still refuses a bad value that bypassed the parser (a hand-made Namespace).
    with pytest.raises(ConfigError, match="int4:g7"):
        config_from_args(argparse.Namespace(tp_comm_compression="int4:g7"))


def test_environment_variable_is_the_default(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("TPCOMP_COMPRESSION", "fp8")
    assert config_from_args(parse([])).default.spec.startswith("fp8")
    assert config_from_args(parse(["--tp-comm-compression", "int8"])).default.spec.startswith("int8")
    monkeypatch.setenv("TPCOMP_COMPRESSION", "int4:g7")
    with pytest.raises(SystemExit):
        parse([])
    assert "(from $TPCOMP_COMPRESSION)" in capsys.readouterr().err


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


def _wrapped_and_listed(rank: int, world_size: int) -> dict:
    """enable() on what Megatron-LM's get_model returns: a list of chunks, each wrapped (``.module``)."""
    from megatron_tpcomp.megatron import intercept
    from tests.megatron.test_intercept import _setup

    class Wrapper(torch.nn.Module):  # Float16Module and DDP keep the model in .module, as this does
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    gpt, tokens, positions = _setup(world_size, False)
    chunks = [Wrapper(Wrapper(gpt))]
    megatron_tpcomp.enable(chunks, "fp8", telemetry=True)
    intercept.reset_counts()
    with torch.no_grad():
        chunks[0](tokens, positions, attention_mask=None)
    compressed = len(intercept.telemetry_records)
    megatron_tpcomp.disable(chunks)
    intercept.reset_counts()
    with torch.no_grad():
        chunks[0](tokens, positions, attention_mask=None)
    errors = []
    for bad in ([], [object()], "model"):
        try:
            megatron_tpcomp.enable(bad, "fp8")
        except ConfigError as exc:
            errors.append(str(exc))
    return {"compressed": compressed, "after_disable": len(intercept.telemetry_records), "errors": errors}


def test_enable_takes_a_list_of_wrapped_chunks() -> None:
    result = run_distributed(_wrapped_and_listed, 2, timeout_s=120)[0]
    assert result["compressed"] == 4  # 2 layers x (attention, mlp) all-reduces
    assert result["after_disable"] == 0
    assert len(result["errors"]) == 3 and "empty list" in result["errors"][0]
    assert "got object" in result["errors"][1] and "got str" in result["errors"][2]


def test_apply_args_on_a_real_model() -> None:
    results = run_distributed(_apply, 2, ["--tp-comm-compression", "fp8"], timeout_s=120)
    assert results[0]["records"] == [
        (f"layer{i}.{b}", "fp8-e4m3:b128:sfp32") for i in range(2) for b in ("attention", "mlp")
    ]
