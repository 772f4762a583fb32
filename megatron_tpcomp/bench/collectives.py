"""Compressed vs stock collectives over a real (optionally shaped) link: ``tpcomp bench collectives``.

For every world size, link rate, operation, message size, codec spec and all-reduce algorithm this measures, in
the same run and alternately, the median time of the compressed collective (codec work included) and of the
stock ``torch.distributed`` collective on the same bf16 message, their ratio (``speedup`` = stock / compressed),
the bytes each rank puts on the wire (:class:`megatron_tpcomp.collectives.CommStats`), the codec work alone
(``codec_ms``) and the ideal transfer time ``wire_bytes * 8 / rate`` of both.

Ranks are separate processes (``python -m megatron_tpcomp.bench.collectives_worker``) in one gloo process group:

- shaped link (``--link 1gbit``; needs root): each rank runs in its own network namespace (``ip netns exec``),
  joined by a veth pair or a bridge and shaped with tc tbf by :class:`megatron_tpcomp.bench.link.ShapedLink`;
  rendezvous on rank 0's namespace address.
- ``--link none``: plain processes on 127.0.0.1 (loopback, no shaping).

Without root a shaped link is impossible: the run says so and measures unshaped instead, and its records say
``link: "none"`` with ``link_info.requested`` and ``link_info.reason``, never a rate it did not have.

Messages are ``[tokens, 576]`` (SmolLM2-135M's hidden size, like ``tpcomp bench codecs``), N(0, 1) with one
channel 300x larger, different on every rank; ``bytes`` is each rank's input. The time of one repetition is the
slowest rank's (ranks start each timed call together after a barrier). Ideal times count payload bytes only:
Ethernet/IP/TCP framing adds about 5% at MTU 1500, and tbf lets ``burst`` bytes through unshaped after idle
time (both reported in ``link_info``).

Target (a goal, not a test): 2 ranks at 1 Gbit/s, 8 MiB bf16 all-reduce: ``int4:g32`` >= 3.0x faster than
the stock bf16 all-reduce including codec time (the byte ratio caps it at 3.56x), ``fp8`` >= 1.7x.

From Python: :func:`run`; from the shell: ``tpcomp bench collectives`` or
``python -m megatron_tpcomp.bench.collectives``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_tpcomp.bench import link as linkmod
from megatron_tpcomp.bench.collectives_worker import OPS
from megatron_tpcomp.bench.common import (
    DTYPES,
    add_launch_arguments,
    check_json_path,
    parse_size,
    partial_writer,
    report,
    size_label,
    split_list,
)
from megatron_tpcomp.bench.ranks import BenchError, launch_workers
from megatron_tpcomp.collectives import ALGOS
from megatron_tpcomp.collectives.algorithms import compressed_algorithms
from megatron_tpcomp.launch import default_threads

DEFAULT_SIZES = "16KiB,1MiB,8MiB"  # a decode-sized message, a mid one, a prefill-sized one
DEFAULT_SPECS = "int4:g32,fp8,int8:g32"
DEFAULT_ALGOS = "one-shot"
DEFAULT_OPS = "all_reduce"
DEFAULT_REPS = 10
DEFAULT_WARMUP = 2
DEFAULT_TIMEOUT_S = 1800.0
#: The algorithm name recorded for operations that have only one (what CommStats.algo says for them).
FIXED_ALGO = {op: compressed_algorithms(op)[0].name for op in ("all_gather", "reduce_scatter")}
WORKER = "megatron_tpcomp.bench.collectives_worker"
#: Record keys every record has (the documented list, then the extras).
REQUIRED_KEYS = (
    "op",
    "spec",
    "algo",
    "world_size",
    "bytes",
    "link",
    "median_ms",
    "baseline_median_ms",
    "speedup",
    "wire_bytes",
)


def default_links() -> list[str]:
    """``["none", "1gbit"]`` where a shaped link can be built (root, ip and tc present), else ``["none"]``."""
    return ["none", "1gbit"] if linkmod.unavailable_reason() is None else ["none"]


def plan_cases(ops: Sequence[str], sizes: Sequence[int], specs: Sequence[str], algos: Sequence[str]) -> list[dict]:
    """Every (op, size, spec, algo) to time, in run order. ``algo`` only multiplies all-reduce cases; the other
    operations have one algorithm each (:data:`FIXED_ALGO`)."""
    cases = []
    for op in ops:
        for nbytes in sizes:
            for spec in specs:
                for algo in algos if op == "all_reduce" else [FIXED_ALGO[op]]:
                    cases.append(dict(op=op, spec=spec, algo=algo, bytes=int(nbytes)))
    return cases


def _launch(world_size: int, link: linkmod.ShapedLink | None, plan: dict, workdir: str, timeout_s: float) -> list[dict]:
    """Start one worker per rank (in the link's namespaces, or on loopback), wait, return rank 0's records."""
    return launch_workers(WORKER, world_size, link, plan, workdir, timeout_s, plan_flag="--cases")


def _finish(rec: dict, link_label: str, link_info: dict, threads: int) -> dict:
    """Add the link, the ratio and the ideal times to one worker record."""
    bps = link_info.get("rate_bps") if link_info.get("shaped") else None
    rec = dict(rec)
    rec["link"] = link_label
    rec["shaped"] = bool(link_info.get("shaped"))
    rec["link_info"] = link_info
    rec["speedup"] = rec["baseline_median_ms"] / rec["median_ms"] if rec["median_ms"] > 0 else float("inf")
    rec["ideal_ms"] = rec["wire_bytes"] * 8 / bps * 1e3 if bps else None
    rec["baseline_ideal_ms"] = rec["baseline_wire_bytes"] * 8 / bps * 1e3 if bps else None
    rec["threads"] = threads
    return rec


def _check_run_args(
    world_sizes: Sequence[int], algos: Sequence[str], ops: Sequence[str], reps: int, warmup: int, dtype: str
) -> None:
    """Raise ValueError naming the first bad argument of :func:`run`."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps} and {warmup}")
    if any(n < 2 for n in world_sizes):
        raise ValueError(f"world sizes must be >= 2, got {list(world_sizes)}")
    bad_ops = [op for op in ops if op not in OPS]
    if bad_ops:
        raise ValueError(f"unknown op(s) {bad_ops}; expected {', '.join(OPS)}")
    bad_algos = [a for a in algos if a not in ALGOS]
    if bad_algos:
        raise ValueError(f"unknown algorithm(s) {bad_algos}; expected {', '.join(ALGOS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected {', '.join(sorted(DTYPES))}")


