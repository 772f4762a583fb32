"""Sharded next-token metrics equal the gathered evaluation's on the embedded real model."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.megatron


def _metrics_worker(rank: int, world_size: int, ckpt: str, ids: list[int]) -> tuple:
    import torch
    from megatron.core import parallel_state

    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.evaluation import _window_metrics
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M
    from megatron_tpcomp.search import sharded_logprobs, sharded_window_metrics

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, _ = load_model(ckpt, dtype=torch.float32)
    group = parallel_state.get_tensor_model_parallel_group()
    t = torch.tensor(ids)
    pos = torch.arange(len(ids) - 1)[None]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            full = model(t[None, :-1], pos, attention_mask=None, runtime_gather_output=True)[0]
            shard = model(t[None, :-1], pos, attention_mask=None, runtime_gather_output=False)[0]
        return torch.log_softmax(full.float(), dim=-1), sharded_logprobs(shard, group)

    base_full, base_shard = both()
    intercept.enable(model, "int4:g32")  # every layer: a KL of ~0.1, some argmax flips
    full, shard = both()
    intercept.disable(model)
    return _window_metrics(base_full, full, t[1:]), sharded_window_metrics(base_shard, shard, t[1:], group)


def test_sharded_metrics_match_the_gathered_evaluation(real_ckpt) -> None:
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    ids = TextTokenizer.from_checkpoint(read_metadata(real_ckpt)).tokenize(assets.calibration_text())[:97]
    out = run_distributed(_metrics_worker, 3, str(real_ckpt), ids, timeout_s=600)
    (nll, kl, top1), sharded = out[0]
    assert all(o[1] == sharded for o in out)  # every rank takes the same decisions from the same numbers
    # Same logits, log-sum-exp over shards instead of one row: fp32 rounding only (nll ~ 300 nats here).
    assert sharded[0] == pytest.approx(nll, rel=1e-5) and sharded[1] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert sharded[2] == top1 and 0 < top1 < 96 and kl > 1.0  # int4 everywhere: real damage, measured alike
