"""Per-layer format search under a quality budget (``tpcomp calibrate --search``).

On SmolLM2-135M the KL damage of compressing several collectives is almost exactly the sum
of the damages of compressing each alone (60 single-collective KLs summed to 0.122 vs 0.123 all at once). So:

1. Sensitivity: for every transformer-layer site (layer x attention|mlp) and candidate, compress ONLY that
   site and measure the mean KL divergence from the uncompressed run on calibration windows (sites x candidates
   forwards per window, at the real TP size, through the real collectives). The layers before the compressed
   site are not recomputed: their outputs from the uncompressed run are replayed (bit-identical: nothing before
   the site changed), which halves the cost on average. The KL is computed on the vocabulary-parallel logit
   shards (two tiny all-reduces per window) instead of gathering ``[s, vocab]`` logits to every rank.
2. Choice: a multiple-choice knapsack: pick one option per site (a candidate, or ``none`` at 16 bits and zero
   KL) minimising the mean cost per value subject to the summed KL <= budget. Solved by Lagrangian relaxation:
   for a price ``lam`` each site independently takes ``argmin cost + lam * KL``; bisection finds the cheapest
   ``lam`` that meets the budget. (Exact for the convex hull of each site's options; optimal up to one site's
   step, which is fine when 60 sites share the budget.) A greedy refill then spends what is left of the budget.
3. Verification: the caller verifies the chosen config on held-out text (``tpcomp eval --config``): additivity
   is an approximation, and calibration text is not the evaluation text. With a perplexity budget
   (:func:`bisect_budget`, ``tpcomp calibrate --search --ppl-budget PCT``) the search itself verifies: it
   chooses by KL, measures the perplexity increase on held-out *calibration* text (the end of the calibration
   text, disjoint from the sensitivity windows; never the evaluation text), and tightens or loosens the KL budget
   geometrically (bisection once bracketed) for a few verified steps, keeping the cheapest plan within budget.
   Measured on SmolLM2-135M (TP=3, 4096 held-out tokens): the perplexity increase of plans of nearly equal KL
   differs by up to 0.3 points (+0.98% at KL 0.0120, +1.28% at KL 0.0121), so a budget met by a narrow margin is
   met by luck as much as by design; more ``verify_tokens`` narrow it. The predicted (summed) KL ran 16-20% under
   the measured one at budget 0.01 (512 sensitivity tokens: noise, and the knapsack favours underestimates).

Candidates are ``SPEC`` or ``SPEC@ALGO`` (ALGO: ``one-shot``, the default, or ``two-shot``). Decisions:

- Bits per value of a candidate come from its codec (``Codec.bits_per_value`` of a ``[context, hidden]``
  message, scales and the outlier table included), never from a table.
- The all-reduce algorithm is part of a candidate because it changes quality: two-shot requantizes the reduced
  chunk, which roughly doubles the noise, so a ``@two-shot`` candidate's sensitivity is measured
  with two-shot. Whether that pays depends on the objective:
  ``bits`` (default; what ``tpcomp eval`` reports): payload bits per value. Two-shot sends
  the same payload with more KL, so it never wins and the default candidates are one-shot only.
  ``wire``: bits each rank puts on the wire per value, in units of the stock bf16 ring all-reduce
  (``2 (N-1)/N x 16`` bits = 16): one-shot costs ``bits x N/2``, two-shot ``bits``, uncompressed 16. At N=3
  two-shot sends a third fewer bytes than one-shot, and the measured KLs decide whether a wider two-shot format
  beats a narrower one-shot one. Measured (SmolLM2-135M, TP=3, summed single-site KLs): two-shot multiplies the
  KL by 2.0 (int4:g32:se4m3+had 0.055 -> 0.112), 1.9 (int5:g64:se4m3+had), 1.9 (int6:g128+had:b128) and 1.3
  (int8:g32); under a KL budget of 0.01 the two-shot plan needs 5.74 payload bits against one-shot's 5.09, but puts
  5.74 instead of 7.63 ring-equivalent bits on the wire, so ``wire`` picks two-shot and ``bits`` one-shot.
- The algorithm is chosen per site: one knapsack runs over every candidate, one-shot and two-shot alike, so
  under ``wire`` a site takes two-shot where its KL is low and one-shot where requantizing costs too much (the
  config records a site's own algorithm as ``SPEC@ALGO``). The single-algorithm plans are solved too and kept in
  the config's metadata for comparison; the mixed plan is never costlier (it may use either). A wider format
  for the second two-shot stage is not a candidate: the collectives requantize with the same codec.
- Default candidates (:data:`DEFAULT_CANDIDATES`, 5 x 60 sensitivity cases): one-shot, from a measured study on
  SmolLM2-135M at TP=3 (18 candidates x 60 sites, 512 calibration tokens; summed single-site KLs in brackets).
  At equal bits, E4M3 group scales beat wider fp16-scaled groups at 58 of 60 sites: ``int4:g32:se4m3+had``
  (4.25 bits, 0.055) over ``int4:g64+had`` (4.25, 0.071), ``int4:g64:se4m3+had`` (4.125, 0.072) over
  ``int4:g128+had`` (4.125, 0.099); ``int5:g64:se4m3+had`` (5.125, 0.019) and ``int6:g128+had:b128`` (6.125, 0.005)
  fill the middle; ``fp8`` (8.25) is the one format that keeps the massive-activation block (layer 11 MLP, where
  E4M3 scales saturate and int8:g32 loses the small values of a block) cheap. Under a KL budget of 0.01 this set
  reaches 5.13 bits per value, all 18 candidates 5.09, the previous default 6.43. Not in the defaults: ``int3``
  (never chosen at KL budgets <= 0.03), 128-value Hadamard blocks at g128 (worse than 32 at 47 of 60 sites),
  ``int4:g32+outliers`` (one site). Any spec is accepted with ``--candidates``.
- Measured later on the same 512 tokens (session 5): static channel scales (``SPEC+chscale``, no extra bits)
  cut the summed KL of int5:g64:se4m3+had from 0.019 to 0.013 and of int4:g64:se4m3+had from 0.072 to 0.060.
  They help most where a massive channel shares its rotation blocks: layer 11 MLP 0.0064 -> 0.0022, layer 24
  attention 0.0018 -> 0.0004. They do nothing for the largest single damage (layer 29 MLP, 0.017), and some
  sites do better without, so the plain and scaled variants compete per site. With them the KL-0.0085 plan
  needs 5.16 bits instead of 5.27. Calibrated outliers inside the rotation
  (``int5:g64:se4m3+had+outliers``, 9 channels) reach 5.20.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

logger = logging.getLogger("megatron_tpcomp")

BLOCKS = ("attention", "mlp")
UNCOMPRESSED_BITS = 16.0
#: Algorithms a candidate may name (``auto`` is not one: the search must know which one it measured).
SEARCH_ALGOS = ("one-shot", "two-shot")
DEFAULT_ALGO = "one-shot"
#: What a plan's ``algo`` says when its sites use different algorithms.
PER_SITE = "per-site"
OBJECTIVES = ("bits", "wire")
#: Default candidates for ``tpcomp calibrate --search`` (one-shot; see the module docstring).
DEFAULT_CANDIDATES = (
    "int4:g64:se4m3+had",
    "int4:g32:se4m3+had",
    "int5:g64:se4m3+had",
    "int6:g128+had:b128",
    "fp8",
)


def split_candidate(name: str) -> tuple[str, str]:
    """``"SPEC@ALGO"`` or ``"SPEC"`` -> (spec, algo); the algo defaults to one-shot.

    Raises:
        ValueError: an algo other than one-shot / two-shot, or an empty spec.
    """
    spec, _, algo = name.strip().partition("@")
    algo = algo or DEFAULT_ALGO
    if algo not in SEARCH_ALGOS:
        raise ValueError(f"candidate {name!r}: algo {algo!r} is not one of {', '.join(SEARCH_ALGOS)}")
    if not spec:
        raise ValueError(f"candidate {name!r} has no spec")
    return spec, algo


def candidate_bits(name: str, shape: tuple[int, int], outlier_k: int) -> float:
    """Payload bits per value of candidate ``name`` for one ``shape`` message (``+outliers`` with a static table
    of ``outlier_k`` channels). Raises CodecError for a bad spec, ValueError for a bad algo."""
    from megatron_tpcomp.codecs import sizing_codec

    return sizing_codec(split_candidate(name)[0], shape[-1], outlier_k).bits_per_value(shape)


def wire_factor(algo: str, tp: int) -> float:
    """Bytes each rank sends with ``algo`` for a P-byte payload, in units of the stock ring all-reduce of the same
    payload (``2 (N-1)/N P``): one-shot ``(N-1) P`` -> N/2; two-shot ``2 (N-1)/N P`` -> 1."""
    if algo == "one-shot":
        return tp / 2.0
    if algo == "two-shot":
        return 1.0
    raise ValueError(f"unknown algo {algo!r}")


def candidate_cost(name: str, bits: float, objective: str, tp: int) -> float:
    """What the knapsack minimises for one site with candidate ``name`` of ``bits`` payload bits per value."""
    if objective == "bits":
        return bits
    if objective == "wire":
        return bits * wire_factor(split_candidate(name)[1], tp)
    raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


def _setting(spec: str, channels: list[int] | None, exponents: list[int] | None = None) -> Any:
    """A site's setting for candidate ``spec``, with the site's calibrated tables where the spec uses them."""
    from megatron_tpcomp.config import SiteSetting

    return SiteSetting(
        spec,
        tuple(channels) if "+outliers" in spec and channels else None,
        channel_scale_exponents=tuple(exponents) if "+chscale" in spec and exponents else None,
    )


# ----------------------------------------------------------------------------------- sharded next-token metrics


def sharded_logprobs(logits: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's shard of the fp32 log-probabilities over the full vocabulary.

    Args:
        logits: ``[s, V/tp]`` this rank's vocabulary-parallel logits (rank r holds rows ``r*V/tp ..``).
    Returns:
        ``[s, V/tp]`` fp32 ``logits - logsumexp(all logits)``.
    """
    import torch.distributed as dist

    z = logits.float()
    m = z.amax(dim=-1)  # [s]
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    se = (z - m[:, None]).exp().sum(dim=-1)  # [s]
    dist.all_reduce(se, group=group)
    return z - (m + se.log())[:, None]


