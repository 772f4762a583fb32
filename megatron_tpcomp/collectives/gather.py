"""Compressed all-gather: encode, all-gather the payloads, decode each rank's (my own too) and concatenate."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives.descriptor import Algorithm, whole_message, whole_plan, whole_work
from megatron_tpcomp.collectives.transport import all_gather_flat


def _run_all_gather(
    x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
) -> tuple[torch.Tensor, int]:
    payload = codec.encode(x)  # [P]
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)  # [N*P]
    all_gather_flat(gathered, payload, group=group)
    parts = [codec.decode(gathered[r * p : (r + 1) * p], x.shape, x.dtype) for r in range(n)]
    return torch.cat(parts, dim=dim), (n - 1) * p


ALL_GATHER = Algorithm(
    op="all_gather",
    name="all-gather",
    steps_per_peer=1,
    step_share=whole_message,
    codec_work=whole_work,
    plan=whole_plan,
    pipelined=False,
    run=_run_all_gather,
)
