"""One-shot all-reduce (Hansen-Palmus et al.): encode, all-gather the payloads, decode all N and sum. Large CPU
messages are pipelined in K chunks (:func:`chunking.pipeline_chunks`): encode, transfer and decode overlap."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.chunking import ChunkPlan
from megatron_tpcomp.collectives.descriptor import Algorithm, whole_message, whole_plan, whole_work
from megatron_tpcomp.collectives.transport import all_gather_flat, decode_sum


def _one_shot(x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int) -> tuple[torch.Tensor, int]:
    payload = codec.encode(x)  # [P] uint8
    p = payload.numel()
    gathered = torch.empty(n * p, dtype=torch.uint8, device=x.device)  # [N*P]
    all_gather_flat(gathered, payload, group=group)
    # The own payload is decoded too: using the unquantized partial here would make this rank differ.
    return decode_sum(codec, gathered, p, x.shape, n, x.dtype), (n - 1) * p


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


def _one_shot_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    if chunks <= 1:
        return whole_plan(shape, codec, n, dim, chunks)
    numel = 1
    for s in shape:
        numel *= int(s)
    return chunking.pipeline_plan(numel, chunks, codec)


ONE_SHOT = Algorithm(
    op="all_reduce",
    name="one-shot",
    steps_per_peer=1,
    step_share=whole_message,
    codec_work=whole_work,
    plan=_one_shot_plan,
    pipelined=True,
    run=_run_one_shot,
)