def sharded_kl(base_lp: torch.Tensor, lp: torch.Tensor, group: Any) -> torch.Tensor:
    """KL(base || this) per position ``[s]`` (nats) from log-prob shards ``[s, V/tp]``; equal on every rank."""
    import torch.distributed as dist

    kl = (base_lp.exp() * (base_lp - lp)).sum(dim=-1)
    dist.all_reduce(kl, group=group)
    return kl


def sharded_window_metrics(
    base_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor, group: Any
) -> tuple[float, float, int]:
    """(sum of NLL, sum of KL(base || this), argmax matches) over one window, from log-prob shards ``[s, V/tp]``
    and next tokens ``targets`` ``[s]``; equal on every rank (same numbers as ``evaluation._window_metrics`` on
    gathered logits, up to summation order)."""
    import torch.distributed as dist

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    v = lp.shape[-1]
    local = targets - rank * v
    mine = (local >= 0) & (local < v)
    picked = lp.gather(1, local.clamp(0, v - 1)[:, None])[:, 0]  # [s]
    nll = torch.where(mine, -picked, torch.zeros_like(picked))
    dist.all_reduce(nll, group=group)
    kl = sharded_kl(base_lp, lp, group)

    def global_argmax(x: torch.Tensor) -> torch.Tensor:
        val, idx = x.max(dim=-1)  # first maximum within the shard
        vals = [torch.empty_like(val) for _ in range(size)]
        idxs = [torch.empty_like(idx) for _ in range(size)]
        dist.all_gather(vals, val, group=group)
        dist.all_gather(idxs, idx, group=group)
        best = torch.stack(vals).argmax(dim=0)  # lowest rank among equal maxima = lowest global index
        return torch.stack(idxs).gather(0, best[None])[0] + best * v

    top1 = int((global_argmax(base_lp) == global_argmax(lp)).sum())
    return float(nll.sum()), float(kl.sum()), top1


