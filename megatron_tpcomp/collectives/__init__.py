"""Compressed tensor-parallel collectives on ``torch.distributed``: all-reduce, all-gather, reduce-scatter.

- :mod:`.api`: the entry points (:func:`all_reduce`, :func:`all_gather`, :func:`reduce_scatter`), their
  fallbacks to the stock collectives, rank agreement and :class:`CommStats`;
- :mod:`.algorithms`: the list of algorithms (``ALGORITHMS``), the lookups and the one ``auto`` rule;
- one module per algorithm, each building its descriptor (bytes sent, rounds, quantizations, chunk plan,
  pipelining, the function that runs it): :mod:`.ring` (the stock collectives), :mod:`.one_shot`,
  :mod:`.two_shot`, :mod:`.gather` (all-gather), :mod:`.scatter` (reduce-scatter); :mod:`.descriptor` defines
  the descriptor, :mod:`.transport` the payload moves they share;
- :mod:`.chunking`: how a message is cut (two-shot chunks, pipelined one-shot chunks, block alignment).

A new algorithm is one module like ``two_shot.py`` plus its entry in ``algorithms.ALGORITHMS``: the
collectives, the cost model, the search's wire objective and the benchmarks read it from there.
"""

from megatron_tpcomp.collectives.algorithms import (
    ALGORITHMS,
    ALGOS,
    STOCK,
    TWO_SHOT_DEFAULT_MIN_BYTES,
    TWO_SHOT_MIN_BYTES,
    Algorithm,
    algorithm,
    choose_algo,
    wire_factor,
)
from megatron_tpcomp.collectives.api import (
    DEFAULT_MIN_BYTES,
    CheckRanks,
    CollectiveError,
    CommStats,
    all_gather,
    all_reduce,
    reduce_scatter,
    resolve_codec,
)
from megatron_tpcomp.collectives.chunking import chunk_alignment, pipeline_chunks

__all__ = [
    "ALGORITHMS",
    "ALGOS",
    "DEFAULT_MIN_BYTES",
    "STOCK",
    "TWO_SHOT_DEFAULT_MIN_BYTES",
    "TWO_SHOT_MIN_BYTES",
    "Algorithm",
    "CheckRanks",
    "CollectiveError",
    "CommStats",
    "algorithm",
    "all_gather",
    "all_reduce",
    "choose_algo",
    "chunk_alignment",
    "pipeline_chunks",
    "reduce_scatter",
    "resolve_codec",
    "wire_factor",
]
