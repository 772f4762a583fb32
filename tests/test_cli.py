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
