"""Compressed collectives on ``torch.distributed``: all-reduce (one-shot, two-shot), all-gather, reduce-scatter.

All functions are out-of-place, work on any backend (gloo on CPU, NCCL on GPU) and put only contiguous
``uint8`` payloads on the wire (gloo rejects float8 dtypes and poisons the group). Each keeps the stock
collective's semantics (N = world size of ``group``):

- ``all_reduce(x)``:          ``[*] -> [*]``, the sum over ranks (row-parallel linear output ``[s, b, h]``).
- ``all_gather(x, dim)``:     ``[s, b, h] -> [N*s, b, h]`` for dim 0 (sequence parallel),
                              ``[s, b, v] -> [s, b, N*v]`` for dim -1 (logits gather).
- ``reduce_scatter(x, dim)``: ``[s, b, h] -> [s/N, b, h]`` for dim 0; rank r keeps block r of the sum.

Example, inside an initialised process group::

    stats: list[CommStats] = []
    y = all_reduce(x, "int4:g32", algo="auto", stats=stats)   # stats[0].wire_bytes, stats[0].algo, ...

Guarantees:

- Every rank ends with bit-identical results: a rank decodes its OWN payload exactly like its peers do instead
  of using its unquantized partial, and sums the decoded values in fp32 in rank order 0..N-1.
- Partial sums are accumulated in fp32; each value is quantized once (one-shot, all-gather, reduce-scatter)
  or twice (two-shot: the reduced chunk is requantized once for the all-gather).
- Below ``min_bytes`` or when the codec is not eligible (codec ``none``, dtype not fp32/bf16/fp16, group of
  one rank, empty tensor), the stock collective runs instead (same out-of-place result, exact); the reason is
  logged once per reason on the ``megatron_tpcomp`` logger and reported in the stats.
- Every rank must call with the same shape, dtype, codec (spec, seeds, tables) and options (as for the stock
  collectives). ``check_ranks`` (default ``"first"``: at the first call of each distinct (op, shape, dtype, codec,
  path) per process group) verifies it with one all-gather of a fixed-size digest record before any payload
  moves (:mod:`megatron_tpcomp.agreement`): a mismatch, including one that would hang (one-shot on one rank,
  two-shot on another), raises CollectiveError on every rank naming each rank's call. Errors caused by the
  arguments (bad ``algo``, indivisible reduce-scatter size) are raised on every rank before any communication,
  and ``check_finite`` agrees across ranks before raising, so nobody is left waiting.

Algorithms for all-reduce (``algo``), P = payload bytes of the whole tensor:

- ``one-shot`` (Hansen-Palmus et al.): encode, all-gather the payloads, decode all N, sum. One round; each
  rank sends ``(N-1) * P`` bytes.
- ``two-shot`` (QuickReduce, Flash Communication): split into N chunks, encode each, all-to-all, decode and
  sum my chunk, requantize it once, all-gather the reduced chunks. Two rounds, about ``2 (N-1)/N * P`` bytes
  per rank, but the second quantization roughly doubles the error (measured on SmolLM2: int4 g32 +12% -> +33% ppl).
- ``auto``: :func:`choose_algo`, a table keyed by world size (see ``TWO_SHOT_MIN_BYTES``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megatron_tpcomp import agreement
from megatron_tpcomp.codecs import Codec, make_codec
from megatron_tpcomp.codecs.base import SUPPORTED_DTYPES, IdentityCodec

logger = logging.getLogger("megatron_tpcomp")

ALGOS = ("auto", "one-shot", "two-shot")

#: Default minimum message size (bytes of the uncompressed input) for compression. 0 = compress everything
#: eligible. Production callers set a threshold: decode-time messages of a few KB are latency-bound and the
#: codec only adds time (every peer system gates by size); the benchmarks will write measured thresholds.
DEFAULT_MIN_BYTES = 0

#: ``auto`` all-reduce: world size -> smallest message (uncompressed bytes) for which two-shot is used; None =
#: never; world sizes not listed use ``TWO_SHOT_DEFAULT_MIN_BYTES``. Why, per rank and payload P:
#: one-shot sends (N-1)*P in one round; two-shot sends 2(N-1)/N*P in two rounds and quantizes twice.
#:   N=2: both send P; two-shot only adds a round and a second quantization -> never.
#:   N=3: 2P vs 1.33P; a third fewer bytes does not pay for doubling the error -> never.
#:   N>=4: (N-1)P vs <2P: two-shot wins on bytes once the message is bandwidth-bound rather than
#:   latency-bound (two rounds). 512 KiB is a placeholder until the benchmark writes measured thresholds.
TWO_SHOT_MIN_BYTES: dict[int, int | None] = {1: None, 2: None, 3: None}
TWO_SHOT_DEFAULT_MIN_BYTES = 512 * 1024

#: Two-shot chunk alignment (values) for codecs whose spec does not tell their block size.
CHUNK_ALIGN = 256

#: Pipelined one-shot (CPU tensors, block-local codecs: ``Codec.block_local``): a message of at least
#: ``PIPELINE_MIN_BYTES`` (uncompressed) is cut into chunks of about ``PIPELINE_CHUNK_BYTES`` (at most
#: ``PIPELINE_MAX_CHUNKS``) on codec-block boundaries; chunk i+1 is encoded and chunk i-1 decoded while chunk i
#: travels (an asynchronous all-gather), so the codec's time hides behind the link's instead of adding to it.
#: On a CPU the codec costs about as much as the wire at 1 Gbit/s, so this is worth up to 2x. Results are
#: bit-identical to the unpipelined path: every block is encoded, decoded and summed exactly as before.
PIPELINE_MIN_BYTES = 1 << 20
PIPELINE_CHUNK_BYTES = 1 << 20
PIPELINE_MAX_CHUNKS = 16

# Flat collectives under their 2.13 names (the *_tensor names emit a FutureWarning there), older names before.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A compressed collective was called with input it cannot handle; the message names the value."""


