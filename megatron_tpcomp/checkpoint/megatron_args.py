"""Checkpoints that describe themselves to Megatron-LM: its ``args`` in every shard, a ``tokenizer_config.json``,
and the exact Megatron-LM flag line (``tpcomp megatron-args CKPT``).

Megatron-LM's ``load_checkpoint`` reads our shards as they are (format ``torch``), but takes the architecture
from its command line and loads with ``strict=False``: a wrong or missing flag (``--rotary-base``) still
"successfully loads" and generates other text. So every shard also holds what Megatron-LM saves itself:

- ``args``: an ``argparse.Namespace`` with the architecture under Megatron-LM's argument names (what
  ``--use-checkpoint-args`` reads: ``checkpointing.load_args_from_checkpoint``), and ``iteration`` (0, a release);
- beside ``tokenizer.json``, a ``tokenizer_config.json`` naming the BOS/EOS/PAD tokens, so Megatron's Hugging
  Face tokenizer (``--tokenizer-type HuggingFaceTokenizer --tokenizer-model CKPT``) has an end-of-document id.

Megatron-LM's ``--use-checkpoint-args`` does not restore ``norm_epsilon`` (nor the tokenizer path, which is
machine-specific and deliberately not recorded): :func:`flag_line` always prints both, and
:func:`mismatches` (used by ``python -m megatron_tpcomp.megatron_lm`` before the model is built) reports every
architecture field where Megatron's parsed arguments disagree with the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_tpcomp.megatron.model import ModelConfig

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
#: Megatron-LM's default ``--make-vocab-size-divisible-by``; lowered when the padded vocabulary would differ.
MEGATRON_VOCAB_MULTIPLE = 128
#: Flags without which Megatron-LM's scripts do not run on a machine without CUDA (fused kernels, Transformer
#: Engine and Apex are CUDA-only); ``tpcomp megatron-args --cpu`` appends them.
CPU_FLAGS = (
    "--transformer-impl local",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
)
#: Relative tolerance of float fields in :func:`mismatches`: the recorded value went through float32 (a GGUF's
#: ``9.999999747e-06`` is the ``1e-05`` a user types).
FLOAT_RTOL = 1e-6


def vocab_multiple(vocab_size: int, tp_size: int) -> int:
    """``--make-vocab-size-divisible-by`` value that makes Megatron pad ``vocab_size`` by nothing at TP size
    ``tp_size`` (Megatron pads to a multiple of this value times TP); the checkpoint's rows are not padded."""
    if vocab_size % tp_size:
        raise ValueError(f"vocab_size {vocab_size} is not divisible by TP size {tp_size}")
    return math.gcd(vocab_size // tp_size, MEGATRON_VOCAB_MULTIPLE)


def megatron_args(cfg: ModelConfig, tp_size: int, dtype: str) -> argparse.Namespace:
    """Megatron-LM's ``args`` for a checkpoint of ``cfg`` sharded for ``tp_size`` ranks and stored in ``dtype``
    (``float32``/``bfloat16``). Plain values only (int, float, str, bool, None): a shard stays loadable with
    ``torch.load(weights_only=True)`` once ``argparse.Namespace`` is an allowed global (Megatron-LM registers
    it; :func:`safe_globals` here)."""
    rotary_base: int | float = cfg.rotary_base
    if float(rotary_base).is_integer():
        rotary_base = int(rotary_base)  # Megatron-LM's --rotary-base is type=int
    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_sequence_length,
        seq_length=cfg.max_sequence_length,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rotary_percent=1.0,
        rotary_interleaved=False,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_epsilon,
        apply_layernorm_1p=False,
        swiglu=True,
        squared_relu=False,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        padded_vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=vocab_multiple(cfg.vocab_size, tp_size),
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=None,  # a path on the converting machine: never right elsewhere, so not recorded
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        num_experts=None,
        ckpt_format="torch",
        bf16=dtype == "bfloat16",
        fp16=False,
        iteration=0,
    )


def shard_extras(cfg: ModelConfig, tp_size: int, dtype: str) -> dict[str, Any]:
    """What a shard holds besides ``model`` and ``checkpoint_version``: ``args`` and ``iteration`` (0: release)."""
    return {"args": megatron_args(cfg, tp_size, dtype), "iteration": 0}


def safe_globals() -> Any:
    """Context manager allowing ``argparse.Namespace`` in ``torch.load(weights_only=True)`` (nothing else)."""
    import torch

    return torch.serialization.safe_globals([argparse.Namespace])


