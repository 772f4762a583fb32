"""The Megatron-Core plug-in on real megatron-core GPT models over gloo (TP=2, with and without sequence
parallel): every forward TP collective is intercepted and counted, per-layer settings take effect, disabled means
Megatron's exact numerics, backward stays uncompressed, and ranks must agree."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp.launch import DistributedRunError, run_distributed

pytestmark = pytest.mark.megatron

TOKENS = (2, 16)


def _setup(world_size: int, sequence_parallel: bool):
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu()
    M.init_parallel(world_size)
    cfg = M.ModelConfig()
    torch.manual_seed(0)
    gpt = M.build_gpt_model(cfg, world_size, sequence_parallel=sequence_parallel)
    tokens = torch.randint(0, cfg.vocab_size, TOKENS, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(TOKENS[1]).unsqueeze(0).expand(TOKENS[0], -1)
    return gpt, tokens, positions


def _gathered(logits: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(parts, logits.contiguous())
    return torch.cat(parts, dim=-1)


def _forward_cases(rank: int, world_size: int, sequence_parallel: bool) -> dict:
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept

    gpt, tokens, positions = _setup(world_size, sequence_parallel)
    originals = (mappings._reduce, mappings._reduce_scatter_along_first_dim, layers.dist_all_gather_func)
    out: dict = {}
    with torch.no_grad():
        out["stock"] = _gathered(gpt(tokens, positions, attention_mask=None), world_size)
        intercept.enable(gpt, "none")
        intercept.reset_counts()
        out["none"] = _gathered(gpt(tokens, positions, attention_mask=None), world_size)
        out["counts"] = dict(intercept.call_counts)
        for spec in ("int8:g32", "int4:g32", "fp8", "nvfp4", "int4:g32+outliers:k4"):
            intercept.enable(gpt, spec, telemetry=True)
            intercept.reset_counts()
            out[spec] = _gathered(gpt(tokens, positions, attention_mask=None), world_size)
            out[f"{spec}/telemetry"] = intercept.telemetry_summary()
        per_layer = CompressionConfig.from_dict(
            {
                "default": "int8:g32",
                "algo": "one-shot",
                "layers": {"0": {"mlp": "none"}, "1": {"attention": "int4:g32@two-shot"}},
            }
        )
        intercept.enable(gpt, per_layer, telemetry=True)
        intercept.reset_counts()
        out["per_layer"] = _gathered(gpt(tokens, positions, attention_mask=None), world_size)
        out["per_layer/telemetry"] = intercept.telemetry_summary()
        out["per_layer/records"] = [(site, s.spec) for site, s in intercept.telemetry_records]
        out["per_layer/algos"] = {site: s.algo for site, s in intercept.telemetry_records}
        out["per_layer/counts"] = dict(intercept.call_counts)
        intercept.disable(gpt)
        out["restored"] = (
            mappings._reduce is originals[0]
            and mappings._reduce_scatter_along_first_dim is originals[1]
            and layers.dist_all_gather_func is originals[2]
        )
        out["after_disable"] = _gathered(gpt(tokens, positions, attention_mask=None), world_size)
    return out


@pytest.fixture(
    scope="module",
    params=[(2, False), (2, True), (4, False), (4, True)],
    ids=lambda p: f"tp{p[0]}-{'sp' if p[1] else 'no-sp'}",
)
def runs(request: pytest.FixtureRequest) -> tuple[bool, list[dict]]:
    tp, sp = request.param
    return sp, run_distributed(_forward_cases, tp, sp, timeout_s=300)


def expected_counts(sequence_parallel: bool, layers: int = 2) -> dict[tuple[str, str], int]:
    """One forward of a local-spec GPTModel at TP=2 (megatron-core 0.16): no SP: embedding + 2 per layer all-reduces;
    SP: reduce-scatters in the same places, all-gathers before qkv, fc1 and the output layer."""
    if not sequence_parallel:
        counts = {("all_reduce", "embedding"): 1}
        for i in range(layers):
            counts[("all_reduce", f"layer{i}.attention")] = 1
            counts[("all_reduce", f"layer{i}.mlp")] = 1
        return counts
    counts = {("reduce_scatter", "embedding"): 1, ("all_gather_linear", "logits"): 1}
    for i in range(layers):
        for block in ("attention", "mlp"):
            counts[("reduce_scatter", f"layer{i}.{block}")] = 1
            counts[("all_gather_linear", f"layer{i}.{block}")] = 1
    return counts


def test_every_forward_collective_is_intercepted(runs: tuple[bool, list[dict]]) -> None:
    sp, results = runs
    # A megatron-core that moves a collective away from the install point changes these counts: fail loudly.
    for res in results:
        assert res["counts"] == expected_counts(sp)


def test_disabled_is_megatron_exactly(runs: tuple[bool, list[dict]]) -> None:
    _, results = runs
    for res in results:
        assert torch.equal(res["none"], res["stock"])  # installed with spec none: bit-identical
        assert torch.equal(res["after_disable"], res["stock"])
        assert res["restored"]


@pytest.mark.parametrize(
    ("spec", "max_rel"),
    # Relative L2 error of the logits of a random 2-layer model (fp32). Each compressed collective adds the
    # codec's error (int8 ~0.6%, fp8 ~2%, 4-bit ~10% of the message); random weights pass it on roughly
    # unattenuated, so the logits' error stays of the order of the worst codec's message error.
    [("int8:g32", 0.02), ("fp8", 0.05), ("int4:g32", 0.25), ("nvfp4", 0.25), ("int4:g32+outliers:k4", 0.25)],
)
def test_compressed_logits_within_bound(runs: tuple[bool, list[dict]], spec: str, max_rel: float) -> None:
    sp, results = runs
    stock = results[0]["stock"]
    got = results[0][spec]
    rel = float((got - stock).norm() / stock.norm())
    assert 0 < rel < max_rel, rel
    for other in results[1:]:
        assert torch.equal(other[spec], got)  # ranks agree bit for bit
    telemetry = results[0][f"{spec}/telemetry"]
    assert set(telemetry) == {"layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp"}
    for row in telemetry.values():
        assert row["compression"] > 1.5  # fp32 model: every codec sends far fewer bytes than the stock ring


def test_per_layer_config_takes_effect(runs: tuple[bool, list[dict]]) -> None:
    sp, results = runs
    res = results[0]
    sites = {site: spec for site, spec in res["per_layer/records"]}
    assert "layer0.mlp" not in sites  # set to none: sent uncompressed ...
    assert res["per_layer/counts"] == expected_counts(sp)  # ... but still intercepted
    assert sites["layer0.attention"] == "int8:g32:sfp16"
    assert sites["layer1.attention"] == "int4:g32:sfp16"
    assert sites["layer1.mlp"] == "int8:g32:sfp16"
    if not sp:  # all-reduces: the site's own algorithm (SPEC@ALGO) wins over the config's
        assert res["per_layer/algos"] == {
            "layer0.attention": "one-shot",
            "layer1.attention": "two-shot",
            "layer1.mlp": "one-shot",
        }


def _backward(rank: int, world_size: int, spec: str) -> dict:
    from megatron_tpcomp.megatron import intercept

    gpt, tokens, positions = _setup(world_size, False)
    intercept.enable(gpt, spec, telemetry=True)
    intercept.reset_counts()
    logits = gpt(tokens, positions, attention_mask=None)
    forward_records = len(intercept.telemetry_records)
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    return {
        "forward_records": forward_records,
        "all_records": len(intercept.telemetry_records),
        "counts": dict(intercept.call_counts),
        "grads": grads,
    }


def test_backward_is_uncompressed_and_gradients_are_sound() -> None:
    stock = run_distributed(_backward, 2, "none", timeout_s=240)
    comp = run_distributed(_backward, 2, "int8:g32", timeout_s=240)
    for res in comp:
        assert res["forward_records"] == 4
        assert res["all_records"] == 4  # backward recorded nothing: it ran Megatron's own collectives
        # Backward collectives either bypass the install point (ColumnParallelLinear's dgrad all-reduce) or
        # reach it with no site: no sited call beyond the forward's.
        assert {k: v for k, v in res["counts"].items() if k[1] != "none"} == expected_counts(False)
    for name, g in stock[0]["grads"].items():
        h = comp[0]["grads"][name]
        assert torch.isfinite(h).all()
        # Forward activations differ by int8 error (~1%), so gradients differ by about as much; a gradient that
        # went through a 4-bit or corrupted collective would be far off.
        assert float((h - g).norm() / g.norm().clamp(min=1e-12)) < 0.05, name


def _mismatch(rank: int, world_size: int) -> str:
    from megatron_tpcomp.megatron import intercept

    gpt, _, _ = _setup(world_size, False)
    try:
        intercept.enable(gpt, "int8:g32" if rank == 0 else "int4:g32")
    except intercept.RankMismatchError as exc:
        return str(exc)
    return "no error"


def test_ranks_that_disagree_fail_fast_with_names() -> None:
    messages = run_distributed(_mismatch, 2, timeout_s=120)
    for message in messages:
        assert "rank 0:" in message and "rank 1:" in message
        assert "int8:g32" in message and "int4:g32" in message


def test_launcher_error_type_is_importable() -> None:
    assert issubclass(DistributedRunError, RuntimeError)


def _logits_gather(rank: int, world_size: int) -> dict:
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu()
    M.init_parallel(world_size)
    cfg = M.ModelConfig()
    torch.manual_seed(0)
    gpt = M.build_gpt_model(cfg, world_size, parallel_output=False)
    tokens = torch.randint(0, cfg.vocab_size, TOKENS, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(TOKENS[1]).unsqueeze(0).expand(TOKENS[0], -1)
    out = {}
    with torch.no_grad():
        out["stock"] = gpt(tokens, positions, attention_mask=None)
        for name, cfg_dict in (("default", {"default": "none"}), ("logits", {"logits": "int8:g32"})):
            intercept.enable(gpt, CompressionConfig.from_dict(cfg_dict), telemetry=True)
            intercept.reset_counts()
            out[name] = gpt(tokens, positions, attention_mask=None)
            out[f"{name}/counts"] = dict(intercept.call_counts)
            out[f"{name}/sites"] = sorted({site for site, _ in intercept.telemetry_records})
    intercept.disable(gpt)
    return out


def test_logits_gather_is_intercepted_and_off_by_default() -> None:
    results = run_distributed(_logits_gather, 2, timeout_s=120)
    res = results[0]
    assert res["stock"].shape == (2, 16, 128)  # gathered: full vocabulary on every rank
    expected = {**expected_counts(False), ("all_gather_last", "logits"): 1}
    assert res["default/counts"] == expected == res["logits/counts"]
    assert torch.equal(res["default"], res["stock"]) and res["default/sites"] == []  # logits uncompressed by default
    assert res["logits/sites"] == ["logits"]
    rel = float((res["logits"] - res["stock"]).norm() / res["stock"].norm())
    assert 0 < rel < 0.01, rel  # int8 g32 on the logits alone: ~0.5% relative (one quantization)
    assert torch.equal(results[1]["logits"], res["logits"])


def _check_modes(rank: int, world_size: int) -> dict:
    import os

    from megatron_tpcomp import agreement
    from megatron_tpcomp.megatron import intercept

    gpt, tokens, positions = _setup(world_size, False)
    intercept.enable(gpt, "int8:g32", telemetry=True)
    out: dict = {}
    with torch.no_grad():
        for mode in ("first", "always", "off"):
            os.environ[intercept.CHECK_RANKS_ENV] = mode
            before = agreement.exchange_count()
            intercept.reset_counts()
            for _ in range(2):
                gpt(tokens, positions, attention_mask=None)
            out[mode] = (agreement.exchange_count() - before, len(intercept.telemetry_records))
        os.environ[intercept.CHECK_RANKS_ENV] = "sometimes"
        try:
            gpt(tokens, positions, attention_mask=None)
            out["bad"] = "no error"
        except Exception as exc:  # ConfigError, raised on every rank before any communication
            out["bad"] = f"{type(exc).__name__}: {exc}"
    intercept.disable(gpt)
    return out


def test_check_ranks_env_modes_reach_the_collectives() -> None:
    for res in run_distributed(_check_modes, 2, timeout_s=120):
        # 4 compressed all-reduces per forward (2 layers x attention, mlp), one shape and one codec object: the
        # default checks that fingerprint once, at its first use; always checks all 8 calls; off none.
        assert res["first"] == (1, 8)
        assert res["always"] == (8, 8)
        assert res["off"] == (0, 8)
        assert res["bad"].startswith("ConfigError: TPCOMP_CHECK_RANKS='sometimes'"), res["bad"]


def _hooked(rank: int, world_size: int) -> dict:
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept

    gpt, tokens, positions = _setup(world_size, False)
    seen: list[tuple[str, str, bool]] = []
    order: list[str] = []

    def outer(call: intercept.Dispatch, proceed) -> torch.Tensor:
        order.append("outer")
        return proceed()

    def record(call: intercept.Dispatch, proceed) -> torch.Tensor:
        order.append("record")
        out = proceed()
        seen.append((call.op, str(call.site), call.stats is not None))
        return out

    with torch.no_grad():
        stock = gpt(tokens, positions, attention_mask=None)
        config = {"default": "int8:g32", "layers": {"0": {"mlp": "none"}}}
        intercept.enable(gpt, CompressionConfig.from_dict(config), telemetry=True)
        intercept.reset_counts()
        with intercept.dispatch_hook(outer), intercept.dispatch_hook(record):
            hooked = gpt(tokens, positions, attention_mask=None)
        counts = dict(intercept.call_counts)
        after = len(seen)
        intercept.reset_counts()
        unhooked = gpt(tokens, positions, attention_mask=None)
        intercept.disable(gpt)
    return {
        "seen": seen,
        "order": order,
        "counts": counts,
        "after": after,
        "late": len(seen) - after,
        "hooks_left": len(intercept._dispatch_hooks),
        "same": torch.equal(hooked, unhooked),
        "changed": not torch.equal(hooked, stock),
    }


def test_dispatch_hook_sees_every_collective_and_is_removed() -> None:
    res = run_distributed(_hooked, 2, timeout_s=120)[0]
    # One call per intercepted collective, with its op and site; stats only where a codec compressed it.
    calls = dict(collections.Counter((op, site) for op, site, _ in res["seen"]))
    assert calls == res["counts"] == expected_counts(False)
    compressed = {site for _, site, has_stats in res["seen"] if has_stats}
    assert compressed == {"layer0.attention", "layer1.attention", "layer1.mlp"}  # embedding: no codec by default
    assert res["order"] == ["outer", "record"] * len(res["seen"])  # first installed is outermost
    assert res["late"] == 0 and res["hooks_left"] == 0  # removed when the block ends
    assert res["same"] and res["changed"]  # the hook does not change the numbers; the codec does
