"""Build megatron-core GPT models (local layer spec) and load the same weights at any tensor-parallel size.

Llama-style architecture with megatron-core's own layers: RMSNorm, SwiGLU, RoPE, grouped-query attention, no
biases (except optional query/key/value biases, as in Qwen2), tied or untied embeddings, every fusion off
(CPU-safe, numerically plain). On a machine without CUDA call :func:`megatron_tpcomp.megatron.cpu.enable_cpu` first.

Same weights at TP=1 and TP=N: build the TP=1 model (``seed=``), take its ``state_dict()`` and give every TP=N
rank :func:`shard_state_dict` of it (:func:`load_full_state_dict` does both). Megatron's layouts, checked in the
megatron-core source (``transformer/attention.py``, ``transformer/mlp.py``, ``tensor_parallel/layers.py``):

- ``linear_qkv.weight`` ``[ng * (np/ng + 2) * hn, h]``: per query group ``g``, the group's ``np/ng`` query heads,
  then its key head, then its value head (``q1 q2 k1 v1 | q3 q4 k2 v2 | ...``). Column-parallel: a contiguous
  split along dim 0 gives each rank whole groups (or, when TP > ng, a slice of one group that Megatron
  all-gathers and re-slices). :func:`fuse_qkv` / :func:`split_qkv` convert from/to separate q, k, v.
- ``linear_fc1.weight`` (SwiGLU) ``[2 * ffn, h]`` = ``[gate; up]`` on TP=1, but each rank holds
  ``[gate_r; up_r]`` (``glu`` chunks the local output in two; Megatron builds fc1 with ``stride=2``): gate and up
  are split separately and re-concatenated per rank.
- ``linear_proj.weight``, ``linear_fc2.weight``: row-parallel, split along dim 1.
- ``embedding.word_embeddings.weight``, ``output_layer.weight``: vocab-parallel, split along dim 0.
- norms: replicated.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model (what a converted checkpoint records).

    Attributes:
        num_layers: transformer layers.
        hidden_size: ``h``.
        num_attention_heads: query heads ``np``; head dim ``hn = h / np``.
        num_query_groups: key/value heads ``ng`` (GQA); ``np`` must be a multiple.
        ffn_hidden_size: SwiGLU inner size (each of gate and up).
        vocab_size: embedding rows; must be divisible by the TP size (no padding is added).
        max_sequence_length: positions the model is built for.
        rotary_base: RoPE theta.
        norm_epsilon: RMSNorm epsilon.
        tie_embeddings: output layer shares the input embedding.
        qkv_bias: the query/key/value projections have biases (Qwen2); no other linear has one.
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 8
    num_query_groups: int = 4  # GQA, divisible by TP 1, 2 and 4
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    max_sequence_length: int = 128
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} not divisible by num_query_groups "
                f"{self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are an error (a misspelt key must not silently use a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def check_tp(self, tp_size: int) -> None:
        """Raise ValueError if this model cannot be split ``tp_size`` ways."""
        problems = []
        for name in ("num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) % tp_size:
                problems.append(f"{name}={getattr(self, name)}")
        ng = self.num_query_groups
        if ng % tp_size and tp_size % ng:
            problems.append(f"num_query_groups={ng} (needs ng % TP == 0 or TP % ng == 0)")
        if problems:
            raise ValueError(f"TP size {tp_size} does not divide: {', '.join(problems)}")


def as_model_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)


# --------------------------------------------------------------------------------------------- parallel state


def init_parallel(tp_size: int, seed: int = 1234) -> None:
    """Initialise megatron's parallel state with TP size ``tp_size`` inside the already-initialised default
    torch.distributed group (gloo on CPU); data parallel takes the rest of the world.

    Also seeds megatron's RNG tracker (``model_parallel_cuda_manual_seed``; on CPU this needs
    :func:`~megatron_tpcomp.megatron.cpu.enable_cpu`).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs an initialised torch.distributed process group")
    if dist.get_world_size() % tp_size:
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by TP size {tp_size}")
    kwargs: dict[str, Any] = {"tensor_model_parallel_size": tp_size}
    # The default group is already gloo on CPU: a second set of gloo groups would only cost start-up time.
    if "create_gloo_process_groups" in inspect.signature(parallel_state.initialize_model_parallel).parameters:
        kwargs["create_gloo_process_groups"] = False
    parallel_state.initialize_model_parallel(**kwargs)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Undo :func:`init_parallel` (the default torch.distributed group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _current_tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


# ---------------------------------------------------------------------------------------------------- models


def transformer_config(
    cfg: ModelConfig | Mapping[str, Any],
    tp_size: int | None = None,
    sequence_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """megatron-core ``TransformerConfig`` for ``cfg`` with every fusion off (CPU-safe, numerics plain).

    ``tp_size`` defaults to the initialised parallel state's TP size.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = as_model_config(cfg)
    tp_size = _current_tp_size() if tp_size is None else tp_size
    cfg.check_tp(tp_size)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU = GLU with silu
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Weights are built as full master weights on the CPU and sliced: the same seed gives the same model at
        # any TP size, and no CUDA RNG is touched.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,  # needs a CUDA extension
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def build_gpt_model(
    cfg: ModelConfig | Mapping[str, Any],
    tp_size: int | None = None,
    *,
    sequence_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
    parallel_output: bool = True,
    seed: int | None = None,
) -> torch.nn.Module:
    """A megatron-core ``GPTModel`` with the local layer spec, in eval mode (parallel state must be initialised).

    Args:
        cfg: a :class:`ModelConfig` or a mapping of its fields.
        tp_size: defaults to the parallel state's TP size.
        sequence_parallel: activations between TP regions are split along the sequence ([s/TP, b, h]).
        dtype: float32 or bfloat16 parameters.
        parallel_output: True: logits stay vocab-parallel, ``[b, s, vocab/TP]``; False: gathered on every rank,
            ``[b, s, vocab]`` (one more TP collective per forward).
        seed: seed of the CPU initialisation (the caller's RNG state is left untouched); None draws from the
            current CPU RNG.

    Forward: ``model(input_ids [b, s], position_ids [b, s], attention_mask=None)`` (causal) -> logits.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = as_model_config(cfg)
    config = transformer_config(cfg, tp_size, sequence_parallel, dtype)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_sequence_length,
            position_embedding_type="rope",
            rotary_base=cfg.rotary_base,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            parallel_output=parallel_output,
        )
    # Norm weights are created in fp32 by torch; Megatron's Float16Module casts the whole module the same way.
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------- weight layout


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Separate projections -> Megatron's fused ``linear_qkv`` rows (weights or biases).

    Args:
        q: ``[np * hn, ...]`` query rows, heads in order (Hugging Face ``q_proj`` layout).
        k: ``[ng * hn, ...]``; v: ``[ng * hn, ...]``.

    Returns:
        ``[ng * (np/ng + 2) * hn, ...]``: for each group, its ``np/ng`` query heads, its key head, its value head.
    """
    ng, hn = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // ng
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(ng, per * hn, *rest), k.reshape(ng, hn, *rest), v.reshape(ng, hn, *rest)], dim=1
    )  # [ng, (per + 2) * hn, ...]
    return grouped.reshape(ng * (per + 2) * hn, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``[ng * (np/ng + 2) * hn, ...]`` -> q ``[np * hn, ...]``, k, v
    ``[ng * hn, ...]``."""
    ng, hn = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // ng
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (per + 2) * hn, *rest)
    q, k, v = torch.split(grouped, [per * hn, hn, hn], dim=1)
    return q.reshape(ng * per * hn, *rest), k.reshape(ng * hn, *rest), v.reshape(ng * hn, *rest)


def _chunk(t: torch.Tensor, dim: int, tp_rank: int, tp_size: int, key: str) -> torch.Tensor:
    if t.shape[dim] % tp_size:
        raise ValueError(f"{key}: dim {dim} of shape {tuple(t.shape)} is not divisible by TP size {tp_size}")
    return t.chunk(tp_size, dim=dim)[tp_rank].clone()


def _shard_one(key: str, t: Any, tp_rank: int, tp_size: int) -> Any:
    """The TP rank's slice of one full (TP=1) state-dict entry; see the module docstring for the layouts."""
    if key.endswith("_extra_state") or not isinstance(t, torch.Tensor):
        return t
    *path, param = key.split(".")
    module = path[-1] if path else ""
    if "norm" in module or param.startswith("layer_norm_"):
        return t.clone()  # RMSNorm weights (separate, or fused into a TE linear): replicated
    if module in ("word_embeddings", "output_layer"):
        return _chunk(t, 0, tp_rank, tp_size, key)  # vocab-parallel: [vocab/TP, h]
    if module == "linear_qkv":
        return _chunk(t, 0, tp_rank, tp_size, key)  # groups are contiguous in dim 0
    if module == "linear_fc1":
        gate, up = t.chunk(2, dim=0)  # [gate; up], each [ffn, h]
        return torch.cat(
            [_chunk(gate, 0, tp_rank, tp_size, key), _chunk(up, 0, tp_rank, tp_size, key)], dim=0
        )  # [2 * ffn/TP, h] = [gate_r; up_r]
    if module in ("linear_proj", "linear_fc2"):
        if param == "bias":
            return t.clone()  # row-parallel bias is added once, after the all-reduce
        return _chunk(t, 1, tp_rank, tp_size, key)  # [h, in/TP]
    raise ValueError(f"shard_state_dict: no tensor-parallel rule for {key!r} (shape {tuple(t.shape)})")


def shard_state_dict(
    full_sd: Mapping[str, Any], tp_rank: int, tp_size: int, cfg: ModelConfig | Mapping[str, Any]
) -> dict[str, Any]:
    """The state dict of TP rank ``tp_rank`` of ``tp_size``, from the state dict of the TP=1 model.

    Args:
        full_sd: ``state_dict()`` of a TP=1 model built by :func:`build_gpt_model` (same config).
        tp_rank: 0 .. tp_size-1.
        tp_size: tensor-parallel size.
        cfg: the model config (checked against ``tp_size``).

    Returns:
        A new dict with the same keys; sharded tensors are copies (the full ones are never aliased).

    Raises:
        ValueError: a key without a known rule, or a dimension not divisible by ``tp_size``.
    """
    cfg = as_model_config(cfg)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for TP size {tp_size}")
    cfg.check_tp(tp_size)
    return {key: _shard_one(key, t, tp_rank, tp_size) for key, t in full_sd.items()}


def load_full_state_dict(model: torch.nn.Module, full_sd: Mapping[str, Any], cfg: ModelConfig | Mapping) -> None:
    """Load the TP=1 state dict ``full_sd`` into ``model`` (this rank's shard of it; strict)."""
    from megatron.core import parallel_state

    shard = shard_state_dict(
        full_sd,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        cfg,
    )
    model.load_state_dict(shard, strict=True)


def merge_shards(shards: list[Mapping[str, Any]], cfg: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`shard_state_dict`: the TP=1 state dict from the state dicts of all ``len(shards)`` ranks.

    Args:
        shards: rank 0 .. TP-1 state dicts of one model (same keys).
        cfg: the model config.

    Returns:
        The full state dict; replicated tensors (norms, row-parallel biases) are taken from rank 0 after checking
        that every rank holds the same values (a mismatch means the shards are not of one model).

    Raises:
        ValueError: shards with different keys, an unknown key, or replicated tensors that differ.
    """
    cfg = as_model_config(cfg)
    tp = len(shards)
    if tp == 0:
        raise ValueError("merge_shards: no shards given")
    keys = list(shards[0])
    for r, sd in enumerate(shards[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ValueError(f"merge_shards: rank {r} has different keys than rank 0 (e.g. {diff})")
    full: dict[str, Any] = {}
    for key in keys:
        parts = [sd[key] for sd in shards]
        t = parts[0]
        if key.endswith("_extra_state") or not isinstance(t, torch.Tensor):
            full[key] = t
            continue
        *path, param = key.split(".")
        module = path[-1] if path else ""
        replicated = "norm" in module or param.startswith("layer_norm_")
        replicated |= module in ("linear_proj", "linear_fc2") and param == "bias"
        if replicated:
            for r, p in enumerate(parts[1:], start=1):
                if not torch.equal(p, t):
                    raise ValueError(f"merge_shards: replicated tensor {key!r} differs between rank 0 and rank {r}")
            full[key] = t.clone()
        elif module in ("word_embeddings", "output_layer", "linear_qkv"):
            full[key] = torch.cat(parts, dim=0)
        elif module == "linear_fc1":
            gates, ups = zip(*(p.chunk(2, dim=0) for p in parts), strict=True)
            full[key] = torch.cat([*gates, *ups], dim=0)
        elif module in ("linear_proj", "linear_fc2"):
            full[key] = torch.cat(parts, dim=1)
        else:
            raise ValueError(f"merge_shards: no tensor-parallel rule for {key!r} (shape {tuple(t.shape)})")
    return full