def run(
    world_sizes: Sequence[int] = (2,),
    links: Sequence[str] | None = None,
    sizes: Sequence[int] = (16 << 10, 1 << 20, 8 << 20),
    specs: Sequence[str] = ("int4:g32", "fp8", "int8:g32"),
    algos: Sequence[str] = ("one-shot",),
    ops: Sequence[str] = ("all_reduce",),
    *,
    reps: int = DEFAULT_REPS,
    warmup: int = DEFAULT_WARMUP,
    dtype: str = "bf16",
    burst: int | None = None,
    limit: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    perf_table: str | None = None,
    log: Callable[[str], None] = print,
    on_records: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Time every case on every (world size, link); one launch of ``world_size`` processes per pair.

    Args:
        world_sizes: ranks per run (each >= 2).
        links: tc rates such as ``"1gbit"``, ``"500mbit"``, or ``"none"`` for loopback; default
            :func:`default_links`. A rate that cannot be shaped here (not root, ...) is measured unshaped
            instead, once per world size, and logged with the reason.
        sizes: per-rank message sizes in bytes (rounded to whole ``[*, 576]`` rows of ``dtype``).
        specs: codec specs of the compressed collectives; ``auto`` is the per-message policy of ``--tp-comm-compression
            auto``: :data:`megatron_tpcomp.config.AUTO_DEFAULT_SPEC` or the stock collective, whichever the cost
            model (``perf_table``) predicts faster for the case's message; the record says which (``auto_choice``).
        algos: all-reduce algorithms (``one-shot``, ``two-shot``, ``auto``).
        ops: ``all_reduce``, ``all_gather``, ``reduce_scatter``.
        reps: timed repetitions per case (medians reported); ``warmup`` untimed ones before.
        dtype: message dtype name (``bf16``, ``fp16``, ``fp32``).
        burst: tbf burst in bytes (default: :func:`megatron_tpcomp.bench.link.default_burst`).
        limit: tbf queue in bytes (default: :func:`megatron_tpcomp.bench.link.default_limit`).
        timeout_s: wall-clock limit per launch (also the process-group timeout).
        perf_table: performance table of the cost model for ``auto`` (``tpcomp bench perf-table``); None: the
            published defaults.
        log: progress and link messages (the ranks print their per-case progress lines themselves).
        on_records: called with every record so far after each launch (``--json`` keeps them in FILE.partial).

    Returns:
        One record per case and link with the keys :data:`REQUIRED_KEYS` (``link`` is the rate actually used,
        ``"none"`` when unshaped; ``bytes`` is the actual per-rank input, whole rows) plus ``requested_bytes,
        algo_used, canonical, fallback, dtype, shape, codec_ms, baseline_wire_bytes, ideal_ms,
        baseline_ideal_ms`` (None when unshaped), ``rel_err`` (compressed vs stock result), ``times_ms,
        baseline_times_ms`` (per repetition, slowest rank), ``reps, warmup, threads, shaped, link_info`` (rate,
        rate_bps, burst, limit, mtu, mode, shaped, and requested/reason when shaping was impossible).

    Raises:
        ValueError: bad arguments. BenchError: a rank failed or timed out.
    """
    _check_run_args(world_sizes, algos, ops, reps, warmup, dtype)
    links = list(links) if links is not None else default_links()
    for lk in links:
        linkmod.parse_rate(lk)  # ValueError on a typo, before anything starts
    cases = plan_cases(ops, sizes, specs, algos)
    records: list[dict] = []
    for n in world_sizes:
        threads = default_threads(n)
        with contextlib.closing(linkmod.each_link(n, links, burst=burst, limit=limit, log=log)) as each:
            for label, info, shaped in each:
                plan = dict(
                    label=f"{n} ranks, {label}",
                    reps=reps,
                    warmup=warmup,
                    threads=threads,
                    dtype=dtype,
                    timeout_s=timeout_s,
                    cases=cases,
                    perf_table=os.path.abspath(perf_table) if perf_table else None,
                )
                with tempfile.TemporaryDirectory(prefix="tpcomp-bench-") as workdir:
                    raw = _launch(n, shaped, plan, workdir, timeout_s)
                records += [_finish(r, label, info, threads) for r in raw]
                if on_records is not None:
                    on_records(records)
    return records


def _algo_label(rec: dict) -> str:
    # "auto>one-shot": what was asked and what ran, when they differ (auto, or a fallback to the stock one).
    return rec["algo_used"] if rec["algo"] == rec["algo_used"] else f"{rec['algo']}>{rec['algo_used']}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of :func:`run`'s records."""
    head = (
        f"{'N':>2} {'link':>7} {'op':<14} {'spec':<12} {'algo':<16} {'size':>7} {'ms':>8} {'stock ms':>8} "
        f"{'speedup':>7} {'codec ms':>8} {'wire B':>9} {'ideal':>7} {'st.ideal':>8} {'rel err':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['world_size']:>2} {r['link']:>7} {r['op']:<14} {r['spec']:<12} {_algo_label(r):<16} "
            f"{size_label(r['bytes']):>7} {r['median_ms']:>8.2f} {r['baseline_median_ms']:>8.2f} "
            f"{r['speedup']:>6.2f}x {r['codec_ms']:>8.2f} {r['wire_bytes']:>9} {_opt(r['ideal_ms'], '7.2f'):>7} "
            f"{_opt(r['baseline_ideal_ms'], '8.2f'):>8} {_opt(r['rel_err'], '7.4f'):>7}"
        )
    return "\n".join(lines)


TARGETS = {"int4:g32": 3.0, "fp8": 1.7}  # 2 ranks, 1 Gbit/s, 8 MiB bf16 all-reduce: stock / compressed


def target_lines(records: list[dict]) -> list[str]:
    """One line per measured target case (2 ranks, shaped 1 Gbit/s, 8 MiB bf16 all-reduce): speedup vs goal."""
    lines = []
    for r in records:
        goal = TARGETS.get(r["spec"])
        if (
            goal is not None
            and r["op"] == "all_reduce"
            and r["world_size"] == 2
            and r["link"] == "1gbit"
            and r["requested_bytes"] == 8 << 20
            and r["dtype"] == "bfloat16"
        ):
            verdict = "met" if r["speedup"] >= goal else "NOT met"
            lines.append(f"target {r['spec']} {r['algo_used']}: {r['speedup']:.2f}x (goal >= {goal}x): {verdict}")
    return lines


def _parser() -> argparse.ArgumentParser:
    """The command line of ``tpcomp bench collectives``."""
    from megatron_tpcomp.cliutil import HelpFormatter, add_specs_argument

    parser = argparse.ArgumentParser(
        prog="tpcomp bench collectives",
        formatter_class=HelpFormatter,
        description="Compressed vs stock collectives (gloo, separate processes), measured alternately in the same "
        "run, optionally over a tc-shaped link between network namespaces (needs root). Reports medians, "
        "speedup = stock / compressed (codec included), bytes on the wire and the ideal time bytes/rate.",
    )
    parser.add_argument("--world-size", default="2", help="comma-separated world sizes, each >= 2 (default 2)")
    parser.add_argument(
        "--link",
        default=None,
        help="comma-separated link rates: tc rates like 1gbit, 500mbit, 5gbit, or none (loopback); default "
        "none,1gbit as root, none otherwise",
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"per-rank message sizes (default {DEFAULT_SIZES})")
    add_specs_argument(parser, DEFAULT_SPECS, "comma-separated codec specs, or auto (the cost model decides)")
    parser.add_argument(
        "--algo", default=DEFAULT_ALGOS, help=f"all-reduce algorithms: {', '.join(ALGOS)} (default {DEFAULT_ALGOS})"
    )
    parser.add_argument("--ops", default=DEFAULT_OPS, help=f"collectives: {', '.join(OPS)} (default {DEFAULT_OPS})")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help=f"timed repetitions (default {DEFAULT_REPS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed (default {DEFAULT_WARMUP})")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="message dtype (default bf16)")
    parser.add_argument("--burst", default=None, help="tbf burst, e.g. 125KB (default: 1 ms at the rate, >= 128KiB)")
    parser.add_argument(
        "--perf-table",
        default=None,
        help="cost-model table (tpcomp bench perf-table) for spec 'auto', which sends each message compressed or "
        "stock, whichever the table predicts faster (default: published defaults)",
    )
    add_launch_arguments(parser, DEFAULT_TIMEOUT_S)
    return parser


