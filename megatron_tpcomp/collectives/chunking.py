"""Chunk plans: how the compressed collectives cut one rank's message into separately encoded pieces.

Two cuts exist: two-shot's N chunks (one per destination rank, zero-padded to whole codec blocks or whole rows)
and the pipelined one-shot's K chunks (CPU tensors, block-local codecs: encode, transfer and decode overlap).
Every cut ends on a codec-block boundary (:func:`chunk_alignment`), so each value is quantized exactly as in the
whole message. The benchmarks and the cost model take their chunking from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_tpcomp.codecs import Codec

#: Pipelined one-shot (CPU tensors, block-local codecs: ``Codec.block_local``): a message of at least
#: ``PIPELINE_MIN_BYTES`` (uncompressed) is cut into chunks of about ``PIPELINE_CHUNK_BYTES`` (at most
#: ``PIPELINE_MAX_CHUNKS``) on codec-block boundaries; chunk i+1 is encoded and chunk i-1 decoded while chunk i
#: travels (an asynchronous all-gather), so the codec's time hides behind the link's instead of adding to it.
#: Results are bit-identical to the unpipelined path: every block is encoded, decoded and summed as before.
PIPELINE_MIN_BYTES = 1 << 20
PIPELINE_CHUNK_BYTES = 1 << 20
PIPELINE_MAX_CHUNKS = 16


@dataclass(frozen=True)
class ChunkPlan:
    """The pieces one rank encodes for one collective call, one payload each, in send order.

    Attributes:
        pieces: shape of each encoded piece (the input dtype's values).
    """

    pieces: tuple[tuple[int, ...], ...]

    def payload_nbytes(self, codec: Codec) -> int:
        """Payload bytes of the whole message as cut: the sum of the pieces' payloads (the P of the wire
        formulas in :mod:`megatron_tpcomp.collectives.algorithms`)."""
        return sum(codec.payload_nbytes(shape) for shape in self.pieces)


def pipeline_chunks(nbytes: int, device_type: str, block_local: bool) -> int:
    """Number of chunks the one-shot all-reduce cuts a message of ``nbytes`` (uncompressed) into: 1 (not
    pipelined) unless the tensor is on the CPU, the codec is block-local and the message is large enough (see
    ``PIPELINE_MIN_BYTES``). The cost model uses the same rule."""
    if device_type != "cpu" or not block_local or nbytes < max(PIPELINE_MIN_BYTES, 1):
        return 1
    return max(1, min(PIPELINE_MAX_CHUNKS, nbytes // max(PIPELINE_CHUNK_BYTES, 1)))


def tensor_pipeline_chunks(x: torch.Tensor, codec: Codec) -> int:
    """:func:`pipeline_chunks` for tensor ``x`` sent with ``codec``."""
    return pipeline_chunks(x.numel() * x.element_size(), x.device.type, codec.block_local)


def pipeline_per(numel: int, chunks: int, codec: Codec) -> int:
    """Values per chunk of the pipelined one-shot: rounded up to whole codec blocks."""
    align = math.lcm(chunk_alignment(codec), codec.chunk_values)  # whole super-blocks: the same exponents
    return math.ceil(numel / chunks / align) * align


def pipeline_plan(numel: int, chunks: int, codec: Codec) -> ChunkPlan:
    """The flat pieces ``[per]`` (the last one shorter) of a one-shot all-reduce of ``numel`` values in
    ``chunks`` pieces; one piece of the whole message when ``chunks`` is 1."""
    if chunks <= 1:
        return ChunkPlan(((numel,),))
    per = pipeline_per(numel, chunks, codec)
    return ChunkPlan(tuple((min(a + per, numel) - a,) for a in range(0, numel, per)))


def chunk_alignment(codec: Codec) -> int:
    """Values per chunk boundary (two-shot, pipelined one-shot): :attr:`Codec.chunk_alignment` (its block size,
    lcm with its Hadamard block and the row length of per-channel state such as ``+chscale``), so that chunks
    split on block boundaries, the codec pads nothing inside a chunk and every value keeps its channel."""
    return codec.chunk_alignment


def chunk_view(x: torch.Tensor, codec: Codec, n: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Split ``x`` into N zero-padded chunks for two-shot.

    Flat codecs: ``[numel] -> [N, c]`` with ``c = ceil(numel / N)`` rounded up to :func:`chunk_alignment`.
    Row-structured codecs (outlier channels in the last dim): ``[rows, h] -> [N, ceil(rows / N), h]``, never
    splitting a row.

    Returns:
        (chunks ``[N, *chunk_shape]`` in ``x.dtype``, chunk_shape)
    """
    shape = chunk_shape(x.shape, codec, n)
    if len(shape) == 2:
        per, h = shape
        rows = x.reshape(-1, h)
        rows = torch.nn.functional.pad(rows, (0, 0, 0, per * n - rows.shape[0]))
        return rows.view(n, per, h), shape
    flat = x.reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, shape[0] * n - flat.numel()))
    return flat.view(n, shape[0]), shape


def chunk_shape(shape: Sequence[int], codec: Codec, n: int) -> tuple[int, ...]:
    """Shape of one two-shot chunk of a message of ``shape`` (see :func:`chunk_view`), without touching data."""
    numel = math.prod(shape)
    if codec.row_structured and len(shape) >= 2:
        h = int(shape[-1])
        return (-(-(numel // h) // n), h)
    align = chunk_alignment(codec)
    per = -(-numel // n)
    return (-(-per // align) * align,)


def unchunk(full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`chunk_view` (drop the zero padding): ``[N, *chunk_shape] -> shape``, contiguous."""
    numel = math.prod(shape)
    if full.dim() == 2:  # flat chunks
        return full.reshape(-1)[:numel].reshape(shape)
    h = full.shape[-1]
    return full.reshape(-1, h)[: numel // h].reshape(shape)


def block_shape(shape: Sequence[int], n: int, dim: int) -> tuple[int, ...]:
    """Shape of one reduce-scatter block: ``shape`` with ``dim`` divided by N (``x.tensor_split(N, dim)[r]``)."""
    out = list(shape)
    out[dim] //= n
    return tuple(out)
