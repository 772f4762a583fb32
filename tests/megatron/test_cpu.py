"""megatron-core on CPU over gloo: the CPU enablement is explicit, exact to undo and idempotent; TP=2 and TP=4
forwards of the same weights (sharded from a TP=1 state dict) equal the TP=1 forward, with and without sequence
parallelism; the static inference engine generates the same greedy tokens at TP=2 as at TP=1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from megatron_tpcomp.launch import run_distributed
from megatron_tpcomp.megatron.generate import ByteTokenizer
from megatron_tpcomp.megatron.model import ModelConfig, fuse_qkv, shard_state_dict, split_qkv

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU enablement refuses to run where CUDA is available"),
]

CFG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,  # GQA; at TP=4 each rank holds half a group (Megatron's TP > ng path)
    ffn_hidden_size=128,
    vocab_size=128,
    max_sequence_length=64,
)
UNTIED = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": False})
CONFIGS = {True: CFG, False: UNTIED}  # by tie_embeddings
SEED = 7
BATCH, SEQ = 2, 16
PROMPTS = ["The state of the union", "is strong", "tensor parallel"]
NEW_TOKENS = 8
# fp32 tolerance. TP changes only the order of fp32 sums: the split matmuls' partial sums are added by the
# all-reduce instead of inside one GEMM (and softmax/norms are computed identically on replicated data). Each
# reordered sum of ~64-128 products of O(1) values differs by a few ulps (~1e-7 relative); the logits here are
# O(0.1-1), so differences are ~1e-7 (measured: at most 2.4e-7 at TP=2 and TP=4), 40x below the bound.
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ rank workers


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))  # [b, s]
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)  # [b, s]
    return tokens, position_ids


def _full_logits(model: torch.nn.Module) -> torch.Tensor:
    """Forward on the fixed batch; vocab-parallel logits [b, s, vocab/TP] gathered to [b, s, vocab] (fp32)."""
    import torch.distributed as dist

    tokens, position_ids = _inputs()
    with torch.no_grad():
        logits = model(tokens, position_ids, attention_mask=None).float().contiguous()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, logits)
    return torch.cat(parts, dim=-1)


def _static_engine(model: torch.nn.Module, max_seq_len: int = 64) -> Any:
    """megatron-core's ``StaticInferenceEngine(legacy=True)`` around ``model`` (both inference APIs)."""
    from megatron_tpcomp.megatron.generate import build_static_engine

    return build_static_engine(
        model, ByteTokenizer(), vocab_size=CFG.vocab_size, max_batch=len(PROMPTS), max_seq_len=max_seq_len
    )


def _greedy_tokens(model: torch.nn.Module) -> list[list[int]]:
    """Greedy continuations of PROMPTS by the static inference engine; ``model`` is the untied model.

    With the default init (std 0.02) the logits are nearly flat, and a tied model with larger embeddings just
    repeats its last token; a 30x larger output layer of an untied model makes the greedy choice depend on the
    context (measured: 15 distinct tokens among 18), so equal tokens at TP=1 and TP=2 mean something.
    """
    from megatron.core.inference.sampling_params import SamplingParams

    with torch.no_grad():
        model.output_layer.weight.mul_(30.0)
    engine = _static_engine(model)
    params = SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=NEW_TOKENS)  # top-1: greedy
    results = engine.generate(prompts=PROMPTS, sampling_params=params)
    return [[int(t) for t in r.generated_tokens] for r in results]


def _reference(rank: int, world_size: int) -> dict[str, Any]:
    """TP=1: build both models from SEED, return their state dicts, logits and layout/bf16 checks."""
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu()
    M.init_parallel(1)
    out: dict[str, Any] = {}
    for tied in (True, False):
        cfg = CONFIGS[tied]
        gpt = M.build_gpt_model(cfg, seed=SEED)
        sd = gpt.state_dict()
        out[f"sd/{tied}"] = sd
        out[f"logits/{tied}"] = _full_logits(gpt)
        out[f"shard_tp1_is_identity/{tied}"] = all(
            v is None or torch.equal(v, sd[k]) for k, v in shard_state_dict(sd, 0, 1, cfg).items()
        )
    # Megatron's own split of linear_qkv agrees with split_qkv's layout (per group: q heads, k, v).
    attn = gpt.decoder.layers[0].self_attention
    x = torch.randn(SEQ, BATCH, CFG.hidden_size, generator=torch.Generator().manual_seed(2))  # [s, b, h]
    with torch.no_grad():
        q_m, k_m, v_m = attn.get_query_key_value_tensors(x, None)[:3]  # [s, b, np|ng, hn]
        wq, wk, wv = split_qkv(attn.linear_qkv.weight, CFG)
        hn = CFG.head_dim
        out["qkv_layout_err"] = max(
            float((q_m - (x @ wq.T).view(SEQ, BATCH, -1, hn)).abs().max()),
            float((k_m - (x @ wk.T).view(SEQ, BATCH, -1, hn)).abs().max()),
            float((v_m - (x @ wv.T).view(SEQ, BATCH, -1, hn)).abs().max()),
        )
    # bf16 builds and runs (norms and embeddings cast like Megatron's Float16Module does).
    gpt16 = M.build_gpt_model(CFG, dtype=torch.bfloat16)
    M.load_full_state_dict(gpt16, out["sd/True"], CFG)
    out["logits_bf16"] = _full_logits(gpt16)
    gpt = M.build_gpt_model(UNTIED)
    M.load_full_state_dict(gpt, out["sd/False"], UNTIED)
    out["tokens"] = _greedy_tokens(gpt)
    M.destroy_parallel()
    cpu.disable_cpu()
    return out


