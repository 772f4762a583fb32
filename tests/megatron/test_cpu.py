"""megatron-core on CPU: the CPU enablement is explicit and reversible, and a TP=2 GPT forward over gloo equals
the TP=1 forward of the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp.launch import run_distributed

pytestmark = pytest.mark.megatron


def _forward(rank: int, world_size: int, sequence_parallel: bool) -> torch.Tensor | None:
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu()
    M.init_parallel(world_size)
    cfg = M.ModelConfig()
    torch.manual_seed(0)  # CPU initialisation builds every full master weight from this RNG, then slices it
    gpt = M.build_gpt_model(cfg, world_size, sequence_parallel=sequence_parallel)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        logits = gpt(tokens, position_ids, attention_mask=None)  # [b, s, vocab/TP]
    parts = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(parts, logits.contiguous())
    M.destroy_parallel()
    cpu.disable_cpu()
    return torch.cat(parts, dim=-1) if rank == 0 else None


@pytest.fixture(scope="module")
def tp1_logits() -> torch.Tensor:
    return run_distributed(_forward, 1, False, timeout_s=120)[0]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["no-sp", "sp"])
def test_tp_matches_tp1(tp1_logits: torch.Tensor, tp: int, sequence_parallel: bool) -> None:
    logits = run_distributed(_forward, tp, sequence_parallel, timeout_s=180)[0]
    assert logits.shape == tp1_logits.shape == (2, 16, 128)
    # fp32; TP only changes the order of the partial sums (split matmuls + all-reduce): ~1e-7 relative.
    assert torch.allclose(logits, tp1_logits, rtol=0, atol=1e-5), float((logits - tp1_logits).abs().max())


def test_enable_disable_restores_every_attribute() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer import torch_norm, utils

    from megatron_tpcomp.megatron import cpu

    before = {
        "add": random.CudaRNGStatesTracker.__dict__["add"],
        "fork": random.CudaRNGStatesTracker.__dict__["fork"],
        "current_device": torch.cuda.current_device,
        "mask": utils.get_default_causal_mask,
        "softmax_mask": fused_softmax.get_default_causal_mask,
    }
    cpu.enable_cpu()
    cpu.enable_cpu()  # idempotent
    assert cpu.cpu_enabled()
    assert torch.cuda.current_device() == "cpu"
    assert utils.get_default_causal_mask(3).device.type == "cpu"
    cpu.disable_cpu()
    assert not cpu.cpu_enabled()
    after = {
        "add": random.CudaRNGStatesTracker.__dict__["add"],
        "fork": random.CudaRNGStatesTracker.__dict__["fork"],
        "current_device": torch.cuda.current_device,
        "mask": utils.get_default_causal_mask,
        "softmax_mask": fused_softmax.get_default_causal_mask,
    }
    for key, value in before.items():
        assert after[key] is value, key
    assert torch_norm.WrappedTorchNorm.__new__ is not None
