"""``tpcomp bench collectives`` end to end on 2 real rank processes (shaped when root), and its argument errors.

Sizes are tiny and repetitions few: these tests check the records, not the speed (targets live in the benchmark).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp import collectives
from megatron_tpcomp.bench import collectives as bench
from megatron_tpcomp.bench import link as linkmod
from megatron_tpcomp.bench.collectives_worker import make_input
from megatron_tpcomp.launch import run_distributed

NO_LINK = linkmod.unavailable_reason()
SIZES = (16 << 10, 40 << 10)
SPECS = ("int4:g32", "fp8")


def _wire_bytes(rank: int, world_size: int, cases: list[dict]) -> list[tuple[int, int]]:
    """(wire_bytes, baseline_wire_bytes) of CommStats for each case, from the real collectives."""
    out = []
    for case in cases:
        x = make_input(case["op"], case["bytes"], world_size, rank, dtype=torch.bfloat16)
        stats: list[collectives.CommStats] = []
        if case["op"] == "all_reduce":
            collectives.all_reduce(x, case["spec"], algo=case["algo"], stats=stats)
        elif case["op"] == "all_gather":
            collectives.all_gather(x, case["spec"], stats=stats)
        else:
            collectives.reduce_scatter(x, case["spec"], stats=stats)
        out.append((stats[0].wire_bytes, stats[0].baseline_wire_bytes))
    dist.barrier()
    return out


OPS = ("all_reduce", "all_gather", "reduce_scatter")
ALGOS = ("one-shot", "two-shot")
CASES = bench.plan_cases(OPS, SIZES, SPECS, ALGOS)


@functools.cache
def _expected_wire_bytes() -> list[tuple[int, int]]:
    """CommStats of the real collectives for CASES on 2 ranks (computed once: a launch costs seconds)."""
    return run_distributed(_wire_bytes, 2, CASES, timeout_s=120)[0]


def _check_records(records: list[dict], link: str) -> None:
    cases = CASES
    assert len(records) == len(cases)
    expected = _expected_wire_bytes()
    for rec, case, (wire, base_wire) in zip(records, cases, expected, strict=True):
        for key in bench.REQUIRED_KEYS:
            assert key in rec, key
        assert (rec["op"], rec["spec"], rec["algo"], rec["requested_bytes"]) == tuple(
            case[k] for k in ("op", "spec", "algo", "bytes")
        )
        assert rec["world_size"] == 2 and rec["link"] == link and rec["dtype"] == "bfloat16"
        assert rec["bytes"] == math.prod(rec["shape"]) * 2 and rec["shape"][1] == 576
        assert rec["median_ms"] > 0 and rec["baseline_median_ms"] > 0 and rec["codec_ms"] > 0
        assert rec["speedup"] == pytest.approx(rec["baseline_median_ms"] / rec["median_ms"])
        assert (rec["wire_bytes"], rec["baseline_wire_bytes"]) == (wire, base_wire)
        assert rec["wire_bytes"] < rec["baseline_wire_bytes"] or rec["op"] != "all_reduce" or rec["algo"] != "one-shot"
        assert rec["fallback"] is None and rec["algo_used"] == rec["algo"]
        assert len(rec["times_ms"]) == len(rec["baseline_times_ms"]) == rec["reps"] == 2
        assert 0 < rec["rel_err"] < 0.1  # compressed result close to the stock one
        json.dumps(rec)  # serialisable as is


@pytest.mark.skipif(NO_LINK is not None, reason=f"shaped link unavailable: {NO_LINK}")
def test_run_shaped_end_to_end() -> None:
    logs: list[str] = []
    records = bench.run(
        [2],
        ["1gbit"],
        SIZES,
        SPECS,
        ALGOS,
        OPS,
        reps=2,
        warmup=1,
        timeout_s=240,
        log=logs.append,
    )
    _check_records(records, "1gbit")
    for rec in records:
        info = rec["link_info"]
        assert rec["shaped"] and info["shaped"] and info["rate_bps"] == 10**9 and info["mode"] == "veth-pair"
        assert info["burst"] == linkmod.default_burst(10**9)
        assert rec["ideal_ms"] == pytest.approx(rec["wire_bytes"] * 8 / 1e9 * 1e3)
        assert rec["baseline_ideal_ms"] == pytest.approx(rec["baseline_wire_bytes"] * 8 / 1e9 * 1e3)
        assert not set(info["namespaces"]) & set(linkmod.list_namespaces())  # cleaned up
    assert any(f"burst {linkmod.default_burst(10**9)} B" in line for line in logs)


def test_run_without_root_says_so_and_runs_unshaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkmod, "unavailable_reason", lambda: "not root (test)")
    logs: list[str] = []
    records = bench.run(
        [2],
        ["1gbit", "none"],  # the fallback measures unshaped once; "none" is then not repeated
        SIZES,
        SPECS,
        ALGOS,
        OPS,
        reps=2,
        warmup=1,
        timeout_s=240,
        log=logs.append,
    )
    _check_records(records, "none")
    for rec in records:
        assert not rec["shaped"] and rec["ideal_ms"] is None
        assert rec["link_info"]["requested"] == "1gbit" and rec["link_info"]["reason"] == "not root (test)"
    assert any("cannot shape (not root (test))" in line and "UNSHAPED" in line for line in logs)
    text = bench.format_table(records)
    assert text.count("\n") == len(records) + 1 and "int4:g32" in text


def test_plan_cases_and_targets() -> None:
    cases = bench.plan_cases(["all_reduce", "all_gather"], [1024], ["fp8"], ["one-shot", "auto"])
    assert [(c["op"], c["algo"]) for c in cases] == [
        ("all_reduce", "one-shot"),
        ("all_reduce", "auto"),
        ("all_gather", "all-gather"),
    ]
    rec = dict(
        spec="int4:g32",
        op="all_reduce",
        world_size=2,
        link="1gbit",
        requested_bytes=8 << 20,
        dtype="bfloat16",
        speedup=3.2,
        algo_used="one-shot",
    )
    assert bench.target_lines([rec]) == ["target int4:g32 one-shot: 3.20x (goal >= 3.0x): met"]
    assert bench.target_lines([dict(rec, link="none")]) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--world-size", "1"], "--world-size"),
        (["--world-size", "two"], "invalid literal"),
        (["--link", "1gbps"], "bad link rate"),
        (["--sizes", "8XB"], "bad size"),
        (["--sizes", "0"], "positive"),
        (["--specs", "int9:zz"], "int9"),
        (["--algo", "three-shot"], "--algo"),
        (["--ops", "all_to_all"], "--ops"),
        (["--reps", "0"], "--reps"),
        (["--burst", "lots"], "bad size"),
    ],
)
def test_cli_bad_args_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "tpcomp bench collectives" in err and message in err, err


def test_main_prints_table_and_writes_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = dict(
        op="all_reduce",
        spec="int4:g32",
        algo="auto",
        algo_used="one-shot",
        world_size=2,
        bytes=8387712,
        requested_bytes=8 << 20,
        dtype="bfloat16",
        link="none",
        median_ms=30.0,
        baseline_median_ms=75.0,
        speedup=2.5,
        codec_ms=12.0,
        wire_bytes=2359056,
        baseline_wire_bytes=8387712,
        ideal_ms=None,
        baseline_ideal_ms=None,
        rel_err=0.02,
    )
    seen = {}

    def fake_run(*args: object, **kwargs: object) -> list[dict]:
        seen.update(args=args, kwargs=kwargs)
        return [record]

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(linkmod, "unavailable_reason", lambda: "not root (test)")
    out_file = tmp_path / "coll.json"
    argv = ["--link", "1gbit", "--sizes", "8MiB", "--specs", "int4:g32", "--algo", "auto", "--json", str(out_file)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "shaped links are unavailable here (not root (test))" in out
    assert "auto>one-shot" in out and "2.50x" in out
    assert seen["args"][:5] == ([2], ["1gbit"], [8 << 20], ["int4:g32"], ["auto"])
    assert json.loads(out_file.read_text()) == [record]


def test_auto_sends_small_messages_stock_and_large_ones_compressed(tmp_path: Path) -> None:
    from megatron_tpcomp.config import AUTO_DEFAULT_SPEC
    from megatron_tpcomp.costmodel import CodecSpeed, CostModel, Link

    # A table for a slow, high-latency link (1 ms per step, 100 MB/s) and a codec with 0.5 ms per call:
    # 16 KiB: stock 2.2 ms < compressed ~2.6 ms -> stock; 1 MiB: stock 12.5 ms > compressed ~8.6 ms -> codec.
    spec = collectives.resolve_codec(AUTO_DEFAULT_SPEC).spec
    model = CostModel(links={2: Link(1e-3, 1e8)}, codecs={spec: CodecSpeed(5e-4, 1e9, 5e-4, 1e9)})
    table = tmp_path / "perf.json"
    table.write_text(json.dumps(model.to_json()))
    records = bench.run(
        [2], ["none"], [16 << 10, 1 << 20], ["auto"], ["one-shot"], reps=1, warmup=0, perf_table=str(table)
    )
    small, large = sorted(records, key=lambda r: r["bytes"])
    assert small["spec"] == large["spec"] == "auto"
    assert small["auto_choice"] == "none/stock" and small["fallback"]
    assert small["wire_bytes"] == small["baseline_wire_bytes"]
    assert large["auto_choice"] == f"{spec}/one-shot" and large["canonical"] == spec and large["fallback"] is None
    assert large["wire_bytes"] < large["baseline_wire_bytes"] / 3  # 4.5 bits vs 16, both ways
