"""The CUDA sources compile for sm_80 and sm_90, and the torch binding passes a syntax check (nvcc here is a
compiler only; the kernels run in tests/gpu/ where a GPU is lent)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: CUDA compile check needs it")
def test_cuda_sources_and_binding_compile() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_cuda.sh")],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": __import__("os").environ["PATH"]},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for arch in ("sm_80", "sm_90"):
        assert f"compiled int4_kernels.cu for {arch}" in result.stdout
    assert "syntax-checked int4_binding.cpp" in result.stdout, result.stdout
