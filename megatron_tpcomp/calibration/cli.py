"""``tpcomp calibrate``: the command line of calibration (statistics and outlier channels, :mod:`.stats`) and of
the per-layer format search (:func:`.configs.search_config`), and the report it prints."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from megatron_tpcomp.calibration.configs import plan_algo_of, search_config, to_config
from megatron_tpcomp.calibration.stats import calibrate
from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.megatron.site import Site

logger = logging.getLogger("megatron_tpcomp")


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}  TP={result['tp']}  k={result['k']}  calibration {result['calibration']['tokens']} tokens, "
        f"held-out {result['calibration']['heldout_tokens']}",
        f"{'site':<18} {'max|x|':>10} {'max/median':>11} {'window overlap':>15} {'held-out overlap':>17}  channels",
    ]

    for key in sorted(result["sites"], key=lambda name: Site.parse(name).order):
        s = result["sites"][key]
        held = "-" if s["heldout_overlap"] is None else f"{s['heldout_overlap']:.2f}"
        lines.append(
            f"{key:<18} {s['absmax_max']:>10.2f} {s['peak_ratio']:>11.0f} {s['window_overlap']:>15.2f} {held:>17}  "
            f"{s['outlier_channels']}"
        )
    return "\n".join(lines)


def _default_candidates() -> tuple[str, ...]:
    from megatron_tpcomp.search import DEFAULT_CANDIDATES

    return DEFAULT_CANDIDATES


def build_parser() -> argparse.ArgumentParser:
    from megatron_tpcomp.cliutil import (
        HelpFormatter,
        add_load_argument,
        add_quiet_argument,
        add_tp_argument,
        int_at_least,
        nonnegative_float,
        nonnegative_int,
        positive_int,
    )

    p = argparse.ArgumentParser(
        prog="tpcomp calibrate",
        formatter_class=HelpFormatter,
        description=(
            "Record per-layer statistics of the TP collectives on calibration text (uncompressed run), pick the top-k "
            "outlier channels per layer and block, report their consistency across windows and on held-out text, "
            "and write a per-layer compression config using SPEC+outliers."
        ),
    )
    add_load_argument(p)
    add_tp_argument(p, 3)
    p.add_argument("--k", type=positive_int, default=None, help="outlier channels per site (default hidden/64)")
    p.add_argument("--spec", default="int4:g32", help="format of the non-outlier channels (default int4:g32)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument(
        "--heldout-tokens", type=nonnegative_int, default=1024, help="held-out tokens for the overlap (0: skip)"
    )
    p.add_argument("--context", type=int_at_least(2), default=512, help="window length (default 512)")
    p.add_argument("--text-file", help="calibration text (default: State of the Union 1961-2000)")
    p.add_argument(
        "--out", required=True, help="per-layer config to write (JSON; checked before the run, written atomically)"
    )
    p.add_argument(
        "--stats-json",
        help="also write the full statistics (per-channel absmax and rms) as JSON (checked before the run)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--search",
        action="store_true",
        help="choose a codec per layer and block (from --candidates or none) minimising bits under --kl-budget "
        "or --ppl-budget",
    )
    p.add_argument(
        "--kl-budget", type=nonnegative_float, default=0.01, help="summed KL allowed by --search (nats/token)"
    )
    p.add_argument(
        "--ppl-budget",
        type=nonnegative_float,
        metavar="PCT",
        help="instead of a KL budget: perplexity increase allowed (percent) on held-out calibration text; the KL "
        "budget is searched from --kl-budget by verified bisection (--budget-steps)",
    )
    p.add_argument(
        "--candidates",
        default=None,
        help="comma-separated SPEC or SPEC@ALGO (ALGO: one-shot when omitted, or two-shot) for --search; +outliers "
        "uses the calibrated channels (default: " + ",".join(_default_candidates()) + ")",
    )
    p.add_argument(
        "--objective",
        choices=("bits", "wire"),
        default="bits",
        help="what --search minimises: payload bits per value (default) or bytes on the wire per rank (one-shot "
        "sends N/2 times what two-shot sends)",
    )
    p.add_argument(
        "--search-tokens", type=positive_int, default=512, help="calibration tokens for the sensitivity runs"
    )
    p.add_argument("--verify", action="store_true", help="with --kl-budget: also verify on held-out calibration text")
    p.add_argument(
        "--verify-tokens",
        type=positive_int,
        default=4096,
        help="held-out calibration tokens per verification (default 4096)",
    )
    p.add_argument("--budget-steps", type=positive_int, default=6, help="verified KL budgets at most for --ppl-budget")
    p.add_argument(
        "--sensitivity-json",
        help="reuse the sensitivities of an earlier --stats-json (skips the sensitivity pass; same model, TP, "
        "candidates and search tokens)",
    )
    add_quiet_argument(p, "no progress bars; log warnings only")
    return p


def _check_args(args: argparse.Namespace, candidates: list[str]) -> None:
    """Everything about the request that can fail before the model runs (raises ValueError, OSError,
    CodecError)."""
    from megatron_tpcomp.cliutil import check_output_file
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.search import candidate_bits

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    check_output_file(out, "--out")  # before the run: a bad path must not cost it
    if args.stats_json:
        check_output_file(args.stats_json, "--stats-json")
    make_codec(args.spec)  # a bad spec fails before the model runs
    if args.search:
        if not candidates:
            raise ValueError("--candidates is empty")
        for c in candidates:
            candidate_bits(c, (args.context, 64), 1)
        if args.ppl_budget is not None and args.ppl_budget < 0:
            raise ValueError(f"--ppl-budget must be >= 0, got {args.ppl_budget}")
        if args.kl_budget < 0 or (args.ppl_budget is not None and args.kl_budget <= 0):
            raise ValueError(f"--kl-budget must be >= 0 (> 0 to start --ppl-budget), got {args.kl_budget}")


def _run(args: argparse.Namespace, candidates: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate, then build the config (searched with ``--search``); returns (result, config)."""
    sensitivity = None
    if args.sensitivity_json:
        loaded = json.loads(Path(args.sensitivity_json).read_text())
        sensitivity = loaded.get("sensitivity", loaded)
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else None
    result = calibrate(
        args.model,
        args.tp,
        k=args.k,
        tokens=args.tokens,
        heldout_tokens=args.heldout_tokens,
        context=args.context,
        text=text,
    )
    if not args.search:
        return result, to_config(result, args.spec)
    config, sens = search_config(
        result,
        candidates,
        args.kl_budget,
        tokens=args.search_tokens,
        context=args.context,
        text=text,
        objective=args.objective,
        ppl_budget=args.ppl_budget,
        verify_tokens=args.verify_tokens,
        steps=args.budget_steps,
        verify=args.verify,
        sensitivity=sensitivity,
        progress=not args.quiet,
    )
    result["sensitivity"] = sens
    return result, config