@dataclass
class CommStats:
    """What one collective call sent, per rank.

    Attributes:
        op: ``all_reduce`` | ``all_gather`` | ``reduce_scatter``.
        spec: canonical codec spec actually used (``none`` for a fallback).
        algo: ``one-shot`` | ``two-shot`` (all-reduce), ``all-gather`` | ``all-to-all`` (all-gather and
            reduce-scatter), ``stock`` (fallback).
        raw_bytes: bytes of this rank's uncompressed input.
        wire_bytes: bytes this rank sends with the path taken.
        baseline_wire_bytes: bytes this rank sends with the stock collective (ring algorithms:
            all-reduce 2(N-1)/N * raw, all-gather (N-1) * raw, reduce-scatter (N-1)/N * raw).
        fallback: why the stock collective ran, or None.
        chunks: pieces of a pipelined one-shot all-reduce (1: not pipelined).
    """

    op: str
    spec: str
    algo: str
    raw_bytes: int
    wire_bytes: int
    baseline_wire_bytes: int
    fallback: str | None = None
    chunks: int = 1

    @property
    def compression(self) -> float:
        """Baseline bytes over sent bytes (1.0 for a fallback)."""
        return self.baseline_wire_bytes / self.wire_bytes if self.wire_bytes else 1.0


# ------------------------------------------------------------------------------------------------------ helpers

_logged_reasons: set[tuple[str, str]] = set()


def _log_fallback_once(op: str, category: str, detail: str) -> None:
    """Log the first fallback of each (op, category); the detail of later ones goes to the stats only."""
    if (op, category) not in _logged_reasons:
        _logged_reasons.add((op, category))
        logger.info("megatron-tpcomp: %s runs uncompressed: %s (logged once per reason)", op, detail)


@functools.lru_cache(maxsize=256)
def _codec_from_spec(spec: str) -> Codec:
    return make_codec(spec)


def resolve_codec(codec: Codec | str | None) -> Codec:
    """A codec object from a codec or a spec string (cached per spec); None means ``none``."""
    if codec is None:
        return _codec_from_spec("none")
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        return _codec_from_spec(codec)
    raise CollectiveError(f"codec must be a Codec or a spec string, got {type(codec).__name__}")


