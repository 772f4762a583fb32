"""The choice of the per-layer format search: a multiple-choice knapsack over the measured sensitivities.

KL damage is close to additive across collectives on the models measured, so each site (layer x attention|mlp)
takes one option (a candidate, or ``none`` at 16 bits and zero KL) minimising the mean cost per value subject to
the summed KL <= budget. Solved by Lagrangian relaxation: for a price ``lam`` each site independently takes
``argmin cost + lam * KL``; bisection finds the cheapest ``lam`` that meets the budget (exact on the convex hull
of each site's options, within one site's step otherwise), then a greedy refill spends what is left.

With a perplexity budget, :func:`bisect_budget` searches the KL budget whose plan's *verified* perplexity
increase fits: additivity is an approximation and predicted KL runs under the measured one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from megatron_tpcomp.search.candidates import (
    DEFAULT_ALGO,
    OBJECTIVES,
    PER_SITE,
    SEARCH_ALGOS,
    UNCOMPRESSED_BITS,
    candidate_cost,
    split_candidate,
)


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


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The scalar fields of a plan (for logs and metadata)."""
    return {k: plan[k] for k in ("kl_budget", "predicted_kl", "bits_per_value", "wire_bits_per_value", "algo")}


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
