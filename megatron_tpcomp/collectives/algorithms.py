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
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.chunking import ChunkPlan

OPS = ("all_reduce", "all_gather", "reduce_scatter")
#: All-reduce algorithm settings (config ``algo``, ``--algo``): ``auto`` picks one of the other two.
ALGOS = ("auto", "one-shot", "two-shot")
#: The all-reduce algorithms ``auto`` chooses between, in tie-break order.
ALL_REDUCE_ALGOS = ("one-shot", "two-shot")

#: The size rule of ``auto`` (:func:`choose_algo` without a cost model): world size -> smallest message
#: (uncompressed bytes) for which two-shot is used; None = never; world sizes not listed use
#: ``TWO_SHOT_DEFAULT_MIN_BYTES``. N = 2: both send P, two-shot only adds a round and a quantization; N = 3:
#: a third fewer bytes does not pay for doubling the error; N >= 4: two-shot sends fewer bytes once the message
#: is bandwidth-bound (512 KiB: a placeholder until measured).
TWO_SHOT_MIN_BYTES: dict[int, int | None] = {1: None, 2: None, 3: None}
TWO_SHOT_DEFAULT_MIN_BYTES = 512 * 1024

# Flat collectives under their 2.13 names (the *_tensor names emit a FutureWarning there), older names before.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CodecTerm:
    """``calls`` codec calls (``enc`` or ``dec``) on ``share`` of the message's uncompressed bytes each."""

    kind: Literal["enc", "dec"]
    calls: int
    share: Fraction


class Runner(Protocol):
    """Runs one algorithm on this rank: ``(output, bytes this rank sent)``. ``dim``: all-gather /
    reduce-scatter dimension (already normalised); ``chunks``: pipeline chunks of the one-shot all-reduce."""

    def __call__(
        self, x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
    ) -> tuple[torch.Tensor, int]: ...


@dataclass(frozen=True)
class Algorithm:
    """One collective algorithm (see the module table).

    Attributes:
        op: ``all_reduce`` | ``all_gather`` | ``reduce_scatter``.
        name: ``stock`` | ``one-shot`` | ``two-shot`` | ``all-gather`` | ``all-to-all`` (``CommStats.algo`` and
            the cost model's path keys).
        steps_per_peer: message steps per peer; the path takes ``steps_per_peer * (N-1)`` latency terms.
        step_share: N -> share of the message (payload P, or B for stock) each step sends.
        codec_work: N -> the codec calls of one call (empty for stock).
        plan: (shape, codec, N, dim, chunks) -> the pieces this rank encodes.
        pipelined: whether the pipelining rule (:func:`chunking.pipeline_chunks`) applies.
        run: the function that runs it.
    """

    op: str
    name: str
    steps_per_peer: int
    step_share: Callable[[int], Fraction]
    codec_work: Callable[[int], tuple[CodecTerm, ...]]
    plan: Callable[[Sequence[int], Codec, int, int, int], ChunkPlan]
    pipelined: bool
    run: Runner

    @property
    def compressed(self) -> bool:
        return self.name != "stock"

    @property
    def quantizations(self) -> int:
        """How many times each value is quantized on its way (0 for stock)."""
        return sum(t.calls for t in self.codec_work(2) if t.kind == "enc")

    def rounds(self, n: int) -> int:
        """Latency terms (message steps) for N ranks."""
        return self.steps_per_peer * (n - 1)

    def wire_fraction(self, n: int) -> Fraction:
        """Bytes this rank sends per byte of payload (of input for stock), for N ranks."""
        return self.steps_per_peer * (n - 1) * self.step_share(n)

    def wire_bytes(self, payload: int, n: int) -> int:
        """Bytes this rank sends for a ``payload``-byte message (input bytes for stock), rounded down."""
        return int(payload * self.wire_fraction(n))

    def chunks(self, nbytes: int, device_type: str, block_local: bool) -> int:
        """Pipeline chunks for a message of ``nbytes`` (uncompressed): 1 where the algorithm is not pipelined."""
        return chunking.pipeline_chunks(nbytes, device_type, block_local) if self.pipelined else 1


# ---------------------------------------------------------------------------------------------- shared helpers


def is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() == 1


def _decode_sum(
    codec: Codec, payloads: torch.Tensor, nbytes: int, shape: Sequence[int], count: int, dtype: torch.dtype
) -> torch.Tensor:
    """Sum in fp32, in rank order, of ``count`` payloads of ``nbytes`` each laid end to end in ``payloads``,
    rounded once to ``dtype`` (:meth:`Codec.decode_sum`: one fused pass on CPU where the library has the codec).

    Returns:
        ``dtype`` tensor of ``shape``.
    """
    return codec.decode_sum(payloads[: count * nbytes], count, shape, dtype)


