"""Stand-in for Megatron-LM's root ``gpt_builders.py`` (see ``__init__.py`` of this directory): dense GPT models
only."""

from __future__ import annotations

import argparse
from typing import Any

#: Arguments whose models this stand-in does not build (a full Megatron-LM checkout does).
UNSUPPORTED = (
    "use_legacy_models",
    "spec",
    "yaml_cfg",
    "num_experts",
    "mtp_num_layers",
    "heterogeneous_layers_config_path",
    "experimental_attention_variant",
    "multi_latent_attention",
)


def gpt_builder(
    args: argparse.Namespace,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> Any:
    """A megatron-core GPTModel from Megatron-LM's arguments (local or Transformer Engine layer spec)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training.arguments import core_transformer_config_from_args

    used = [name for name in UNSUPPORTED if getattr(args, name, None)]
    if used:
        raise NotImplementedError(
            f"megatron-tpcomp's stand-in gpt_builders builds dense GPT models only; --{used[0].replace('_', '-')} "
            "needs Megatron-LM's own gpt_builders.py: run from a full Megatron-LM checkout (MEGATRON_LM_DIR)"
        )
    if config is None:
        config = core_transformer_config_from_args(args)
    if args.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
