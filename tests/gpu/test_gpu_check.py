"""``scripts/gpu_check.sh``: the steps it lists with ``--dry-run`` and that it reports every step past failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("env", "build_cuda_ext", "tests_gpu", "tests_interpret", "bench_kernels")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_gpu_check_dry_run_lists_every_step():
    """Every step in order with its command and limit; the limits fit one 8-minute command; nothing is run."""
    res = run("--dry-run", "--out", "/nonexistent/gpu_check_out")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    found = [m.group(1) for m in (re.match(r"gpu_check: step (\w+)", line) for line in lines) if m]
    assert found == [*STEPS, "report"], res.stdout
    by_step = dict(zip(found, lines, strict=True))
    assert "setup.py build_ext --inplace" in by_step["build_cuda_ext"]
    assert "cuda_int4_available" in by_step["build_cuda_ext"]  # a build that built nothing fails the step
    assert "env -u TRITON_INTERPRET" in by_step["tests_gpu"] and "tests/gpu" in by_step["tests_gpu"]
    assert "TRITON_INTERPRET=1" in by_step["tests_interpret"] and "-k interpret" in by_step["tests_interpret"]
    assert "megatron_tpcomp.gpu.bench" in by_step["bench_kernels"]
    assert "/nonexistent/gpu_check_out/bench.json" in by_step["bench_kernels"]
    assert "/nonexistent/gpu_check_out/gpu_check.json" in by_step["report"]
    limits = [int(re.search(r"\(limit (\d+) s\)", by_step[s]).group(1)) for s in STEPS]
    assert sum(limits) <= 8 * 60 - 20, f"step limits {limits} leave no room in an 8-minute command"
    assert not Path("/nonexistent/gpu_check_out").exists()


def test_gpu_check_rejects_unknown_argument():
    res = run("--fast")
    assert res.returncode == 2 and "unknown argument '--fast'" in res.stderr


def test_gpu_check_reports_every_step_past_failures(tmp_path):
    """With 1-second limits every step fails or times out here, and the JSON report still lists all of them."""
    limits = {f"TIMEOUT_{s.upper()}": "1" for s in STEPS}
    res = run("--out", str(tmp_path), PYTHON=sys.executable, **limits)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(STEPS)
    for step in report["steps"]:
        assert set(step) >= {"exit", "ok", "timed_out", "seconds", "log_tail"}
        if not step["ok"]:
            assert step["exit"] != 0
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
        assert report["ok"] is False and not report["steps"][0]["ok"], "no GPU here: the env step must fail"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_gpu_check_help(flag):
    res = run(flag)
    assert res.returncode == 0 and "--dry-run" in res.stdout


COMPILE_CHECK = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.gpu import triton_codecs as tc

assert not tc.INTERPRETED
enc_sig = dict(x_ptr="*bf16", payload_ptr="*u8", signs_ptr="*fp32", n="i32", nblocks="i32", scales_off="i32",
               exps_off="i32", rot_c="fp32")
dec_sig = dict(payload_ptr="*u8", out_ptr="*bf16", signs_ptr="*fp32", count="i32", nbytes="i32", n="i32",
               nblocks="i32", scales_off="i32", exps_off="i32", rot_c="fp32", out_max="fp32")
for arch, spec in itertools.product((80, 90), ("int4:g32", "int5:g64:se4m3+had", "int6:g128+had:b128")):
    codec = make_codec(spec)
    inner, had = tc._split(codec)
    cx = tc._constexprs(inner, had)
    for kind, kernel, sig, const in (
        ("encode", tc._encode_kernel, enc_sig, {**cx, "IN_BF16": True}),
        ("decode_sum", tc._decode_sum_kernel, dec_sig,
         {k: v for k, v in cx.items() if k not in ("LIM_MANT_BITS", "LIM_EXP")} | {"OUT": 2}),
    ):
        signature = {**sig, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(kernel, signature, const), target=GPUTarget("cuda", arch, 32),
                           options={"enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        bad = [op for op in ("fma.", "div.full", "div.approx", "rcp.approx") if op in ptx]
        print(f"{kind} {spec} sm_{arch}: {'ok' if not bad else 'uses ' + ', '.join(bad)}")
"""


def test_triton_kernels_compile_for_sm80_sm90_without_fast_math():
    """The real Triton compiler (no GPU needed: PTX and ptxas only) builds the encode and decode-sum kernels for
    sm_80 and sm_90, and their PTX has no FMA contraction and no approximate division or reciprocal: what the
    interpreter tests cannot see (it caught a constexpr reassignment the interpreter accepts)."""
    pytest.importorskip("triton", reason="triton is not installed (the megatron-lm extra brings it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip(f"triton's ptxas is unavailable here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 12 and all(line.endswith(": ok") for line in lines), res.stdout