def _tensor_parallel(rank: int, world_size: int, sds: dict[bool, dict], with_generation: bool) -> dict[str, Any]:
    """TP=world_size: load the TP=1 weights sharded, forward with and without SP; optionally generate."""
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu()
    M.init_parallel(world_size)
    out: dict[str, Any] = {}
    for tied in (True, False):
        cfg = CONFIGS[tied]
        for sp in (False, True):
            gpt = M.build_gpt_model(cfg, sequence_parallel=sp)
            M.load_full_state_dict(gpt, sds[tied], cfg)
            out[f"logits/{tied}/{sp}"] = _full_logits(gpt)
        # Independent check of the sharding rules: Megatron's CPU initialisation builds each full master weight
        # from the same RNG stream and slices it itself (fc1 with stride 2), so the same seed must give exactly
        # the shards shard_state_dict cuts from the TP=1 weights.
        own = M.build_gpt_model(cfg, seed=SEED).state_dict()
        ours = shard_state_dict(sds[tied], rank, world_size, cfg)
        out[f"init_mismatch/{tied}"] = sorted(
            k for k, v in own.items() if isinstance(v, torch.Tensor) and not torch.equal(v, ours[k])
        )
    if with_generation:
        gpt = M.build_gpt_model(UNTIED)
        M.load_full_state_dict(gpt, sds[False], UNTIED)
        out["tokens"] = _greedy_tokens(gpt)
    M.destroy_parallel()
    cpu.disable_cpu()
    return out


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return run_distributed(_reference, 1, timeout_s=180)[0]


@pytest.fixture(scope="module")
def tp_results(reference: dict[str, Any]) -> Callable[[int], list[dict[str, Any]]]:
    """``get(tp)``: the per-rank results of one TP=tp run (memoised: each TP size is spawned once)."""
    cache: dict[int, list[dict[str, Any]]] = {}
    sds = {tied: reference[f"sd/{tied}"] for tied in (True, False)}

    def get(tp: int) -> list[dict[str, Any]]:
        if tp not in cache:
            cache[tp] = run_distributed(_tensor_parallel, tp, sds, tp == 2, timeout_s=240)
        return cache[tp]

    return get


@pytest.fixture(params=[2, 4], ids=["tp2", "tp4"])
def tp_run(request: pytest.FixtureRequest, tp_results: Callable) -> tuple[int, list[dict[str, Any]]]:
    return request.param, tp_results(request.param)


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_tp_logits_equal_tp1(reference: dict, tp_run: tuple[int, list[dict]], tied: bool, sp: bool) -> None:
    tp, ranks = tp_run
    expected = reference[f"logits/{tied}"]
    assert expected.shape == (BATCH, SEQ, CFG.vocab_size)
    for rank, result in enumerate(ranks):
        got = result[f"logits/{tied}/{sp}"]
        assert got.shape == expected.shape
        err = float((got - expected).abs().max())
        assert err <= ATOL, f"TP={tp} rank {rank}: max |logits - TP1 logits| = {err:.3g}"
    assert float(expected.abs().max()) > 0.05  # the bound is meaningful relative to the logits' size


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_shards_equal_megatron_own_initialisation(tp_run: tuple[int, list[dict]], tied: bool) -> None:
    _, ranks = tp_run
    for rank, result in enumerate(ranks):
        assert result[f"init_mismatch/{tied}"] == [], f"rank {rank}"


def test_reference_checks(reference: dict) -> None:
    assert reference["shard_tp1_is_identity/True"] and reference["shard_tp1_is_identity/False"]
    assert reference["qkv_layout_err"] < 1e-5
    # bf16 (8-bit mantissa) through 2 layers: ~1% of the logit scale.
    scale = float(reference["logits/True"].abs().max())
    assert float((reference["logits_bf16"] - reference["logits/True"]).abs().max()) < 0.05 * scale