@dataclass(frozen=True)
class _Settings:
    """The validated lists and sizes of one command line."""

    world_sizes: list[int]
    links: list[str]
    sizes: list[int]
    specs: list[str]
    algos: list[str]
    ops: list[str]
    burst: int | None
    limit: int | None


def _choices(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    """The comma-separated ``value`` of ``flag``, every item one of ``allowed``."""
    items = split_list(value)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad or value!r}; expected {', '.join(allowed)}")
    return items


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Settings:
    """Validate ``args`` before minutes of timing; a bad value ends the program through ``parser.error``."""
    from megatron_tpcomp.codecs import CodecError, make_codec

    try:
        world_sizes = [int(s) for s in split_list(args.world_size)]
        if not world_sizes or any(n < 2 for n in world_sizes):
            raise ValueError(f"--world-size needs sizes >= 2, got {args.world_size!r}")
        links = split_list(args.link) if args.link is not None else default_links()
        if args.link is not None and not links:
            links = ["none"]  # --link "" is "none"
        for lk in links:
            linkmod.parse_rate(lk)
        sizes = [parse_size(s) for s in split_list(args.sizes)]
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"--sizes needs positive sizes, got {args.sizes!r}")
        specs = split_list(args.specs)
        if not specs:
            raise ValueError("--specs is empty")
        for s in specs:
            if s != "auto":
                make_codec(s)  # fail fast on a typo, before minutes of timing
        if args.perf_table and not os.path.isfile(args.perf_table):
            raise ValueError(f"--perf-table {args.perf_table}: no such file")
        algos, ops = _choices(args.algo, ALGOS, "--algo"), _choices(args.ops, OPS, "--ops")
        burst = parse_size(args.burst) if args.burst else None
        limit = parse_size(args.limit) if args.limit else None
        if burst is not None and limit is not None and limit < burst:
            raise ValueError(f"--limit {limit} B must be at least --burst {burst} B")
        check_json_path(args.json)
    except (CodecError, ValueError) as exc:
        parser.error(str(exc))
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return _Settings(world_sizes, links, sizes, specs, algos, ops, burst, limit)


