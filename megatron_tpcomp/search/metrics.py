"""Next-token metrics on vocabulary-parallel logit shards: each rank keeps its ``[s, V/tp]`` slice and a few tiny
all-reduces give the log-softmax, KL, NLL and argmax over the full vocabulary, instead of gathering ``[s, V]``
logits to every rank."""

from __future__ import annotations

from typing import Any

import torch


def sharded_logprobs(logits: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's shard of the fp32 log-probabilities over the full vocabulary.

    Args:
        logits: ``[s, V/tp]`` this rank's vocabulary-parallel logits (rank r holds rows ``r*V/tp ..``).
    Returns:
        ``[s, V/tp]`` fp32 ``logits - logsumexp(all logits)``.
    """
    import torch.distributed as dist

    z = logits.float()
    m = z.amax(dim=-1)  # [s]
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    se = (z - m[:, None]).exp().sum(dim=-1)  # [s]
    dist.all_reduce(se, group=group)
    return z - (m + se.log())[:, None]


def sharded_kl(base_lp: torch.Tensor, lp: torch.Tensor, group: Any) -> torch.Tensor:
    """KL(base || this) per position ``[s]`` (nats) from log-prob shards ``[s, V/tp]``; equal on every rank."""
    import torch.distributed as dist

    kl = (base_lp.exp() * (base_lp - lp)).sum(dim=-1)
    dist.all_reduce(kl, group=group)
    return kl


def sharded_window_metrics(
    base_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor, group: Any
) -> tuple[float, float, int]:
    """(sum of NLL, sum of KL(base || this), argmax matches) over one window, from log-prob shards ``[s, V/tp]``
    and next tokens ``targets`` ``[s]``; equal on every rank (same numbers as ``evaluation._window_metrics`` on
    gathered logits, up to summation order)."""
    import torch.distributed as dist

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    v = lp.shape[-1]
    local = targets - rank * v
    mine = (local >= 0) & (local < v)
    picked = lp.gather(1, local.clamp(0, v - 1)[:, None])[:, 0]  # [s]
    nll = torch.where(mine, -picked, torch.zeros_like(picked))
    dist.all_reduce(nll, group=group)
    kl = sharded_kl(base_lp, lp, group)

    def global_argmax(x: torch.Tensor) -> torch.Tensor:
        val, idx = x.max(dim=-1)  # first maximum within the shard
        vals = [torch.empty_like(val) for _ in range(size)]
        idxs = [torch.empty_like(idx) for _ in range(size)]
        dist.all_gather(vals, val, group=group)
        dist.all_gather(idxs, idx, group=group)
        best = torch.stack(vals).argmax(dim=0)  # lowest rank among equal maxima = lowest global index
        return torch.stack(idxs).gather(0, best[None])[0] + best * v

    top1 = int((global_argmax(base_lp) == global_argmax(lp)).sum())
    return float(nll.sum()), float(kl.sum()), top1


def logits_shard(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[s, V/tp]`` vocabulary-parallel logits of one sequence ``ids`` ``[s]`` (no gather)."""
    with torch.no_grad():
        out = model(ids[None], torch.arange(ids.numel())[None], attention_mask=None, runtime_gather_output=False)
    return out[0]
