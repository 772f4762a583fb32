"""``python scripts/tp_forward_check.py``: argument handling everywhere, the CUDA step's answer without CUDA, and
the whole check on the CPU with the toy model at TP=2 (real gloo ranks, real megatron-core model, real codecs):
the JSON's numbers are in range, compressed modes send fewer bytes than uncompressed, fp8 barely moves the
logits, and every rank gathered the same logits."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "tp_forward_check.py"
_spec = importlib.util.spec_from_file_location("tp_forward_check", SCRIPT)
tfc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tfc)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer; on a GPU the step runs the check")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize(("text", "tokens"), [("2x128", (2, 128)), ("1X16", (1, 16))])
def test_parse_tokens(text: str, tokens: tuple[int, int]) -> None:
    assert tfc.parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["", "128", "2x0", "2x3x4", "two"])
def test_parse_tokens_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=f"tokens {text!r}: expected BATCHxSEQUENCE"):
        tfc.parse_tokens(text)


def test_smollm2_shape_splits_three_ways_not_two() -> None:
    """SmolLM2-135M's 9 heads / 3 KV heads: the check's default TP size is 3 because 2 cannot work."""
    from megatron_tpcomp.megatron.model import ModelConfig

    cfg = ModelConfig.from_dict(tfc.model_shape(False, None))
    cfg.check_tp(3)
    with pytest.raises(ValueError, match="num_attention_heads=9"):
        cfg.check_tp(2)
    assert tfc.model_shape(False, 4)["num_layers"] == 4 and tfc.model_shape(True, None)["hidden_size"] == 64


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tp", "2"], "TP size 2 does not divide: num_attention_heads=9"),
        (["--tp", "0"], "--tp 0: expected an integer >= 1"),
        (["--layers", "0"], "--layers 0: expected an integer >= 1"),
        (["--reps", "-1"], "--reps -1: expected an integer >= 0"),
        (["--tokens", "2x0"], "--tokens: tokens '2x0'"),
        (["--specs", "int4:g7"], "invalid codec spec 'int4:g7'"),
        (["--specs", ","], "--specs ','"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        *([(["--device", "cpu"], "--device cpu needs a machine without CUDA")] if torch.cuda.is_available() else []),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        tfc.main(args)  # in this process: argparse's exit, before any rank or device
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    assert expected in err, err
    assert "skipped" not in out  # rejected before the device is looked at


@NO_CUDA
def test_cuda_without_cuda_says_skipped(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    res = cli("--json", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "skipped: no CUDA"
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and result["tp"] == 3 and result["model"]["num_layers"] == 30
    assert result["skipped_modes"] == []  # the searched config fits SmolLM2's shape at TP=3


@pytest.mark.megatron
@NO_CUDA  # megatron-core's CPU patches refuse a machine with CUDA
def test_small_model_on_cpu_at_tp2(tmp_path: Path) -> None:
    """Bounds (toy model, 2 x 16 tokens, fp32): fp8 keeps every argmax here (measured: 1.0, KL ~1e-6), so a
    top-1 agreement under 0.9 or a KL over 1e-3 is a broken codec path, not noise; int4:g32+had measured KL ~2e-5."""
    pytest.importorskip("megatron.core", reason="builds a megatron-core model")
    out = tmp_path / "tp.json"
    res = cli(
        "--device", "cpu", "--small", "--tp", "2", "--tokens", "2x16", "--reps", "2",
        "--specs", "fp8,int4:g32+had,searched", "--json", str(out), timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["status"] == "ok" and result["ranks_identical"] is True
    assert result["transport"] == "gloo, CPU tensors" and result["device"] == "cpu" and result["tp"] == 2
    (skip,) = result["skipped_modes"]  # the shipped config is for 30 layers at TP=3
    assert skip.startswith("searched config:") and "num_layers=30" in skip
    assert f"skipped: {skip}" in res.stdout
    modes = {m["name"]: m for m in result["modes"]}
    assert list(modes) == ["uncompressed", "fp8", "int4:g32+had"]
    ref = modes["uncompressed"]
    assert ref["max_abs_logit_diff"] == 0.0 and ref["top1_agreement"] == 1.0 and ref["kl"] == 0.0
    assert ref["compressed_calls"] == 0 and ref["kernels"] == [] and ref["wire_bytes"] > 0
    layers = result["model"]["num_layers"]
    for name in ("fp8", "int4:g32+had"):
        m = modes[name]
        assert m["ok"] and m["finite"], m
        assert m["raw_bytes"] == ref["raw_bytes"] and m["calls"] == ref["calls"]
        assert 0 < m["wire_bytes"] < ref["wire_bytes"], (name, m["wire_bytes"], ref["wire_bytes"])
        assert m["compressed_calls"] == 2 * layers  # attention and MLP all-reduce of every layer
        assert 0.0 < m["max_abs_logit_diff"] < 1.0 and 0.0 < m["kl"] < 1e-2, m
        assert m["ms_per_forward"] > 0 and len(m["ms_all"]) == 2
        ops = {(k["op"], k["backend"]) for k in m["kernels"] if "backend" in k}
        assert {op for op, _ in ops} == {"encode", "decode"}, m["kernels"]
        assert all(backend in ("cpu", "reference") for _, backend in ops), m["kernels"]
    assert modes["fp8"]["top1_agreement"] >= 0.9 and modes["fp8"]["kl"] < 1e-3, modes["fp8"]
    assert modes["int4:g32+had"]["wire_bytes"] < modes["fp8"]["wire_bytes"]
