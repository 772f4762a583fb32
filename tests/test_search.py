"""The per-layer format choice: a multiple-choice knapsack under a KL budget, checked against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from megatron_tpcomp.search import UNCOMPRESSED_BITS, assignment_to_config, choose

BITS = {"int4": 4.5, "fp5": 5.25, "int8": 8.5}


def _random_case(rng: random.Random, sites: int) -> dict[str, dict[str, float]]:
    # Lower-bit formats cost more KL at the same site; some sites are far more sensitive (FACTS.md: layer 29).
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


def test_assignment_becomes_a_valid_config() -> None:
    data = assignment_to_config(
        {"layer0.mlp": "int4:g32+outliers", "layer0.attention": "none", "layer1.mlp": "int8:g32"},
        {"layer0.mlp": [3, 7, 11]},
        {"num_layers": 2, "hidden_size": 64, "tp_size": 2},
        {"kl_budget": 0.01},
    )
    assert data["layers"]["0"]["mlp"] == {"spec": "int4:g32+outliers", "outlier_channels": [3, 7, 11]}
    assert data["layers"]["1"]["mlp"] == "int8:g32" and data["default"] == "none"
