"""End-to-end inference time with compressed TP communication: ``tpcomp bench e2e``.

SmolLM2-135M (or any ``tpcomp convert`` checkpoint) at TP=3 through megatron-core's static inference engine, one
process per rank over gloo, optionally over a tc-shaped link: time to first token (TTFT) for prompts of
``--prompt-lens`` tokens and time per output token (TPOT) over ``--gen-tokens`` decode steps, for the
uncompressed baseline (spec ``none``) and each compression spec, ``auto`` included. The model is loaded once per
rank and compression is switched in the running engine; the specs alternate within every repetition (baseline,
spec 1, spec 2, ..., baseline, ...) so machine noise hits all alike, and medians over the repetitions are
reported. Measurement details (prefill and decode stamps, the timing of every TP collective, the slowest rank) are
in :mod:`megatron_tpcomp.bench.e2e_worker`.

Ranks run on the CPU (gloo; ``CUDA_VISIBLE_DEVICES`` is cleared for them), ``cores / tp`` threads each, in fp32 by
default: on CPUs without AVX512-BF16 a bf16 matrix product runs ~100x slower than fp32 (docs/results.md), which
would bury the communication. Activations and collectives are then fp32, so a codec's byte ratio is twice its bf16
one (``wire_bytes`` reports what was sent).

``comm_share`` is measured, not estimated: the time the baseline's ranks spend inside TP collectives during the
prefill over its TTFT (mean over ranks). ``decode_comm_share`` is the same for the decode steps.

Links (ranks in network namespaces joined by :class:`megatron_tpcomp.bench.link.ShapedLink`; needs root):

- :data:`COMM_BOUND_RATE` (1 Gbit/s) is chosen so that the baseline spends about half of its prefill in TP
  communication (measured shares in docs/results.md), the regime of 8 L4 GPUs on PCIe without NVLink that
  motivated this project;
- ``none`` (loopback, unshaped) is the fast link where compression should not pay.

Without root the shaped rates cannot be built: the run says so and measures unshaped instead, recording
``link: "none"`` with ``link_info.requested`` and ``link_info.reason``.

Targets (goals, not tests): ``int4:g32`` TTFT >= 1.6x faster than the baseline on the comm-bound link;
``auto`` no more than 2% slower than the baseline on the fast link (TTFT) and in decode (TPOT) on every link.

Besides codec specs, per-layer config files (``--config FILE``, e.g. one found by ``tpcomp calibrate --search``)
are settings of their own, labelled by the file's stem and checked against the checkpoint before any rank starts.

From Python: :func:`run`; from the shell: ``tpcomp bench e2e`` or ``python -m megatron_tpcomp.bench.e2e``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_tpcomp.bench import link as linkmod
from megatron_tpcomp.bench.common import add_launch_arguments, check_json_path, partial_writer, report, split_list
from megatron_tpcomp.bench.ranks import BenchError, launch_workers
from megatron_tpcomp.launch import default_threads

#: Comm-bound link rate: about half of the baseline's prefill in TP communication (see the module docstring).
#: (Rates below ~600 Mbit/s stalled with a tbf bucket under one 64 KiB GSO segment; link.MIN_BURST is 128 KiB.)
COMM_BOUND_RATE = "1gbit"
DEFAULT_PROMPT_LENS = "128,512,1024"
DEFAULT_SPECS = "none,int4:g32+had,int4:g32,fp8,auto"
DEFAULT_GEN_TOKENS = 16
DEFAULT_REPS = 3
DEFAULT_WARMUP = 1
DEFAULT_TIMEOUT_S = 3600.0
BASELINE = "none"
WORKER = "megatron_tpcomp.bench.e2e_worker"
#: Record keys every record has (the documented list, then the extras).
REQUIRED_KEYS = (
    "spec",
    "prompt_len",
    "ttft_ms",
    "tpot_ms",
    "baseline_ttft_ms",
    "baseline_tpot_ms",
    "speedup",
    "tpot_speedup",
    "comm_share",
    "link",
    "link_info",
    "world_size",
    "reps",
    "wire_bytes",
)
#: Goals: INT4 TTFT speedup on the comm-bound link; auto vs the baseline on the fast link and in decode.
INT4_TTFT_GOAL = 1.6
INT4_SPEC = "int4:g32"
AUTO_TOLERANCE = 0.02


def default_links() -> list[str]:
    """``[COMM_BOUND_RATE, "none"]`` where a shaped link can be built (root, ip and tc present), else ``["none"]``."""
    return [COMM_BOUND_RATE, "none"] if linkmod.unavailable_reason() is None else ["none"]


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _ideal(share: float | None, wire: float | None, base_wire: float | None) -> float | None:
    """Amdahl bound of the TTFT speedup: the baseline's compute plus its communication scaled by the bytes sent,
    codec work free (an estimate beside the measurement, not a measurement)."""
    if share is None or not wire or not base_wire:
        return None
    return 1.0 / ((1.0 - share) + share * wire / base_wire)


def aggregate(result: dict, link_label: str, link_info: dict, world_size: int) -> list[dict]:
    """One record per (prompt_len, spec) of a worker's result: medians over the repetitions, the baseline's
    numbers and the ratios against it (``speedup`` = baseline TTFT / TTFT, ``tpot_speedup`` likewise)."""
    runs = result["runs"]
    lens = list(dict.fromkeys(r["prompt_len"] for r in runs))
    specs = list(dict.fromkeys(r["spec"] for r in runs))
    records = []
    for L in lens:
        by_spec = {s: [r for r in runs if r["prompt_len"] == L and r["spec"] == s] for s in specs}
        base = by_spec[BASELINE]
        base_ttft = _median([r["ttft_ms"] for r in base])
        base_tpot = _median([r["tpot_ms"] for r in base])
        base_share = _median([r["comm_share"] for r in base])
        base_dshare = _median([r["decode_comm_share"] for r in base])
        base_wire = _median([r["wire_bytes"] for r in base])
        for s in specs:
            rs = by_spec[s]
            ttft = _median([r["ttft_ms"] for r in rs])
            tpot = _median([r["tpot_ms"] for r in rs])
            wire = _median([r["wire_bytes"] for r in rs])
            rec = dict(
                spec=s,
                prompt_len=L,
                prompt_tokens=rs[0]["prompt_tokens"],
                ttft_ms=ttft,
                tpot_ms=tpot,
                baseline_ttft_ms=base_ttft,
                baseline_tpot_ms=base_tpot,
                speedup=_ratio(base_ttft, ttft),
                tpot_speedup=_ratio(base_tpot, tpot),
                ideal_speedup=_ideal(base_share, wire, base_wire),
                comm_share=base_share,
                decode_comm_share=base_dshare,
                spec_comm_share=_median([r["comm_share"] for r in rs]),
                spec_comm_ms=_median([r["comm_ms"] for r in rs]),
                link=link_label,
                shaped=bool(link_info.get("shaped")),
                link_info=link_info,
                world_size=world_size,
                reps=len(rs),
                gen_tokens=rs[0]["decode_steps"] + 1,
                wire_bytes=int(wire) if wire is not None else None,
                baseline_wire_bytes=int(base_wire) if base_wire is not None else None,
                decode_wire_bytes_per_token=_median([r["decode_wire_bytes"] / max(r["decode_steps"], 1) for r in rs]),
                prefill_compressed_frac=_ratio(rs[-1]["prefill_compressed_calls"], rs[-1]["prefill_calls"]),
                decode_compressed_frac=_ratio(rs[-1]["decode_compressed_calls"], rs[-1]["decode_calls"]),
                ttft_times_ms=[r["ttft_ms"] for r in rs],
                tpot_times_ms=[r["tpot_ms"] for r in rs],
                dtype=result["dtype"],
                threads=result["threads"],
                model=os.path.basename(os.path.normpath(str(result["model"]))),  # a name, not this machine's path
            )
            if s != BASELINE and rs[-1].get("auto_choices"):
                rec["auto_choices"] = rs[-1]["auto_choices"]
                cal = result.get("calibration")
                rec["perf_table"] = cal["table"] if cal else result.get("perf_table")
            records.append(rec)
    return records


def _launch(world_size: int, link: linkmod.ShapedLink | None, plan: dict, workdir: str, timeout_s: float) -> dict:
    """Start one worker per rank (in the link's namespaces, or on loopback), wait, return rank 0's result."""
    env = {"CUDA_VISIBLE_DEVICES": ""}  # a CPU benchmark (gloo, CPU patches) also on a machine with a GPU
    return launch_workers(WORKER, world_size, link, plan, workdir, timeout_s, plan_flag="--plan", env=env)


def resolve_model(model: str | None, tp: int) -> str:
    """The checkpoint directory: ``model`` (a ``tpcomp convert`` directory, or a known model name) or the default
    SmolLM2 converted for ``tp`` (once, into the cache). Raises ValueError when it is unusable at ``tp``."""
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import CheckpointError, read_metadata
    from megatron_tpcomp.cliutil import check_model_and_tp

    try:
        check_model_and_tp(model or assets.DEFAULT_MODEL, tp)  # a TP that does not divide it: before converting
        path = assets.ensure_checkpoint(model or assets.DEFAULT_MODEL, tp, progress=False)
        meta = read_metadata(path)
    except (assets.AssetError, CheckpointError, OSError) as exc:
        raise ValueError(f"--model {model or assets.DEFAULT_MODEL!r}: {exc}") from None
    if meta.tp_size != tp:
        raise ValueError(
            f"--model {path} is sharded for TP={meta.tp_size}, not --tp {tp}; reshard with `tpcomp convert {path} "
            f"OUT --tp {tp}`"
        )
    return str(path)


def check_specs(specs: Sequence[str]) -> list[str]:
    """Validated specs with the baseline ``none`` first (added when missing); ValueError names a bad one."""
    from megatron_tpcomp.config import CompressionConfig

    out = []
    for s in specs:
        try:
            CompressionConfig.from_spec(s)
        except ValueError as exc:  # ConfigError and CodecError
            raise ValueError(f"--specs: bad spec {s!r}: {exc}") from None
        if s not in out:
            out.append(s)
    if BASELINE in out:
        out.remove(BASELINE)
    return [BASELINE, *out]


def check_specs_for_model(specs: Sequence[str], ckpt: str, tp: int) -> None:
    """Each spec's config checked against the checkpoint in this process, before any rank is spawned (ValueError
    naming the spec)."""
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.cliutil import check_config_for_model
    from megatron_tpcomp.config import CompressionConfig

    model_cfg = read_metadata(ckpt).model_config
    for s in specs:
        check_config_for_model(CompressionConfig.from_spec(s), model_cfg, tp, f"--specs {s}")


def load_config_files(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--config`` files as settings: ``{file stem: validated config mapping}``, in order. ValueError (one line,
    naming the file) for an unreadable or invalid file, or two files with the same stem."""
    from megatron_tpcomp.config import CompressionConfig

    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        label = Path(path).stem
        if label in out:
            raise ValueError(f"--config {path}: a second config labelled {label!r} (the file stem); rename one file")
        out[label] = CompressionConfig.load(path).to_dict()  # ConfigError (a ValueError) names the file
    return out


