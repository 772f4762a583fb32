"""The `tpcomp` command line: demo, specs, bench; help and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tpcomp import cli


def test_specs_lists_presets_with_bits(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["specs"]) == 0
    out = capsys.readouterr().out
    # int4:g32: 4 bits + an fp16 scale per 32 values (0.5) + an int16 super-block exponent per 4096 (16/4096)
    assert "int4:g32:sfp16" in out and "4.5039" in out and "mxfp4" in out


def test_specs_sizes_calibrated_specs_with_stand_in_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["specs", "int4:g64:se4m3+had+chscale"]) == 0
    assert "int4:g64:se4m3+had:b32+chscale" in capsys.readouterr().out.splitlines()[-1].split()[1]
    assert cli.main(["specs", "int4:g32+outliers", "--hidden", "640"]) == 0
    bits = float(capsys.readouterr().out.splitlines()[-1].split()[-1])
    assert bits == pytest.approx((10 * 16 + 630 * 4.5) / 640, abs=0.01)  # K = 640/64 = 10 calibrated channels


def test_specs_rejects_a_bad_spec_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["specs", "int11"]) == 2
    err = capsys.readouterr().err
    assert "int11" in err and "int2 .. int8" in err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err


def test_demo_runs_on_real_processes_and_reports() -> None:
    # Through the console entry point, as a user runs it (small shape to keep it quick).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_tpcomp.cli",
            "collectives-demo",
            "--world-size",
            "2",
            "--specs",
            "int4:g32,fp8",
            "--shape",
            "64,1,576",
            "--reps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All ranks hold bit-identical results: yes" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("int4:g32", "fp8"))]
    assert len(rows) == 2
    # int4 at 2 ranks: one payload (4.5 bits) vs the ring all-reduce's one full copy (16 bits): 3.5x fewer bytes.
    int4 = rows[0].split()
    assert int4[1] == "one-shot" and float(int4[5].rstrip("x")) > 3.4


def test_demo_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "megatron_tpcomp.cli", "collectives-demo", "--specs", "int4:q32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown option 'q32'" in result.stderr


def test_bench_codecs_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert (
        cli.main(["bench", "codecs", "--specs", "int4:g32,fp8", "--sizes", "16KiB", "--reps", "2", "--json", str(out)])
        == 0
    )
    records = json.loads(out.read_text())
    assert [r["spec"] for r in records] == ["int4:g32", "fp8"]
    for r in records:
        for key in ("encode_gbps", "decode_gbps", "clone_gbps", "encode_vs_clone", "decode_vs_clone"):
            assert r[key] > 0
        assert r["dtype"] == "bfloat16" and r["bytes"] > 0


# ------------------------------------------------------------------------------------ one flag convention


def _option_blocks(help_text: str) -> dict[str, str]:
    """``--help`` output -> {first option string: its whole entry, one line per printed line}."""
    blocks: dict[str, str] = {}
    key = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            blocks[key] = line
        elif key is not None and line.startswith("   "):
            blocks[key] += "\n" + line.strip()
        else:
            key = None
    return blocks


def _spellings(entry: str) -> list[str]:
    """The option strings of one help entry: "  --load CKPT, --model CKPT   help..." -> ["--load", "--model"]."""
    return [part.split()[0] for part in entry.splitlines()[0].strip().split("  ")[0].split(", ")]


SUBCOMMANDS = [
    ["eval"],
    ["calibrate"],
    ["convert"],
    ["generate"],
    ["bench", "codecs"],
    ["bench", "collectives"],
    ["bench", "e2e"],
    ["bench", "kernels"],
    ["bench", "perf-table"],
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_help_states_each_default_at_most_once(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # The launcher's --help used to print "(default: the checkpoint's) (default: None)": a hand-written default
    # and argparse's ArgumentDefaultsHelpFormatter's, one after the other.
    with pytest.raises(SystemExit) as info:
        cli.main([*cmd, "--help"])
    assert info.value.code == 0
    blocks = _option_blocks(capsys.readouterr().out)
    assert len(blocks) >= 3, blocks  # the parser printed its options (the block split works)
    twice = {flag: text for flag, text in blocks.items() if text.count("(default") > 1}
    assert not twice, twice
    assert not [text for text in blocks.values() if "(default: None)" in text]


# Megatron-LM's name (first) and the project's older name of each shared option, per subcommand.
ALIASES = {
    "eval": [("--tensor-model-parallel-size", "--tp"), ("--load", "--model"), ("--specs", "--spec")]
    + [("--num-tokens-to-generate", "--gen-tokens"), ("--quiet", "-q")],
    "calibrate": [("--tensor-model-parallel-size", "--tp"), ("--load", "--model"), ("--quiet", "-q")],
    "convert": [("--tensor-model-parallel-size", "--tp"), ("--quiet", "-q")],
    "generate": [("--tensor-model-parallel-size", "--tp"), ("--load", "--model"), ("--prompt-file", "--prompts-file")]
    + [("--num-tokens-to-generate", "--gen-tokens"), ("--top_k", "--top-k"), ("--output-path", "--out")]
    + [("--output-path", "--output"), ("--json", "--summary-json"), ("--quiet", "-q")],
    "bench codecs": [("--specs", "--spec")],
    "bench collectives": [("--specs", "--spec"), ("--quiet", "-q")],
    "bench e2e": [("--tensor-model-parallel-size", "--tp"), ("--load", "--model"), ("--specs", "--spec")]
    + [("--num-tokens-to-generate", "--gen-tokens"), ("--quiet", "-q")],
    "bench kernels": [("--quiet", "-q")],
}


@pytest.mark.parametrize("cmd", list(ALIASES))
def test_help_lists_megatron_names_first_with_the_old_names_as_aliases(
    cmd: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([*cmd.split(), "--help"])
    blocks = _option_blocks(capsys.readouterr().out)
    for new, old in ALIASES[cmd]:
        assert new in blocks, (cmd, new, list(blocks))  # Megatron's name is the option's first spelling
        # one argparse option with both spellings (so both set the same value): "--load CKPT, --model CKPT"
        assert old in _spellings(blocks[new]), (cmd, new, old, blocks[new])


def _parsed(build: object, argv: list[str]) -> dict[str, object]:
    return vars(build().parse_args(argv))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("module", "base", "new", "old"),
    [
        ("evaluation", [], ["--tensor-model-parallel-size", "2"], ["--tp", "2"]),
        ("evaluation", [], ["--load", "ckpt-dir"], ["--model", "ckpt-dir"]),
        ("evaluation", [], ["--specs", "int4:g32"], ["--spec", "int4:g32"]),
        ("evaluation", [], ["--num-tokens-to-generate", "5"], ["--gen-tokens", "5"]),
        ("evaluation", [], ["--quiet"], ["-q"]),
        ("calibration", ["--out", "c.json"], ["--tensor-model-parallel-size", "2"], ["--tp", "2"]),
        ("calibration", ["--out", "c.json"], ["--load", "ckpt-dir"], ["--model", "ckpt-dir"]),
        ("calibration", ["--out", "c.json"], ["--quiet"], ["-q"]),
        ("checkpoint_cli", ["src", "dst"], ["--tensor-model-parallel-size", "2"], ["--tp", "2"]),
        ("checkpoint_cli", ["src", "dst"], ["--quiet"], ["-q"]),
    ],
)
def test_each_alias_parses_to_the_same_value(module: str, base: list[str], new: list[str], old: list[str]) -> None:
    import importlib

    build = importlib.import_module(f"megatron_tpcomp.{module}").build_parser
    with_new, with_old, neither = _parsed(build, base + new), _parsed(build, base + old), _parsed(build, base)
    assert with_new == with_old
    assert with_new != neither  # the flag did something: the value differs from the default


def test_bench_codecs_spec_alias_writes_the_same_records(tmp_path: Path) -> None:
    # --spec and --specs both take the comma-separated list (the real benchmark, 1 tiny size, 1 repetition).
    out = {}
    for flag in ("--specs", "--spec"):
        path = tmp_path / f"{flag.strip('-')}.json"
        argv = ["bench", "codecs", flag, "int8:g32,fp8", "--sizes", "16KiB", "--reps", "1", "--json", str(path)]
        assert cli.main(argv) == 0
        out[flag] = [(r["spec"], r["bytes"], r["dtype"]) for r in json.loads(path.read_text())]
    assert out["--specs"] == out["--spec"]
    assert [spec for spec, _, _ in out["--spec"]] == ["int8:g32", "fp8"]


def test_top_level_help_names_the_convention_and_generate(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "--tensor-model-parallel-size / --tp" in out and "--load / --model" in out


@pytest.mark.parametrize("flag", ["--tensor-model-parallel-size", "--tp"])
def test_a_bad_value_is_reported_under_the_spelling_typed(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse alone would say "argument --tensor-model-parallel-size/--tp: ..." whichever was typed.
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", flag, "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: expected an integer >= 1, got '0'" in err, err