def _ineligible(x: torch.Tensor, codec: Codec, world_size: int, min_bytes: int) -> tuple[str, str] | None:
    """(category, detail) of the reason to run the stock collective, or None to compress."""
    if world_size == 1:
        return "world", "group of one rank"
    if isinstance(codec, IdentityCodec):
        return "none", "codec is 'none'"
    if x.dtype not in SUPPORTED_DTYPES:
        return "dtype", f"dtype {str(x.dtype).replace('torch.', '')} is not one of float32/bfloat16/float16"
    if x.numel() == 0:
        return "empty", "empty tensor"
    nbytes = x.numel() * x.element_size()
    if nbytes < min_bytes:
        return "small", f"message of {nbytes} bytes is below the {min_bytes}-byte minimum (min_bytes)"
    return None


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() == 1


#: ``check_ranks`` values: ``"first"`` (default), True (every call), False (never).
CheckRanks = bool | Literal["first"]


def _check_mode(op: str, check_ranks: object) -> None:
    if check_ranks is not True and check_ranks is not False and check_ranks != "first":
        raise CollectiveError(f"{op}: check_ranks={check_ranks!r} is not valid; expected 'first', True or False")


def _path(reason: tuple[str, str] | None, compressed: str) -> tuple[str, str]:
    """(path compared across ranks, path for people): the stock collective with the category of its reason (two
    ranks below different min_bytes still run the same stock collective) and the reason in full, or the
    compressed path."""
    if reason is not None:
        return f"stock ({reason[0]})", f"stock ({reason[1]})"
    return compressed, compressed


def _agree(
    x: torch.Tensor,
    op: str,
    option: str,
    codec: Codec,
    path: tuple[str, str],
    group: dist.ProcessGroup | None,
    n: int,
    *,
    check_finite: bool,
    check_ranks: CheckRanks,
) -> None:
    """Before any payload moves: raise CollectiveError on EVERY rank if

    - ``check_finite``: any rank's input holds NaN/Inf;
    - the ranks' calls differ in anything that changes the bits or the communication (op, shape, dtype, codec
      spec and parameters, algorithm, chunk plan, min_bytes decision). The exchange runs when ``check_ranks``
      asks for it or ``check_finite`` is set, and always compares the fingerprints.

    One all-gather of a fixed-size record (:func:`agreement.exchange`), so a mismatch cannot hang it; every rank
    decides from the same gathered data. Without ``check_finite`` and with ``check_ranks=False`` it costs nothing.
    """
    if not check_finite and check_ranks is False:
        return
    count = 0
    if check_finite and x.is_floating_point():
        values = x.float() if x.element_size() == 1 else x  # isfinite has no float8 kernel on CPU
        count = int((~torch.isfinite(values)).sum())
    if n == 1:
        if count:
            raise CollectiveError(
                f"{op}: input is not finite (check_finite=True): rank 0 holds {count} NaN/Inf values; raised on rank 0"
            )
        return
    shape, digest = tuple(x.shape), agreement.cached_codec_fingerprint(codec)
    # The hot path of check_ranks="first" after first use: this tuple and one set lookup.
    if check_finite or agreement.needs_exchange(check_ranks, (op, option, shape, x.dtype, digest, path[0]), group):
        fp = agreement.CallFingerprint(op, option, shape, x.dtype, codec.spec, digest, path[0], path[1])
        agreement.exchange(fp, group, x.device, nonfinite=count, check_finite=check_finite, error=CollectiveError)