def test_static_engine_greedy_tp2_equals_tp1(reference: dict, tp_results: Callable) -> None:
    expected = reference["tokens"]
    # A prompt may stop early on EOD (token 0), but most of the budget is used and the tokens vary.
    assert all(1 <= len(t) <= NEW_TOKENS for t in expected) and sum(map(len, expected)) >= 2 * NEW_TOKENS
    assert len({tok for t in expected for tok in t}) >= NEW_TOKENS, expected  # not a repeat-one-token model
    for rank, result in enumerate(tp_results(2)):
        assert result["tokens"] == expected, f"rank {rank}"


# --------------------------------------------------------------------- enable/disable (in this process)


def _raw_entries() -> dict[str, Any]:
    """The patched owners' own ``__dict__`` entries (absent -> a marker), for identity checks."""
    from megatron_tpcomp.megatron import cpu

    entries = {}
    for spec in cpu.PATCHES:
        owner, name, _ = cpu._resolve(spec)
        entries[spec.qualname] = vars(owner).get(name, "<absent>")
    return entries


# Written out, so a patch silently dropped from cpu.PATCHES fails here.
EXPECTED_PATCHES = {
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "torch.cuda.current_device",
    "megatron.core.transformer.utils.get_default_causal_mask",
    "megatron.core.fusions.fused_softmax.get_default_causal_mask",
    "megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__",
    "torch.Tensor.cuda",
    "torch.cuda.Event",
}


def test_enable_disable_restores_every_attribute_exactly(caplog: pytest.LogCaptureFixture) -> None:
    from megatron_tpcomp.megatron import cpu

    assert not cpu.cpu_enabled()
    before = _raw_entries()
    assert set(before) == EXPECTED_PATCHES
    assert before["torch.Tensor.cuda"] == "<absent>"  # inherited from TensorBase: restoring must delete ours
    with caplog.at_level(logging.INFO, logger="megatron_tpcomp"):
        handle = cpu.enable_cpu()
        patched = _raw_entries()
        again = cpu.enable_cpu()  # idempotent: nothing re-wrapped
    try:
        assert set(handle.patched) == set(handle.installed_now) == EXPECTED_PATCHES
        assert again.installed_now == () and set(again.patched) == EXPECTED_PATCHES
        assert _raw_entries() == patched and all(patched[k] is not before[k] for k in before)
        assert [r.name for r in caplog.records].count("megatron_tpcomp") == 1
        assert "patched" in caplog.records[0].getMessage()
        assert torch.cuda.current_device() == "cpu"
        from megatron.core.transformer import utils

        mask = utils.get_default_causal_mask(3)
        assert mask.device.type == "cpu"
        assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
        assert torch.ones(2).cuda().device.type == "cpu"
    finally:
        cpu.disable_cpu()
    assert not cpu.cpu_enabled()
    after = _raw_entries()
    for key, value in before.items():
        assert after[key] is value, key
    assert "cuda" not in vars(torch.Tensor)


def test_model_only_subset_and_context_manager() -> None:
    from megatron_tpcomp.megatron import cpu

    before = _raw_entries()
    with cpu.cpu_megatron(inference=False) as handle:
        assert "torch.Tensor.cuda" not in handle.patched and "torch.cuda.Event" not in handle.patched
        assert "torch.cuda.current_device" in handle.patched
        with cpu.cpu_megatron() as inner:  # adds only the inference patches, and removes only those
            assert set(inner.installed_now) == {"torch.Tensor.cuda", "torch.cuda.Event"}
        assert set(cpu.patched_attributes()) == set(handle.patched)
    assert not cpu.cpu_enabled()
    assert all(_raw_entries()[k] is v for k, v in before.items())


def test_rng_tracker_runs_on_cpu_generator() -> None:
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from megatron_tpcomp.megatron import cpu

    with cpu.cpu_megatron(inference=False):
        tracker = CudaRNGStatesTracker()
        torch.manual_seed(0)
        outer = torch.get_rng_state()
        tracker.add("model-parallel-rng", 123)
        assert torch.equal(torch.get_rng_state(), outer)  # adding a state leaves the caller's stream alone
        with tracker.fork("model-parallel-rng"):
            a = torch.rand(4)
        with tracker.fork("model-parallel-rng"):
            b = torch.rand(4)  # the tracked stream advanced: a fresh draw, not a replay
        assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(123)))  # seeded by add()
        assert not torch.equal(a, b)
        assert torch.equal(torch.get_rng_state(), outer)  # fork restores the outer state
        with pytest.raises(Exception, match="already exists"):
            tracker.add("other", 123)


