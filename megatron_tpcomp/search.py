"""Per-layer format search under a quality budget (``tpcomp calibrate --search``).

FACTS.md measured on SmolLM2-135M that the KL damage of compressing several collectives is almost exactly the sum
of the damages of compressing each alone (60 single-collective KLs summed to 0.122 vs 0.123 all at once). So:

1. Sensitivity: for every transformer-layer site (layer x attention|mlp) and candidate codec, compress ONLY that
   site and measure the mean KL divergence from the uncompressed run on calibration windows (sites x candidates
   forwards per window, at the real TP size, through the real collectives).
2. Choice: a multiple-choice knapsack: pick one option per site (a candidate, or ``none`` at 16 bits and zero
   KL) minimising the mean bits per value subject to the summed KL <= budget. Solved by Lagrangian relaxation:
   for a price ``lam`` each site independently takes ``argmin bits + lam * KL``; bisection finds the cheapest
   ``lam`` that meets the budget. (Exact for the convex hull of each site's options; optimal up to one site's
   step, which is fine when 60 sites share the budget.)
3. The caller verifies the chosen config on held-out text (``tpcomp eval --config``): additivity is an
   approximation, and calibration text is not the evaluation text.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("megatron_tpcomp")

BLOCKS = ("attention", "mlp")
UNCOMPRESSED_BITS = 16.0


def _setting(spec: str, channels: list[int] | None) -> Any:
    from megatron_tpcomp.config import SiteSetting

    return SiteSetting(spec, tuple(channels) if "+outliers" in spec and channels else None)


def _sensitivity_worker(
    rank: int,
    world_size: int,
    ckpt: str,
    windows: list[list[int]],
    candidates: list[str],
    outliers: dict[str, list[int]],
    progress: bool,
) -> dict[str, dict[str, float]] | None:
    from tqdm import tqdm

    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.evaluation import kl_per_position, next_token_logprobs
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, meta = load_model(ckpt)
    layers = meta.model_config.num_layers

    seqs = [torch.tensor(w) for w in windows]
    intercept.disable(model)
    base = [next_token_logprobs(model, ids) for ids in seqs]  # [s, V] each
    result: dict[str, dict[str, float]] = {}
    jobs = [(layer, block, c) for layer in range(layers) for block in BLOCKS for c in candidates]
    for layer, block, cand in tqdm(jobs, desc="sensitivity", unit="case", disable=not (progress and rank == 0)):
        site = f"layer{layer}.{block}"
        cfg = CompressionConfig(layers={layer: {block: _setting(cand, outliers.get(site))}})
        intercept.enable(model, cfg)
        kl = 0.0
        for ids, b in zip(seqs, base, strict=True):
            kl += float(kl_per_position(b, next_token_logprobs(model, ids)).mean())
        intercept.disable(model)
        result.setdefault(site, {})[cand] = kl / len(windows)
    M.destroy_parallel()
    return result if rank == 0 else None


def measure_sensitivity(
    ckpt: str,
    tp: int,
    windows: list[list[int]],
    candidates: list[str],
    outliers: dict[str, list[int]] | None = None,
    *,
    progress: bool = True,
    timeout_s: float = 12 * 3600,
) -> dict[str, dict[str, float]]:
    """site -> candidate -> mean KL (nats/token) when only that site is compressed with that candidate."""
    from megatron_tpcomp.launch import run_distributed

    return run_distributed(
        _sensitivity_worker, tp, ckpt, windows, candidates, outliers or {}, progress, timeout_s=timeout_s
    )[0]


def choose(
    sensitivity: dict[str, dict[str, float]], bits: dict[str, float], budget: float
) -> tuple[dict[str, str], float, float]:
    """Cheapest assignment site -> spec (or ``none``) with summed KL <= ``budget`` (see the module docstring).

    Args:
        sensitivity: site -> candidate -> KL; bits: candidate -> bits per value.
        budget: total KL allowed (nats per token), >= 0.

    Returns:
        (assignment, predicted total KL, mean bits per value over the sites)
    """
    if budget < 0:
        raise ValueError(f"KL budget must be >= 0, got {budget}")
    sites = sorted(sensitivity)

    def options(site: str) -> list[tuple[float, float, str]]:
        opts = [(UNCOMPRESSED_BITS, 0.0, "none")]
        opts += [(bits[c], max(kl, 0.0), c) for c, kl in sensitivity[site].items()]
        return opts

    def pick(lam: float) -> dict[str, tuple[float, float, str]]:
        return {s: min(options(s), key=lambda o: (o[0] + lam * o[1], o[1])) for s in sites}

    def total(sel: dict[str, tuple[float, float, str]]) -> tuple[float, float]:
        return sum(o[1] for o in sel.values()), sum(o[0] for o in sel.values()) / max(len(sel), 1)

    lo, hi = 0.0, 1.0
    while total(pick(hi))[0] > budget and hi < 1e12:
        hi *= 4
    if total(pick(lo))[0] <= budget:
        hi = lo
    for _ in range(80):  # bisection on the price of KL
        if hi - lo <= 1e-9 * max(hi, 1.0):
            break
        mid = (lo + hi) / 2
        if total(pick(mid))[0] <= budget:
            hi = mid
        else:
            lo = mid
    sel = pick(hi)
    # Spend what is left of the budget: cheapest upgrades first (one site at a time), never exceeding it.
    kl_sum, _ = total(sel)
    improved = True
    while improved:
        improved = False
        best = None
        for s in sites:
            for o in options(s):
                extra = o[1] - sel[s][1]
                saved = sel[s][0] - o[0]
                if saved > 0 and kl_sum + extra <= budget and (best is None or saved > best[0]):
                    best = (saved, s, o, extra)
        if best is not None:
            _, s, o, extra = best
            sel[s] = o
            kl_sum += extra
            improved = True
    kl_total, mean_bits = total(sel)
    return {s: o[2] for s, o in sel.items()}, kl_total, mean_bits


def assignment_to_config(
    assignment: dict[str, str], outliers: dict[str, list[int]], model: dict[str, int], meta: dict[str, Any]
) -> dict[str, Any]:
    """A per-layer config (schema of :mod:`megatron_tpcomp.config`) for a site -> spec assignment."""
    from megatron_tpcomp.config import CompressionConfig

    layers: dict[str, dict[str, Any]] = {}
    for site, spec in sorted(assignment.items()):
        head, _, block = site.partition(".")
        value: Any = spec
        if "+outliers" in spec:
            value = {"spec": spec, "outlier_channels": outliers[site]}
        layers.setdefault(str(int(head[5:])), {})[block] = value
    data = {
        "version": 1,
        "default": "none",
        "algo": "one-shot",
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
        "model": model,
    }
    CompressionConfig.from_dict(data, source="searched config")
    data["meta"] = meta
    return data
