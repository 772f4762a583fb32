"""Reliability of the Megatron-LM launch surface: what a user types wrong fails at once, naming what is wrong.

Each test failed on the code before the change it pins (noted per test)."""

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


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpt_static_inference.py")
    megatron_tpcomp.add_arguments(parser)
    return parser.parse_args(argv)


def test_bad_spec_fails_while_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``int4:g7`` parsed fine and failed in apply_args, after the model was built and loaded."""
    with pytest.raises(SystemExit) as info:
        _parse(["--tp-comm-compression", "int4:g7"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tp-comm-compression: 'int4:g7'" in err and "block size 7" in err


def test_config_path_where_a_spec_is_expected(tmp_path: Path) -> None:
    """Before: ``--tp-comm-compression cfg.json`` was parsed as a codec spec ('unknown codec')."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"default": "int8:g32", "layers": {"0": {"mlp": "none"}}}))
    config = config_from_args(_parse(["--tp-comm-compression", str(path)]))
    assert config.codec_for("mlp", 0) is None and config.codec_for("mlp", 1) is not None


def test_bad_environment_value_names_the_variable(monkeypatch, capsys) -> None:
    """Before: $TPCOMP_COMPRESSION was not read at all (silently uncompressed)."""
    monkeypatch.setenv("TPCOMP_COMPRESSION", "fp8:b0")
    with pytest.raises(SystemExit):
        _parse([])
    assert "'fp8:b0' (from $TPCOMP_COMPRESSION)" in capsys.readouterr().err
    monkeypatch.setenv("TPCOMP_COMPRESSION", "fp8")
    assert config_from_args(_parse([])).default.spec.startswith("fp8")


def _enable_get_model_output(rank: int, world_size: int) -> str:
    from megatron_tpcomp.megatron import intercept
    from tests.megatron.test_intercept import _setup

    gpt, tokens, positions = _setup(world_size, False)

    class Float16ModuleLike(torch.nn.Module):
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

    chunks = [Float16ModuleLike(gpt)]  # what Megatron-LM's get_model returns
    megatron_tpcomp.enable(chunks, "int8", telemetry=True)
    intercept.reset_counts()
    with torch.no_grad():
        gpt(tokens, positions, attention_mask=None)
    megatron_tpcomp.disable(chunks)
    return ",".join(sorted({site for site, _ in intercept.telemetry_records}))


def test_enable_accepts_get_model_s_list_of_wrapped_chunks() -> None:
    """Before: AttributeError: 'list' object has no attribute 'config'."""
    sites = run_distributed(_enable_get_model_output, 2, timeout_s=120)[0]
    assert sites == "layer0.attention,layer0.mlp,layer1.attention,layer1.mlp"


def test_enable_rejects_what_is_not_a_model_in_one_line() -> None:
    """Before: AttributeError deep inside enable() for a list or a string."""
    for bad, expected in (([], "empty list"), ("int4", "got str"), ([1], "got int")):
        with pytest.raises(ConfigError, match=expected):
            megatron_tpcomp.enable(bad, "int4")


def test_megatron_args_on_a_directory_that_is_no_checkpoint(tmp_path: Path, capsys) -> None:
    """New command; a wrong path is one line and exit 2, not a traceback."""
    from megatron_tpcomp.cli import main

    assert main(["megatron-args", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpcomp megatron-args: error:") and err.count("\n") == 1


def test_recorded_architecture_disagreeing_with_flags_is_named() -> None:
    """Before: shards held no args, so nothing could notice a wrong --rotary-base (Megatron-LM loads with
    strict=False and "successfully loads"); the launch now refuses before building the model."""
    from megatron_tpcomp.checkpoint.megatron_args import megatron_args, mismatches
    from megatron_tpcomp.megatron.model import ModelConfig

    recorded = megatron_args(ModelConfig(rotary_base=100000.0, norm_epsilon=9.999999747378752e-06), 2, "float32")
    given = argparse.Namespace(**vars(recorded))
    given.norm_epsilon = 1e-5  # what a user types for the float32 value: the same
    assert mismatches(recorded, given) == []
    given.rotary_base, given.untie_embeddings_and_output_weights = 10000, True
    assert mismatches(recorded, given) == [
        "--rotary-base 10000 (checkpoint: 100000)",
        "--untie-embeddings-and-output-weights True (checkpoint: False)",
    ]
