"""The zero-edit launch's warnings for CUDA graphs and ``--tp-comm-overlap``, through Megatron-LM's real arguments.

The launch (``python -m megatron_tpcomp.megatron_lm``) applies compression right after ``get_model``; by then
``initialize_megatron`` has parsed the flags (through the launch's hooked ``parse_args``, which chains the
plug-in's flags onto the script's parser) and run Megatron-LM's ``validate_args``, which rewrites the deprecated
``--enable-cuda-graph`` / ``--external-cuda-graph`` into ``--cuda-graph-impl local`` / ``transformer_engine`` and
deletes them. The tests take that same path: hooked ``parse_args`` -> ``validate_args`` (with the CPU patches a
CPU launch installs) -> ``warn_unverified``, called twice (a script that builds its model twice), with Python's
own once-per-location filter off so "once" is the plug-in's doing. Fast: nothing is built or run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.megatron_lm.test_parser import BASE

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(torch.cuda.is_available(), reason="validate_args runs here with the CPU launch's patches"),
]

SPEC = ["--tp-comm-compression", "int4:g32+had"]
# --tp-comm-overlap needs sequence parallelism, which validate_args turns off at TP=1: TP=2 over 2 ranks.
OVERLAP = ["--tp-comm-overlap", "--tensor-model-parallel-size", "2", "--sequence-parallel"]


@pytest.fixture
def launch_hooks(megatron_training: Path) -> Iterator[None]:
    """The launch's hooks installed, and its once-per-flag memory empty, for one test (both restored after)."""
    from megatron_tpcomp import megatron_lm
    from megatron_tpcomp.megatron import args as plugin_args

    saved = set(plugin_args.WARNED)
    plugin_args.WARNED.clear()
    megatron_lm.install_hooks()
    try:
        yield
    finally:
        megatron_lm.uninstall_hooks()
        plugin_args.WARNED.clear()
        plugin_args.WARNED.update(saved)


def launch_args(argv: list[str], monkeypatch: pytest.MonkeyPatch, world_size: int = 1) -> argparse.Namespace:
    """``argv`` as ``initialize_megatron`` sees it under the launch: the hooked parse_args (no script provider,
    as ``run_text_generation_server.py``'s own is chained the same way), then Megatron-LM's validate_args."""
    import megatron.training.initialize as initialize
    from megatron.training.arguments import validate_args

    from megatron_tpcomp.megatron.cpu import cpu_megatron

    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # parse_args reads the world size from torchrun's env
    monkeypatch.setattr(sys, "argv", ["script.py", *BASE, *argv])
    args = initialize.parse_args(None, False)
    with cpu_megatron(inference=False, training=True):  # T2: validate_args asks the device arch at TP > 1
        validate_args(args, {})
    return args


def warned_twice(args: argparse.Namespace, caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(warnings.warn messages, log records) of two ``warn_unverified`` calls on the same arguments."""
    from megatron_tpcomp.megatron.args import warn_unverified

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "megatron_tpcomp"):
        warnings.simplefilter("always")  # Python's default filter would hide a repeat from the same line
        warn_unverified(args)
        warn_unverified(args)
    said = [str(w.message) for w in caught if "megatron-tpcomp" in str(w.message)]
    logged = [r.getMessage() for r in caplog.records if r.name == "megatron_tpcomp"]
    return said, logged


@pytest.mark.parametrize(
    ("flags", "world_size", "named"),
    [
        (["--cuda-graph-impl", "local"], 1, "--cuda-graph-impl local"),
        (["--cuda-graph-impl", "transformer_engine"], 1, "--cuda-graph-impl transformer_engine"),
        # Deprecated spellings: validate_args has rewritten them, the warning still names what was typed.
        (["--enable-cuda-graph"], 1, "--enable-cuda-graph"),
        (["--external-cuda-graph"], 1, "--external-cuda-graph"),
        (OVERLAP, 2, "--tp-comm-overlap is on"),
    ],
    ids=["graph-local", "graph-te", "enable-cuda-graph", "external-cuda-graph", "tp-comm-overlap"],
)
def test_each_flag_warns_once_naming_it(
    launch_hooks: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    flags: list[str],
    world_size: int,
    named: str,
) -> None:
    said, logged = warned_twice(launch_args([*flags, *SPEC], monkeypatch, world_size), caplog)
    assert len(said) == 1 and named in said[0], said
    assert logged == said, logged  # the log line (what rank logs show) is the same single message
    if "overlap" in named:
        assert "uncompressed" in said[0] and "cuda-graph" not in said[0], said
    else:
        assert "CUDA-graph capture" in said[0] and "tp-comm-overlap" not in said[0], said


def test_both_on_warn_once_each(
    launch_hooks: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    args = launch_args(["--cuda-graph-impl", "local", *OVERLAP, *SPEC], monkeypatch, world_size=2)
    said, _ = warned_twice(args, caplog)
    assert len(said) == 2, said
    assert sum("--cuda-graph-impl local" in s for s in said) == 1 and sum("--tp-comm-overlap" in s for s in said) == 1


@pytest.mark.parametrize(
    ("flags", "world_size"),
    [
        ([], 1),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),  # SP alone is not the overlap
        (["--cuda-graph-impl", "none", "--inference-dynamic-batching-num-cuda-graphs", "4"], 1),  # graphs off
    ],
    ids=["plain", "sequence-parallel", "graph-impl-none"],
)
def test_no_warning_without_the_flags(
    launch_hooks: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    flags: list[str],
    world_size: int,
) -> None:
    args = launch_args([*flags, *SPEC], monkeypatch, world_size)
    assert args.tp_comm_compression == "int4:g32+had"  # compression on: only the flags are missing
    assert warned_twice(args, caplog) == ([], [])


def test_no_warning_when_compression_is_off(
    launch_hooks: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``apply_to`` (what the hooked get_model calls) warns only when it turns compression on: with the flags
    but no --tp-comm-compression, Megatron's own collectives run and there is nothing unverified to warn about."""
    from megatron.training import global_vars

    from megatron_tpcomp import megatron_lm
    from megatron_tpcomp.megatron import args as plugin_args

    args = launch_args(["--cuda-graph-impl", "local", *OVERLAP], monkeypatch, world_size=2)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)  # what initialize_megatron's set_global_variables does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        megatron_lm.apply_to([])  # returns before touching the (here empty) list of chunks
    assert [str(w.message) for w in caught if "megatron-tpcomp" in str(w.message)] == []
    assert "compression off" in capsys.readouterr().out
    assert plugin_args.WARNED == set()
