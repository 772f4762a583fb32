"""Per-layer format search under a quality budget (``tpcomp calibrate --search``).

1. Sensitivity (:mod:`.workers`): for every transformer-layer site (layer x attention|mlp) and candidate
   (:mod:`.candidates`), compress only that site and measure the mean KL divergence from the uncompressed run on
   calibration windows, at the real TP size through the real collectives (layers before the site replayed,
   :mod:`.replay`; KL on vocabulary-parallel shards, :mod:`.metrics`).
2. Choice (:mod:`.knapsack`): KL damage adds up nearly exactly across sites on the models measured, so a
   multiple-choice knapsack picks one option per site minimising bits (or wire bytes) under a summed-KL budget.
3. Verification: the plan is measured on held-out calibration text (``--verify``, or a perplexity budget that
   bisects the KL budget, :func:`.knapsack.bisect_budget`); ``tpcomp eval --config`` verifies on evaluation text.

Measurements behind the defaults and the method are in docs/results.md.
"""

from megatron_tpcomp.search.assignment import assignment_to_config
from megatron_tpcomp.search.candidates import (
    BLOCKS,
    DEFAULT_ALGO,
    DEFAULT_CANDIDATES,
    OBJECTIVES,
    PER_SITE,
    SEARCH_ALGOS,
    UNCOMPRESSED_BITS,
    candidate_bits,
    candidate_cost,
    site_setting,
    split_candidate,
    wire_factor,
)
from megatron_tpcomp.search.knapsack import bisect_budget, choose, choose_plan, plan_algo, plan_summary
from megatron_tpcomp.search.metrics import logits_shard, sharded_kl, sharded_logprobs, sharded_window_metrics
from megatron_tpcomp.search.replay import record_outputs, replay_prefix
from megatron_tpcomp.search.workers import measure_sensitivity, verify_plans

__all__ = [
    "BLOCKS",
    "DEFAULT_ALGO",
    "DEFAULT_CANDIDATES",
    "OBJECTIVES",
    "PER_SITE",
    "SEARCH_ALGOS",
    "UNCOMPRESSED_BITS",
    "assignment_to_config",
    "bisect_budget",
    "candidate_bits",
    "candidate_cost",
    "choose",
    "choose_plan",
    "logits_shard",
    "measure_sensitivity",
    "plan_algo",
    "plan_summary",
    "record_outputs",
    "replay_prefix",
    "sharded_kl",
    "sharded_logprobs",
    "sharded_window_metrics",
    "site_setting",
    "split_candidate",
    "verify_plans",
    "wire_factor",
]
