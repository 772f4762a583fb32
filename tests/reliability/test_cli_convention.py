"""Reliability of the one-CLI-convention work: hostile or conflicting spellings, and the TP=1 summary.

Each test failed on the code before (noted per test) and passes now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tpcomp import cli, megatron_lm, textgen
from megatron_tpcomp.config import CompressionConfig


def test_megatron_lm_summary_at_tp1_says_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "compression summary: 0.00 MB sent per rank instead of 0.00 MB (1.00x, 0.00 MB saved)" at TP=1.
    state = megatron_lm.state
    saved = dict(vars(state))
    try:
        state.config = CompressionConfig.from_spec("int4:g32+had")
        state.num_layers, state.rank, state.tp, state.summary_done, state.summary_path = 2, 0, 1, False, None
        result = megatron_lm.report()
    finally:
        vars(state).update(saved)  # report() is also an atexit hook: leave no config behind for it
    out = capsys.readouterr().out
    assert "compression is a no-op at TP=1 (nothing is exchanged)" in out and "1.00x" not in out, out
    assert result is not None and result["wire_bytes_per_rank"] == 0


def test_both_timeout_spellings_at_once_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: --distributed-timeout-minutes did not exist (usage error); now minutes and seconds are both
    # accepted, and giving both (two different numbers for one setting) is a one-line error naming both values.
    argv = ["--load", "/nonexistent", "--prompts", "x", "--distributed-timeout-minutes", "2", "--dist-timeout", "5"]
    assert textgen.main(argv) == 2
    err = capsys.readouterr().err
    assert "--distributed-timeout-minutes 2 and --dist-timeout 5: give one of the two" in err, err


def test_prompt_file_line_without_text_or_prompt_names_file_and_line(tmp_path: Path) -> None:
    # Before: a Megatron-LM prompt file (key "text") was refused line 1; now "text" or "prompt" is read, and a
    # line with neither names the file and the line.
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 3}) + "\n")
    args = textgen.build_parser().parse_args(["--load", "x", "--prompt-file", str(path)])
    with pytest.raises(ValueError, match=r'prompts.jsonl:2: expected an object with a string "text" \(or "prompt"\)'):
        textgen.read_prompts(args)


@pytest.mark.parametrize(
    ("argv", "typed"),
    [
        (["eval", "--gen-tokens", "-1"], "--gen-tokens"),
        (["eval", "--num-tokens-to-generate", "-1"], "--num-tokens-to-generate"),
        (["generate", "--load", "x", "--top_k", "-2"], "--top_k"),
        (["generate", "--load", "x", "--top-k", "-2"], "--top-k"),
    ],
)
def test_bad_value_error_names_the_spelling_typed(
    argv: list[str], typed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before the aliases there was one spelling; argparse alone would now print "--top_k/--top-k".
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {typed}: expected an integer >= " in err, err
    assert "/" not in err.split("error:")[-1].split(":")[0], err


def test_prompts_needs_at_least_one_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        textgen.main(["--load", "x", "--prompts"])
    assert info.value.code == 2 and "argument --prompts: expected at least one argument" in capsys.readouterr().err
