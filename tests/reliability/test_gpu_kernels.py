"""Reliability: the kernel dispatch (``megatron_tpcomp/backends/dispatch.py``) and the Triton codecs under hostile
settings and inputs. Each case runs in a fresh interpreter, because whether the Triton kernels are built for the
GPU or for Triton's interpreter is fixed when they are imported.

Findings (each test fails on the code before its fix):

- ``TPCOMP_BACKEND`` (then ``TPCOMP_GPU_KERNELS``) with a typo (``fast``) was not a setting at all (nothing read
  it): now a one-line error naming the variable, the value and the valid ones, before any work.
- ``TPCOMP_BACKEND=triton`` on a CPU tensor without ``TRITON_INTERPRET=1``: a one-line error saying what to set,
  not a Triton launch on host memory.
- Triton's interpreter widens bf16 subnormals wrongly (2^-126 * 0.1 became 7e-39): the kernels widen bf16 by a bit
  shift, so bf16 inputs with subnormals encode to the reference's bytes (75 of 2,448 bytes differed before).
- A payload of the wrong size with ``TPCOMP_BACKEND=triton``: a one-line CodecError before the kernel would read
  past the buffer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed (the megatron-lm extra brings it)")


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TPCOMP_BACKEND")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "CUDA_VISIBLE_DEVICES": "", **env},
    )


def last_line(res: subprocess.CompletedProcess) -> str:
    return (res.stdout.strip().splitlines() or [""])[-1]


def test_reliability_gpu_kernels_env_typo_is_one_line_error():
    res = run_py(
        """
        import torch
        from megatron_tpcomp.codecs import make_codec
        try:
            make_codec("int4:g32+had").encode(torch.ones(8))
        except Exception as e:
            print(type(e).__name__, "|", e)
        """,
        TPCOMP_BACKEND="fast",
    )
    line = last_line(res)
    assert line.startswith("CodecError |"), res.stdout + res.stderr
    assert "TPCOMP_BACKEND='fast'" in line and "auto, reference, cpu, triton, cuda, te" in line


def test_reliability_gpu_kernels_forced_triton_on_cpu_without_interpreter():
    res = run_py(
        """
        import torch
        from megatron_tpcomp.codecs import make_codec
        try:
            make_codec("int5:g64:se4m3+had").encode(torch.ones(8))
        except Exception as e:
            print(type(e).__name__, "|", e)
        """,
        TPCOMP_BACKEND="triton",
    )
    line = last_line(res)
    assert line.startswith("BackendUnavailableError |") and "set TRITON_INTERPRET" in line, res.stdout + res.stderr


def test_reliability_gpu_kernels_bf16_subnormals_and_bad_payload():
    res = run_py(
        """
        import os, torch
        from megatron_tpcomp.codecs import make_codec
        from megatron_tpcomp import backends
        codec = make_codec("int4:g32")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4296, generator=g).to(torch.bfloat16)
        x[4096:] = x[4096:] * torch.finfo(torch.bfloat16).tiny  # bf16 subnormals fill the second super-block
        os.environ["TPCOMP_BACKEND"] = "reference"
        ref = codec.encode(x)
        os.environ["TPCOMP_BACKEND"] = "triton"
        got = codec.encode(x)
        assert backends.choose(codec, "encode", x.device, x.dtype).backend == "triton", "the kernel did not run"
        print("bytes differ:", int((got != ref).sum()), "of", ref.numel())
        try:
            codec.decode_sum(ref[:-16], 1, x.shape, torch.float32)
        except Exception as e:
            print(type(e).__name__, "|", e)
        """,
        TRITON_INTERPRET="1",
    )
    lines = res.stdout.strip().splitlines()
    assert len(lines) >= 2, res.stdout + res.stderr
    assert lines[-2].startswith("bytes differ: 0 of"), lines[-2]
    assert lines[-1].startswith("CodecError |") and "payload has shape" in lines[-1], lines[-1]