def tokenizer_config(tokenizer_json: str, ids: Mapping[str, int | None]) -> dict[str, Any] | None:
    """``tokenizer_config.json`` contents for a ``tokenizers`` JSON and its ``{"bos_id", "eos_id"}``: the
    special tokens by text (how transformers' ``AutoTokenizer`` reads them), PAD = EOS. None without an EOS.

    Raises:
        ValueError: an id that is not in the tokenizer's vocabulary.
    """
    from tokenizers import Tokenizer

    eos = ids.get("eos_id")
    if eos is None:
        return None
    tk = Tokenizer.from_str(tokenizer_json)
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, token_id in (("bos_token", ids.get("bos_id")), ("eos_token", eos), ("pad_token", eos)):
        if token_id is None:
            continue
        text = tk.id_to_token(int(token_id))
        if text is None:
            raise ValueError(f"{role} id {token_id} is not in the tokenizer (vocabulary of {tk.get_vocab_size()})")
        out[role] = text
    return out


def write_tokenizer_config(directory: Path, tokenizer_json: str, ids: Mapping[str, int | None]) -> Path | None:
    """Write :func:`tokenizer_config` into ``directory`` (nothing without an EOS id); returns the path."""
    data = tokenizer_config(tokenizer_json, ids)
    if data is None:
        return None
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _num(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def flag_line(cfg: ModelConfig, tp_size: int, dtype: str, ckpt: str | Path, *, cpu: bool = False) -> list[str]:
    """The Megatron-LM flags that build this checkpoint's model and load it (and its tokenizer), in order."""
    ns = megatron_args(cfg, tp_size, dtype)
    flags = [
        f"--load {ckpt}",
        f"--tensor-model-parallel-size {tp_size}",
        f"--num-layers {ns.num_layers}",
        f"--hidden-size {ns.hidden_size}",
        f"--ffn-hidden-size {ns.ffn_hidden_size}",
        f"--num-attention-heads {ns.num_attention_heads}",
    ]
    if ns.group_query_attention:
        flags += ["--group-query-attention", f"--num-query-groups {ns.num_query_groups}"]
    flags += [
        f"--kv-channels {ns.kv_channels}",
        f"--max-position-embeddings {ns.max_position_embeddings}",
        f"--seq-length {ns.seq_length}",
        "--position-embedding-type rope",
        f"--rotary-base {_num(ns.rotary_base)}",
        "--normalization RMSNorm",
        f"--norm-epsilon {ns.norm_epsilon!r}",
        "--swiglu",
        "--disable-bias-linear",
    ]
    if ns.add_qkv_bias:
        flags.append("--add-qkv-bias")
    if ns.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    flags += [
        f"--make-vocab-size-divisible-by {ns.make_vocab_size_divisible_by}",
        "--tokenizer-type HuggingFaceTokenizer",
        f"--tokenizer-model {ckpt}",
    ]
    if ns.bf16:
        flags.append("--bf16")
    if cpu:
        flags += list(CPU_FLAGS)
    return flags


#: Architecture fields compared by :func:`mismatches` (Megatron-LM argument names).
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "normalization",
    "norm_epsilon",
    "swiglu",
    "add_bias_linear",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
    "padded_vocab_size",
    "tensor_model_parallel_size",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def mismatches(recorded: argparse.Namespace, given: argparse.Namespace) -> list[str]:
    """Where Megatron-LM's parsed arguments ``given`` disagree with the checkpoint's ``recorded`` architecture:
    one ``"--flag X (checkpoint: Y)"`` per field (empty: they agree). ``num_query_groups`` counts only with
    grouped-query attention (Megatron uses the head count otherwise); ``kv_channels`` None means
    hidden/heads; a field ``given`` lacks or leaves None (a Megatron-LM without it, or not yet computed) is
    not compared."""
    out = []
    for name in ARCH_FIELDS:
        want = getattr(recorded, name, None)
        got = getattr(given, name, None)
        if name == "num_query_groups" and not getattr(given, "group_query_attention", False):
            got = getattr(given, "num_attention_heads", None)
        if name == "kv_channels" and got is None and getattr(given, "num_attention_heads", None):
            got = given.hidden_size // given.num_attention_heads
        if want is None or got is None:
            continue
        if isinstance(want, float) or isinstance(got, float):
            same = math.isclose(float(want), float(got), rel_tol=FLOAT_RTOL)
        else:
            same = want == got
        if not same:
            out.append(f"{_flag(name)} {got!r} (checkpoint: {want!r})")
    return out
