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

import logging
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
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.session import rank_session

    with rank_session(ckpt, world_size) as session:
        model, meta = session.model, session.meta
        hidden = meta.model_config.hidden_size
        intercept.enable(model, "none")  # sites on the stack, Megatron's own collectives
        totals, per_window = _site_stats(model, windows, hidden)
        held_totals, _ = _site_stats(model, heldout, hidden) if heldout else ({}, [])
        intercept.disable(model)
    if rank != 0:
        return None
    sites = {key: _site_summary(t, per_window, held_totals.get(key), key, k) for key, t in totals.items()}
    return {"sites": sites, "hidden": hidden, "num_layers": meta.model_config.num_layers}


def _site_summary(
    t: dict[str, torch.Tensor], per_window: list[dict[str, torch.Tensor]], held: dict[str, torch.Tensor] | None,
    key: str, k: int,
) -> dict[str, Any]:  # fmt: skip
    """One site's report: its top-``k`` channels by absmax, peak ratio, RMS and overlaps (see the module doc)."""
    absmax = t["absmax"]
    top = [int(c) for c in torch.topk(absmax, k).indices.sort().values]
    median = float(absmax.median())
    return {
        "outlier_channels": top,
        "peak_ratio": float(absmax.max()) / max(median, 1e-30),
        "absmax_max": float(absmax.max()),
        "absmax_median": median,
        "rms": (t["sumsq"] / max(int(t["count"]), 1)).sqrt().tolist(),
        "absmax": absmax.tolist(),
        "window_overlap": sum(_overlap(top, [int(c) for c in torch.topk(w[key], k).indices]) for w in per_window)
        / len(per_window),
        "heldout_overlap": _overlap(top, [int(c) for c in torch.topk(held["absmax"], k).indices])
        if held is not None
        else None,
    }


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
