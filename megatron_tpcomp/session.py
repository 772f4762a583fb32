"""One rank's model session for the tools (evaluation, calibration, search, demo, textgen, bench e2e).

Every tool's rank does the same set-up inside an initialised torch.distributed group: megatron-core's CPU
patches, Megatron's parallel state at the TP size, this rank's shard of the checkpoint; and the same teardown:
the intercept's hooks off and the parallel state destroyed, also when the body raises (a rank that is reused,
as in tests, must not inherit them). The process group itself belongs to whoever created it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class RankSession:
    """What a rank works with: ``model`` (this rank's megatron-core GPTModel shard, eval mode), the checkpoint's
    ``meta`` (:class:`~megatron_tpcomp.checkpoint.CheckpointMeta`), the ``tp`` size and the seconds the load took.
    """

    model: torch.nn.Module
    meta: Any
    tp: int
    load_s: float

    @property
    def group(self) -> Any:
        """The tensor-parallel process group."""
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()


@contextlib.contextmanager
def rank_session(
    ckpt: str | Path,
    tp: int,
    *,
    dtype: torch.dtype | None = None,
    seed: int = 1234,
    cpu: bool = True,
    cuda: bool = False,
) -> Iterator[RankSession]:
    """``with rank_session(ckpt, tp) as s: s.model(...)``: set up this rank, load its shard, always tear down.

    Args:
        ckpt: checkpoint directory (tpcomp or Megatron ``torch_dist``); tp: TP size (divides the world size).
        dtype: parameter dtype (None: the checkpoint's own); seed: Megatron's RNG tracker seed.
        cpu: install megatron-core's CPU inference patches first (off on a CUDA run); cuda: move the model there.
    """
    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.megatron import cpu as cpu_patches
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron import model as M

    if cpu:
        cpu_patches.enable_cpu_inference()
    M.init_parallel(tp, seed=seed)
    model = None
    try:
        t0 = time.perf_counter()
        model, meta = load_model(ckpt, dtype=dtype)
        load_s = time.perf_counter() - t0
        if cuda:
            model = model.cuda()
        yield RankSession(model, meta, tp, load_s)
    finally:
        if model is not None:
            intercept.disable(model)
        M.destroy_parallel()
