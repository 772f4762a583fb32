"""The distributed passes of the format search, one process per TP rank: the sensitivity of every site to every
candidate (:func:`measure_sensitivity`) and the verification of chosen plans on held-out text
(:func:`verify_plans`), both through the real collectives at the real TP size."""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_tpcomp.search.assignment import assignment_to_config
from megatron_tpcomp.search.candidates import site_setting, split_candidate
from megatron_tpcomp.search.knapsack import bisect_budget, choose_plan, plan_summary
from megatron_tpcomp.search.metrics import logits_shard, sharded_kl, sharded_logprobs, sharded_window_metrics
from megatron_tpcomp.search.replay import record_outputs, replay_prefix


def _baseline(
    model: torch.nn.Module, seqs: list[torch.Tensor], group: Any
) -> tuple[list[torch.Tensor], list[list[torch.Tensor | None]]]:
    """The uncompressed run of every window: its log-prob shards ``[s, V/tp]`` and every layer's output."""
    layers = list(model.decoder.layers)
    base, recorded = [], []
    slots, handles = record_outputs(layers)
    for ids in seqs:
        base.append(sharded_logprobs(logits_shard(model, ids), group))  # [s, V/tp]
        recorded.append(list(slots))
    for h in handles:
        h.remove()
    return base, recorded


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
    from tqdm import tqdm

    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron.site import Site, layer_sites
    from megatron_tpcomp.session import rank_session

    with rank_session(ckpt, world_size, dtype=torch.float32) as session:
        model, group = session.model, session.group
        layers = list(model.decoder.layers)
        seqs = [torch.tensor(w) for w in windows]
        intercept.disable(model)
        base, recorded = _baseline(model, seqs, group)
        wanted = [Site.parse(s) for s in sites] if sites else list(layer_sites(session.meta.model_config.num_layers))
        result: dict[str, dict[str, float]] = {}
        jobs = [(site, c) for site in wanted for c in candidates]
        for site, cand in tqdm(jobs, desc="sensitivity", unit="case", disable=not (progress and rank == 0)):
            name = str(site)
            spec, algo = split_candidate(cand)
            setting = site_setting(spec, outliers.get(name), scales.get(name))
            intercept.enable(model, CompressionConfig(layers={site.layer: {site.kind: setting}}, algo=algo))
            kl = 0.0
            for ids, b, outs in zip(seqs, base, recorded, strict=True):
                with replay_prefix(layers, outs, site.layer if replay else 0):
                    lp = sharded_logprobs(logits_shard(model, ids), group)
                kl += float(sharded_kl(b, lp, group).mean())
            intercept.disable(model)
            result.setdefault(name, {})[cand] = kl / len(windows)
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
    from megatron_tpcomp.megatron.site import Site

    for c in candidates:
        split_candidate(c)
    for s in sites or []:
        if Site.parse(s).layer is None:
            raise ValueError(f"site {s!r}: the search measures transformer-layer sites (layerN.attention|mlp)")
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

    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.session import rank_session

    with rank_session(ckpt, world_size, dtype=torch.float32) as session:
        model, group = session.model, session.group
        mc = session.meta.model_config
        dims = {"num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "tp_size": world_size}
        seqs = [torch.tensor(w) for w in windows]  # each window: context + 1 tokens (inputs and next tokens)
        intercept.disable(model)
        base = [sharded_logprobs(logits_shard(model, ids[:-1]), group) for ids in seqs]
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
                lp = sharded_logprobs(logits_shard(model, ids[:-1]), group)
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
    return result if rank == 0 else None


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
