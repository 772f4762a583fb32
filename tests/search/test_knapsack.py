"""The per-layer format choice: a multiple-choice knapsack under a KL budget, checked against brute force, and
the verified bisection of the KL budget under a perplexity budget."""

from __future__ import annotations

import itertools
import random

import pytest

from megatron_tpcomp.config import CompressionConfig
from megatron_tpcomp.search import UNCOMPRESSED_BITS, assignment_to_config, choose, split_candidate

BITS = {"int4": 4.5, "fp5": 5.25, "int8": 8.5}


def _random_case(rng: random.Random, sites: int) -> dict[str, dict[str, float]]:
    # Lower-bit formats cost more KL at the same site; some sites are far more sensitive (SmolLM2-135M: layer 29 MLP).
    out = {}
    for s in range(sites):
        scale = rng.choice([0.001, 0.003, 0.01, 0.05])
        out[f"layer{s}.mlp"] = {"int8": scale * 0.03, "fp5": scale * rng.uniform(0.3, 0.6), "int4": scale}
    return out


def _brute_force(sens: dict[str, dict[str, float]], budget: float) -> float:
    sites = sorted(sens)
    opts = [[(UNCOMPRESSED_BITS, 0.0)] + [(BITS[c], kl) for c, kl in sens[s].items()] for s in sites]
    best = UNCOMPRESSED_BITS
    for combo in itertools.product(*opts):
        if sum(o[1] for o in combo) <= budget:
            best = min(best, sum(o[0] for o in combo) / len(sites))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_choice_meets_the_budget_and_is_near_optimal(seed: int) -> None:
    rng = random.Random(seed)
    sens = _random_case(rng, 5)
    budget = rng.choice([0.0, 0.002, 0.01, 0.03, 0.1])
    assignment, kl, bits = choose(sens, BITS, budget)
    assert set(assignment) == set(sens)
    assert kl <= budget + 1e-12
    assert kl == pytest.approx(sum(sens[s][c] for s, c in assignment.items() if c != "none"))
    optimum = _brute_force(sens, budget)
    # Lagrangian choice + greedy refill: at most one site's step (16 - 4.5 bits over 5 sites) above optimum.
    assert optimum <= bits + 1e-9 and bits - optimum <= (UNCOMPRESSED_BITS - 4.5) / 5 + 1e-9, (bits, optimum)


def test_extremes() -> None:
    sens = _random_case(random.Random(0), 6)
    assignment, kl, bits = choose(sens, BITS, 0.0)
    assert set(assignment.values()) == {"none"} and kl == 0.0 and bits == UNCOMPRESSED_BITS
    assignment, _, bits = choose(sens, BITS, 10.0)
    assert set(assignment.values()) == {"int4"} and bits == 4.5
    with pytest.raises(ValueError, match="KL budget must be >= 0"):
        choose(sens, BITS, -1.0)


def _algo_case() -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    # Two-shot: same payload, more KL (requantization); one-shot: N/2 times the bytes on the wire.
    sens, bits = {}, {"int4": 4.0, "int8": 8.0, "int4@two-shot": 4.0, "int8@two-shot": 8.0}
    for i in range(6):
        scale = 0.001 * (i + 1)
        sens[f"layer{i}.mlp"] = {
            "int4": scale,
            "int8": scale / 100,
            "int4@two-shot": 2 * scale,
            "int8@two-shot": 0.02 * scale,
        }
    return sens, bits


def test_two_shot_never_wins_on_payload_bits_but_can_on_the_wire() -> None:
    from megatron_tpcomp.search import choose_plan

    sens, bits = _algo_case()
    plan = choose_plan(sens, bits, 0.01, objective="bits", tp=3)
    assert plan["algo"] == "one-shot" and set(plan["plans"]) == {"one-shot", "two-shot", "per-site"}
    assert all(c in ("none", "int4", "int8") for c in plan["assignment"].values())
    assert plan["predicted_kl"] <= 0.01 and plan["bits_per_value"] == plan["cost"]
    # Wire cost at TP=3: one-shot int8 = 12, int4 = 6 ring-equivalent bits; two-shot int8 = 8, int4 = 4.
    wire = choose_plan(sens, bits, 0.01, objective="wire", tp=3)
    assert sum(c.endswith("@two-shot") for c in wire["assignment"].values()) >= 3
    plans = wire["plans"]
    assert wire["cost"] == wire["wire_bits_per_value"] <= plans["two-shot"]["wire_bits_per_value"]
    assert plans["two-shot"]["wire_bits_per_value"] < plans["one-shot"]["wire_bits_per_value"]
    assert wire["predicted_kl"] <= 0.01
    # At TP=2 both algorithms send the same bytes: the lower KL of one-shot wins again.
    assert choose_plan(sens, bits, 0.01, objective="wire", tp=2)["algo"] == "one-shot"
    with pytest.raises(ValueError, match="objective"):
        choose_plan(sens, bits, 0.01, objective="speed")


