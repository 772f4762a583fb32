"""Candidates of the per-layer format search: ``SPEC`` or ``SPEC@ALGO`` (ALGO: ``one-shot``, the default, or
``two-shot``), what each costs per value, and the default set.

Bits per value come from the codec (``Codec.bits_per_value`` of a ``[context, hidden]`` message, scales and the
outlier table included), never from a table. The all-reduce algorithm is part of a candidate because it changes
quality: two-shot requantizes the reduced chunk, so a ``@two-shot`` candidate's sensitivity is measured with
two-shot. Objectives: ``bits`` (payload bits per value, what ``tpcomp eval`` reports) or ``wire`` (bits each rank
puts on the wire per value, in units of the stock bf16 ring all-reduce: the algorithm descriptor's
:func:`~megatron_tpcomp.collectives.algorithms.wire_factor`). The defaults come from a measured study
on SmolLM2-135M at TP=3 (docs/results.md).
"""

from __future__ import annotations

from typing import Any

from megatron_tpcomp.collectives.algorithms import ALL_REDUCE_ALGOS, wire_factor
from megatron_tpcomp.megatron.site import LAYER_BLOCKS

#: The blocks of a layer the search assigns a format to.
BLOCKS = LAYER_BLOCKS
UNCOMPRESSED_BITS = 16.0
#: Algorithms a candidate may name (``auto`` is not one: the search must know which one it measured).
SEARCH_ALGOS = ALL_REDUCE_ALGOS
DEFAULT_ALGO = "one-shot"
#: What a plan's ``algo`` says when its sites use different algorithms.
PER_SITE = "per-site"
OBJECTIVES = ("bits", "wire")
#: Default candidates for ``tpcomp calibrate --search`` (one-shot; the study behind them: docs/results.md).
DEFAULT_CANDIDATES = (
    "int4:g64:se4m3+had",
    "int4:g32:se4m3+had",
    "int5:g64:se4m3+had",
    "int6:g128+had:b128",
    "int8:g128+had",
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


def candidate_cost(name: str, bits: float, objective: str, tp: int) -> float:
    """What the knapsack minimises for one site with candidate ``name`` of ``bits`` payload bits per value."""
    if objective == "bits":
        return bits
    if objective == "wire":
        return bits * wire_factor(split_candidate(name)[1], tp)
    raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


def site_setting(spec: str, channels: list[int] | None, exponents: list[int] | None = None) -> Any:
    """A site's setting for candidate ``spec``, with the site's calibrated tables where the spec uses them."""
    from megatron_tpcomp.config import SiteSetting

    return SiteSetting(
        spec,
        tuple(channels) if "+outliers" in spec and channels else None,
        channel_scale_exponents=tuple(exponents) if "+chscale" in spec and exponents else None,
    )
