"""Packaging facts that can be checked without building: one version, metadata in pyproject.toml, the license,
dependency ranges that hold what is tested, and where the CPU codec library looks for its sources.

The built wheel and sdist are checked in tests/reliability/test_packaging.py and scripts/check_wheel.sh.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import megatron_tpcomp
from megatron_tpcomp.backends import cpu

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_installed_version_is_the_package_version() -> None:
    # pyproject.toml reads the version from megatron_tpcomp/__init__.py; what pip recorded must be that one.
    assert importlib.metadata.version("megatron-tpcomp") == megatron_tpcomp.__version__


def test_metadata_lives_in_pyproject_only() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == "megatron-tpcomp"
    assert project["dynamic"] == ["version"] and "version" not in project
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "megatron_tpcomp.__version__"
    assert project["readme"] == "README.md" and (ROOT / "README.md").is_file()
    assert project["scripts"] == {"tpcomp": "megatron_tpcomp.cli:main"}
    # setup.py's setup() call carries no metadata (a second version or dependency list would drift).
    calls = [
        node
        for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    assert len(calls) == 1
    assert {kw.arg for kw in calls[0].keywords} == {"ext_modules", "cmdclass"}


def test_license_is_apache_2() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The megatron-tpcomp authors\n")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{megatron_tpcomp.__version__}]" in changelog


def _requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_dependency_ranges_hold_the_tested_versions() -> None:
    # Every dependency this environment runs the tests with lies inside the declared range (the ranges are
    # supposed to be the tested ones), and the heavy ones are bounded above (a new major is untested).
    for req in _requirements(("dev", "plot")):
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is outside {req}"
    bounded = {r.name: r for r in _requirements()}
    for name in ("torch", "megatron-core", "numpy", "safetensors", "tokenizers", "gguf"):
        assert any(s.operator in ("<", "<=", "==", "~=") for s in bounded[name].specifier), f"{name} has no upper bound"
    assert not bounded["torch"].specifier.contains("2.15.0")
    mcore = bounded["megatron-core"].specifier
    assert mcore.contains("0.16.1") and mcore.contains("0.19.2") and not mcore.contains("0.20.0")


def _fake_package(tmp_path: Path, name: str, with_copy: bool) -> Path:
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if with_copy:
        (pkg / "_csrc").mkdir()
        (pkg / "_csrc" / "cpu_codecs.cpp").write_text("// installed copy\n")
    return pkg


def test_source_lookup_prefers_the_package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed layout: <site>/<pkg>/_csrc/cpu_codecs.cpp, found through importlib.resources, before the
    # repository's kernels/ (which exists here too, as in a checkout that also has a built package).
    repo = tmp_path / "kernels"
    repo.mkdir()
    (repo / "cpu_codecs.cpp").write_text("// checkout\n")
    pkg = _fake_package(tmp_path, "tpcomp_fake_installed", with_copy=True)
    monkeypatch.syspath_prepend(str(pkg.parent))
    assert cpu.source_dir("tpcomp_fake_installed", repo) == pkg / "_csrc"
    # An editable install: no copy in the package, the checkout's kernels/ is used.
    _fake_package(tmp_path, "tpcomp_fake_editable", with_copy=False)
    assert cpu.source_dir("tpcomp_fake_editable", repo) == repo
    # Neither: one line naming both places.
    with pytest.raises(RuntimeError, match=r"cpu_codecs\.cpp is missing: looked in .*_csrc.* and .*nowhere"):
        cpu.source_dir("tpcomp_fake_editable", tmp_path / "nowhere")
    sys.modules.pop("tpcomp_fake_installed", None)
    sys.modules.pop("tpcomp_fake_editable", None)


def test_source_lookup_in_this_checkout() -> None:
    # The package under test is the editable checkout: no _csrc copy (build output, never in the tree), so the
    # repository's kernels/ is the source, as the README and the build key assume.
    assert not (ROOT / "megatron_tpcomp" / cpu.PACKAGE_SOURCES).exists()
    assert cpu.source_dir() == ROOT / "kernels"


def test_the_build_copies_every_kernel_source() -> None:
    # setup.py copies kernels/*.{cpp,h,cu} into the package; the sdist's MANIFEST.in ships the same patterns.
    # (setup.py is read, not run: running it would write build output into the checkout.)
    source = (ROOT / "setup.py").read_text()
    tree = ast.parse(source)
    suffixes = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KERNEL_SUFFIXES"
    )
    on_disk = {p.suffix for p in (ROOT / "kernels").iterdir() if p.is_file()}
    assert on_disk <= set(suffixes), f"kernels/ has {on_disk - set(suffixes)} files the build would not copy"
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include kernels " + " ".join(f"*{s}" for s in suffixes) in manifest
    assert cpu.PACKAGE_SOURCES == "_csrc" and '("megatron_tpcomp", "_csrc")' in source


def _setup_functions(*names: str) -> dict:
    """The named top-level functions of setup.py, defined without running the rest of it (it calls setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names], [])
    namespace: dict = {"os": os, "shutil": shutil}
    exec(compile(module, "setup.py", "exec"), namespace)
    return namespace


def _toolkit(root: Path, headers: bool) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return nvcc


def test_the_build_finds_the_cuda_headers_behind_a_linked_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # nvcc on PATH as a link into the toolkit: torch would take CUDA_HOME = the link's folder's parent, which has
    # no headers (the extension build then failed on cuda_runtime.h); setup.py points CUDA_HOME at the toolkit.
    fns = _setup_functions("_has_cuda_headers", "_point_cuda_home_at_the_toolkit")
    nvcc = _toolkit(tmp_path / "cuda-13.0", headers=True)
    (tmp_path / "local" / "bin").mkdir(parents=True)
    (tmp_path / "local" / "bin" / "nvcc").symlink_to(nvcc)
    monkeypatch.setenv("PATH", str(tmp_path / "local" / "bin"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    fns["_point_cuda_home_at_the_toolkit"]()
    assert Path(os.environ["CUDA_HOME"]) == (tmp_path / "cuda-13.0").resolve()


def test_the_build_leaves_cuda_home_alone_where_it_is_set_or_already_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fns = _setup_functions("_has_cuda_headers", "_point_cuda_home_at_the_toolkit")
    _toolkit(tmp_path / "cuda", headers=True)
    monkeypatch.setenv("PATH", str(tmp_path / "cuda" / "bin"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    fns["_point_cuda_home_at_the_toolkit"]()  # nvcc's own folder has the headers: torch finds them itself
    assert "CUDA_HOME" not in os.environ
    monkeypatch.setenv("CUDA_HOME", "/the/users/choice")
    fns["_point_cuda_home_at_the_toolkit"]()
    assert os.environ["CUDA_HOME"] == "/the/users/choice"
