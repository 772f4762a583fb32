"""Build megatron-core GPT models (local layer spec) for tests, demos and converted checkpoints.

Llama-style architecture: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, tied or untied
embeddings. Everything runs with megatron-core's own layers; on CPU call :func:`cpu.enable_cpu` first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model (what a converted checkpoint records)."""

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

    def to_dict(self) -> dict:
        return asdict(self)


def init_parallel(tp_size: int) -> None:
    """Initialise megatron's parallel state for TP over an already-initialised torch.distributed world."""
    from megatron.core import parallel_state

    if dist.get_world_size() % tp_size:
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by TP size {tp_size}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def transformer_config(
    cfg: ModelConfig, tp_size: int, sequence_parallel: bool = False, dtype: torch.dtype = torch.float32
):
    """megatron-core TransformerConfig for ``cfg`` with every fusion off (CPU-safe, numerics exact)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def build_gpt_model(
    cfg: ModelConfig,
    tp_size: int,
    sequence_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
    parallel_output: bool = True,
) -> torch.nn.Module:
    """A megatron-core GPTModel with the local layer spec, on CPU (parallel state must be initialised).

    ``parallel_output=False`` gathers the vocab-parallel logits on every rank ([b, s, vocab] instead of
    [b, s, vocab/TP]): one more TP collective per forward.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(cfg, tp_size, sequence_parallel, dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        parallel_output=parallel_output,
    )
    return model.to(dtype).eval()
