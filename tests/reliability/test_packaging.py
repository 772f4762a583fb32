"""Issue 17, packaging: the package as pip installs it, away from the checkout.

Findings pinned here (each failed on the code before the fix):
- an installed wheel had no kernel sources, so the fused CPU codecs were silently off (``auto``: the torch
  reference, ~100x slower, without a word; ``on``: an error);
- the sdist lacked kernels/ (CPU and CUDA sources) and the license; the metadata had no license or readme;
- a fallback to the reference codecs under ``auto`` said nothing, whatever the reason;
- ``tpcomp --version`` was "unknown subcommand".

The wheel and sdist are built for real (setuptools' PEP 517 hooks, as pip calls them) from a copy of the
sources in a temporary folder, and the wheel's content is imported from outside the checkout.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cpp", ".h", ".cu"))


def _copy_sources(dest: Path) -> Path:
    """What an sdist is made from, copied so that no build output lands in the checkout."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"):
        if (ROOT / name).exists():  # one that is missing shows up as a missing file in the sdist / wheel
            shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "_csrc", "*.so", "*.o")
    shutil.copytree(ROOT / "kernels", dest / "kernels", ignore=skip)
    shutil.copytree(ROOT / "megatron_tpcomp", dest / "megatron_tpcomp", ignore=skip)
    return dest


def _build(hook: str, src: Path, out: Path) -> Path:
    """Run setuptools' PEP 517 ``hook`` (build_sdist / build_wheel) in ``src``; returns the file it wrote."""
    out.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    env = {**os.environ, "TPCOMP_NO_CUDA_EXT": "1"}  # CPU-only here; the CUDA extension has its own checks
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel of the current sources, and the wheel unpacked as a site folder (``site``)."""
    base = tmp_path_factory.mktemp("packaging")
    (base / "src").mkdir()
    src = _copy_sources(base / "src")
    sdist = _build("build_sdist", src, base / "sdist")
    wheel = _build("build_wheel", src, base / "wheel")
    site = base / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return {"sdist": sdist, "wheel": wheel, "site": site, "base": base}


def test_sdist_carries_kernels_license_readme_changelog(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    want = {f"kernels/{k}" for k in KERNEL_FILES} | {"LICENSE", "README.md", "CHANGELOG.md"}
    assert "kernels/int4_kernels.cu" in want and "kernels/cpu_codecs.cpp" in want
    assert want <= names, sorted(want - names)
    assert not any("_csrc" in n for n in names)  # build output, not a source


def test_wheel_carries_sources_and_metadata(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    assert {f"megatron_tpcomp/_csrc/{k}" for k in KERNEL_FILES} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().lstrip().startswith("# megatron-tpcomp")  # the README is the long description
    torch_req = next(r for r in meta.get_all("Requires-Dist") if r.startswith("torch"))
    assert "<2.15" in torch_req, torch_req


# Runs in a fresh interpreter whose megatron_tpcomp is the unpacked wheel, from a folder outside the checkout.
# Each scenario starts with cleared caches and counts the fallback warnings of three encodes.
_SCENARIOS = r"""
import json, logging, os, sys
from pathlib import Path
import torch
import megatron_tpcomp
from megatron_tpcomp import backends
from megatron_tpcomp.backends import BackendUnavailableError
from megatron_tpcomp.backends import cpu as cpu_codecs
from megatron_tpcomp.codecs import make_codec

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("megatron_tpcomp").addHandler(handler)
codec, x = make_codec("int4:g32"), torch.randn(64, 256).bfloat16()
ref = None

def scenario(mode):
    backends.reset()  # the library's load, the remembered choices and the once-per-process warning
    records.clear()
    os.environ["TPCOMP_BACKEND"] = mode
    out = {"available": list(cpu_codecs.available())}
    try:
        payloads = [codec.encode(x) for _ in range(3)]
        out["same_bytes"] = all(torch.equal(p, ref) for p in payloads) if ref is not None else None
    except BackendUnavailableError as exc:
        out["raised"] = str(exc)
    out["warnings"] = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return out

result = {"package": megatron_tpcomp.__file__}
os.environ["TPCOMP_BACKEND"] = "reference"
ref = codec.encode(x)
result["installed_on"] = scenario("cpu")
csrc = Path(megatron_tpcomp.__file__).parent / "_csrc" / "cpu_codecs.cpp"  # where the build puts the source
good = csrc.read_text() if csrc.exists() else None
os.environ["TPCOMP_CACHE"] = sys.argv[1]  # the broken source must not be built into the shared cache
if good is not None:
    csrc.write_text("#error this compiler cannot build the kernels\n" + good)
    result["compile_error_auto"] = scenario("auto")
    csrc.unlink()
result["source_missing_auto"] = scenario("auto")
result["source_missing_on"] = scenario("cpu")
if good is not None:
    csrc.write_text(good)
os.environ["PATH"] = sys.argv[1]  # no g++ on PATH
os.environ.pop("CXX", None)
result["no_compiler_auto"] = scenario("auto")
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def installed(built: dict[str, Path]) -> dict:
    run_dir = built["base"] / "run"
    run_dir.mkdir()
    (run_dir / "cache").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TPCOMP_BACKEND")}
    # The unpacked wheel first on sys.path; the venv's site-packages (torch, ...) after it. The checkout's
    # editable finder is consulted only after sys.path, so it cannot shadow the wheel.
    env["PYTHONPATH"] = str(built["site"])
    result = subprocess.run(
        [sys.executable, "-c", _SCENARIOS, str(run_dir / "cache")],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_installed_wheel_builds_the_cpu_codecs(installed: dict, built: dict[str, Path]) -> None:
    # Imported from the unpacked wheel (not the checkout), TPCOMP_BACKEND=cpu: the library builds from the
    # package's own copy of the sources and writes the reference bytes.
    assert Path(installed["package"]).resolve().parent == built["site"].resolve() / "megatron_tpcomp"
    on = installed["installed_on"]
    assert on["available"] == [True, ""], on
    assert on["same_bytes"] is True and on["warnings"] == []


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("compile_error_auto", "failed to build"),
        ("source_missing_auto", "cpu_codecs.cpp is missing: looked in"),
        ("no_compiler_auto", "no C++ compiler"),
    ],
)
def test_auto_fallback_warns_once_with_the_reason(installed: dict, case: str, reason: str) -> None:
    assert case in installed, "the wheel has no megatron_tpcomp/_csrc/cpu_codecs.cpp to break"
    got = installed[case]
    assert got["available"][0] is False and reason in got["available"][1]
    assert got["same_bytes"] is True  # the reference ran: same payload bytes, just slower
    assert len(got["warnings"]) == 1, got["warnings"]  # three encodes, one warning
    assert "torch reference codecs run instead" in got["warnings"][0] and reason in got["warnings"][0]


def test_on_without_sources_raises_naming_them(installed: dict) -> None:
    got = installed["source_missing_on"]
    assert "raised" in got and "TPCOMP_BACKEND=cpu" in got["raised"]
    assert "cpu_codecs.cpp is missing" in got["raised"] and "_csrc" in got["raised"]


def test_version_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "megatron_tpcomp.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    import megatron_tpcomp

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tpcomp (megatron-tpcomp) {megatron_tpcomp.__version__}\n"
