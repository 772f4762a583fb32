"""The README, docs/design.md and docs/results.md name files that exist: a file moved or renamed without its
mention updated fails here, so a newcomer following them never lands on nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Repository paths as the documents write them (`megatron_tpcomp/...`, `kernels/...`, `tests/...`, ...).
PATH = re.compile(r"(?<![\w./-])((?:megatron_tpcomp|kernels|tests|scripts|tools|examples|docs)/[\w./*-]*[\w/*])")
#: Mentions that are not paths of this repository: Megatron-LM's own files, a glob, the wheel's build folder.
NOT_OURS = ("examples/inference/", "kernels/int4_*", "megatron_tpcomp/_csrc")


def _mentions(doc: Path) -> list[str]:
    text = doc.read_text()
    return sorted({m for m in PATH.findall(text) if not m.startswith(NOT_OURS) and "*" not in m})


@pytest.mark.parametrize(("doc", "at_least"), [("README.md", 20), ("docs/design.md", 3), ("docs/results.md", 5)])
def test_every_path_a_document_names_exists(doc: str, at_least: int) -> None:
    mentions = _mentions(ROOT / doc)
    assert len(mentions) >= at_least, mentions  # the pattern still finds the paths
    missing = [m for m in mentions if not (ROOT / m).exists()]
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_the_checker_sees_a_missing_path(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("see [`megatron_tpcomp/collectives.py`](megatron_tpcomp/collectives.py) and `kernels/int4_*`")
    assert _mentions(doc) == ["megatron_tpcomp/collectives.py"]
    assert not (ROOT / "megatron_tpcomp/collectives.py").exists()
