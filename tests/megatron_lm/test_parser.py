"""The plug-in's flags on Megatron-LM's real parser (``megatron.training.arguments.parse_args``): no collision
with Megatron-LM's own flags, values checked while parsing (a bad spec never reaches the model), the launch's
chaining of a script's own ``extra_args_provider``, and the launch hooks installed and removed exactly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from megatron_tpcomp.megatron.args import ENV_VAR, add_arguments, config_from_args

pytestmark = pytest.mark.megatron

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
BASE += ["--max-position-embeddings", "32", "--micro-batch-size", "1"]


def megatron_parse(argv: list[str], provider=add_arguments) -> argparse.Namespace:
    """Megatron-LM's own parse_args (it reads ``sys.argv``) with ``provider`` as extra_args_provider."""
    from megatron.training.arguments import parse_args

    saved = sys.argv
    sys.argv = ["script.py", *argv]
    try:
        return parse_args(extra_args_provider=provider)
    finally:
        sys.argv = saved


def test_flags_parse_beside_megatron_lm_own(megatron_training: Path) -> None:
    args = megatron_parse(
        [*BASE, "--tp-comm-overlap", "--tp-comm-compression", "int4:g32+had", "--tp-comm-compression-algo", "two-shot"]
    )
    assert args.tp_comm_overlap is True  # Megatron-LM's own --tp-comm-* flag still parses
    assert args.tp_comm_compression == "int4:g32+had" and args.num_layers == 2
    config = config_from_args(args)
    assert config.default.spec == "int4:g32:sfp16+had:b32" and config.algo == "two-shot"
    # Off unless asked for.
    assert config_from_args(megatron_parse(BASE)) is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tp-comm-compression", "int4:g7"], "int4:g7"),
        (["--tp-comm-compression", "bogus"], "unknown codec 'bogus'"),
        (["--tp-comm-compression-min-bytes", "-1"], "must be >= 0"),
        (["--tp-comm-compression-algo", "ring"], "invalid choice: 'ring'"),
    ],
)
def test_bad_values_fail_while_parsing(
    megatron_training: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as info:
        megatron_parse([*BASE, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}" in err and expected in err, err


def test_bad_spec_message_is_the_spec_parser_s(megatron_training: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_tpcomp.config import CompressionConfig

    with pytest.raises(ValueError) as direct:
        CompressionConfig.from_spec("int4:g7")
    with pytest.raises(SystemExit):
        megatron_parse([*BASE, "--tp-comm-compression", "int4:g7"])
    assert str(direct.value) in capsys.readouterr().err


def test_config_file_recognised_by_suffix(megatron_training: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"default": "fp8", "layers": {"1": {"mlp": "none"}}}))
    config = config_from_args(megatron_parse([*BASE, "--tp-comm-compression", str(good)]))
    assert config.default.spec.startswith("fp8") and config.codec_for("mlp", 1) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: int4:g7\n")
    with pytest.raises(SystemExit):
        megatron_parse([*BASE, "--tp-comm-compression", str(bad)])
    assert "int4:g7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        megatron_parse([*BASE, "--tp-comm-compression-config", str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err


def test_environment_variable_is_the_default(
    megatron_training: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, "fp8")
    assert config_from_args(megatron_parse(BASE)).default.spec.startswith("fp8")
    # The flag wins over the variable.
    assert config_from_args(megatron_parse([*BASE, "--tp-comm-compression", "int8"])).default.spec.startswith("int8")
    monkeypatch.setenv(ENV_VAR, "int4:g7")
    with pytest.raises(SystemExit):
        megatron_parse(BASE)
    assert f"${ENV_VAR}" in capsys.readouterr().err


def test_launch_hooks_chain_the_script_s_provider(megatron_training: Path, capsys) -> None:
    """What ``python -m megatron_tpcomp.megatron_lm`` installs: initialize_megatron's parse_args chains the
    static inference script's own provider with ours; uninstalling restores the very same functions."""
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize

    from megatron_tpcomp import megatron_lm

    sys.path.insert(0, str(megatron_training / "examples" / "inference" / "gpt"))
    try:
        from utils import add_common_inference_args  # Megatron-LM's examples/inference/gpt/utils.py
    finally:
        sys.path.pop(0)
    before = (arguments.parse_args, initialize.parse_args)
    hooked = megatron_lm.install_hooks()
    try:
        assert set(hooked) == {
            "megatron.training.arguments.parse_args",
            "megatron.training.initialize.parse_args",
            "megatron.training.training.get_model",
            "megatron.training.get_model",
        }
        saved = sys.argv
        sys.argv = ["gpt_static_inference.py", *BASE, "--prompts", "hi", "--top_k", "1"]
        sys.argv += ["--tp-comm-compression", "int4:g32+had"]
        try:
            args = initialize.parse_args(add_common_inference_args, False)  # how initialize_megatron calls it
        finally:
            sys.argv = saved
        assert args.prompts == ["hi"] and args.top_k == 1 and args.tp_comm_compression == "int4:g32+had"
    finally:
        megatron_lm.uninstall_hooks()
    assert (arguments.parse_args, initialize.parse_args) == before


def test_parse_time_check_against_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_tpcomp import megatron_lm

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"default": "int8", "layers": {"5": {"mlp": "none"}}}))
    ns = argparse.Namespace(
        tp_comm_compression=None,
        tp_comm_compression_config=str(cfg),
        num_layers=2,
        hidden_size=64,
        tensor_model_parallel_size=2,
    )
    with pytest.raises(SystemExit) as info:
        megatron_lm.check_parsed(ns)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tp-comm-compression-config" in err and "layer 5" in err and str(cfg) in err
    ns.num_layers = None  # --use-checkpoint-args: the architecture is not known yet, checked at enable()
    megatron_lm.check_parsed(ns)
