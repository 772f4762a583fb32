"""Transformer Engine layer specs with compression: needs TE and >= 2 GPUs (NCCL cannot put two ranks on one)."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.launch import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs for a TP=2 NCCL group"),
]


def _te_forward(rank: int, world_size: int) -> dict:
    torch.cuda.set_device(rank)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron import model as M

    M.init_parallel(world_size)
    cfg = M.ModelConfig(hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=4)
    config = M.transformer_config(cfg, world_size, dtype=torch.bfloat16)
    config.use_cpu_initialization = False
    torch.manual_seed(0)
    gpt = (
        GPTModel(
            config,
            get_gpt_layer_with_transformer_engine_spec(),
            cfg.vocab_size,
            cfg.max_sequence_length,
            position_embedding_type="rope",
        )
        .cuda()
        .eval()
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    positions = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        stock = gpt(tokens, positions, attention_mask=None)
        intercept.enable(gpt, "int8:g32", telemetry=True)
        intercept.reset_counts()
        comp = gpt(tokens, positions, attention_mask=None)
    return {
        "rel": float((comp.float() - stock.float()).norm() / stock.float().norm()),
        "sites": sorted({s for s, _ in intercept.telemetry_records}),
        "counts": dict(intercept.call_counts),
    }


def test_te_spec_collectives_are_compressed() -> None:
    res = run_distributed(_te_forward, 2, timeout_s=300, backend="nccl")[0]
    assert res["sites"] == ["layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp"], res
    assert 0 < res["rel"] < 0.05, res
