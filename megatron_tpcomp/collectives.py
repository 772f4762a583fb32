"""Compressed collectives on ``torch.distributed``: all-reduce (one-shot, two-shot), all-gather, reduce-scatter.

All functions are out-of-place, work on any backend (gloo on CPU, NCCL on GPU) and move only ``uint8``
payloads (gloo rejects float8 dtypes and poisons the group). Each has the stock collective's semantics:

- ``all_reduce(x)``:          ``[*] -> [*]``, the sum over ranks.
- ``all_gather(x, dim)``:     ``[s, ...] -> [N*s, ...]`` along ``dim`` (0: sequence parallel; -1: logits).
- ``reduce_scatter(x, dim)``: ``[s, ...] -> [s/N, ...]`` along ``dim``, rank r keeps block r of the sum.

Guarantees:

- Every rank ends with bit-identical results: a rank decodes its OWN payload like its peers' instead of using
  its unquantized partial, and sums the decoded values in fp32 in rank order 0..N-1.
- Partial sums are accumulated in fp32; each value is quantized once (one-shot, reduce-scatter, all-gather)
  or twice (two-shot: the reduced chunk is requantized once for the all-gather).
- Below ``min_bytes`` or when the codec is not eligible (codec ``none``, dtype not fp32/bf16/fp16, group of
  one), the stock collective runs instead; the reason is logged once.

Algorithms for all-reduce (``algo``):

- ``one-shot`` (Hansen-Palmus et al.): encode, all-gather the payloads, decode all N, sum. Each rank sends
  its payload to N-1 peers: ``(N-1) * P`` bytes.
- ``two-shot`` (QuickReduce, Flash Communication): split into N chunks, encode each, all-to-all, decode and
  sum my chunk, requantize it, all-gather the reduced chunks. About ``2 (N-1)/N * P`` bytes per rank, but the
  second quantization roughly doubles the error (FACTS.md: int4 g32 +12% -> +33% perplexity).
- ``auto``: one-shot for N <= 2 and for small messages (latency-bound: one round instead of two), two-shot
  for N >= 4 and messages of at least ``TWO_SHOT_MIN_BYTES``; the adaptive policy will replace this rule.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec, make_codec
from megatron_tpcomp.codecs.base import SUPPORTED_DTYPES, IdentityCodec

logger = logging.getLogger("megatron_tpcomp")

ALGOS = ("auto", "one-shot", "two-shot")
#: Default minimum message size (bytes of the uncompressed input) for compression. 0 = compress everything
#: eligible; production callers set a threshold (decode-time messages of a few KB rarely pay).
DEFAULT_MIN_BYTES = 0
#: ``auto`` uses two-shot from this message size on, and only for N >= 4 (ANCHORS.md lesson 1).
TWO_SHOT_MIN_BYTES = 512 * 1024
TWO_SHOT_MIN_WORLD = 4
#: Two-shot chunks start at multiples of this many values, so that chunks split on block boundaries of every
#: block size up to 256 (no extra padding inside the codec for aligned messages).
CHUNK_ALIGN = 256

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A compressed collective was called with input it cannot handle; the message names the value."""


@dataclass
class CommStats:
    """What one collective call sent.

    Attributes:
        op: ``all_reduce`` | ``all_gather`` | ``reduce_scatter``.
        spec: canonical codec spec actually used (``none`` for a fallback).
        algo: ``one-shot`` | ``two-shot`` | ``stock``.
        raw_bytes: bytes of this rank's uncompressed input.
        wire_bytes: bytes this rank sends with the path taken.
        baseline_wire_bytes: bytes this rank would send with the stock collective (ring algorithms).
        fallback: why the stock collective ran, or None.
    """

    op: str
    spec: str
    algo: str
    raw_bytes: int
    wire_bytes: int
    baseline_wire_bytes: int
    fallback: str | None = None

    @property
    def compression(self) -> float:
        """Baseline bytes over sent bytes (1.0 for a fallback)."""
        return self.baseline_wire_bytes / self.wire_bytes if self.wire_bytes else 1.0


_logged_reasons: set[str] = set()


def _log_fallback_once(op: str, reason: str) -> None:
    key = f"{op}: {reason}"
    if key not in _logged_reasons:
        _logged_reasons.add(key)
        logger.info("megatron-tpcomp: %s runs uncompressed: %s (logged once)", op, reason)


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


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _ineligible(x: torch.Tensor, codec: Codec, world_size: int, min_bytes: int) -> str | None:
    if world_size == 1:
        return "group of one rank"
    if isinstance(codec, IdentityCodec):
        return "codec is 'none'"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not one of fp32/bf16/fp16"
    nbytes = x.numel() * x.element_size()
    if nbytes < min_bytes:
        return f"message of {nbytes} bytes is below the {min_bytes}-byte minimum"
    return None


def _check_finite(x: torch.Tensor, op: str, group: dist.ProcessGroup | None) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise CollectiveError(
            f"{op}: input on rank {dist.get_rank(group)} holds {bad} NaN/Inf values (check_finite=True)"
        )


