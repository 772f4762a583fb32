"""Per-layer configs from calibration results: every block ``SPEC+outliers`` with its calibrated channels
(:func:`to_config`), or a searched codec per block under a KL or perplexity budget (:func:`search_config`, using
:mod:`megatron_tpcomp.search` with the calibrated outlier channels and channel scales)."""

from __future__ import annotations

import logging
from typing import Any

from megatron_tpcomp.codecs.chscale import exponents_from_rms
from megatron_tpcomp.megatron.site import Site, layer_sites

logger = logging.getLogger("megatron_tpcomp")


def to_config(result: dict[str, Any], spec: str, *, algo: str = "auto") -> dict[str, Any]:
    """A per-layer compression config (schema of :mod:`megatron_tpcomp.config`): every calibrated block uses
    ``spec+outliers`` with its channel table; embedding and logits stay uncompressed."""
    from megatron_tpcomp.config import CompressionConfig

    layered = f"{spec}+outliers" if "+outliers" not in spec else spec
    layers: dict[str, dict[str, Any]] = {}
    for key, site in result["sites"].items():
        where = Site.parse(key)
        if where.layer is None:
            continue
        layers.setdefault(str(where.layer), {})[where.kind] = {
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
    from megatron_tpcomp import search

    if objective not in search.OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(search.OBJECTIVES)}")
    if ppl_budget is not None and ppl_budget < 0:
        raise ValueError(f"the perplexity budget must be >= 0 percent, got {ppl_budget}")
    outliers = {key: s["outlier_channels"] for key, s in result["sites"].items()}
    scales = {key: exponents_from_rms(s["rms"]) for key, s in result["sites"].items()}  # for +chscale
    bits = {c: search.candidate_bits(c, (context, result["hidden"]), result["k"]) for c in candidates}
    ids = _calibration_ids(result, text)
    count = min(max(tokens // context, 1), len(ids) // context)
    if count < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens; one window needs {context}")
    windows = [ids[i * context : (i + 1) * context] for i in range(count)]
    held, first = [], -1
    if ppl_budget is not None or verify:
        used = max(count * context, result["calibration"]["tokens"])
        held, first = _heldout_windows(ids, used, context, verify_tokens)
    sens = _sensitivities(result, windows, candidates, outliers, scales, sensitivity, progress)
    if held:
        checked = search.verify_plans(
            result["checkpoint"], result["tp"], held, sens, bits, outliers, scales=scales, objective=objective,
            ppl_budget_pct=ppl_budget, start=budget, steps=steps, progress=progress,
        )  # fmt: skip
        where = "end of the calibration text" if text is not None else "State of the Union 1961-2000, end"
        verification = {"text": where, "tokens": checked["tokens"], "first_token": first, "context": context}
        plan, budget_meta = _verified_plan(checked, verification, sens, bits, objective, ppl_budget, result["tp"])
    else:
        plan = search.choose_plan(sens, bits, budget, objective=objective, tp=result["tp"])
        budget_meta = {"type": "kl", "kl_budget": budget}
    meta = _search_meta(result, plan, budget_meta, objective, {c: bits[c] for c in candidates}, count * context)
    meta["sensitivity_reused"] = sensitivity is not None
    dims = {"num_layers": result["num_layers"], "hidden_size": result["hidden"], "tp_size": result["tp"]}
    return search.assignment_to_config(plan["assignment"], outliers, dims, meta, scales=scales), sens


def _search_meta(
    result: dict[str, Any],
    plan: dict[str, Any],
    budget_meta: dict[str, Any],
    objective: str,
    bits: dict[str, float],
    search_tokens: int,
) -> dict[str, Any]:
    """A searched config's ``meta``: the budget, the plan's prediction, the candidates' bits, the calibration."""
    return {
        "calibrated_by": "tpcomp calibrate --search",
        "model": result["model"],
        "budget": budget_meta,
        "kl_budget": plan["kl_budget"],
        "objective": objective,
        "predicted_kl": plan["predicted_kl"],
        "predicted_bits_per_value": plan["bits_per_value"],
        "predicted_wire_bits_per_value": plan["wire_bits_per_value"],
        "plans": plan["plans"],
        "candidates": bits,
        "search_tokens": search_tokens,
        "sensitivity_reused": False,
        **result["calibration"],
    }


def _calibration_ids(result: dict[str, Any], text: str | None) -> list[int]:
    """Token ids of the calibration text (the default State of the Union text unless ``text`` is given)."""
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.tokenizer import TextTokenizer

    tok = TextTokenizer.from_checkpoint(read_metadata(result["checkpoint"]))
    return tok.tokenize(assets.calibration_text() if text is None else text)


def _heldout_windows(ids: list[int], used: int, context: int, verify_tokens: int) -> tuple[list[list[int]], int]:
    """Held-out windows of ``context + 1`` tokens that end at the end of ``ids``, after the first ``used``
    tokens (statistics and sensitivities); returns (windows, index of their first token)."""
    n = verify_tokens // context
    first = len(ids) - n * context - 1
    if n < 1 or first < used:
        raise ValueError(
            f"held-out verification needs {max(n, 1) * context + 1} tokens after the {used} calibration tokens; "
            f"the calibration text has {len(ids)} (lower --verify-tokens or --tokens)"
        )
    return [ids[first + i * context : first + (i + 1) * context + 1] for i in range(n)], first


def _sensitivities(
    result: dict[str, Any],
    windows: list[list[int]],
    candidates: list[str],
    outliers: dict[str, list[int]],
    scales: dict[str, list[int]],
    given: dict[str, dict[str, float]] | None,
    progress: bool,
) -> dict[str, dict[str, float]]:
    """site -> candidate -> KL: measured on ``windows``, or ``given`` (checked to cover every site/candidate)."""
    from megatron_tpcomp.search import measure_sensitivity

    if given is None:
        return measure_sensitivity(
            result["checkpoint"], result["tp"], windows, candidates, outliers, scales=scales, progress=progress
        )
    sites = [str(s) for s in layer_sites(result["num_layers"])]
    missing = [f"{s}/{c}" for s in sites for c in candidates if c not in given.get(s, {})]
    if missing:
        raise ValueError(f"the given sensitivities lack {len(missing)} site/candidate pairs, e.g. {missing[:3]}")
    return {s: {c: float(given[s][c]) for c in candidates} for s in sites}


def _verified_plan(
    checked: dict[str, Any],
    verification: dict[str, Any],
    sens: dict[str, dict[str, float]],
    bits: dict[str, float],
    objective: str,
    ppl_budget: float | None,
    tp: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan to write from :func:`megatron_tpcomp.search.verify_plans`' answer ``checked``, and the config's
    ``meta.budget`` (budget type, whether a perplexity budget was met, the chosen plan's verification, the
    steps). With no verified plan within the perplexity budget: the least damaging plan tried, with a warning."""
    from megatron_tpcomp.search import choose_plan

    plan = checked["best"]
    met = plan is not None
    if plan is None:  # nothing verified within the perplexity budget: the least damaging plan tried
        least = min(checked["steps"], key=lambda s: s["ppl_increase_pct"])
        plan = choose_plan(sens, bits, least["kl_budget"], objective=objective, tp=tp)
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
            "baseline_ppl": checked["baseline_ppl"],
            "ppl_increase_pct": chosen["ppl_increase_pct"],
            "kld": chosen["kld"],
            "top1_agreement": chosen["top1_agreement"],
        },
        "steps": checked["steps"],
    }
    return plan, budget_meta


def plan_algo_of(config: dict[str, Any]) -> str:
    """``one-shot``, ``two-shot`` or ``per-site`` (then with the number of sites off the config's algo)."""
    own = sum(
        1
        for blocks in config["layers"].values()
        for v in blocks.values()
        if (isinstance(v, str) and "@" in v) or (isinstance(v, dict) and "algo" in v)
    )
    return f"per-site ({config['algo']}, {own} sites otherwise)" if own else config["algo"]