def main(argv: list[str] | None = None) -> int:
    """``tpcomp bench collectives``: parse options, :func:`run`, print the table, write ``--json``."""
    parser = _parser()
    args = parser.parse_args(argv)
    st = _settings(parser, args)
    reason = linkmod.unavailable_reason()
    if reason is not None and any(linkmod.parse_rate(lk) is not None for lk in st.links):
        print(f"note: shaped links are unavailable here ({reason}); those runs are unshaped, on loopback")
    print(
        f"world sizes {st.world_sizes}, links {st.links}, {args.dtype} [tokens, 576] messages, medians of "
        f"{args.reps} alternating repetitions after {args.warmup} warm-up, slowest rank per repetition",
        flush=True,
    )
    try:
        records = run(
            st.world_sizes,
            st.links,
            st.sizes,
            st.specs,
            st.algos,
            st.ops,
            reps=args.reps,
            warmup=args.warmup,
            dtype=args.dtype,
            perf_table=args.perf_table,
            burst=st.burst,
            limit=st.limit,
            timeout_s=args.timeout,
            log=(lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True)),
            on_records=partial_writer(args.json),
        )
    except (BenchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rank processes stopped, namespaces removed", file=sys.stderr)
        return 130
    return report(records, format_table(records), target_lines(records), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
