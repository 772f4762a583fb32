"""Per-layer config of a searched assignment (site -> candidate), in the schema of :mod:`megatron_tpcomp.config`."""

from __future__ import annotations

import collections
from typing import Any

from megatron_tpcomp.megatron.site import Site
from megatron_tpcomp.search.candidates import DEFAULT_ALGO, SEARCH_ALGOS, split_candidate


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
        where = Site.parse(site)
        if where.layer is None:
            raise ValueError(f"site {site!r}: a searched assignment holds transformer-layer sites only")
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
        layers.setdefault(str(where.layer), {})[where.kind] = value
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
