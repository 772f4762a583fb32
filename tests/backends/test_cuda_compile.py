"""The CUDA sources compile for sm_80 and sm_90 and the torch binding passes a syntax check, through
scripts/check_cuda.sh (nvcc is a compiler only in CI; the kernels run in tests/backends/ where a GPU is lent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH: no CUDA compile check")


@pytest.fixture(scope="module")
def check_output() -> str:
    """stdout of one run of check_cuda.sh (each arch compiled once); fails with the compiler's errors."""
    env = {**os.environ, "PYTHON": sys.executable, "ARCHS": " ".join(ARCHS)}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_cuda.sh")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, f"check_cuda.sh failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("arch", ARCHS)
def test_every_cu_file_compiles(check_output: str, arch: str) -> None:
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))
    assert sources, "no kernels/*.cu found"
    for name in sources:
        assert f"compiled {name} for sm_{arch}" in check_output, check_output


def test_binding_passes_syntax_check(check_output: str) -> None:
    if "skipped the binding syntax check" in check_output:
        pytest.skip(check_output.strip().splitlines()[-1])
    assert "syntax-checked int4_binding.cpp" in check_output, check_output