def _encode_into(codec: Codec, parts: Sequence[torch.Tensor], nbytes: int, device: torch.device) -> torch.Tensor:
    """Encode each part into consecutive ``nbytes`` slots of one flat uint8 send buffer ``[len(parts) * nbytes]``."""
    buf = torch.empty(len(parts) * nbytes, dtype=torch.uint8, device=device)
    for r, part in enumerate(parts):
        buf[r * nbytes : (r + 1) * nbytes] = codec.encode(part)
    return buf


# --------------------------------------------------------------------------------------------------- all-reduce


def _one_shot(x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int) -> tuple[torch.Tensor, int]:
    payload = codec.encode(x)  # [P] uint8
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)  # [N*P]
    all_gather_flat(gathered, payload, group=group)
    # The own payload is decoded too: using the unquantized partial here would make this rank differ.
    return _decode_sum(codec, gathered, p, x.shape, n, x.dtype), (n - 1) * p


def _one_shot_pipelined(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, chunks: int
) -> tuple[torch.Tensor, int]:
    """One-shot all-reduce in ``chunks`` pieces with encode / transfer / decode overlapped (see
    ``chunking.PIPELINE_MIN_BYTES``). Chunks end on multiples of :func:`chunking.chunk_alignment`, so every codec
    block (and rotation block) is the same as in the whole-message path: the result has the same bits."""
    flat = x.reshape(-1)
    numel = flat.numel()
    per = chunking.pipeline_per(numel, chunks, codec)
    out = torch.empty(numel, dtype=x.dtype, device=x.device)
    pending: list[tuple[dist.Work, torch.Tensor, int, int]] = []
    sent = 0

    def finish(item: tuple[dist.Work, torch.Tensor, int, int]) -> None:
        work, gathered, a, b = item
        work.wait()
        codec.decode_sum(gathered, n, (b - a,), x.dtype, out=out[a:b])

    for a in range(0, numel, per):
        b = min(a + per, numel)
        payload = codec.encode(flat[a:b])  # [p] uint8
        gathered = torch.empty(n * payload.numel(), dtype=torch.uint8, device=x.device)
        pending.append((all_gather_flat(gathered, payload, group=group, async_op=True), gathered, a, b))
        sent += (n - 1) * payload.numel()
        if len(pending) > 1:  # decode the previous chunk while this one travels
            finish(pending.pop(0))
    for item in pending:
        finish(item)
    return out.view(x.shape), sent


