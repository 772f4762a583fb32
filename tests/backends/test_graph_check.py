"""``python scripts/graph_check.py``: its argument handling everywhere; the capture itself on CUDA.

On a CPU machine the check must say ``skipped: no CUDA`` (the GPU check's ``cuda_graph_capture`` step reads that
line) after validating its arguments, so a bad spec or shape fails the same way with or without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "graph_check.py"
_spec = importlib.util.spec_from_file_location("graph_check", SCRIPT)
graph_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_check)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; the CUDA test covers a GPU")


def cli(*args: str) -> subprocess.CompletedProcess:
    """The script as the GPU check runs it (a fresh interpreter: the dispatch's env var is read there)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize(("text", "shape"), [("4x576", (4, 576)), ("576", (576,)), ("2X3x64", (2, 3, 64))])
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert graph_check.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "4x", "0x576", "4x-1", "four", "4.5x2"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=f"shape {text!r}: expected dimensions >= 1"):
        graph_check.parse_shape(text)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--spec", "int4:g7"], "--spec 'int4:g7': invalid codec spec 'int4:g7'"),
        (["--spec", "bogus"], "unknown codec 'bogus'"),
        (["--shape", "4x0"], "--shape: shape '4x0'"),
        (["--count", "0"], "--count 0: expected an integer >= 1"),
        (
            ["--modes", "auto,fast"],
            "--modes 'auto,fast': expected a comma-separated list from auto, reference, cpu, triton, cuda, te",
        ),
        (["--modes", ","], "--modes ','"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--forward-layers", "-1"], "--forward-layers -1: expected an integer >= 0"),
        (["--tokens", "16"], "--tokens: tokens '16': expected BATCHxSEQUENCE"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(args: list[str], expected: str) -> None:
    res = cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert expected in res.stderr, res.stderr
    assert "skipped" not in res.stdout  # rejected before the device is looked at


@NO_CUDA
def test_without_cuda_it_says_skipped(tmp_path: Path) -> None:
    out = tmp_path / "graph.json"
    res = cli("--json", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "skipped: no CUDA"
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and result["reason"] == "no CUDA" and result["modes"] == []
    # The spec is canonicalised (validated) even when nothing runs.
    assert result["spec"] == "int4:g32:sfp16+had:b32" and result["shape"] == [4, 576] and result["count"] == 2


@NO_CUDA
def test_run_without_cuda_validates_the_spec_first() -> None:
    with pytest.raises(ValueError, match="int4:g7"):
        graph_check.run("int4:g7")
    assert graph_check.run(dtype=torch.float16)["dtype"] == "float16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph: needs CUDA")
def test_capture_and_replay_equal_eager_on_cuda() -> None:
    """Both dispatch modes: bit-identical replay on two inputs (the module docstring says why exactly)."""
    result = graph_check.run(forward_layers=0)  # the whole forward has its own test below
    assert result["status"] == "ok", result
    assert [m["mode"] for m in result["modes"]] == ["auto", "reference"]
    for m in result["modes"]:
        assert m["max_abs_diff_a"] == 0.0 and m["max_abs_diff_b"] == 0.0, m


FORWARD_STAND_IN = r"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("graph_check", sys.argv[1])
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)
rows = [gc.check_forward("int4:g32+had", 1, (1, 8), ("auto", "reference"), device=torch.device("cpu"))]
# A torch whose fake process group does not copy in its all-gather: the check replaces the one-shot gather.
from megatron_tpcomp.collectives import one_shot, transport
original = one_shot.all_gather_flat
transport.all_gather_flat = lambda out, inp, group=None, async_op=False: None
rows.append(gc.check_forward("int4:g32+had", 1, (1, 8), ("auto",), device=torch.device("cpu")))
rows.append(one_shot.all_gather_flat is original)
print(json.dumps(rows))
"""


@pytest.mark.megatron
@NO_CUDA
def test_forward_check_set_up_on_cpu() -> None:
    """The whole-forward check's set-up without a GPU: the fake TP=3 world, the megatron-core model with the
    plug-in, the compressed path taken in the "captured" forward (one per block per layer) and the comparisons,
    with a second eager call standing in for capture and replay (a CPU has no graphs; the CUDA test covers them).
    Also the branch for a fake all-gather that does not copy, and that the one-shot gather is restored after."""
    pytest.importorskip("megatron.core", reason="builds a megatron-core model")
    res = subprocess.run(
        [sys.executable, "-c", FORWARD_STAND_IN, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    native, replaced, restored = json.loads(res.stdout.strip().splitlines()[-1])
    assert native["status"] == "ok", native
    assert native["gather"].startswith("the fake process group's all-gather")
    assert [m["mode"] for m in native["modes"]] == ["auto", "reference"]
    for m in native["modes"]:
        assert m["ok"] and m["captured_compressed_calls"] == 2, m
        assert m["max_abs_diff_a"] == 0.0 and m["max_abs_diff_b"] == 0.0
    assert native["modes"][1]["kernel"] == "reference"
    assert native["model"]["hidden_size"] == 576 and native["model"]["num_layers"] == 1 and native["tp"] == 3
    assert replaced["status"] == "ok" and replaced["gather"].startswith("one_shot.all_gather_flat replaced"), replaced
    assert restored is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph: needs CUDA")
def test_whole_forward_capture_equals_eager_on_cuda() -> None:
    """A 2-layer SmolLM2-shaped forward with the plug-in's compressed all-reduces, captured and replayed."""
    pytest.importorskip("megatron.core", reason="builds a megatron-core model")
    result = graph_check.check_forward()
    assert result["status"] == "ok", result
    for m in result["modes"]:
        assert m["captured_compressed_calls"] == 2 * graph_check.DEFAULT_FORWARD_LAYERS, m
