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
- No host synchronisation after warm-up (CUDA-graph safe): once a call of the same (op, shape, dtype, codec,
  path) has run (the agreement exchange of ``check_ranks="first"`` reads its record back: that is the warm-up),
  the call reads nothing back to the host and sizes nothing from the data; every decision (path, algorithm,
  chunks, backend) is taken from shapes, dtypes and arguments. ``check_ranks=True`` and ``check_finite=True``
  read back on every call: not graph-safe. ``tests/collectives/test_no_sync.py`` checks this.

Algorithms (``algo`` for all-reduce: ``one-shot``, ``two-shot``, ``auto``), their bytes, rounds and chunking:
:mod:`megatron_tpcomp.collectives.algorithms`; ``auto`` is :func:`~megatron_tpcomp.collectives.algorithms.choose_algo`
(the size rule, ``TWO_SHOT_MIN_BYTES``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megatron_tpcomp import agreement
from megatron_tpcomp.codecs import Codec, make_codec
from megatron_tpcomp.codecs.base import SUPPORTED_DTYPES, IdentityCodec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.algorithms import (
    ALGOS,
    ALL_GATHER,
    ALL_TO_ALL,
    STOCK,
    algorithm,
    choose_algo,
    is_float8,
)

logger = logging.getLogger("megatron_tpcomp")

#: Default minimum message size (bytes of the uncompressed input) for compression. 0 = compress everything
#: eligible. Production callers set a threshold: decode-time messages of a few KB are latency-bound and the
#: codec only adds time (every peer system gates by size).
DEFAULT_MIN_BYTES = 0


class CollectiveError(RuntimeError):
    """A compressed collective was called with input it cannot handle; the message names the value."""


@dataclass
class CommStats:
    """What one collective call sent, per rank.

    Attributes:
        op: ``all_reduce`` | ``all_gather`` | ``reduce_scatter``.
        spec: canonical codec spec actually used (``none`` for a fallback).
        algo: the :class:`~megatron_tpcomp.collectives.algorithms.Algorithm` name: ``one-shot`` | ``two-shot``
            (all-reduce), ``all-gather`` | ``all-to-all`` (all-gather and reduce-scatter), ``stock`` (fallback).
        raw_bytes: bytes of this rank's uncompressed input.
        wire_bytes: bytes this rank sends with the path taken.
        baseline_wire_bytes: bytes this rank sends with the stock ring collective (``algorithms.STOCK``).
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


def _execute(
    op: str,
    algo: str,
    reason: tuple[str, str] | None,
    x: torch.Tensor,
    codec: Codec,
    group: dist.ProcessGroup | None,
    n: int,
    *,
    dim: int,
    chunks: int,
    stats: list[CommStats] | None,
) -> torch.Tensor:
    """Run ``op`` with algorithm ``algo`` (its stock collective when ``reason`` says why not to compress) and
    append its :class:`CommStats` to ``stats`` if given."""
    nbytes = x.numel() * x.element_size()
    stock = STOCK[op]
    base = stock.wire_bytes(nbytes, n)
    if reason is not None:
        _log_fallback_once(op, *reason)
        out, _ = stock.run(x, codec, group, n, dim=dim, chunks=1)
        if stats is not None:
            stats.append(CommStats(op, "none", "stock", nbytes, base, base, reason[1]))
        return out
    chosen = algorithm(op, algo)
    out, sent = chosen.run(x, codec, group, n, dim=dim, chunks=chunks)
    if stats is not None:
        stats.append(CommStats(op, codec.spec, chosen.name, nbytes, sent, base, chunks=chunks))
    return out


# --------------------------------------------------------------------------------------------------- all-reduce


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
            call of each distinct such fingerprint per process group, cached (later calls make no host sync);
            True: every call (a host sync every call); False: never.
        check_finite: raise CollectiveError on every rank if any rank's ``x`` holds NaN/Inf (one extra tiny
            all-gather; the count is read back to the host on every call: a sync, not for CUDA graphs). Without it
            a non-finite value decodes as NaN for its whole block on every rank.
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
    if is_float8(x.dtype):
        raise CollectiveError(f"all_reduce: no stock reduction for {x.dtype} (gloo rejects it); cast to bf16 first")
    reason = _ineligible(x, codec, n, min_bytes)
    chosen = choose_algo(n, nbytes) if algo == "auto" else algo
    # The algorithm's pipelining rule (one-shot on CPU tensors), for compressed paths only.
    chunks = algorithm("all_reduce", chosen).chunks(nbytes, x.device.type, codec.block_local) if reason is None else 1
    if check_finite or check_ranks is not False:
        if chunks > 1:
            per = chunking.pipeline_per(x.numel(), chunks, codec)
            plan = f"one-shot pipelined in {chunks} chunks of {per} values"
        elif chosen == "two-shot":
            plan = f"two-shot in chunks of {chunking.chunk_shape(x.shape, codec, n)}"
        else:
            plan = chosen
        path = _path(reason, plan)
        _agree(x, "all_reduce", "", codec, path, group, n, check_finite=check_finite, check_ranks=check_ranks)
    return _execute("all_reduce", chosen, reason, x, codec, group, n, dim=0, chunks=chunks, stats=stats)


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
    reason = _ineligible(x, codec, n, min_bytes)
    if check_finite or check_ranks is not False:
        path = _path(reason, ALL_GATHER.name)
        _agree(x, "all_gather", f"dim={dim}", codec, path, group, n, check_finite=check_finite, check_ranks=check_ranks)
    return _execute("all_gather", ALL_GATHER.name, reason, x, codec, group, n, dim=dim, chunks=1, stats=stats)


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
    if is_float8(x.dtype):
        raise CollectiveError(f"reduce_scatter: no stock reduction for {x.dtype} (gloo rejects it); cast to bf16")
    reason = _ineligible(x, codec, n, min_bytes)
    if check_finite or check_ranks is not False:
        path = _path(reason, ALL_TO_ALL.name)
        opt = f"dim={dim}"
        _agree(x, "reduce_scatter", opt, codec, path, group, n, check_finite=check_finite, check_ranks=check_ranks)
    return _execute("reduce_scatter", ALL_TO_ALL.name, reason, x, codec, group, n, dim=dim, chunks=1, stats=stats)