def test_missing_attribute_names_it_and_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.fusions import fused_softmax

    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron.compat import MegatronCompatError, megatron_version

    before = {k: v for k, v in _raw_entries().items() if "fused_softmax" not in k}
    monkeypatch.delattr(fused_softmax, "get_default_causal_mask")
    with pytest.raises(MegatronCompatError) as info:
        cpu.enable_cpu()
    message = str(info.value)
    assert "megatron.core.fusions.fused_softmax.get_default_causal_mask" in message
    assert str(megatron_version()) in message
    assert not cpu.cpu_enabled()  # resolution happens before any patch: nothing half-installed
    monkeypatch.undo()
    assert all(_raw_entries()[k] is v for k, v in before.items())


# ---------------------------------------------------------------------- sharding rules (no processes)


def _labelled_full_sd(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A TP=1 state dict whose rows/columns carry their own index, to see where each one lands."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_query_groups * cfg.head_dim
    rows = lambda n, base: (base + torch.arange(n, dtype=torch.float32)).unsqueeze(1).expand(n, h).clone()
    return {
        "embedding.word_embeddings.weight": rows(v, 0),
        "decoder.layers.0.input_layernorm.weight": torch.arange(h, dtype=torch.float32),
        "decoder.layers.0.self_attention.linear_qkv.weight": fuse_qkv(
            rows(q_rows, 1000), rows(kv_rows, 2000), rows(kv_rows, 3000), cfg
        ),
        "decoder.layers.0.self_attention.linear_qkv._extra_state": None,
        "decoder.layers.0.self_attention.linear_proj.weight": torch.arange(q_rows).float().expand(h, q_rows).clone(),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.cat([rows(f, 4000), rows(f, 5000)]),  # [gate; up]
        "decoder.layers.0.mlp.linear_fc2.weight": torch.arange(f).float().expand(h, f).clone(),
        "decoder.final_layernorm.weight": torch.ones(h),
        "output_layer.weight": rows(v, 0),
    }


def _row_labels(sd: dict[str, torch.Tensor], key: str) -> list[int]:
    return sd[key][:, 0].long().tolist()


def test_shard_state_dict_layouts() -> None:
    full = _labelled_full_sd(CFG)
    hn, f = CFG.head_dim, CFG.ffn_hidden_size
    for r in range(2):
        sd = shard_state_dict(full, r, 2, CFG)
        # rank r holds query group r: its 2 query heads, then its k head, then its v head
        q_heads = list(range(1000 + 2 * r * hn, 1000 + 2 * (r + 1) * hn))
        assert _row_labels(sd, "decoder.layers.0.self_attention.linear_qkv.weight") == q_heads + list(
            range(2000 + r * hn, 2000 + (r + 1) * hn)
        ) + list(range(3000 + r * hn, 3000 + (r + 1) * hn))
        half = f // 2
        assert _row_labels(sd, "decoder.layers.0.mlp.linear_fc1.weight") == list(
            range(4000 + r * half, 4000 + (r + 1) * half)
        ) + list(range(5000 + r * half, 5000 + (r + 1) * half))
        assert _row_labels(sd, "embedding.word_embeddings.weight") == list(range(64 * r, 64 * (r + 1)))
        assert _row_labels(sd, "output_layer.weight") == list(range(64 * r, 64 * (r + 1)))
        assert sd["decoder.layers.0.mlp.linear_fc2.weight"][0].long().tolist() == list(range(r * half, (r + 1) * half))
        assert sd["decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 32)
        assert torch.equal(sd["decoder.final_layernorm.weight"], full["decoder.final_layernorm.weight"])
        assert sd["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
    # shards are copies: editing one never touches the full weights
    sd = shard_state_dict(full, 0, 2, CFG)
    sd["decoder.final_layernorm.weight"].zero_()
    assert full["decoder.final_layernorm.weight"].sum() == CFG.hidden_size


def test_shard_state_dict_rejects_unknown_keys_and_bad_sizes() -> None:
    full = _labelled_full_sd(CFG)
    with pytest.raises(ValueError, match="no tensor-parallel rule for 'decoder.layers.0.mystery.weight'"):
        shard_state_dict({**full, "decoder.layers.0.mystery.weight": torch.ones(2, 2)}, 0, 2, CFG)
    with pytest.raises(ValueError, match="vocab_size=128"):
        shard_state_dict(full, 0, 3, CFG)
    with pytest.raises(ValueError, match="out of range"):
        shard_state_dict(full, 2, 2, CFG)


def test_qkv_fuse_split_round_trip_and_config_from_dict() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(CFG.num_attention_heads * CFG.head_dim, 5, generator=g)
    k, v = (torch.randn(CFG.num_query_groups * CFG.head_dim, 5, generator=g) for _ in range(2))
    for a, b in zip(split_qkv(fuse_qkv(q, k, v, CFG), CFG), (q, k, v), strict=True):
        assert torch.equal(a, b)
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**CFG.to_dict(), "hiden_size": 3})
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(num_attention_heads=6, num_query_groups=4, hidden_size=48)
