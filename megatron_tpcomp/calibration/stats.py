"""Calibration: statistics of what each TP collective communicates, and calibrated outlier channels.

``tpcomp calibrate`` runs calibration text through the tensor-parallel model with Megatron's own (uncompressed)
collectives and records, per layer and block (attention output projection, MLP down projection), the
per-channel statistics of every rank's partial sum before it is reduced:

- ``absmax[h]``: max |x| per hidden channel over tokens, windows and ranks (ranks merged with an all-reduce MAX:
  every rank's payload must carry its own outliers);
- ``rms[h]``: root mean square per channel (ranks merged by summing squares);
- ``peak_ratio``: max over channels of absmax / median over channels of absmax: how "massive" the outliers are.

Outlier channels (Dong et al.): the top-``k`` channels by ``absmax`` travel in BF16 and the rest in the chosen
low-bit format. Consistency is reported as the overlap (|A ∩ B| / k) of the chosen set with the top-k of each
calibration window (``window_overlap``, mean) and of held-out text (``heldout_overlap``): on SmolLM2 the set is
stable only where outliers are massive. The written per-layer config gives every block ``SPEC+outliers`` with its
channel table; ``tpcomp eval --config`` measures it and ``tpcomp convert --compression-config`` embeds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.codecs.chscale import exponents_from_rms

logger = logging.getLogger("megatron_tpcomp")

#: Collectives whose input is a row-parallel partial sum (the residual-stream channels that carry outliers).
REDUCTION_OPS = ("all_reduce", "reduce_scatter")


def _overlap(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / max(len(a), 1)


def _site_stats(
    model: torch.nn.Module, windows: list[list[int]], hidden: int
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Run ``windows`` through ``model`` (enabled with spec ``none``) and accumulate per-site statistics.

    Returns:
        (totals: site -> {"absmax": [h], "sumsq": [h], "count": [1]}, per_window: [site -> absmax [h]]),
        all merged across the TP ranks.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_tpcomp.megatron import intercept

    group = parallel_state.get_tensor_model_parallel_group()
    totals: dict[str, dict[str, torch.Tensor]] = {}
    per_window: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}

    def observer(op: str, site: Any, x: torch.Tensor) -> None:
        if op not in REDUCTION_OPS or x.shape[-1] != hidden:
            return
        flat = x.detach().reshape(-1, hidden).float()  # [tokens, h]
        key = str(site)
        absmax = flat.abs().amax(dim=0)
        current[key] = torch.maximum(current[key], absmax) if key in current else absmax
        t = totals.setdefault(key, {"absmax": torch.zeros(hidden), "sumsq": torch.zeros(hidden), "count": 0})
        t["absmax"] = torch.maximum(t["absmax"], absmax)
        t["sumsq"] += flat.square().sum(dim=0)
        t["count"] += flat.shape[0]

    with torch.no_grad(), intercept.observe(observer):
        for ids in windows:
            current.clear()
            tokens = torch.tensor([ids])
            model(tokens, torch.arange(len(ids))[None], attention_mask=None)
            keys = sorted(current)
            stacked = torch.stack([current[k] for k in keys])  # [sites, h]
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=group)
            per_window.append(dict(zip(keys, stacked, strict=True)))
    keys = sorted(totals)
    absmax = torch.stack([totals[k]["absmax"] for k in keys])
    sumsq = torch.stack([totals[k]["sumsq"] for k in keys])
    dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(sumsq, group=group)
    merged = {
        k: {"absmax": absmax[i], "sumsq": sumsq[i], "count": torch.tensor([totals[k]["count"]])}
        for i, k in enumerate(keys)
    }
    return merged, per_window


def _calibrate_worker(
    rank: int, world_size: int, ckpt: str, windows: list[list[int]], heldout: list[list[int]], k: int
) -> dict[str, Any] | None:
    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, meta = load_model(ckpt)
    hidden = meta.model_config.hidden_size
    intercept.enable(model, "none")  # sites on the stack, Megatron's own collectives
    totals, per_window = _site_stats(model, windows, hidden)
    held_totals, _ = _site_stats(model, heldout, hidden) if heldout else ({}, [])
    intercept.disable(model)
    M.destroy_parallel()
    if rank != 0:
        return None
    sites = {}
    for key, t in totals.items():
        absmax = t["absmax"]
        top = [int(c) for c in torch.topk(absmax, k).indices.sort().values]
        median = float(absmax.median())
        sites[key] = {
            "outlier_channels": top,
            "peak_ratio": float(absmax.max()) / max(median, 1e-30),
            "absmax_max": float(absmax.max()),
            "absmax_median": median,
            "rms": (t["sumsq"] / max(int(t["count"]), 1)).sqrt().tolist(),
            "absmax": absmax.tolist(),
            "window_overlap": sum(_overlap(top, [int(c) for c in torch.topk(w[key], k).indices]) for w in per_window)
            / len(per_window),
            "heldout_overlap": _overlap(top, [int(c) for c in torch.topk(held_totals[key]["absmax"], k).indices])
            if key in held_totals
            else None,
        }
    return {"sites": sites, "hidden": hidden, "num_layers": meta.model_config.num_layers}


def calibrate(
    model: str = "smollm2-135m",
    tp: int = 3,
    *,
    k: int | None = None,
    tokens: int = 4096,
    heldout_tokens: int = 1024,
    context: int = 512,
    text: str | None = None,
    heldout_text: str | None = None,
    timeout_s: float = 6 * 3600,
) -> dict[str, Any]:
    """Collect the statistics and pick ``k`` outlier channels per site (see the module docstring).

    Args:
        model: checkpoint directory or a known model name (converted into the cache at ``tp`` once).
        k: outlier channels per site; default ``max(1, hidden // 64)`` (9 for SmolLM2's 576).
        tokens / heldout_tokens: calibration and held-out tokens (whole windows of ``context``).
        text / heldout_text: defaults: State of the Union 1961-2000 (calibration) and 2001-2021 (held-out, the
            evaluation text), so a config is never judged on the text it was calibrated on.

    Returns:
        ``{"sites": {site: {...}}, "hidden", "num_layers", "k", "tp", "model", "calibration": {...}}``
    """
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.cliutil import check_model_and_tp
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    if context < 2 or tokens < context:
        raise ValueError(f"need tokens >= context >= 2, got tokens={tokens}, context={context}")
    check_model_and_tp(model, tp)  # before anything is converted
    ckpt = assets.ensure_checkpoint(model, tp)
    meta = read_metadata(ckpt)
    hidden = meta.model_config.hidden_size
    k = max(1, hidden // 64) if k is None else k
    if not 1 <= k < hidden:
        raise ValueError(f"k must be in 1..{hidden - 1} (hidden size {hidden}), got {k}")
    tok = TextTokenizer.from_checkpoint(meta)

    def windows(t: str, n: int) -> list[list[int]]:
        ids = tok.tokenize(t)
        count = min(n // context, len(ids) // context)
        if count < 1:
            raise ValueError(f"the text has {len(ids)} tokens; one window needs {context}")
        return [ids[i * context : (i + 1) * context] for i in range(count)]

    calib = windows(assets.calibration_text() if text is None else text, tokens)
    held = (
        windows(assets.eval_text() if heldout_text is None else heldout_text, heldout_tokens) if heldout_tokens else []
    )
    logger.info(
        "megatron-tpcomp: calibrating %s at TP=%d on %d x %d tokens (+%d held-out windows)",
        ckpt,
        tp,
        len(calib),
        context,
        len(held),
    )
    out = run_distributed(_calibrate_worker, tp, str(ckpt), calib, held, k, timeout_s=timeout_s)[0]
    out.update(
        k=k,
        tp=tp,
        model=meta.source.get("name") or str(ckpt),
        checkpoint=str(ckpt),
        calibration={
            "text": "State of the Union 1961-2000" if text is None else "user text",
            "tokens": len(calib) * context,
            "heldout_tokens": len(held) * context,
            "context": context,
        },
    )
    return out


def to_config(result: dict[str, Any], spec: str, *, algo: str = "auto") -> dict[str, Any]:
    """A per-layer compression config (schema of :mod:`megatron_tpcomp.config`): every calibrated block uses
    ``spec+outliers`` with its channel table; embedding and logits stay uncompressed."""
    from megatron_tpcomp.config import CompressionConfig

    layered = f"{spec}+outliers" if "+outliers" not in spec else spec
    layers: dict[str, dict[str, Any]] = {}
    for key, site in result["sites"].items():
        layer_part, _, block = key.partition(".")
        if not layer_part.startswith("layer") or block not in ("attention", "mlp"):
            continue
        layers.setdefault(str(int(layer_part[5:])), {})[block] = {
            "spec": layered,
            "outlier_channels": site["outlier_channels"],
        }
    data = {
        "version": 1,
        "default": spec,
        "algo": algo,
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
        "model": {"num_layers": result["num_layers"], "hidden_size": result["hidden"], "tp_size": result["tp"]},
    }
    CompressionConfig.from_dict(data, source="calibrated config")  # validate before anyone writes it
    data["meta"] = {"calibrated_by": "tpcomp calibrate", "model": result["model"], "k": result["k"]}
    data["meta"].update(result["calibration"])
    return data


def search_config(
    result: dict[str, Any],
    candidates: list[str],
    budget: float,
    *,
    tokens: int = 512,
    context: int = 512,
    text: str | None = None,
    objective: str = "bits",
    ppl_budget: float | None = None,
    verify_tokens: int = 4096,
    steps: int = 6,
    verify: bool = False,
    sensitivity: dict[str, dict[str, float]] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Per-layer format search (:mod:`megatron_tpcomp.search`) on calibration text, using the calibrated
    outlier channels for ``+outliers`` candidates.

    Args:
        candidates: ``SPEC`` or ``SPEC@ALGO`` (one-shot | two-shot); budget: the KL budget (nats/token), or the
            starting point of the bisection when ``ppl_budget`` is given.
        tokens: calibration tokens for the sensitivities (whole windows of ``context`` from the start of the text).
        objective: ``bits`` (payload bits per value) or ``wire`` (bytes on the wire, one-/two-shot aware).
        ppl_budget: perplexity increase allowed (percent) on held-out calibration text: ``verify_tokens`` tokens
            from the END of the calibration text (disjoint from the sensitivity and statistics windows), with at
            most ``steps`` verified KL budgets (:func:`megatron_tpcomp.search.bisect_budget`).
        verify: with a KL budget, also measure the chosen plan on those held-out tokens (recorded in ``meta``).
        sensitivity: site -> candidate -> KL measured before (skips the sensitivity pass; must cover
            ``candidates`` and every site).

    Returns:
        (per-layer config dict with the prediction and any verification in ``meta``, site -> candidate -> KL)
    """
    from megatron_tpcomp import assets, search
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.tokenizer import TextTokenizer

    if objective not in search.OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(search.OBJECTIVES)}")
    if ppl_budget is not None and ppl_budget < 0:
        raise ValueError(f"the perplexity budget must be >= 0 percent, got {ppl_budget}")
    meta = read_metadata(result["checkpoint"])
    hidden = result["hidden"]
    outliers = {key: s["outlier_channels"] for key, s in result["sites"].items()}
    scales = {key: exponents_from_rms(s["rms"]) for key, s in result["sites"].items()}  # for +chscale
    bits = {c: search.candidate_bits(c, (context, hidden), result["k"]) for c in candidates}
    ids = TextTokenizer.from_checkpoint(meta).tokenize(assets.calibration_text() if text is None else text)
    count = min(max(tokens // context, 1), len(ids) // context)
    if count < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens; one window needs {context}")
    windows = [ids[i * context : (i + 1) * context] for i in range(count)]
    held: list[list[int]] = []
    if ppl_budget is not None or verify:
        n = verify_tokens // context
        first = len(ids) - n * context - 1  # the held-out windows end at the end of the text
        used = max(count * context, result["calibration"]["tokens"])
        if n < 1 or first < used:
            raise ValueError(
                f"held-out verification needs {max(n, 1) * context + 1} tokens after the {used} calibration tokens; "
                f"the calibration text has {len(ids)} (lower --verify-tokens or --tokens)"
            )
        held = [ids[first + i * context : first + (i + 1) * context + 1] for i in range(n)]
    sites = [f"layer{i}.{b}" for i in range(result["num_layers"]) for b in search.BLOCKS]
    if sensitivity is None:
        sens = search.measure_sensitivity(
            result["checkpoint"], result["tp"], windows, candidates, outliers, scales=scales, progress=progress
        )
    else:
        missing = [f"{s}/{c}" for s in sites for c in candidates if c not in sensitivity.get(s, {})]
        if missing:
            raise ValueError(f"the given sensitivities lack {len(missing)} site/candidate pairs, e.g. {missing[:3]}")
        sens = {s: {c: float(sensitivity[s][c]) for c in candidates} for s in sites}
    model_dims = {"num_layers": result["num_layers"], "hidden_size": hidden, "tp_size": result["tp"]}
    budget_meta: dict[str, Any]
    if held:
        checked = search.verify_plans(
            result["checkpoint"],
            result["tp"],
            held,
            sens,
            bits,
            outliers,
            scales=scales,
            objective=objective,
            ppl_budget_pct=ppl_budget,
            start=budget,
            steps=steps,
            progress=progress,
        )
        verification = {
            "text": "end of the calibration text" if text is not None else "State of the Union 1961-2000, end",
            "tokens": checked["tokens"],
            "first_token": first,
            "context": context,
            "baseline_ppl": checked["baseline_ppl"],
        }
        plan = checked["best"]
        met = plan is not None
        if plan is None:  # nothing verified within the perplexity budget: the least damaging plan tried
            least = min(checked["steps"], key=lambda s: s["ppl_increase_pct"])
            plan = search.choose_plan(sens, bits, least["kl_budget"], objective=objective, tp=result["tp"])
            logger.warning(
                "megatron-tpcomp: no verified KL budget kept the held-out perplexity increase within %s%%; "
                "writing the least damaging plan tried (%+.3f%%)",
                ppl_budget,
                least["ppl_increase_pct"],
            )
        chosen = next(s for s in checked["steps"] if s["kl_budget"] == plan["kl_budget"])
        budget_meta = {
            "type": "ppl" if ppl_budget is not None else "kl",
            "ppl_budget_pct": ppl_budget,
            "met": met if ppl_budget is not None else None,
            "kl_budget": plan["kl_budget"],
            "verification": {
                **verification,
                "ppl_increase_pct": chosen["ppl_increase_pct"],
                "kld": chosen["kld"],
                "top1_agreement": chosen["top1_agreement"],
            },
            "steps": checked["steps"],
        }
    else:
        plan = search.choose_plan(sens, bits, budget, objective=objective, tp=result["tp"])
        budget_meta = {"type": "kl", "kl_budget": budget}
    config = search.assignment_to_config(
        plan["assignment"],
        outliers,
        model_dims,
        {
            "calibrated_by": "tpcomp calibrate --search",
            "model": result["model"],
            "budget": budget_meta,
            "kl_budget": plan["kl_budget"],
            "objective": objective,
            "predicted_kl": plan["predicted_kl"],
            "predicted_bits_per_value": plan["bits_per_value"],
            "predicted_wire_bits_per_value": plan["wire_bits_per_value"],
            "plans": plan["plans"],
            "candidates": {c: bits[c] for c in candidates},
            "search_tokens": count * context,
            "sensitivity_reused": sensitivity is not None,
            **result["calibration"],
        },
        scales=scales,
    )
    return config, sens


def plan_algo_of(config: dict[str, Any]) -> str:
    """``one-shot``, ``two-shot`` or ``per-site`` (then with the number of sites off the config's algo)."""
    own = sum(
        1
        for blocks in config["layers"].values()
        for v in blocks.values()
        if (isinstance(v, str) and "@" in v) or (isinstance(v, dict) and "algo" in v)
    )
    return f"per-site ({config['algo']}, {own} sites otherwise)" if own else config["algo"]


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}  TP={result['tp']}  k={result['k']}  calibration {result['calibration']['tokens']} tokens, "
        f"held-out {result['calibration']['heldout_tokens']}",
        f"{'site':<18} {'max|x|':>10} {'max/median':>11} {'window overlap':>15} {'held-out overlap':>17}  channels",
    ]

    def order(key: str) -> tuple[int, str]:
        head, _, block = key.partition(".")
        return (int(head[5:]) if head.startswith("layer") else -1, block)

    for key in sorted(result["sites"], key=order):
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.cliutil import atomic_write_json, check_output_file
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.search import candidate_bits

    out = Path(args.out)
    candidates = (
        [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else list(_default_candidates())
    )
    try:
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
        if args.search:
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
        else:
            config = to_config(result, args.spec)
    except (ValueError, OSError, CheckpointError, AssetError, CodecError) as exc:
        print(f"tpcomp calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.search:
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
        print(f"{line}; verify with tpcomp eval --config {out}")
    atomic_write_json(out, config)  # an interrupted run never leaves a truncated config
    print(f"wrote {out}")
    if args.stats_json:
        atomic_write_json(args.stats_json, result, indent=None)
    if any(math.isnan(s["peak_ratio"]) for s in result["sites"].values()):
        logger.warning("megatron-tpcomp: some sites saw NaN activations during calibration")
    return 0
