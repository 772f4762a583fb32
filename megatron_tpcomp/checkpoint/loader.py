"""Load any checkpoint this package reads as a model on this rank: a megatron-tpcomp checkpoint (at its TP size)
or a Megatron ``torch_dist`` checkpoint (at any TP size that divides the model)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_tpcomp.checkpoint import torch_dist
from megatron_tpcomp.checkpoint.locate import find_checkpoint
from megatron_tpcomp.checkpoint.metadata import CheckpointMeta
from megatron_tpcomp.checkpoint.store import load_tpcomp_model


def load_model(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    parallel_output: bool = True,
    sequence_parallel: bool = False,
    verify: bool = True,
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build the checkpoint's GPTModel on this rank and load its weights: :func:`.torch_dist.load_model` for a
    Megatron ``torch_dist`` checkpoint, :func:`.store.load_tpcomp_model` (``verify``: check shard hashes) for
    ours. Megatron's parallel state must be initialised; on a machine without CUDA call
    ``megatron_tpcomp.megatron.cpu.enable_cpu()`` first.

    Returns:
        (model in eval mode, metadata)

    Raises:
        CheckpointError: see the two loaders.
    """
    if find_checkpoint(ckpt_dir) is not None:
        return torch_dist.load_model(
            ckpt_dir, dtype=dtype, parallel_output=parallel_output, sequence_parallel=sequence_parallel
        )
    return load_tpcomp_model(
        ckpt_dir, dtype=dtype, parallel_output=parallel_output, sequence_parallel=sequence_parallel, verify=verify
    )
