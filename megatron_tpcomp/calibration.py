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
calibration window (``window_overlap``, mean) and of held-out text (``heldout_overlap``): FACTS.md found the set
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
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    if context < 2 or tokens < context:
        raise ValueError(f"need tokens >= context >= 2, got tokens={tokens}, context={context}")
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
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Per-layer format search (:mod:`megatron_tpcomp.search`) on calibration text, using the calibrated
    outlier channels for ``+outliers`` candidates.

    Returns:
        (per-layer config dict with the prediction in ``meta``, site -> candidate -> KL)
    """
    from megatron_tpcomp import assets, search
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.tokenizer import TextTokenizer

    meta = read_metadata(result["checkpoint"])
    hidden = result["hidden"]
    outliers = {key: s["outlier_channels"] for key, s in result["sites"].items()}
    bits = {}
    for c in candidates:
        channels = list(range(result["k"])) if "+outliers" in c else None  # the table size, not its values
        bits[c] = make_codec(c, outlier_channels=channels).bits_per_value((context, hidden))
    ids = TextTokenizer.from_checkpoint(meta).tokenize(assets.calibration_text() if text is None else text)
    count = min(max(tokens // context, 1), len(ids) // context)
    if count < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens; one window needs {context}")
    windows = [ids[i * context : (i + 1) * context] for i in range(count)]
    sens = search.measure_sensitivity(
        result["checkpoint"], result["tp"], windows, candidates, outliers, progress=progress
    )
    assignment, kl, mean_bits = search.choose(sens, bits, budget)
    config = search.assignment_to_config(
        assignment,
        outliers,
        {"num_layers": result["num_layers"], "hidden_size": hidden, "tp_size": result["tp"]},
        {
            "calibrated_by": "tpcomp calibrate --search",
            "model": result["model"],
            "kl_budget": budget,
            "predicted_kl": kl,
            "predicted_bits_per_value": mean_bits,
            "candidates": {c: bits[c] for c in candidates},
            "search_tokens": count * context,
            **result["calibration"],
        },
    )
    return config, sens


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpcomp calibrate",
        description=(
            "Record per-layer statistics of the TP collectives on calibration text (uncompressed run), pick the top-k "
            "outlier channels per layer and block, report their consistency across windows and on held-out text, "
            "and write a per-layer compression config using SPEC+outliers."
        ),
    )
    p.add_argument("--model", default="smollm2-135m", help="checkpoint directory or smollm2-135m (default)")
    p.add_argument("--tp", type=int, default=3, help="tensor-parallel size (default 3)")
    p.add_argument("--k", type=int, default=None, help="outlier channels per site (default hidden/64)")
    p.add_argument("--spec", default="int4:g32", help="format of the non-outlier channels (default int4:g32)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--heldout-tokens", type=int, default=1024, help="held-out tokens for the overlap (0: skip)")
    p.add_argument("--context", type=int, default=512, help="window length (default 512)")
    p.add_argument("--text-file", help="calibration text (default: State of the Union 1961-2000)")
    p.add_argument("--out", required=True, help="per-layer config to write (JSON)")
    p.add_argument("--stats-json", help="also write the full statistics (per-channel absmax and rms) as JSON")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--search",
        action="store_true",
        help="choose a codec per layer and block (from --candidates or none) minimising bits under --kl-budget",
    )
    p.add_argument("--kl-budget", type=float, default=0.01, help="summed KL allowed by --search (nats/token)")
    p.add_argument(
        "--candidates",
        default="int4:g32+had,int4:g32+outliers,fp5:b32,int8:g32",
        help="comma-separated specs for --search (+outliers uses the calibrated channels)",
    )
    p.add_argument("--search-tokens", type=int, default=512, help="calibration tokens for the sensitivity runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.codecs import make_codec

    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise ValueError(f"{out} already exists; pass --force to replace it")
        make_codec(args.spec)  # a bad spec fails before the model runs
        if args.search:
            for c in args.candidates.split(","):
                make_codec(c.strip(), outlier_channels=[0] if "+outliers" in c else None)
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
            candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
            config, sens = search_config(
                result, candidates, args.kl_budget, tokens=args.search_tokens, context=args.context, text=text
            )
            result["sensitivity"] = sens
        else:
            config = to_config(result, args.spec)
    except (ValueError, OSError, CheckpointError, AssetError) as exc:
        print(f"tpcomp calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.search:
        m = config["meta"]
        print(
            f"search: predicted KL {m['predicted_kl']:.4f} (budget {m['kl_budget']}), "
            f"{m['predicted_bits_per_value']:.3f} bits/value; verify with tpcomp eval --config {out}"
        )
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(out)  # atomic: an interrupted run never leaves a truncated config
    print(f"wrote {out}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(result) + "\n")
    if any(math.isnan(s["peak_ratio"]) for s in result["sites"].values()):
        logger.warning("megatron-tpcomp: some sites saw NaN activations during calibration")
    return 0
