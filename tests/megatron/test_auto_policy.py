"""Policy ``auto`` in the plug-in: per message, the cost model picks the layer's codec or the stock collective;
all ranks decide alike, and "stock" means Megatron's exact numerics."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_tpcomp.costmodel import CodecSpeed, CostModel, Link
from megatron_tpcomp.launch import run_distributed

pytestmark = pytest.mark.megatron


def _table(path: str, beta: float) -> None:
    model = CostModel.default()
    model.links[2] = Link(alpha_s=20e-6, beta_bytes_per_s=beta, source="test")
    # A CPU-speed codec (torch reference on 2 cores: ~40 us per call, ~0.3 GB/s).
    model.codecs["*"] = CodecSpeed(40e-6, 0.3e9, 40e-6, 1e9, source="test")
    with open(path, "w") as f:
        json.dump(model.to_json(), f)


def _run(rank: int, world_size: int, slow: str, fast: str) -> dict:
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu()
    M.init_parallel(world_size)
    cfg = M.ModelConfig()
    gpt = M.build_gpt_model(cfg, world_size, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16)[None].expand(2, -1)
    out = {}
    with torch.no_grad():
        out["stock"] = gpt(tokens, pos, attention_mask=None)
        for name, table in (("slow", slow), ("fast", fast)):
            config = CompressionConfig.from_dict({"default": "int8:g32", "policy": "auto", "perf_table": table})
            intercept.enable(gpt, config)
            intercept.reset_counts()
            out[name] = gpt(tokens, pos, attention_mask=None)
            out[f"{name}/choices"] = dict(intercept.auto_choices)
        fixed = CompressionConfig.from_dict({"default": "int8:g32"})
        intercept.enable(gpt, fixed)
        out["fixed"] = gpt(tokens, pos, attention_mask=None)
    intercept.disable(gpt)
    return out


def test_auto_compresses_on_a_slow_link_and_not_on_a_fast_one(tmp_path) -> None:
    slow, fast = str(tmp_path / "slow.json"), str(tmp_path / "fast.json")
    _table(slow, 1e6)  # 8 Mbit/s: every message's bytes dominate
    _table(fast, 1e13)  # faster than any codec: compression never pays
    results = run_distributed(_run, 2, slow, fast, timeout_s=240)
    for r in results:
        choices_slow, choices_fast = r["slow/choices"], r["fast/choices"]
        assert sum(choices_slow.values()) == sum(choices_fast.values()) == 4  # 2 layers x (attention, mlp)
        assert all(choice.startswith("int8:g32") for (_, _, choice) in choices_slow)
        assert all(choice == "none" for (_, _, choice) in choices_fast)
        assert torch.equal(r["slow"], r["fixed"])  # compressing every message = the fixed policy
        assert torch.equal(r["fast"], r["stock"])  # never compressing = Megatron's numerics, bit for bit