def _search_line(config: dict[str, Any]) -> str:
    """One line on a searched config: algorithm, predicted KL and bits, and its held-out verification."""
    m = config["meta"]
    b = m["budget"]
    line = (
        f"search: {plan_algo_of(config)}, predicted KL {m['predicted_kl']:.4f} (KL budget {m['kl_budget']:.5f}), "
        f"{m['predicted_bits_per_value']:.3f} bits/value"
    )
    if "verification" in b:
        v = b["verification"]
        line += (
            f"; held-out calibration text ({v['tokens']} tokens): ppl {v['ppl_increase_pct']:+.2f}%, "
            f"KL {v['kld']:.4f}, top-1 {100 * v['top1_agreement']:.1f}%"
        )
        if b["type"] == "ppl":
            line += f" (ppl budget {b['ppl_budget_pct']}%: {'met' if b['met'] else 'NOT met'})"
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.cliutil import atomic_write_json

    out = Path(args.out)
    candidates = (
        [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else list(_default_candidates())
    )
    try:
        _check_args(args, candidates)
        result, config = _run(args, candidates)
    except (ValueError, OSError, CheckpointError, AssetError, CodecError) as exc:
        print(f"tpcomp calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.search:
        print(f"{_search_line(config)}; verify with tpcomp eval --config {out}")
    atomic_write_json(out, config)  # an interrupted run never leaves a truncated config
    print(f"wrote {out}")
    if args.stats_json:
        atomic_write_json(args.stats_json, result, indent=None)
    if any(math.isnan(s["peak_ratio"]) for s in result["sites"].values()):
        logger.warning("megatron-tpcomp: some sites saw NaN activations during calibration")
    return 0