def choose_algo(world_size: int, nbytes: int) -> str:
    """The ``auto`` rule: ``two-shot`` for N >= 4 and messages >= TWO_SHOT_MIN_BYTES, else ``one-shot``."""
    if world_size >= TWO_SHOT_MIN_WORLD and nbytes >= TWO_SHOT_MIN_BYTES:
        return "two-shot"
    return "one-shot"


def _ring_allreduce_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n


def _decode_sum(codec: Codec, payloads: torch.Tensor, nbytes: int, shape: Sequence[int], count: int) -> torch.Tensor:
    """fp32 sum, in rank order, of ``count`` payloads of ``nbytes`` each laid end to end in ``payloads``."""
    acc = codec.decode(payloads[:nbytes], shape, torch.float32)
    for r in range(1, count):
        acc += codec.decode(payloads[r * nbytes : (r + 1) * nbytes], shape, torch.float32)
    return acc


# ---------------------------------------------------------------------------------------------------- all-reduce


def _one_shot(x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int) -> tuple[torch.Tensor, int]:
    payload = codec.encode(x)
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)
    _all_gather_flat(gathered, payload, group=group)
    out = _decode_sum(codec, gathered, p, x.shape, n).to(x.dtype)
    return out, (n - 1) * p


def _chunk_view(x: torch.Tensor, codec: Codec, n: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-padded ``[n, *chunk_shape]`` view of ``x`` for two-shot; row-structured codecs split along rows."""
    if codec.row_structured and x.dim() >= 2:
        h = x.shape[-1]
        rows = x.reshape(-1, h)
        per = -(-rows.shape[0] // n)
        rows = torch.nn.functional.pad(rows, (0, 0, 0, per * n - rows.shape[0]))
        return rows.view(n, per, h), (per, h)
    flat = x.reshape(-1)
    per = -(-flat.numel() // n)
    per = -(-per // CHUNK_ALIGN) * CHUNK_ALIGN if per > CHUNK_ALIGN else per
    flat = torch.nn.functional.pad(flat, (0, per * n - flat.numel()))
    return flat.view(n, per), (per,)


def _two_shot(x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int) -> tuple[torch.Tensor, int]:
    chunks, chunk_shape = _chunk_view(x, codec, n)
    p = codec.payload_nbytes(chunk_shape)
    send = torch.empty(n * p, dtype=torch.uint8, device=x.device)
    for r in range(n):
        send[r * p : (r + 1) * p] = codec.encode(chunks[r])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    reduced = _decode_sum(codec, recv, p, chunk_shape, n)  # my chunk, fp32
    mine = codec.encode(reduced)
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)
    _all_gather_flat(gathered, mine, group=group)
    full = torch.empty((n, *chunk_shape), dtype=x.dtype, device=x.device)
    for r in range(n):  # my own chunk too: every rank must hold the same requantized values
        full[r] = codec.decode(gathered[r * p : (r + 1) * p], chunk_shape, x.dtype)
    if len(chunk_shape) == 1:
        out = full.reshape(-1)[: x.numel()]
    else:  # drop the zero rows that padded the row count to a multiple of N
        out = full.reshape(-1, chunk_shape[-1])[: x.numel() // chunk_shape[-1]]
    return out.reshape(x.shape).contiguous(), 2 * (n - 1) * p


def all_reduce(
    x: torch.Tensor,
    codec: Codec | str | None,
    group: dist.ProcessGroup | None = None,
    *,
    algo: str = "auto",
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_finite: bool = False,
    stats: list[CommStats] | None = None,
) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group``, sending compressed payloads. Out of place.

    Args:
        x: fp32/bf16/fp16 tensor, any shape, same shape on every rank (e.g. a row-parallel partial [s, b, h]).
        codec: a Codec or a spec string (``"int4:g32"``); ``none``/None runs the stock all-reduce.
        group: process group (default: the world).
        algo: ``auto`` | ``one-shot`` | ``two-shot``.
        min_bytes: messages smaller than this (uncompressed bytes) use the stock all-reduce.
        check_finite: raise CollectiveError if ``x`` holds NaN/Inf (otherwise they decode to NaN blocks).
        stats: if a list is given, a CommStats record of this call is appended.

    Returns:
        A new tensor of ``x.shape`` and ``x.dtype``, bit-identical on every rank.
    """
    if algo not in ALGOS:
        raise CollectiveError(f"unknown all-reduce algorithm {algo!r}; expected one of {', '.join(ALGOS)}")
    codec = resolve_codec(codec)
    n, _ = _world(group)
    nbytes = x.numel() * x.element_size()
    if check_finite:
        _check_finite(x, "all_reduce", group)
    reason = _ineligible(x, codec, n, min_bytes)
    if reason is None and x.numel() == 0:
        reason = "empty tensor"
    if reason is not None:
        _log_fallback_once("all_reduce", reason)
        out = x.clone(memory_format=torch.contiguous_format)
        if n > 1:
            dist.all_reduce(out, group=group)
        if stats is not None:
            base = _ring_allreduce_bytes(nbytes, n)
            stats.append(CommStats("all_reduce", "none", "stock", nbytes, base, base, reason))
        return out
    chosen = choose_algo(n, nbytes) if algo == "auto" else algo
    if chosen == "one-shot":
        out, sent = _one_shot(x, codec, group, n)
    else:
        out, sent = _two_shot(x, codec, group, n)
    if stats is not None:
        stats.append(CommStats("all_reduce", codec.spec, chosen, nbytes, sent, _ring_allreduce_bytes(nbytes, n)))
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
    stats: list[CommStats] | None = None,
) -> torch.Tensor:
    """Concatenate ``x`` from every rank along ``dim``: ``[s, ...] -> [N*s, ...]`` (for dim 0).

    Every rank decodes its own payload too, so all ranks hold identical values. ``x`` must have the same shape
    on every rank. Row-structured codecs (outlier channels) use the last dimension as channels.
    """
    codec = resolve_codec(codec)
    n, _ = _world(group)
    dim = dim % max(x.dim(), 1)
    nbytes = x.numel() * x.element_size()
    if check_finite:
        _check_finite(x, "all_gather", group)
    reason = _ineligible(x, codec, n, min_bytes) or ("empty tensor" if x.numel() == 0 else None)
    if reason is not None:
        _log_fallback_once("all_gather", reason)
        src = x.movedim(dim, 0).contiguous()
        out = torch.empty((n * src.shape[0], *src.shape[1:]), dtype=x.dtype, device=x.device)
        if n > 1:
            _all_gather_flat(out, src, group=group)
        else:
            out.copy_(src)
        if stats is not None:
            stats.append(CommStats("all_gather", "none", "stock", nbytes, (n - 1) * nbytes, (n - 1) * nbytes, reason))
        return out.movedim(0, dim).contiguous()
    payload = codec.encode(x)
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)
    _all_gather_flat(gathered, payload, group=group)
    parts = [codec.decode(gathered[r * p : (r + 1) * p], x.shape, x.dtype) for r in range(n)]
    if stats is not None:
        stats.append(CommStats("all_gather", codec.spec, "one-shot", nbytes, (n - 1) * p, (n - 1) * nbytes))
    return torch.cat(parts, dim=dim)


