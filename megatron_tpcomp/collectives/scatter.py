"""Compressed reduce-scatter: each destination block encoded separately, one all-to-all, the receiver decodes
the N blocks and sums them in rank order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.chunking import ChunkPlan
from megatron_tpcomp.collectives.descriptor import Algorithm, per_rank_share, scatter_work
from megatron_tpcomp.collectives.transport import decode_sum, encode_into


def _run_reduce_scatter(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    blocks = x.tensor_split(n, dim)  # N views, each x.shape with dim / N
    p = codec.payload_nbytes(blocks[0].shape)
    send = encode_into(codec, blocks, p, x.device)  # [N*p]: block r goes to rank r
    recv = torch.empty_like(send)  # [N*p]: my block from every rank, in rank order
    dist.all_to_all_single(recv, send, group=group)
    return decode_sum(codec, recv, p, blocks[0].shape, n, x.dtype), (n - 1) * p


def _scatter_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    return ChunkPlan((chunking.block_shape(shape, n, dim),) * n)


ALL_TO_ALL = Algorithm(
    op="reduce_scatter",
    name="all-to-all",
    steps_per_peer=1,
    step_share=per_rank_share,
    codec_work=scatter_work,
    plan=_scatter_plan,
    pipelined=False,
    run=_run_reduce_scatter,
)
