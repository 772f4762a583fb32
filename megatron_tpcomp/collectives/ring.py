"""The stock ring collectives (``dist.all_reduce``, all-gather, reduce-scatter): the baselines that ``CommStats``
and the cost model compare against, and what the collectives fall back to."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives.descriptor import Algorithm, no_work, per_rank_share, whole_message, whole_plan
from megatron_tpcomp.collectives.transport import all_gather_flat, is_float8, reduce_scatter_flat


def _run_stock_all_reduce(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    out = x.clone(memory_format=torch.contiguous_format)
    if n > 1 and x.numel():
        dist.all_reduce(out, group=group)
    return out, STOCK_ALL_REDUCE.wire_bytes(x.numel() * x.element_size(), n)


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
    return out.movedim(0, dim).contiguous(), STOCK_ALL_GATHER.wire_bytes(x.numel() * x.element_size(), n)


def _run_stock_reduce_scatter(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    src = x.movedim(dim, 0).contiguous()  # [x.shape[dim], ...]: block r is rows r*s/N .. (r+1)*s/N
    out = torch.empty((src.shape[0] // n, *src.shape[1:]), dtype=x.dtype, device=x.device)
    if n > 1 and x.numel():
        reduce_scatter_flat(out, src, group=group)
    elif x.numel():
        out.copy_(src[: out.shape[0]])
    return out.movedim(0, dim).contiguous(), STOCK_REDUCE_SCATTER.wire_bytes(x.numel() * x.element_size(), n)


STOCK_ALL_REDUCE = Algorithm(
    op="all_reduce",
    name="stock",
    steps_per_peer=2,
    step_share=per_rank_share,
    codec_work=no_work,
    plan=whole_plan,
    pipelined=False,
    run=_run_stock_all_reduce,
)


STOCK_ALL_GATHER = Algorithm(
    op="all_gather",
    name="stock",
    steps_per_peer=1,
    step_share=whole_message,
    codec_work=no_work,
    plan=whole_plan,
    pipelined=False,
    run=_run_stock_all_gather,
)


STOCK_REDUCE_SCATTER = Algorithm(
    op="reduce_scatter",
    name="stock",
    steps_per_peer=1,
    step_share=per_rank_share,
    codec_work=no_work,
    plan=whole_plan,
    pipelined=False,
    run=_run_stock_reduce_scatter,
)
