"""Megatron-LM's own source (``megatron/training``, ``examples/inference``, ``tools``) for the tests of this
package: ``$MEGATRON_LM_DIR`` (a user's checkout), else the ``core_v0.16.1`` source archive beside the repository
(``../shared/fixtures/megatron-lm/``) unpacked into a temporary directory; else every test here skips, saying
how to run it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = ROOT.parent / "shared" / "fixtures" / "megatron-lm" / "Megatron-LM-core_v0.16.1.tar.gz"
HOW = (
    "set MEGATRON_LM_DIR to a Megatron-LM checkout (core_v0.16.1 tested), or put its source archive at "
    "../shared/fixtures/megatron-lm/Megatron-LM-core_v0.16.1.tar.gz beside the repository; megatron.training "
    "also needs `pip install six triton simpy`"
)


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Plain files and directories inside the archive's one top folder (no links, no absolute paths)."""
    out = []
    for m in tar.getmembers():
        if (m.isfile() or m.isdir()) and not m.name.startswith("/") and ".." not in Path(m.name).parts:
            out.append(m)
    return out


def _tree_version(root: Path) -> str | None:
    """MAJOR.MINOR.PATCH of the megatron.core inside a Megatron-LM tree (``megatron/core/package_info.py``)."""
    info = root / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        return None
    fields: dict[str, str] = {}
    for line in info.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() in ("MAJOR", "MINOR", "PATCH"):
            fields[name.strip()] = value.strip().strip("'\"")
    if len(fields) != 3:
        return None
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}"


def _installed_megatron_core() -> str | None:
    """MAJOR.MINOR.PATCH of the installed megatron-core (None if it is not installed)."""
    try:
        from importlib.metadata import version

        return ".".join(version("megatron-core").split("+")[0].split(".")[:3])
    except Exception:
        return None


@pytest.fixture(scope="session")
def megatron_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root of a Megatron-LM tree (holds ``megatron/training`` and ``examples/inference``)."""
    missing = [m for m in ("six", "triton", "simpy") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"Megatron-LM's megatron.training needs {', '.join(missing)}: {HOW}")
    given = os.environ.get("MEGATRON_LM_DIR")
    if given:
        root = Path(given)
        if not (root / "megatron" / "training" / "__init__.py").is_file():
            pytest.fail(
                f"MEGATRON_LM_DIR={given} has no megatron/training/__init__.py; expected a Megatron-LM checkout"
            )
    elif not ARCHIVE.is_file():
        pytest.skip(f"no Megatron-LM source: {HOW}")
    else:
        out = tmp_path_factory.mktemp("megatron-lm")
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(out, members=_safe_members(tar), filter="data")
        (root,) = [p for p in out.iterdir() if p.is_dir()]
    # megatron.training imports the installed megatron.core: a tree of another release does not fit it (0.16.1's
    # tokenizer module moved in 0.19), so the two must match; say so instead of failing.
    tree, installed = _tree_version(root), _installed_megatron_core()
    if tree is not None and installed is not None and tree != installed:
        pytest.skip(
            f"Megatron-LM at {root} is {tree} but megatron-core {installed} is installed: megatron.training needs "
            "its own megatron.core (set MEGATRON_LM_DIR to a Megatron-LM checkout of the installed release)"
        )
    # Megatron-LM >= 0.17's megatron.training needs Python 3.12 (typing.override): say so instead of failing.
    probe = subprocess.run(
        [sys.executable, "-c", "import megatron.training.arguments"],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(
            f"Megatron-LM at {root}: megatron.training does not import on Python "
            f"{sys.version_info.major}.{sys.version_info.minor} ({last})"
        )
    return root


@pytest.fixture
def megatron_training(megatron_lm_dir: Path) -> Iterator[Path]:
    """``megatron.training`` importable in this process (the tree first on ``sys.path`` for the test)."""
    sys.path.insert(0, str(megatron_lm_dir))
    try:
        yield megatron_lm_dir
    finally:
        sys.path.remove(str(megatron_lm_dir))


@pytest.fixture(scope="session")
def described_ckpt(real_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M at TP=3 written by today's converter (Megatron-LM ``args`` in every shard, and a
    ``tokenizer_config.json``), resharded from the cached conversion."""
    from megatron_tpcomp.checkpoint.convert import convert

    return convert(real_ckpt, tmp_path_factory.mktemp("described") / "ckpt", 3, progress=False).path