def _run_one_shot(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    if chunks > 1:
        return _one_shot_pipelined(x, codec, group, n, chunks)
    return _one_shot(x, codec, group, n)


def _run_two_shot(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    chunks_, chunk_shape = chunking.chunk_view(x, codec, n)  # [N, *c]
    p = codec.payload_nbytes(chunk_shape)
    send = _encode_into(codec, list(chunks_.unbind(0)), p, x.device)  # [N*p]: chunk r goes to rank r
    recv = torch.empty_like(send)  # [N*p]: my chunk from every rank, in rank order
    dist.all_to_all_single(recv, send, group=group)
    reduced = _decode_sum(codec, recv, p, chunk_shape, n, torch.float32)  # my chunk of the sum
    mine = codec.encode(reduced)  # requantized once, from fp32
    all_gather_flat(send, mine, group=group)  # the send buffer is free again: reuse it
    full = torch.empty((n, *chunk_shape), dtype=x.dtype, device=x.device)
    for r in range(n):  # my own chunk too: every rank must hold the same requantized values
        full[r] = codec.decode(send[r * p : (r + 1) * p], chunk_shape, x.dtype)
    return chunking.unchunk(full, x.shape), 2 * (n - 1) * p


def _run_stock_all_reduce(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    out = x.clone(memory_format=torch.contiguous_format)
    if n > 1 and x.numel():
        dist.all_reduce(out, group=group)
    return out, STOCK["all_reduce"].wire_bytes(x.numel() * x.element_size(), n)


# ------------------------------------------------------------------------------------ all-gather, reduce-scatter


def _run_all_gather(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    payload = codec.encode(x)  # [P]
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)  # [N*P]
    all_gather_flat(gathered, payload, group=group)
    parts = [codec.decode(gathered[r * p : (r + 1) * p], x.shape, x.dtype) for r in range(n)]
    return torch.cat(parts, dim=dim), (n - 1) * p


def _run_stock_all_gather(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    src = x.movedim(dim, 0).contiguous()  # [x.shape[dim], ...]
    out = torch.empty((n * src.shape[0], *src.shape[1:]), dtype=x.dtype, device=x.device)
    if n > 1 and x.numel():
        if is_float8(x.dtype):  # gloo rejects float8 and poisons the group: move the bytes
            all_gather_flat(out.view(torch.uint8), src.view(torch.uint8), group=group)
        else:
            all_gather_flat(out, src, group=group)
    elif x.numel():
        out.copy_(src)
    return out.movedim(0, dim).contiguous(), STOCK["all_gather"].wire_bytes(x.numel() * x.element_size(), n)


def _run_reduce_scatter(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    blocks = x.tensor_split(n, dim)  # N views, each x.shape with dim / N
    p = codec.payload_nbytes(blocks[0].shape)
    send = _encode_into(codec, blocks, p, x.device)  # [N*p]: block r goes to rank r
    recv = torch.empty_like(send)  # [N*p]: my block from every rank, in rank order
    dist.all_to_all_single(recv, send, group=group)
    return _decode_sum(codec, recv, p, blocks[0].shape, n, x.dtype), (n - 1) * p


def _run_stock_reduce_scatter(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    src = x.movedim(dim, 0).contiguous()  # [x.shape[dim], ...]: block r is rows r*s/N .. (r+1)*s/N
    out = torch.empty((src.shape[0] // n, *src.shape[1:]), dtype=x.dtype, device=x.device)
    if n > 1 and x.numel():
        reduce_scatter_flat(out, src, group=group)
    elif x.numel():
        out.copy_(src[: out.shape[0]])
    return out.movedim(0, dim).contiguous(), STOCK["reduce_scatter"].wire_bytes(x.numel() * x.element_size(), n)


# -------------------------------------------------------------------------------------------------- descriptors

_ONE = Fraction(1)


def _all(n: int) -> Fraction:
    """Each step sends the whole message (payload)."""
    return _ONE


def _per_rank(n: int) -> Fraction:
    """Each step sends one rank's share of the message."""
    return Fraction(1, n)


def _whole(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    return ChunkPlan((tuple(shape),))


def _one_shot_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    if chunks <= 1:
        return _whole(shape, codec, n, dim, chunks)
    numel = 1
    for s in shape:
        numel *= int(s)
    return chunking.pipeline_plan(numel, chunks, codec)


def _two_shot_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    return ChunkPlan((chunking.chunk_shape(shape, codec, n),) * n)


def _scatter_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    return ChunkPlan((chunking.block_shape(shape, n, dim),) * n)


def _no_work(n: int) -> tuple[CodecTerm, ...]:
    return ()


def _whole_work(n: int) -> tuple[CodecTerm, ...]:
    """Encode the message, decode N whole payloads (one-shot, all-gather)."""
    return CodecTerm("enc", 1, _ONE), CodecTerm("dec", n, _ONE)


def _scatter_work(n: int) -> tuple[CodecTerm, ...]:
    """Encode the message (as N pieces), decode N payloads of one piece each (reduce-scatter)."""
    return CodecTerm("enc", 1, _ONE), CodecTerm("dec", n, Fraction(1, n))


def _two_shot_work(n: int) -> tuple[CodecTerm, ...]:
    """Reduce-scatter of N chunks, then requantize the reduced chunk and decode N reduced chunks."""
    return *_scatter_work(n), CodecTerm("enc", 1, Fraction(1, n)), CodecTerm("dec", n, Fraction(1, n))


STOCK_ALL_REDUCE = Algorithm(
    op="all_reduce",
    name="stock",
    steps_per_peer=2,
    step_share=_per_rank,
    codec_work=_no_work,
    plan=_whole,
    pipelined=False,
    run=_run_stock_all_reduce,
)
ONE_SHOT = Algorithm(
    op="all_reduce",
    name="one-shot",
    steps_per_peer=1,
    step_share=_all,
    codec_work=_whole_work,
    plan=_one_shot_plan,
    pipelined=True,
    run=_run_one_shot,
)
TWO_SHOT = Algorithm(
    op="all_reduce",
    name="two-shot",
    steps_per_peer=2,
    step_share=_per_rank,
    codec_work=_two_shot_work,
    plan=_two_shot_plan,
    pipelined=False,
    run=_run_two_shot,
)
STOCK_ALL_GATHER = Algorithm(
    op="all_gather",
    name="stock",
    steps_per_peer=1,
    step_share=_all,
    codec_work=_no_work,
    plan=_whole,
    pipelined=False,
    run=_run_stock_all_gather,
)
ALL_GATHER = Algorithm(
    op="all_gather",
    name="all-gather",
    steps_per_peer=1,
    step_share=_all,
    codec_work=_whole_work,
    plan=_whole,
    pipelined=False,
    run=_run_all_gather,
)
STOCK_REDUCE_SCATTER = Algorithm(
    op="reduce_scatter",
    name="stock",
    steps_per_peer=1,
    step_share=_per_rank,
    codec_work=_no_work,
    plan=_whole,
    pipelined=False,
    run=_run_stock_reduce_scatter,
)
ALL_TO_ALL = Algorithm(
    op="reduce_scatter",
    name="all-to-all",
    steps_per_peer=1,
    step_share=_per_rank,
    codec_work=_scatter_work,
    plan=_scatter_plan,
    pipelined=False,
    run=_run_reduce_scatter,
)

#: Every algorithm, stock ones first per op.
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
