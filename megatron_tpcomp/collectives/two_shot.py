"""Two-shot all-reduce (QuickReduce, Flash Communication): N chunks, all-to-all, decode and sum my chunk,
requantize it once, all-gather the reduced chunks. Fewer bytes than one-shot from N = 4 on; the second
quantization roughly doubles the error."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.chunking import ChunkPlan
from megatron_tpcomp.collectives.descriptor import Algorithm, CodecTerm, per_rank_share, scatter_work
from megatron_tpcomp.collectives.transport import all_gather_flat, decode_sum, encode_into


def _run_two_shot(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    chunks_, chunk_shape = chunking.chunk_view(x, codec, n)  # [N, *c]
    p = codec.payload_nbytes(chunk_shape)
    send = encode_into(codec, list(chunks_.unbind(0)), p, x.device)  # [N*p]: chunk r goes to rank r
    recv = torch.empty_like(send)  # [N*p]: my chunk from every rank, in rank order
    dist.all_to_all_single(recv, send, group=group)
    reduced = decode_sum(codec, recv, p, chunk_shape, n, torch.float32)  # my chunk of the sum
    mine = codec.encode(reduced)  # requantized once, from fp32
    all_gather_flat(send, mine, group=group)  # the send buffer is free again: reuse it
    full = torch.empty((n, *chunk_shape), dtype=x.dtype, device=x.device)
    for r in range(n):  # my own chunk too: every rank must hold the same requantized values
        full[r] = codec.decode(send[r * p : (r + 1) * p], chunk_shape, x.dtype)
    return chunking.unchunk(full, x.shape), 2 * (n - 1) * p


def _two_shot_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    return ChunkPlan((chunking.chunk_shape(shape, codec, n),) * n)


def _two_shot_work(n: int) -> tuple[CodecTerm, ...]:
    """Reduce-scatter of N chunks, then requantize the reduced chunk and decode N reduced chunks."""
    return *scatter_work(n), CodecTerm("enc", 1, Fraction(1, n)), CodecTerm("dec", n, Fraction(1, n))


TWO_SHOT = Algorithm(
    op="all_reduce",
    name="two-shot",
    steps_per_peer=2,
    step_share=per_rank_share,
    codec_work=_two_shot_work,
    plan=_two_shot_plan,
    pipelined=False,
    run=_run_two_shot,
)