def test_each_site_takes_its_own_algorithm_when_that_pays() -> None:
    from megatron_tpcomp.search import choose_plan

    # Sites 0-2 barely notice requantization (two-shot KL = 1.1x one-shot), sites 3-5 suffer (50x): under the
    # wire objective at TP=3 the first should go two-shot (a third fewer bytes), the others stay one-shot.
    bits = {"int4": 4.0, "int8": 8.0, "int4@two-shot": 4.0, "int8@two-shot": 8.0}
    sens = {}
    for i in range(6):
        factor = 1.1 if i < 3 else 50.0
        sens[f"layer{i}.mlp"] = {"int4": 0.002, "int8": 0.0001, "int4@two-shot": 0.002 * factor}
        sens[f"layer{i}.mlp"]["int8@two-shot"] = 0.0001 * factor
    plan = choose_plan(sens, bits, 0.01, objective="wire", tp=3)
    assert plan["algo"] == "per-site" and plan["predicted_kl"] <= 0.01
    assert all(plan["assignment"][f"layer{i}.mlp"].endswith("@two-shot") for i in range(3))
    assert not any(plan["assignment"][f"layer{i}.mlp"].endswith("@two-shot") for i in range(3, 6))
    single = min(plan["plans"]["one-shot"]["wire_bits_per_value"], plan["plans"]["two-shot"]["wire_bits_per_value"])
    assert plan["cost"] == plan["wire_bits_per_value"] < single
    # The config keeps the majority algorithm (a tie: one-shot) and writes the others as SPEC@ALGO; loaded, every
    # site runs the algorithm the plan measured it with.
    data = assignment_to_config(plan["assignment"], {}, {"num_layers": 6, "hidden_size": 64, "tp_size": 3}, {})
    cfg = CompressionConfig.from_dict(data)
    assert data["algo"] == "one-shot"
    for site, cand in plan["assignment"].items():
        layer = int(site[5:].partition(".")[0])
        assert cfg.algo_for("mlp", layer) == split_candidate(cand)[1]
    assert cfg.algo_for("attention", 0) == "one-shot"  # not in the plan: uncompressed anyway


def _ppl_case(seed: int = 3) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    rng = random.Random(seed)
    return _random_case(rng, 40), BITS


@pytest.mark.parametrize("slope", [60.0, 110.0, 300.0])
def test_ppl_bisection_lands_within_the_budget_near_its_edge(slope: float) -> None:
    from megatron_tpcomp.search import bisect_budget, choose_plan

    sens, bits = _ppl_case()
    calls = []

    def plan_for(b: float) -> dict:
        return choose_plan(sens, bits, b)

    def verify(plan: dict) -> dict:  # a monotone stand-in for the held-out measurement
        calls.append(plan["kl_budget"])
        return {"ppl_increase_pct": slope * plan["predicted_kl"], "kld": plan["predicted_kl"], "top1_agreement": 0.9}

    best, trail = bisect_budget(plan_for, verify, 1.0, start=0.01, steps=8)
    assert best is not None and slope * best["predicted_kl"] <= 1.0
    assert len(calls) <= 8 and len(trail) >= len(calls)
    assert len(set(map(lambda s: (s["bits_per_value"], s["predicted_kl"]), trail))) == len(calls)  # no plan twice
    assert [s["reused"] for s in trail].count(False) == len(calls)
    # Near the edge: no worse than the plan of a KL budget 3% below the exact one (1 / slope).
    assert best["bits_per_value"] <= plan_for(0.97 / slope)["bits_per_value"] + 1e-9
    # The walk (monotone stand-in): within -> the next KL budget is larger, over -> smaller.
    for a, b in zip(trail, trail[1:], strict=False):
        assert (b["kl_budget"] > a["kl_budget"]) == a["within"], trail


def test_ppl_bisection_reports_an_unreachable_budget() -> None:
    from megatron_tpcomp.search import bisect_budget, choose_plan

    sens, bits = _ppl_case()
    best, trail = bisect_budget(
        lambda b: choose_plan(sens, bits, b),
        lambda plan: {"ppl_increase_pct": 2.0 + plan["predicted_kl"]},  # never within 1%
        1.0,
        start=0.01,
        steps=4,
    )
    assert best is None and len(trail) == 4 and not any(s["within"] for s in trail)
    assert [s["kl_budget"] for s in trail] == [0.01, 0.005, 0.0025, 0.00125]
    with pytest.raises(ValueError, match="> 0"):
        bisect_budget(lambda b: {}, lambda p: {}, 1.0, start=0.0)
