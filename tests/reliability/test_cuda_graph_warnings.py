"""Reliability: the CUDA-graph / ``--tp-comm-overlap`` warnings name what the user typed and are not skipped by
the three-line patch (``megatron_tpcomp.apply_args``) or by arguments Megatron-LM has not validated yet."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

import megatron_tpcomp
from megatron_tpcomp.launch import run_distributed
from tests.megatron_lm.conftest import megatron_lm_dir, megatron_training  # noqa: F401 - fixtures used here
from tests.megatron_lm.test_overlap_warnings import SPEC, launch_args, launch_hooks, warned_twice  # noqa: F401
from tests.megatron_lm.test_parser import BASE

pytestmark = pytest.mark.megatron
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="validate_args runs here with the CPU patches")


@CPU_ONLY
@pytest.mark.parametrize(
    ("typed", "impl"), [("--enable-cuda-graph", "local"), ("--external-cuda-graph", "transformer_engine")]
)
def test_deprecated_graph_flag_is_named_after_validate_args_rewrote_it(
    launch_hooks: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    typed: str,
    impl: str,
) -> None:
    """Before: validate_args turns --enable-cuda-graph into cuda_graph_impl='local' and deletes it, and the
    warning named only '--cuda-graph-impl local', a flag the user never typed."""
    args = launch_args([typed, *SPEC], monkeypatch)
    assert args.cuda_graph_impl == impl and not hasattr(args, typed[2:].replace("-", "_"))  # Megatron's rewrite
    (said,), _ = warned_twice(args, caplog)
    assert typed in said and f"--cuda-graph-impl {impl}" in said, said


@CPU_ONLY
def test_external_cuda_graph_warns_before_validation(
    launch_hooks: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: parsed but not yet validated (cuda_graph_impl still 'none'), --external-cuda-graph gave no warning
    at all (only --enable-cuda-graph was looked at)."""
    import megatron.training.initialize as initialize

    monkeypatch.setattr("sys.argv", ["script.py", *BASE, "--external-cuda-graph", *SPEC])
    args = initialize.parse_args(None, False)  # the launch's hooked parser, no validate_args
    assert args.external_cuda_graph and args.cuda_graph_impl == "none"
    (said,), _ = warned_twice(args, caplog)
    assert "--external-cuda-graph (--cuda-graph-impl transformer_engine)" in said, said


def _apply_args_warnings(rank: int, world_size: int) -> list[str]:
    """The three-line patch on a real TP=1 GPT: ``apply_args(model, args)`` twice with CUDA graphs on."""
    from megatron_tpcomp.megatron import args as plugin_args
    from tests.megatron.test_intercept import _setup

    gpt, _, _ = _setup(world_size, False)
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda-graph-impl", default="none")  # Megatron-LM's flag, as get_args() carries it
    megatron_tpcomp.add_arguments(parser)
    args = parser.parse_args(["--cuda-graph-impl", "local", *SPEC])
    plugin_args.WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        megatron_tpcomp.apply_args(gpt, args)
        megatron_tpcomp.disable(gpt)
        megatron_tpcomp.apply_args(gpt, args)
    megatron_tpcomp.disable(gpt)
    return [str(w.message) for w in caught if "megatron-tpcomp" in str(w.message)]


def test_three_line_patch_warns_once_too() -> None:
    """Before: only the zero-edit launch warned; apply_args (the documented three-line patch) said nothing."""
    said = run_distributed(_apply_args_warnings, 1, timeout_s=180)[0]  # rank 0
    assert len(said) == 1 and "--cuda-graph-impl local (or the deprecated --enable-cuda-graph)" in said[0], said