def _norm_dim(x: torch.Tensor, dim: int, op: str) -> int:
    if x.dim() == 0:
        raise CollectiveError(f"{op}: needs a tensor with at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise CollectiveError(f"{op}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def choose_algo(world_size: int, nbytes: int) -> str:
    """The ``auto`` rule: ``two-shot`` if the world size's entry in ``TWO_SHOT_MIN_BYTES`` allows it for a
    message of ``nbytes`` (uncompressed), else ``one-shot``."""
    threshold = TWO_SHOT_MIN_BYTES.get(world_size, TWO_SHOT_DEFAULT_MIN_BYTES)
    return "two-shot" if threshold is not None and nbytes >= threshold else "one-shot"


def _ring_allreduce_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n


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
    _all_gather_flat(gathered, payload, group=group)
    # The own payload is decoded too: using the unquantized partial here would make this rank differ.
    return _decode_sum(codec, gathered, p, x.shape, n, x.dtype), (n - 1) * p


def pipeline_chunks(nbytes: int, device_type: str, block_local: bool) -> int:
    """Number of chunks the one-shot all-reduce cuts a message of ``nbytes`` (uncompressed) into: 1 (not
    pipelined) unless the tensor is on the CPU, the codec is block-local and the message is large enough (see
    ``PIPELINE_MIN_BYTES``). The cost model uses the same rule."""
    if device_type != "cpu" or not block_local or nbytes < max(PIPELINE_MIN_BYTES, 1):
        return 1
    return max(1, min(PIPELINE_MAX_CHUNKS, nbytes // max(PIPELINE_CHUNK_BYTES, 1)))


def _pipeline_chunks(x: torch.Tensor, codec: Codec) -> int:
    return pipeline_chunks(x.numel() * x.element_size(), x.device.type, codec.block_local)


def _pipeline_per(numel: int, chunks: int, codec: Codec) -> int:
    """Values per chunk of the pipelined one-shot: rounded up to whole codec blocks."""
    align = math.lcm(chunk_alignment(codec), codec.chunk_values)  # whole super-blocks: the same exponents
    return math.ceil(numel / chunks / align) * align


def _one_shot_pipelined(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, chunks: int
) -> tuple[torch.Tensor, int]:
    """One-shot all-reduce in ``chunks`` pieces with encode / transfer / decode overlapped (see
    ``PIPELINE_MIN_BYTES``). Chunks end on multiples of :func:`chunk_alignment`, so every codec block (and
    rotation block) is the same as in the whole-message path: the result has the same bits."""
    flat = x.reshape(-1)
    numel = flat.numel()
    per = _pipeline_per(numel, chunks, codec)
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
        pending.append((_all_gather_flat(gathered, payload, group=group, async_op=True), gathered, a, b))
        sent += (n - 1) * payload.numel()
        if len(pending) > 1:  # decode the previous chunk while this one travels
            finish(pending.pop(0))
    for item in pending:
        finish(item)
    return out.view(x.shape), sent


def chunk_alignment(codec: Codec) -> int:
    """Values per chunk boundary (two-shot, pipelined one-shot): the codec's block size (lcm with its Hadamard
    block, and with the row length of a codec with per-channel state such as ``+chscale``), so that chunks
    split on block boundaries, the codec pads nothing inside a chunk and every value keeps its channel."""
    return codec.chunk_alignment


def _chunk_view(x: torch.Tensor, codec: Codec, n: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Split ``x`` into N zero-padded chunks for two-shot.

    Flat codecs: ``[numel] -> [N, c]`` with ``c = ceil(numel / N)`` rounded up to :func:`chunk_alignment`.
    Row-structured codecs (outlier channels in the last dim): ``[rows, h] -> [N, ceil(rows / N), h]``, never
    splitting a row.

    Returns:
        (chunks ``[N, *chunk_shape]`` in ``x.dtype``, chunk_shape)
    """
    chunk_shape = _chunk_shape(x.shape, codec, n)
    if len(chunk_shape) == 2:
        per, h = chunk_shape
        rows = x.reshape(-1, h)
        rows = torch.nn.functional.pad(rows, (0, 0, 0, per * n - rows.shape[0]))
        return rows.view(n, per, h), chunk_shape
    flat = x.reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, chunk_shape[0] * n - flat.numel()))
    return flat.view(n, chunk_shape[0]), chunk_shape


def _chunk_shape(shape: Sequence[int], codec: Codec, n: int) -> tuple[int, ...]:
    """Shape of one two-shot chunk of a message of ``shape`` (see :func:`_chunk_view`), without touching data."""
    numel = math.prod(shape)
    if codec.row_structured and len(shape) >= 2:
        h = int(shape[-1])
        return (-(-(numel // h) // n), h)
    align = chunk_alignment(codec)
    per = -(-numel // n)
    return (-(-per // align) * align,)


def _unchunk(full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_chunk_view` (drop the zero padding): ``[N, *chunk_shape] -> shape``, contiguous."""
    numel = math.prod(shape)
    if full.dim() == 2:  # flat chunks
        return full.reshape(-1)[:numel].reshape(shape)
    h = full.shape[-1]
    return full.reshape(-1, h)[: numel // h].reshape(shape)


def _two_shot(x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int) -> tuple[torch.Tensor, int]:
    chunks, chunk_shape = _chunk_view(x, codec, n)  # [N, *c]
    p = codec.payload_nbytes(chunk_shape)
    send = _encode_into(codec, list(chunks.unbind(0)), p, x.device)  # [N*p]: chunk r goes to rank r
    recv = torch.empty_like(send)  # [N*p]: my chunk from every rank, in rank order
    dist.all_to_all_single(recv, send, group=group)
    reduced = _decode_sum(codec, recv, p, chunk_shape, n, torch.float32)  # my chunk of the sum
    mine = codec.encode(reduced)  # requantized once, from fp32
    _all_gather_flat(send, mine, group=group)  # the send buffer is free again: reuse it
    full = torch.empty((n, *chunk_shape), dtype=x.dtype, device=x.device)
    for r in range(n):  # my own chunk too: every rank must hold the same requantized values
        full[r] = codec.decode(send[r * p : (r + 1) * p], chunk_shape, x.dtype)
    return _unchunk(full, x.shape), 2 * (n - 1) * p


def all_reduce(
    x: torch.Tensor,
    codec: Codec | str | None,
    group: dist.ProcessGroup | None = None,
    *,
    algo: str = "auto",
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_finite: bool = False,
    check_ranks: CheckRanks = "first",
    stats: list[CommStats] | None = None,
) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group``, sending compressed payloads: ``[*] -> [*]``. Out of place.

    Args:
        x: fp32/bf16/fp16 tensor, any shape and strides, same shape on every rank (e.g. a row-parallel
            partial ``[s, b, h]``). Other dtypes run the stock all-reduce (float8 is refused: gloo cannot).
        codec: a Codec or a spec string (``"int4:g32"``); ``"none"``/None runs the stock all-reduce.
        group: process group (default: the world).
        algo: ``auto`` | ``one-shot`` | ``two-shot`` (see the module docstring).
        min_bytes: messages smaller than this (uncompressed bytes) use the stock all-reduce.
        check_ranks: verify that every rank makes the same call: op, shape, dtype, codec spec AND parameters
            outside it (seeds, calibrated tables), algorithm, chunk plan, min_bytes decision; on a mismatch
            raise CollectiveError on every rank naming each rank's call, before any payload moves (one
            all-gather of a fixed-size record, shared with ``check_finite``). ``"first"`` (default): at the first
            call of each distinct such fingerprint per process group, cached; True: every call; False: never.
        check_finite: raise CollectiveError on every rank if any rank's ``x`` holds NaN/Inf (one extra tiny
            all-gather). Without it a non-finite value decodes as NaN for its whole block on every rank.
        stats: if a list is given, a :class:`CommStats` record of this call is appended.

    Returns:
        A new contiguous tensor of ``x.shape`` and ``x.dtype``, bit-identical on every rank.

    Raises:
        CollectiveError: unknown ``algo`` or ``check_ranks``, float8 input, ranks that disagree (``check_ranks``)
            or (``check_finite``) NaN/Inf on some rank.
    """
    _check_mode("all_reduce", check_ranks)
    if algo not in ALGOS:
        raise CollectiveError(f"all_reduce: unknown algorithm {algo!r}; expected one of {', '.join(ALGOS)}")
    codec = resolve_codec(codec)
    n = dist.get_world_size(group)
    nbytes = x.numel() * x.element_size()
    if _is_float8(x.dtype):
        raise CollectiveError(f"all_reduce: no stock reduction for {x.dtype} (gloo rejects it); cast to bf16 first")
    reason = _ineligible(x, codec, n, min_bytes)
    chosen = choose_algo(n, nbytes) if algo == "auto" else algo
    chunks = _pipeline_chunks(x, codec) if chosen == "one-shot" and reason is None else 1
    if check_finite or check_ranks is not False:
        if chunks > 1:
            plan = f"one-shot pipelined in {chunks} chunks of {_pipeline_per(x.numel(), chunks, codec)} values"
        elif chosen == "two-shot":
            plan = f"two-shot in chunks of {_chunk_shape(x.shape, codec, n)}"
        else:
            plan = chosen
        path = _path(reason, plan)
        _agree(x, "all_reduce", "", codec, path, group, n, check_finite=check_finite, check_ranks=check_ranks)
    if reason is not None:
        _log_fallback_once("all_reduce", *reason)
        out = x.clone(memory_format=torch.contiguous_format)
        if n > 1 and x.numel():
            dist.all_reduce(out, group=group)
        if stats is not None:
            base = _ring_allreduce_bytes(nbytes, n)
            stats.append(CommStats("all_reduce", "none", "stock", nbytes, base, base, reason[1]))
        return out
    if chosen == "one-shot":
        if chunks > 1:
            out, sent = _one_shot_pipelined(x, codec, group, n, chunks)
        else:
            out, sent = _one_shot(x, codec, group, n)
    else:
        out, sent = _two_shot(x, codec, group, n)
    if stats is not None:
        base = _ring_allreduce_bytes(nbytes, n)
        stats.append(CommStats("all_reduce", codec.spec, chosen, nbytes, sent, base, chunks=chunks))
    return out


# ------------------------------------------------------------------------------------ all-gather, reduce-scatter


def all_gather(
    x: torch.Tensor,
    codec: Codec | str | None,
    group: dist.ProcessGroup | None = None,
    *,
    dim: int = 0,
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_finite: bool = False,
    check_ranks: CheckRanks = "first",
    stats: list[CommStats] | None = None,
) -> torch.Tensor:
    """Concatenate ``x`` from every rank along ``dim``, sending compressed payloads. Out of place.

    ``[s, b, h] -> [N*s, b, h]`` for ``dim=0`` (sequence parallel), ``[s, b, v] -> [s, b, N*v]`` for
    ``dim=-1`` (logits). Every rank decodes its own payload too, so all ranks hold identical values.

    Args:
        x: tensor with at least one dimension, same shape and dtype on every rank. fp32/bf16/fp16 are
            compressed; other dtypes (float8 included, sent as raw bytes) run the stock all-gather.
        codec, group, min_bytes, check_finite, check_ranks, stats: as for :func:`all_reduce`.
        dim: dimension to concatenate along (negative counts from the end).

    Returns:
        A new contiguous tensor, ``x.shape`` with ``dim`` multiplied by N, dtype ``x.dtype``.
    """
    _check_mode("all_gather", check_ranks)
    codec = resolve_codec(codec)
    n = dist.get_world_size(group)
    dim = _norm_dim(x, dim, "all_gather")
    nbytes = x.numel() * x.element_size()
    reason = _ineligible(x, codec, n, min_bytes)
    if check_finite or check_ranks is not False:
        path = _path(reason, "all-gather")
        _agree(x, "all_gather", f"dim={dim}", codec, path, group, n, check_finite=check_finite, check_ranks=check_ranks)
    if reason is not None:
        _log_fallback_once("all_gather", *reason)
        src = x.movedim(dim, 0).contiguous()  # [x.shape[dim], ...]
        out = torch.empty((n * src.shape[0], *src.shape[1:]), dtype=x.dtype, device=x.device)
        if n > 1 and x.numel():
            if _is_float8(x.dtype):  # gloo rejects float8 and poisons the group: move the bytes
                _all_gather_flat(out.view(torch.uint8), src.view(torch.uint8), group=group)
            else:
                _all_gather_flat(out, src, group=group)
        elif x.numel():
            out.copy_(src)
        if stats is not None:
            base = (n - 1) * nbytes
            stats.append(CommStats("all_gather", "none", "stock", nbytes, base, base, reason[1]))
        return out.movedim(0, dim).contiguous()
    payload = codec.encode(x)  # [P]
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)  # [N*P]
    _all_gather_flat(gathered, payload, group=group)
    parts = [codec.decode(gathered[r * p : (r + 1) * p], x.shape, x.dtype) for r in range(n)]
    if stats is not None:
        stats.append(CommStats("all_gather", codec.spec, "all-gather", nbytes, (n - 1) * p, (n - 1) * nbytes))
    return torch.cat(parts, dim=dim)


def reduce_scatter(
    x: torch.Tensor,
    codec: Codec | str | None,
    group: dist.ProcessGroup | None = None,
    *,
    dim: int = 0,
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_finite: bool = False,
    check_ranks: CheckRanks = "first",
    stats: list[CommStats] | None = None,
) -> torch.Tensor:
    """Sum ``x`` over ranks and keep block ``rank`` along ``dim``: ``[s, b, h] -> [s/N, b, h]`` for ``dim=0``.

    Each destination block ``x.tensor_split(N, dim)[r]`` is encoded separately (so row-structured codecs keep
    whole rows) and sent to rank r with one all-to-all; the receiver decodes the N blocks and sums them in
    fp32 in rank order.

    Args:
        x: tensor, same shape on every rank; ``x.shape[dim]`` must be divisible by N.
        codec, group, min_bytes, check_finite, check_ranks, stats: as for :func:`all_reduce`.
        dim: dimension to scatter along.

    Returns:
        A new contiguous tensor of ``x.shape`` with ``dim`` divided by N, dtype ``x.dtype``.

    Raises:
        CollectiveError: ``x.shape[dim]`` is not divisible by the world size (raised on every rank, before any
            communication), float8 input, ranks that disagree (``check_ranks``) or (``check_finite``) NaN/Inf on
            some rank.
    """
    _check_mode("reduce_scatter", check_ranks)
    codec = resolve_codec(codec)
    n = dist.get_world_size(group)
    dim = _norm_dim(x, dim, "reduce_scatter")
    if x.shape[dim] % n:
        raise CollectiveError(
            f"reduce_scatter: size {x.shape[dim]} along dim {dim} is not divisible by the world size {n} "
            f"(input shape {tuple(x.shape)})"
        )
    if _is_float8(x.dtype):
        raise CollectiveError(f"reduce_scatter: no stock reduction for {x.dtype} (gloo rejects it); cast to bf16")
    nbytes = x.numel() * x.element_size()
    reason = _ineligible(x, codec, n, min_bytes)
    if check_finite or check_ranks is not False:
        path = _path(reason, "all-to-all")
        opt = f"dim={dim}"
        _agree(x, "reduce_scatter", opt, codec, path, group, n, check_finite=check_finite, check_ranks=check_ranks)
    blocks = x.tensor_split(n, dim)  # N views, each x.shape with dim / N
    block_shape = blocks[0].shape
    base = (n - 1) * nbytes // n
    if reason is not None:
        _log_fallback_once("reduce_scatter", *reason)
        src = x.movedim(dim, 0).contiguous()  # [x.shape[dim], ...]: block r is rows r*s/N .. (r+1)*s/N
        out = torch.empty((src.shape[0] // n, *src.shape[1:]), dtype=x.dtype, device=x.device)
        if n > 1 and x.numel():
            _reduce_scatter_flat(out, src, group=group)
        elif x.numel():
            out.copy_(src[: out.shape[0]])
        if stats is not None:
            stats.append(CommStats("reduce_scatter", "none", "stock", nbytes, base, base, reason[1]))
        return out.movedim(0, dim).contiguous()
    p = codec.payload_nbytes(block_shape)
    send = _encode_into(codec, blocks, p, x.device)  # [N*p]: block r goes to rank r
    recv = torch.empty_like(send)  # [N*p]: my block from every rank, in rank order
    dist.all_to_all_single(recv, send, group=group)
    out = _decode_sum(codec, recv, p, block_shape, n, x.dtype)
    if stats is not None:
        stats.append(CommStats("reduce_scatter", codec.spec, "all-to-all", nbytes, (n - 1) * p, base))
    return out


def payload_ratio(codec: Codec | str, shape: Sequence[int], dtype: torch.dtype) -> float:
    """Uncompressed bytes over payload bytes for one message of ``shape``/``dtype`` (for logs and demos)."""
    codec = resolve_codec(codec)
    n = math.prod(shape)
    return n * torch.empty((), dtype=dtype).element_size() / max(codec.payload_nbytes(shape), 1)