def check_configs_for_model(
    configs: Mapping[str, Mapping[str, Any]],
    specs: Sequence[str],
    ckpt: str,
    tp: int,
    sources: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-layer configs (``{label: mapping}``) validated and checked against the checkpoint at ``tp`` in this
    process, before any rank is spawned; a label must differ from every spec. Returns plain dicts (JSON for the
    plan). ValueError names the config (``sources[label]``, its file, else the label) and the mismatch."""
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.cliutil import check_config_for_model
    from megatron_tpcomp.config import CompressionConfig

    if not configs:
        return {}
    model_cfg = read_metadata(ckpt).model_config
    out: dict[str, dict[str, Any]] = {}
    for label, data in configs.items():
        if not label or label in specs:
            raise ValueError(f"--config {label!r}: the label must be non-empty and differ from the specs {list(specs)}")
        source = (sources or {}).get(label, label)
        cfg = CompressionConfig.from_dict(data, source=source)
        check_config_for_model(cfg, model_cfg, tp, f"--config {source}")
        out[label] = cfg.to_dict()
    return out


def run(
    links: Sequence[str] | None = None,
    prompt_lens: Sequence[int] = (128, 512, 1024),
    specs: Sequence[str] = ("none", "int4:g32+had", "int4:g32", "fp8", "auto"),
    *,
    tp: int = 3,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    reps: int = DEFAULT_REPS,
    warmup: int = DEFAULT_WARMUP,
    model: str | None = None,
    dtype: str = "fp32",
    perf_table: str | None = None,
    burst: int | None = None,
    limit: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] = print,
    on_records: Callable[[list[dict]], None] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict]:
    """Measure every (link, prompt length, spec); one launch of ``tp`` rank processes per link.

    Args:
        links: tc rates (``"1gbit"``) or ``"none"``; default :func:`default_links`. A rate that cannot be shaped
            here is measured unshaped instead (once) and logged with the reason.
        prompt_lens: prompt lengths in tokens (each prompt is a prefix of the State of the Union text that the
            engine tokenizes to exactly that many tokens).
        specs: compression specs; ``none`` (the baseline) is added first when missing; ``auto`` = policy auto.
        tp: tensor-parallel size = number of rank processes.
        gen_tokens: tokens generated per run (>= 2: the first comes from the prefill, the others are decode steps).
        reps: timed repetitions (medians reported); ``warmup``: untimed passes over the specs before, at the
            shortest prompt.
        model: checkpoint directory or model name (default: SmolLM2-135M converted for ``tp``).
        dtype: ``bf16`` or ``fp32`` compute and communication.
        perf_table: cost-model table for ``auto`` (default: calibrated on each link by the run).
        burst, limit: tbf parameters in bytes (default: :mod:`megatron_tpcomp.bench.link`'s).
        timeout_s: wall-clock limit per launch (also the process-group timeout).
        log: progress and link messages (rank 0 prints its per-run lines to stderr itself).
        on_records: called with every record so far after each link (``--json`` keeps them in FILE.partial).
        configs: per-layer compression configs as more settings after the specs, ``{label: config mapping}``
            (:func:`load_config_files` reads files); their records have ``spec`` = the label and ``config``
            = True.

    Returns:
        One record per (link, prompt_len, spec) with :data:`REQUIRED_KEYS` plus ``ideal_speedup`` (the TTFT
        speedup if codecs were free and communication time scaled with the bytes sent), ``prompt_tokens, shaped,
        decode_comm_share, spec_comm_share, spec_comm_ms, gen_tokens, baseline_wire_bytes,
        decode_wire_bytes_per_token, prefill_compressed_frac, decode_compressed_frac, ttft_times_ms,
        tpot_times_ms, dtype, threads, model`` (and ``auto_choices, perf_table`` for policy auto).

    Raises:
        ValueError: bad arguments. BenchError: a rank failed or timed out.
    """
    _check_run_args(tp, reps, warmup, gen_tokens, prompt_lens, dtype, perf_table)
    specs = check_specs(specs)
    links = list(links) if links is not None else default_links()
    for lk in links:
        linkmod.parse_rate(lk)  # ValueError on a typo, before anything starts
    ckpt = resolve_model(model, tp)
    plan_configs = check_configs_for_model(configs or {}, specs, ckpt, tp)
    plan = _plan(ckpt, specs, plan_configs, dtype, tp, timeout_s, prompt_lens, gen_tokens, reps, warmup, perf_table)
    records: list[dict] = []
    each = linkmod.each_link(tp, links, burst=burst, limit=limit, log=log, tag=f"TP={tp}")
    with contextlib.closing(each):  # the link goes down even if a run fails
        for label, info, shaped in each:
            records += _measure_link(tp, label, info, shaped, plan, timeout_s)
            if on_records is not None:
                on_records(records)
    return records


def _check_run_args(
    tp: int,
    reps: int,
    warmup: int,
    gen_tokens: int,
    prompt_lens: Sequence[int],
    dtype: str,
    perf_table: str | None,
) -> None:
    """:func:`run`'s scalar arguments, checked before anything is resolved or started (ValueError, one line)."""
    if tp < 2:
        raise ValueError(f"--tp must be >= 2, got {tp}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps} and {warmup}")
    if gen_tokens < 2:
        raise ValueError(
            f"--gen-tokens must be >= 2 (one prefill token and at least one decode step), got {gen_tokens}"
        )
    bad = [L for L in prompt_lens if int(L) < 1]
    if bad or not prompt_lens:
        raise ValueError(f"--prompt-lens needs positive token counts, got {list(prompt_lens)}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"unknown dtype {dtype!r}; expected bf16 or fp32")
    if perf_table is not None and not os.path.isfile(perf_table):
        raise ValueError(f"--perf-table {perf_table}: no such file")


def _plan(
    ckpt: str,
    specs: Sequence[str],
    plan_configs: Mapping[str, Mapping[str, Any]],
    dtype: str,
    tp: int,
    timeout_s: float,
    prompt_lens: Sequence[int],
    gen_tokens: int,
    reps: int,
    warmup: int,
    perf_table: str | None,
) -> dict[str, Any]:
    """The workers' plan without its per-link ``label`` and ``workdir`` (see :func:`_measure_link`): the
    checkpoint, the settings (specs, then the configs' labels) and the timing parameters, as JSON values."""
    return dict(
        model=ckpt,
        dtype=dtype,
        threads=default_threads(tp),
        timeout_s=timeout_s,
        prompt_lens=[int(L) for L in prompt_lens],
        gen_tokens=gen_tokens,
        specs=[*specs, *plan_configs],
        configs=plan_configs,
        reps=reps,
        warmup=warmup,
        perf_table=os.path.abspath(perf_table) if perf_table else None,
    )


def _measure_link(
    tp: int, label: str, info: dict, shaped: linkmod.ShapedLink | None, plan: Mapping[str, Any], timeout_s: float
) -> list[dict]:
    """One launch of ``tp`` ranks over one link with ``plan``: its records (:func:`aggregate`), those of a
    ``--config`` setting marked ``config`` = True."""
    with tempfile.TemporaryDirectory(prefix="tpcomp-e2e-") as workdir:
        result = _launch(tp, shaped, {"label": f"TP={tp}, {label}", **plan, "workdir": workdir}, workdir, timeout_s)
    new = aggregate(result, label, info, tp)
    for rec in new:
        rec["config"] = rec["spec"] in plan["configs"]
    return new


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of :func:`run`'s records (the spec column as wide as the longest label: a
    ``--config`` file's stem can be long)."""
    sw = max([13, *(len(str(r["spec"])) for r in records)])
    head = (
        f"{'link':>8} {'prompt':>6} {'spec':<{sw}} {'TTFT ms':>9} {'base ms':>9} {'speedup':>7} {'TPOT ms':>8} "
        f"{'base ms':>8} {'tpot x':>6} {'comm%':>5} {'dec comm%':>9} {'wire MB':>8} {'compr':>5} {'ideal':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        share = _opt(None if r["comm_share"] is None else 100 * r["comm_share"], "5.0f")
        dshare = _opt(None if r.get("decode_comm_share") is None else 100 * r["decode_comm_share"], "9.0f")
        wire = _opt(None if r["wire_bytes"] is None else r["wire_bytes"] / 1e6, "8.2f")
        frac = r.get("prefill_compressed_frac")
        lines.append(
            f"{r['link']:>8} {r['prompt_len']:>6} {r['spec']:<{sw}} {_opt(r['ttft_ms'], '9.1f')} "
            f"{_opt(r['baseline_ttft_ms'], '9.1f')} {_opt(r['speedup'], '6.2f')}x {_opt(r['tpot_ms'], '8.1f')} "
            f"{_opt(r['baseline_tpot_ms'], '8.1f')} {_opt(r['tpot_speedup'], '5.2f')}x {share} {dshare} {wire} "
            f"{_opt(None if frac is None else 100 * frac, '4.0f')}% {_opt(r.get('ideal_speedup'), '5.2f')}x"
        )
    return "\n".join(lines)


def target_lines(records: list[dict]) -> list[str]:
    """The goals, per measured case: INT4 TTFT speedup on every shaped link at or below the comm-bound rate
    (the baseline's comm share is printed beside it); ``auto`` vs the baseline in TTFT on the unshaped link and
    in TPOT on every link (no more than 2% slower)."""
    lines = []
    slow_bps = linkmod.parse_rate(COMM_BOUND_RATE)
    for r in records:
        rate = r["link_info"].get("rate_bps") if r.get("shaped") else None
        share = "-" if r["comm_share"] is None else f"{100 * r['comm_share']:.0f}%"
        if r["spec"] == INT4_SPEC and rate is not None and rate <= slow_bps and r["speedup"] is not None:
            verdict = "met" if r["speedup"] >= INT4_TTFT_GOAL else "NOT met"
            lines.append(
                f"target {INT4_SPEC} TTFT {r['link']} {r['prompt_len']} tokens (baseline comm {share}): "
                f"{r['speedup']:.2f}x (goal >= {INT4_TTFT_GOAL}x): {verdict}"
            )
        if r["spec"] == "auto":
            checks = [("TPOT", r["tpot_speedup"])]
            if not r.get("shaped"):
                checks.insert(0, ("TTFT", r["speedup"]))
            for what, x in checks:
                if x is None:
                    continue
                slower = 1 / x - 1
                verdict = "met" if slower <= AUTO_TOLERANCE else "NOT met"
                lines.append(
                    f"target auto {what} {r['link']} {r['prompt_len']} tokens: {100 * slower:+.1f}% vs none "
                    f"(goal <= +{100 * AUTO_TOLERANCE:.0f}%): {verdict}"
                )
    return lines


def _ints(text: str, what: str) -> list[int]:
    out = []
    for s in split_list(text):
        try:
            out.append(int(s))
        except ValueError:
            raise ValueError(f"{what}: {s!r} is not a whole number") from None
    return out


def main(argv: list[str] | None = None) -> int:
    """``tpcomp bench e2e``: parse options, :func:`run`, print the table and the targets, write ``--json``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        opts = _options(args)
    except ValueError as exc:
        parser.error(str(exc))
    _announce(args, opts)
    try:
        records = run(
            opts.links,
            opts.prompt_lens,
            opts.specs,
            tp=args.tp,
            gen_tokens=args.gen_tokens,
            reps=args.reps,
            warmup=args.warmup,
            model=opts.model,
            dtype=args.dtype,
            perf_table=args.perf_table,
            burst=opts.burst,
            limit=opts.limit,
            timeout_s=args.timeout,
            # progress on stderr, results on stdout
            log=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)),
            on_records=partial_writer(args.json),
            configs=opts.configs,
        )
    except (BenchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rank processes stopped, namespaces removed", file=sys.stderr)
        return 130
    return report(records, format_table(records), target_lines(records), args.json)


def _parser() -> argparse.ArgumentParser:
    """The ``tpcomp bench e2e`` argument parser (declarations only; :func:`_options` checks the values)."""
    from megatron_tpcomp.cliutil import (
        HelpFormatter,
        add_gen_tokens_argument,
        add_load_argument,
        add_specs_argument,
        add_tp_argument,
    )

    parser = argparse.ArgumentParser(
        prog="tpcomp bench e2e",
        formatter_class=HelpFormatter,
        description="End-to-end TTFT and TPOT of a TP model through megatron-core's static inference engine, "
        "uncompressed vs each compression spec vs auto, alternating in one run (one gloo process per rank, "
        "optionally over a tc-shaped link between network namespaces; needs root). Reports medians, speedups "
        "against the baseline and the baseline's measured share of time in TP communication.",
        epilog=f"Default links: {COMM_BOUND_RATE} (comm-bound: about half of the baseline prefill is TP "
        "communication on a 2-core host) and none (loopback, where compression should not pay). Goals: "
        f"{INT4_SPEC} TTFT >= {INT4_TTFT_GOAL}x on the comm-bound link; auto within "
        f"{100 * AUTO_TOLERANCE:.0f}% of none on the fast link and in decode.",
    )
    add_tp_argument(parser, 3, "tensor-parallel size = rank processes, >= 2", type=int)
    parser.add_argument(
        "--link",
        default=None,
        help=f"comma-separated link rates: tc rates like 1gbit, 2gbit, or none (loopback); default "
        f"{COMM_BOUND_RATE},none as root, none otherwise",
    )
    parser.add_argument(
        "--prompt-lens", default=DEFAULT_PROMPT_LENS, help=f"prompt lengths in tokens (default {DEFAULT_PROMPT_LENS})"
    )
    add_gen_tokens_argument(
        parser,
        DEFAULT_GEN_TOKENS,
        "tokens generated per run, >= 2; TPOT is the median decode step",
        type=int,
    )
    add_specs_argument(
        parser,
        DEFAULT_SPECS,
        "comma-separated compression specs; none = uncompressed baseline (added when missing), auto = policy auto",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a per-layer compression config (JSON/YAML, e.g. from tpcomp calibrate --search) as one more setting, "
        "labelled by its file stem; repeat for several",
    )
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help=f"timed repetitions (default {DEFAULT_REPS})")
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed passes, shortest prompt (default {DEFAULT_WARMUP})"
    )
    add_load_argument(
        parser, None, "checkpoint directory (tpcomp convert) at --tp (default: SmolLM2-135M from the assets cache)"
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16"),
        help="compute and communication dtype (default fp32: CPUs without AVX512-BF16 multiply bf16 matrices ~100x "
        "slower than fp32, which would bury the communication)",
    )
    parser.add_argument(
        "--perf-table", default=None, help="cost-model table for auto (default: measured on each link by the run)"
    )
    parser.add_argument(
        "--burst",
        default=None,
        help="tbf burst, e.g. 256KiB (default: 1 ms at the rate, >= 128KiB: smaller buckets stall on 64 KiB GSO "
        "packets)",
    )
    add_launch_arguments(parser, DEFAULT_TIMEOUT_S)
    return parser


@dataclass(frozen=True)
class _Options:
    """``tpcomp bench e2e``'s options that :func:`_options` parsed or resolved (the others are used as given)."""

    links: list[str]
    prompt_lens: list[int]
    specs: list[str]
    burst: int | None
    limit: int | None
    configs: dict[str, dict[str, Any]]
    model: str


def _options(args: argparse.Namespace) -> _Options:
    """Check the parsed options and resolve the checkpoint and the ``--config`` files against it, all before
    anything starts. ValueError (one line) names the bad option."""
    from megatron_tpcomp.bench.common import parse_size

    if args.tp < 2:
        raise ValueError(f"--tp must be >= 2, got {args.tp}")
    links = split_list(args.link) if args.link is not None else default_links()
    if args.link is not None and not links:
        links = ["none"]
    for lk in links:
        linkmod.parse_rate(lk)
    prompt_lens = _ints(args.prompt_lens, "--prompt-lens")
    bad = [L for L in prompt_lens if L < 1]
    if bad or not prompt_lens:
        raise ValueError(f"--prompt-lens needs positive token counts, got {args.prompt_lens!r}")
    if args.gen_tokens < 2:
        raise ValueError(f"--gen-tokens must be >= 2, got {args.gen_tokens}")
    specs = check_specs(split_list(args.specs))
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.perf_table is not None and not os.path.isfile(args.perf_table):
        raise ValueError(f"--perf-table {args.perf_table}: no such file")
    burst = parse_size(args.burst) if args.burst else None
    limit = parse_size(args.limit) if args.limit else None
    if burst is not None and limit is not None and limit < burst:
        raise ValueError(f"--limit {limit} B must be at least --burst {burst} B")
    check_json_path(args.json)
    configs = load_config_files(args.config)
    model = resolve_model(args.model, args.tp)
    check_specs_for_model(specs, model, args.tp)
    sources = {Path(p).stem: p for p in args.config}
    configs = check_configs_for_model(configs, specs, model, args.tp, sources)
    return _Options(links, prompt_lens, specs, burst, limit, configs, model)


def _announce(args: argparse.Namespace, opts: _Options) -> None:
    """On stderr, before the run: that shaped links are impossible here (with the reason), and what is measured."""
    reason = linkmod.unavailable_reason()
    if reason is not None and any(linkmod.parse_rate(lk) is not None for lk in opts.links):
        print(
            f"note: shaped links are unavailable here ({reason}); those runs are unshaped, on loopback", file=sys.stderr
        )
    with_configs = f" + configs {list(opts.configs)}" if opts.configs else ""
    print(
        f"TP={args.tp}, links {opts.links}, prompts {opts.prompt_lens} tokens, {args.gen_tokens} generated, specs "
        f"{opts.specs}{with_configs}, "
        f"{args.dtype}; medians of {args.reps} alternating repetitions after {args.warmup} warm-up, slowest rank",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