def _logits_shard(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[s, V/tp]`` vocabulary-parallel logits of one sequence ``ids`` ``[s]`` (no gather)."""
    with torch.no_grad():
        out = model(ids[None], torch.arange(ids.numel())[None], attention_mask=None, runtime_gather_output=False)
    return out[0]


# ------------------------------------------------------------------------------------------ prefix replay


def _record_outputs(layers: Sequence[torch.nn.Module]) -> tuple[list[torch.Tensor | None], list[Any]]:
    """Forward hooks that keep a copy of every layer's output hidden states; returns (slots, hook handles)."""
    slots: list[torch.Tensor | None] = [None] * len(layers)

    def hook(index: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        slots[index] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [layer.register_forward_hook(functools.partial(hook, i)) for i, layer in enumerate(layers)]
    return slots, handles


def _recorded_forward(output: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    return output, kwargs.get("context")


@contextlib.contextmanager
def replay_prefix(layers: Sequence[torch.nn.Module], outputs: Sequence[torch.Tensor], start: int) -> Iterator[None]:
    """Within the block, layers ``0 .. start-1`` return their recorded ``outputs`` (megatron-core's
    TransformerLayer returns ``(hidden_states, context)``) instead of computing; later layers run normally."""
    for i in range(start):
        layers[i].forward = functools.partial(_recorded_forward, outputs[i])  # instance attribute: __call__ uses it
    try:
        yield
    finally:
        for i in range(start):
            del layers[i].forward


# ------------------------------------------------------------------------------------------------ sensitivity


def _sensitivity_worker(
    rank: int,
    world_size: int,
    ckpt: str,
    windows: list[list[int]],
    candidates: list[str],
    outliers: dict[str, list[int]],
    sites: list[str] | None,
    replay: bool,
    progress: bool,
    scales: dict[str, list[int]],
) -> dict[str, dict[str, float]] | None:
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, meta = load_model(ckpt, dtype=torch.float32)
    group = parallel_state.get_tensor_model_parallel_group()
    layers = list(model.decoder.layers)
    num_layers = meta.model_config.num_layers

    seqs = [torch.tensor(w) for w in windows]
    intercept.disable(model)
    base, recorded = [], []
    slots, handles = _record_outputs(layers)
    for ids in seqs:
        base.append(sharded_logprobs(_logits_shard(model, ids), group))  # [s, V/tp]
        recorded.append(list(slots))
    for h in handles:
        h.remove()
    wanted = sites or [f"layer{i}.{b}" for i in range(num_layers) for b in BLOCKS]
    result: dict[str, dict[str, float]] = {}
    jobs = [(site, c) for site in wanted for c in candidates]
    for site, cand in tqdm(jobs, desc="sensitivity", unit="case", disable=not (progress and rank == 0)):
        head, _, block = site.partition(".")
        layer = int(head[5:])
        spec, algo = split_candidate(cand)
        setting = _setting(spec, outliers.get(site), scales.get(site))
        cfg = CompressionConfig(layers={layer: {block: setting}}, algo=algo)
        intercept.enable(model, cfg)
        kl = 0.0
        for ids, b, outs in zip(seqs, base, recorded, strict=True):
            with replay_prefix(layers, outs, layer if replay else 0):
                lp = sharded_logprobs(_logits_shard(model, ids), group)
            kl += float(sharded_kl(b, lp, group).mean())
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
    scales: dict[str, list[int]] | None = None,
    sites: list[str] | None = None,
    replay: bool = True,
    progress: bool = True,
    timeout_s: float = 12 * 3600,
) -> dict[str, dict[str, float]]:
    """site -> candidate -> mean KL (nats/token) when only that site is compressed with that candidate
    (``SPEC`` or ``SPEC@ALGO``), over ``windows`` (token id lists). ``sites``: a subset (default all);
    ``replay=False`` recomputes the layers before each site (for checking the replay)."""
    from megatron_tpcomp.launch import run_distributed

    for c in candidates:
        split_candidate(c)
    return run_distributed(
        _sensitivity_worker,
        tp,
        ckpt,
        windows,
        list(candidates),
        outliers or {},
        sites,
        replay,
        progress,
        scales or {},
        timeout_s=timeout_s,
    )[0]


# ----------------------------------------------------------------------------------------------------- choice


def choose(
    sensitivity: dict[str, dict[str, float]], bits: dict[str, float], budget: float
) -> tuple[dict[str, str], float, float]:
    """Cheapest assignment site -> candidate (or ``none``) with summed KL <= ``budget`` (see the module docstring).

    Args:
        sensitivity: site -> candidate -> KL; bits: candidate -> cost per value (payload bits, or any cost with
            ``none`` at :data:`UNCOMPRESSED_BITS`).
        budget: total KL allowed (nats per token), >= 0.

    Returns:
        (assignment, predicted total KL, mean cost per value over the sites)
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
    # Spend what is left of the budget: cheapest options first (one site at a time), never exceeding it.
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


def choose_plan(
    sensitivity: dict[str, dict[str, float]],
    bits: dict[str, float],
    budget: float,
    *,
    objective: str = "bits",
    tp: int = 1,
) -> dict[str, Any]:
    """The cheapest plan under a KL ``budget``: one knapsack over all candidates (each site takes its own
    all-reduce algorithm), compared with the knapsack restricted to each single algorithm; the lowest
    ``objective`` wins (ties: one algorithm, one-shot first).

    Args:
        sensitivity: site -> candidate (``SPEC[@ALGO]``) -> KL; bits: candidate -> payload bits per value.
        objective: ``bits`` (payload bits per value) or ``wire`` (see :func:`candidate_cost`); tp: TP size.

    Returns:
        ``{"assignment": site -> candidate or none, "algo" (the one algorithm of the compressed sites, or
        ``per-site``), "kl_budget", "predicted_kl", "bits_per_value" (payload, mean over sites),
        "wire_bits_per_value" (ring-equivalent), "cost" (the objective), "plans": name (``one-shot``,
        ``two-shot``, ``per-site``) -> {"predicted_kl", "bits_per_value", "wire_bits_per_value"}}``
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    names = sorted({c for per_site in sensitivity.values() for c in per_site})
    by_algo: dict[str, list[str]] = {}
    for c in names:
        by_algo.setdefault(split_candidate(c)[1], []).append(c)
    if not by_algo:
        by_algo[DEFAULT_ALGO] = []
    groups = {algo: by_algo[algo] for algo in sorted(by_algo, key=SEARCH_ALGOS.index)}
    if len(groups) > 1:
        groups[PER_SITE] = names
    plans: dict[str, dict[str, Any]] = {}
    for name, group in groups.items():
        keep = set(group)
        sens = {s: {c: kl for c, kl in v.items() if c in keep} for s, v in sensitivity.items()}
        costs = {c: candidate_cost(c, bits[c], objective, tp) for c in keep}
        assignment, kl, cost = choose(sens, costs, budget)
        n = max(len(assignment), 1)
        payload = sum(UNCOMPRESSED_BITS if c == "none" else bits[c] for c in assignment.values()) / n
        wire = (
            sum(
                UNCOMPRESSED_BITS if c == "none" else candidate_cost(c, bits[c], "wire", tp)
                for c in assignment.values()
            )
            / n
        )
        plans[name] = {
            "assignment": assignment,
            "predicted_kl": kl,
            "bits_per_value": payload,
            "wire_bits_per_value": wire,
            "cost": cost,
        }
    order = (*SEARCH_ALGOS, PER_SITE)
    best = plans[min(plans, key=lambda a: (plans[a]["cost"], order.index(a)))]
    return {
        "assignment": best["assignment"],
        "algo": plan_algo(best["assignment"]),
        "kl_budget": budget,
        "predicted_kl": best["predicted_kl"],
        "bits_per_value": best["bits_per_value"],
        "wire_bits_per_value": best["wire_bits_per_value"],
        "cost": best["cost"],
        "objective": objective,
        "plans": {
            a: {k: p[k] for k in ("predicted_kl", "bits_per_value", "wire_bits_per_value")} for a, p in plans.items()
        },
    }


def plan_algo(assignment: dict[str, str]) -> str:
    """The all-reduce algorithm of an assignment's compressed sites, or :data:`PER_SITE` when they differ
    (one-shot when nothing is compressed)."""
    used = {split_candidate(c)[1] for c in assignment.values() if c != "none"}
    return used.pop() if len(used) == 1 else PER_SITE if used else DEFAULT_ALGO


def assignment_to_config(
    assignment: dict[str, str],
    outliers: dict[str, list[int]],
    model: dict[str, int],
    meta: dict[str, Any],
    *,
    scales: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """A per-layer config (schema of :mod:`megatron_tpcomp.config`) for a site -> candidate assignment. The
    config's ``algo`` is the algorithm most compressed sites use (ties: one-shot); the others are written as
    ``SPEC@ALGO``."""
    from megatron_tpcomp.config import CompressionConfig

    counts = collections.Counter(split_candidate(c)[1] for c in assignment.values() if c != "none")
    algo = max(SEARCH_ALGOS, key=lambda a: (counts[a], a == DEFAULT_ALGO))
    layers: dict[str, dict[str, Any]] = {}
    for site, cand in sorted(assignment.items()):
        head, _, block = site.partition(".")
        spec, cand_algo = split_candidate(cand)
        value: Any = spec
        if "+outliers" in spec or "+chscale" in spec:
            value = {"spec": spec}
            if "+outliers" in spec:
                value["outlier_channels"] = outliers[site]
            if "+chscale" in spec:
                value["channel_scale_exponents"] = (scales or {})[site]
            if cand_algo != algo:
                value["algo"] = cand_algo
        elif spec != "none" and cand_algo != algo:
            value = f"{spec}@{cand_algo}"
        layers.setdefault(str(int(head[5:])), {})[block] = value
    data = {
        "version": 1,
        "default": "none",
        "algo": algo,
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
        "model": model,
    }
    CompressionConfig.from_dict(data, source="searched config")
    data["meta"] = meta
    return data


# ------------------------------------------------------------------------------------------ perplexity budget


def _plan_key(plan: dict[str, Any]) -> tuple[Any, ...]:
    return (plan["algo"], tuple(sorted(plan["assignment"].items())))


def bisect_budget(
    plan_for: Callable[[float], dict[str, Any]],
    verify: Callable[[dict[str, Any]], dict[str, float]],
    ppl_budget_pct: float,
    *,
    start: float = 0.01,
    steps: int = 6,
    tolerance: float = 1.05,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Search the KL budget whose plan's verified perplexity increase is within ``ppl_budget_pct``.

    Starting at ``start``, a plan within the budget doubles the KL budget and one over it halves it until both
    sides are seen, then the geometric midpoint of the largest KL budget within and the smallest over is tried.
    Stops after ``steps`` verifications or when the bracket is narrower than ``tolerance`` (a ratio). A KL budget
    whose plan equals an already verified one reuses that measurement (no verification spent).

    Args:
        plan_for: KL budget -> plan (:func:`choose_plan`); verify: plan -> ``{"ppl_increase_pct", ...}``.

    Returns:
        (the plan with the lowest ``cost`` among those within the budget, or None if none was; every step as
        ``{"kl_budget", "predicted_kl", "bits_per_value", "cost", "algo", "within", "reused", **metrics}``)
    """
    if start <= 0:
        raise ValueError(f"the starting KL budget must be > 0, got {start}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    measured: dict[tuple[Any, ...], dict[str, float]] = {}
    trail: list[dict[str, Any]] = []
    within_plans: list[dict[str, Any]] = []
    ok: float | None = None  # largest KL budget within the ppl budget
    over: float | None = None  # smallest KL budget over it
    budget = start
    verified = 0
    for _ in range(8 * steps):  # reused plans cost nothing; bound the loop anyway
        plan = plan_for(budget)
        key = _plan_key(plan)
        reused = key in measured
        if not reused:
            measured[key] = dict(verify(plan))
            verified += 1
        metrics = measured[key]
        within = metrics["ppl_increase_pct"] <= ppl_budget_pct
        step = {
            "kl_budget": budget,
            "predicted_kl": plan["predicted_kl"],
            "bits_per_value": plan["bits_per_value"],
            "cost": plan["cost"],
            "algo": plan["algo"],
            "within": within,
            "reused": reused,
            **metrics,
        }
        trail.append(step)
        if log is not None:
            log(
                f"ppl-budget step {len(trail)}: KL budget {budget:.5f} -> predicted KL {plan['predicted_kl']:.5f}, "
                f"{plan['bits_per_value']:.3f} bits/value ({plan['algo']}); held-out ppl "
                f"{metrics['ppl_increase_pct']:+.3f}% (budget {ppl_budget_pct}%), KL {metrics.get('kld', math.nan):.5f}"
                f"{' [same plan as before]' if reused else ''}: {'within' if within else 'over'}"
            )
        if within:
            within_plans.append(plan)
            ok = budget if ok is None else max(ok, budget)
        else:
            over = budget if over is None else min(over, budget)
        if verified >= steps:
            break
        if ok is None:
            budget /= 2
        elif over is None:
            budget *= 2
        else:
            if over / ok <= tolerance:
                break
            budget = math.sqrt(ok * over)
    best = min(within_plans, key=lambda p: (p["cost"], p["predicted_kl"])) if within_plans else None
    return best, trail


def _verify_worker(
    rank: int,
    world_size: int,
    ckpt: str,
    windows: list[list[int]],
    sensitivity: dict[str, dict[str, float]],
    bits: dict[str, float],
    outliers: dict[str, list[int]],
    objective: str,
    ppl_budget_pct: float | None,
    start: float,
    steps: int,
    progress: bool,
    scales: dict[str, list[int]],
) -> dict[str, Any] | None:
    import sys

    from megatron.core import parallel_state

    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, meta = load_model(ckpt, dtype=torch.float32)
    group = parallel_state.get_tensor_model_parallel_group()
    mc = meta.model_config
    dims = {"num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "tp_size": world_size}
    seqs = [torch.tensor(w) for w in windows]  # each window: context + 1 tokens (inputs and next tokens)
    intercept.disable(model)
    base = [sharded_logprobs(_logits_shard(model, ids[:-1]), group) for ids in seqs]
    tokens = sum(ids.numel() - 1 for ids in seqs)
    base_nll = 0.0
    for ids, b in zip(seqs, base, strict=True):
        base_nll += sharded_window_metrics(b, b, ids[1:], group)[0]

    def verify(plan: dict[str, Any]) -> dict[str, float]:
        data = assignment_to_config(plan["assignment"], outliers, dims, {}, scales=scales)
        data.pop("meta")
        intercept.enable(model, CompressionConfig.from_dict(data, source="plan"))
        nll = kl = 0.0
        top1 = 0
        for ids, b in zip(seqs, base, strict=True):
            lp = sharded_logprobs(_logits_shard(model, ids[:-1]), group)
            n, k, t = sharded_window_metrics(b, lp, ids[1:], group)
            nll, kl, top1 = nll + n, kl + k, top1 + t
        intercept.disable(model)
        return {
            "ppl_increase_pct": 100.0 * (math.exp((nll - base_nll) / tokens) - 1.0),
            "kld": kl / tokens,
            "top1_agreement": top1 / tokens,
        }

    def log(msg: str) -> None:
        if rank == 0 and progress:
            print(f"megatron-tpcomp: {msg}", file=sys.stderr, flush=True)

    def plan_for(budget: float) -> dict[str, Any]:
        return choose_plan(sensitivity, bits, budget, objective=objective, tp=world_size)

    if ppl_budget_pct is None:  # verify the one plan of the KL budget
        plan = plan_for(start)
        result: dict[str, Any] = {"best": plan, "steps": [{**plan_summary(plan), **verify(plan)}]}
    else:
        best, trail = bisect_budget(plan_for, verify, ppl_budget_pct, start=start, steps=steps, log=log)
        result = {"best": best, "steps": trail}
    result["baseline_ppl"] = math.exp(base_nll / tokens)
    result["tokens"] = tokens
    M.destroy_parallel()
    return result if rank == 0 else None


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The scalar fields of a plan (for logs and metadata)."""
    return {k: plan[k] for k in ("kl_budget", "predicted_kl", "bits_per_value", "wire_bits_per_value", "algo")}


def verify_plans(
    ckpt: str,
    tp: int,
    windows: list[list[int]],
    sensitivity: dict[str, dict[str, float]],
    bits: dict[str, float],
    outliers: dict[str, list[int]],
    *,
    scales: dict[str, list[int]] | None = None,
    objective: str = "bits",
    ppl_budget_pct: float | None = None,
    start: float = 0.01,
    steps: int = 6,
    progress: bool = True,
    timeout_s: float = 12 * 3600,
) -> dict[str, Any]:
    """Verify on held-out ``windows`` (each ``context + 1`` token ids): with ``ppl_budget_pct`` run
    :func:`bisect_budget` from KL budget ``start``; without, measure the plan of KL budget ``start`` once.

    Returns:
        ``{"best": plan or None, "steps": [...], "baseline_ppl", "tokens"}``
    """
    from megatron_tpcomp.launch import run_distributed

    return run_distributed(
        _verify_worker,
        tp,
        ckpt,
        windows,
        sensitivity,
        bits,
        outliers,
        objective,
        ppl_budget_pct,
        start,
        steps,
        progress,
        scales or {},
        timeout_s=timeout_s,
    )[0]
