"""One descriptor per collective algorithm: what it sends, in how many rounds, how it cuts and quantizes the
message, and the function that runs it.

Per rank, for N ranks and a message whose payload is P bytes (the input's B bytes for the stock collectives):

============== ============== =========================== ============ ============== =====================
op             algorithm      bytes sent                  rounds       quantizations  codec work
============== ============== =========================== ============ ============== =====================
all_reduce     stock (ring)   2 (N-1)/N B                 2 (N-1)      0              none
all_reduce     one-shot       (N-1) P                     N-1          1              enc(B), N dec(B)
all_reduce     two-shot       2 (N-1)/N P                 2 (N-1)      2              enc(B), N dec(B/N),
                                                                                      enc(B/N), N dec(B/N)
all_gather     stock (ring)   (N-1) B                     N-1          0              none
all_gather     all-gather     (N-1) P                     N-1          1              enc(B), N dec(B)
reduce_scatter stock (ring)   (N-1)/N B                   N-1          0              none
reduce_scatter all-to-all     (N-1)/N P                   N-1          1              enc(B), N dec(B/N)
============== ============== =========================== ============ ============== =====================

- one-shot (Hansen-Palmus et al.): encode, all-gather the payloads, decode all N, sum. Large CPU messages are
  pipelined in K chunks (:func:`chunking.pipeline_chunks`).
- two-shot (QuickReduce, Flash Communication): N chunks, all-to-all, decode and sum my chunk, requantize it
  once, all-gather the reduced chunks; fewer bytes from N = 4 on, but the second quantization roughly doubles
  the error.

Every rank decodes its OWN payload too and sums in fp32 in rank order 0..N-1, so all ranks hold the same bits.
The cost model (:mod:`megatron_tpcomp.costmodel`) builds its formulas from these descriptors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_tpcomp.collectives.descriptor import Algorithm, CodecTerm, Runner
from megatron_tpcomp.collectives.gather import ALL_GATHER
from megatron_tpcomp.collectives.one_shot import ONE_SHOT
from megatron_tpcomp.collectives.ring import STOCK_ALL_GATHER, STOCK_ALL_REDUCE, STOCK_REDUCE_SCATTER
from megatron_tpcomp.collectives.scatter import ALL_TO_ALL
from megatron_tpcomp.collectives.transport import all_gather_flat, is_float8, reduce_scatter_flat
from megatron_tpcomp.collectives.two_shot import TWO_SHOT

__all__ = [
    "ALGORITHMS", "ALGOS", "ALL_GATHER", "ALL_REDUCE_ALGOS", "ALL_TO_ALL", "ONE_SHOT", "OPS", "STOCK",
    "STOCK_ALL_GATHER", "STOCK_ALL_REDUCE", "STOCK_REDUCE_SCATTER", "TWO_SHOT", "TWO_SHOT_DEFAULT_MIN_BYTES",
    "TWO_SHOT_MIN_BYTES", "Algorithm", "CodecTerm", "Runner", "algorithm", "all_gather_flat", "choose_algo",
    "compressed_algorithms", "is_float8", "reduce_scatter_flat", "wire_factor",
]  # fmt: skip

OPS = ("all_reduce", "all_gather", "reduce_scatter")

#: Every algorithm, stock ones first per op, compressed ones in tie-break order. Adding an algorithm: a module
#: that builds its :class:`Algorithm` (like ``two_shot.py``), and its entry here.
ALGORITHMS: tuple[Algorithm, ...] = (
    STOCK_ALL_REDUCE,
    ONE_SHOT,
    TWO_SHOT,
    STOCK_ALL_GATHER,
    ALL_GATHER,
    STOCK_REDUCE_SCATTER,
    ALL_TO_ALL,
)
#: The stock ring collective of each op (the baseline of ``CommStats`` and the cost model).
STOCK: dict[str, Algorithm] = {a.op: a for a in ALGORITHMS if not a.compressed}
#: The all-reduce algorithms ``auto`` chooses between, in tie-break order.
ALL_REDUCE_ALGOS = tuple(a.name for a in ALGORITHMS if a.op == "all_reduce" and a.compressed)
#: All-reduce algorithm settings (config ``algo``, ``--algo``): ``auto`` picks one of the others.
ALGOS = ("auto", *ALL_REDUCE_ALGOS)

#: The size rule of ``auto`` (:func:`choose_algo` without a cost model): world size -> smallest message
#: (uncompressed bytes) for which two-shot is used; None = never; world sizes not listed use
#: ``TWO_SHOT_DEFAULT_MIN_BYTES``. N = 2: both send P, two-shot only adds a round and a quantization; N = 3:
#: a third fewer bytes does not pay for doubling the error; N >= 4: two-shot sends fewer bytes once the message
#: is bandwidth-bound (512 KiB: a placeholder until measured).
TWO_SHOT_MIN_BYTES: dict[int, int | None] = {1: None, 2: None, 3: None}

TWO_SHOT_DEFAULT_MIN_BYTES = 512 * 1024


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected all_reduce, all_gather or reduce_scatter")


def compressed_algorithms(op: str) -> tuple[Algorithm, ...]:
    """The compressed algorithms of ``op``, in tie-break order."""
    _check_op(op)
    return tuple(a for a in ALGORITHMS if a.op == op and a.compressed)


def algorithm(op: str, name: str) -> Algorithm:
    """The descriptor of ``op`` run as ``name``. All-reduce: ``stock``, ``one-shot`` or ``two-shot``. All-gather
    and reduce-scatter have one compressed algorithm: ``stock`` gives the stock one, their own name or an
    all-reduce setting (the config's ``algo``, which does not apply to them) the compressed one.

    Raises:
        ValueError: unknown ``op`` or ``name``.
    """
    _check_op(op)
    for a in ALGORITHMS:
        if a.op == op and a.name == name:
            return a
    if op != "all_reduce" and name in ALGOS:
        return compressed_algorithms(op)[0]
    names = ", ".join(a.name for a in ALGORITHMS if a.op == op)
    raise ValueError(f"unknown {op} algorithm {name!r}; expected one of {names}")


def choose_algo(
    world_size: int,
    nbytes: int,
    predict: Callable[[str], float] | None = None,
    candidates: Sequence[str] = ALL_REDUCE_ALGOS,
) -> str:
    """The one meaning of all-reduce ``auto``: ``one-shot`` or ``two-shot`` for a message of ``nbytes``
    (uncompressed) on ``world_size`` ranks. Two rules, chosen by ``predict``:

    - size rule (``predict`` None; a fixed codec: :func:`megatron_tpcomp.collectives.all_reduce`): two-shot if
      the world size's entry in ``TWO_SHOT_MIN_BYTES`` allows it for this size, else one-shot;
    - cost rule (``predict``: algorithm -> predicted seconds; policy ``auto``: :meth:`CostModel.choose`): the
      fastest of ``candidates``, the first one on a tie.
    """
    if predict is not None:
        best = candidates[0]
        best_t = predict(best)
        for algo in candidates[1:]:
            t = predict(algo)
            if t < best_t:
                best, best_t = algo, t
        return best
    threshold = TWO_SHOT_MIN_BYTES.get(world_size, TWO_SHOT_DEFAULT_MIN_BYTES)
    return "two-shot" if threshold is not None and nbytes >= threshold else "one-shot"


def wire_factor(algo: str, n: int) -> float:
    """Bytes each rank sends with all-reduce ``algo`` for a P-byte payload, in units of the stock ring all-reduce
    of the same P bytes (``2 (N-1)/N P``): one-shot N/2, two-shot 1. Defined for N = 1 too (the ratio of the
    per-step volumes).

    Raises:
        ValueError: ``algo`` is not ``one-shot`` or ``two-shot``.
    """
    if algo not in ALL_REDUCE_ALGOS:
        raise ValueError(f"unknown algo {algo!r}; expected one of {', '.join(ALL_REDUCE_ALGOS)}")
    a, stock = algorithm("all_reduce", algo), STOCK["all_reduce"]
    return float(a.steps_per_peer * a.step_share(n) / (stock.steps_per_peer * stock.step_share(n)))
