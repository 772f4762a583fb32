"""Compressed tensor-parallel collectives on ``torch.distributed``: all-reduce, all-gather, reduce-scatter.

- :mod:`.api`: the entry points (:func:`all_reduce`, :func:`all_gather`, :func:`reduce_scatter`), their
  fallbacks to the stock collectives, rank agreement and :class:`CommStats`;
- :mod:`.algorithms`: one descriptor per algorithm (bytes sent, rounds, quantizations, chunk plan, pipelining,
  the function that runs it) and the ``auto`` rule;
- :mod:`.chunking`: how a message is cut (two-shot chunks, pipelined one-shot chunks, block alignment).
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
