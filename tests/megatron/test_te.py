"""Transformer Engine interception. The wrapper's contract (TE's calling convention, site routing, stock path
outside a site) is checked here over gloo with a collective of TE's signature; the real TE path needs TE and
two GPUs (tests/backends/test_te_intercept.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp.launch import run_distributed

pytestmark = pytest.mark.megatron


def stock_allreduce(inp: torch.Tensor, group=None, async_op: bool = False):
    """TE's convention: returns (output, handle)."""
    out = inp.clone()
    handle = dist.all_reduce(out, group=group, async_op=async_op)
    return out, handle


def _wrapper_contract(rank: int, world_size: int) -> dict:
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept, te

    wrapped = te.wrap_te_collective("allreduce", stock_allreduce, intercept._run)
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(rank))
    group = dist.new_group(list(range(world_size)))
    intercept.reset_counts()
    unsited, handle = wrapped(x, group)
    state = intercept._ModelState(CompressionConfig.from_spec("int8:g32"), [], True)
    intercept._site_stack.append((intercept.Site("mlp", 3), state))
    sited, sited_handle = wrapped(x, group)
    intercept._site_stack.clear()
    exact = x.clone()
    dist.all_reduce(exact)
    return {
        "unsited_exact": torch.equal(unsited, exact) and handle is None,
        "sited_rel": float((sited - exact).norm() / exact.norm()),
        "sited_handle": sited_handle,
        "counts": dict(intercept.call_counts),
        "records": [(s, r.spec) for s, r in intercept.telemetry_records],
    }


def test_te_wrapper_contract() -> None:
    for res in run_distributed(_wrapper_contract, 2, timeout_s=120):
        assert res["unsited_exact"]  # outside a site: TE's own collective, untouched
        assert 0 < res["sited_rel"] < 0.01 and res["sited_handle"] is None
        assert res["counts"] == {("te_all_reduce", "none"): 1, ("te_all_reduce", "layer3.mlp"): 1}
        assert res["records"] == [("layer3.mlp", "int8:g32:sfp16")]


def test_without_te_nothing_is_installed() -> None:
    from megatron_tpcomp.megatron import te

    ok, reason = te.have_te()
    if ok:
        pytest.skip("Transformer Engine is installed here")
    assert "Transformer Engine is not importable" in reason
    assert te.install(lambda *a: None, {}) == 0