def reduce_scatter(
    x: torch.Tensor,
    codec: Codec | str | None,
    group: dist.ProcessGroup | None = None,
    *,
    dim: int = 0,
    min_bytes: int = DEFAULT_MIN_BYTES,
    check_finite: bool = False,
    stats: list[CommStats] | None = None,
) -> torch.Tensor:
    """Sum ``x`` over ranks and keep block ``rank`` along ``dim``: ``[s, ...] -> [s/N, ...]`` (for dim 0).

    Each destination block is encoded separately and sent with one all-to-all; the receiver decodes the N
    blocks and sums them in fp32 in rank order.

    Raises:
        CollectiveError: if ``x.shape[dim]`` is not divisible by the world size.
    """
    codec = resolve_codec(codec)
    n, rank = _world(group)
    dim = dim % max(x.dim(), 1)
    if x.dim() == 0 or x.shape[dim] % n:
        size = x.shape[dim] if x.dim() else "a 0-d tensor"
        raise CollectiveError(f"reduce_scatter: size {size} along dim {dim} is not divisible by the world size {n}")
    nbytes = x.numel() * x.element_size()
    if check_finite:
        _check_finite(x, "reduce_scatter", group)
    src = x.movedim(dim, 0)
    blocks = src.reshape(n, src.shape[0] // n, *src.shape[1:])  # [N, s/N, ...]
    block_shape = tuple(blocks.shape[1:])
    base = (n - 1) * nbytes // n
    reason = _ineligible(x, codec, n, min_bytes) or ("empty tensor" if x.numel() == 0 else None)
    if reason is not None:
        _log_fallback_once("reduce_scatter", reason)
        out = torch.empty(block_shape, dtype=x.dtype, device=x.device)
        if n > 1:
            _reduce_scatter_flat(out, blocks.contiguous(), group=group)
        else:
            out.copy_(blocks[0])
        if stats is not None:
            stats.append(CommStats("reduce_scatter", "none", "stock", nbytes, base, base, reason))
        return out.movedim(0, dim).contiguous()
    p = codec.payload_nbytes(block_shape)
    send = torch.empty(n * p, dtype=torch.uint8, device=x.device)
    for r in range(n):
        send[r * p : (r + 1) * p] = codec.encode(blocks[r])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    out = _decode_sum(codec, recv, p, block_shape, n).to(x.dtype)
    if stats is not None:
        stats.append(CommStats("reduce_scatter", codec.spec, "all-to-all", nbytes, (n - 1) * p, base))
    return out.movedim(0, dim).contiguous()


def payload_ratio(codec: Codec | str, shape: Sequence[int], dtype: torch.dtype) -> float:
    """Uncompressed bytes over payload bytes for one message of ``shape``/``dtype`` (for logs and demos)."""
    codec = resolve_codec(codec)
    n = math.prod(shape)
    return n * torch.empty((), dtype=dtype).element_size() / max(codec.payload_nbytes(shape), 1)
