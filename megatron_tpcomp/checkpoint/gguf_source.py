"""GGUF (llama.cpp) Llama-family models -> Hugging Face layout tensors, model config and tokenizer.

How a GGUF differs from the Hugging Face layout:

- Tensor names: ``token_embd``, ``blk.{i}.attn_{q,k,v,output}``, ``blk.{i}.ffn_{gate,up,down}``,
  ``blk.{i}.attn_norm``, ``blk.{i}.ffn_norm``, ``output_norm``, ``output`` (absent when tied).
- Quantized tensors (Q4_1, Q8_0, ...) are dequantized with ``gguf.quants.dequantize`` to fp32.
- llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` within each head from the "rotate half"
  order (first half of the head dim, then second half) to interleaved pairs, for llama.cpp's RoPE. Undone here:
  per head, rows ``[i0, j0, i1, j1, ...]`` -> ``[i0, i1, ..., j0, j1, ...]``.
- The tokenizer (``tokenizer.ggml.*``: GPT-2 style byte-level BPE tokens + merges) is rebuilt as a Hugging Face
  ``tokenizers`` JSON; the pre-tokenizer follows ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.hf import check_hf_state_dict
from megatron_tpcomp.checkpoint.metadata import validate_model_config
from megatron_tpcomp.megatron.model import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_TOP_NAMES["output.weight"] = "lm_head.weight"
#: ModelConfig field -> the GGUF metadata key it comes from (named in errors).
GGUF_NAMES = {
    "num_layers": "llama.block_count",
    "hidden_size": "llama.embedding_length",
    "num_attention_heads": "llama.attention.head_count",
    "num_query_groups": "llama.attention.head_count_kv",
    "ffn_hidden_size": "llama.feed_forward_length",
    "vocab_size": "llama.vocab_size",
    "max_sequence_length": "llama.context_length",
    "rotary_base": "llama.rope.freq_base",
    "norm_epsilon": "llama.attention.layer_norm_rms_epsilon",
}

#: ``tokenizer.ggml.pre`` values whose pre-tokenizer is GPT-2's byte-level split with single digits split off
#: (llama.cpp's SMOLLM / STARCODER regexes); plain GPT-2 otherwise.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "smaug-bpe"}


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: ``[n_heads * hn, ...]`` interleaved -> rotate-half order.

    Inverse of llama.cpp's ``reshape(n_heads, 2, hn/2, ...).swapaxes(1, 2)``.
    """
    rows = w.shape[0]
    hn = rows // n_heads
    if rows % n_heads or hn % 2:
        raise CheckpointError(f"cannot un-permute {tuple(w.shape)} rows over {n_heads} heads")
    rest = w.shape[1:]
    return w.reshape(n_heads, hn // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def _field(reader: Any, key: str, default: Any = None, *, path: Path) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _tokenizer_json(reader: Any, path: Path) -> tuple[str, dict[str, int | None]]:
    """Rebuild the GGUF's BPE tokenizer as a ``tokenizers`` JSON string, plus its BOS/EOS ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model", path=path)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (only GPT-2 style BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens", path=path)
    merges = _field(reader, "tokenizer.ggml.merges", path=path)
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), path=path)
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2", path=path)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # Control tokens (type 3: <|endoftext|>, <|im_start|>, ...) are matched whole, never split into bytes.
    tk.add_special_tokens([AddedToken(tokens[i], special=True) for i, t in enumerate(types) if t == 3])
    ids = {
        "bos_id": reader.fields["tokenizer.ggml.bos_token_id"].contents()
        if "tokenizer.ggml.bos_token_id" in reader.fields
        else None,
        "eos_id": reader.fields["tokenizer.ggml.eos_token_id"].contents()
        if "tokenizer.ggml.eos_token_id" in reader.fields
        else None,
    }
    return tk.to_str(), ids


def read_gguf(
    path: str | Path, *, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Llama-architecture GGUF file.

    Returns:
        (model config, Hugging Face layout state dict in fp32, source info with ``tokenizer_json``,
        ``bos_token_id``, ``eos_token_id``)

    Raises:
        CheckpointError: the file is missing, not GGUF, not a Llama-architecture model, or incomplete.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tqdm import tqdm

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # ValueError (bad magic), struct errors on a truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file: {exc}") from exc
    arch = _field(reader, "general.architecture", path=path)
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (expected 'llama')")
    heads = _field(reader, "llama.attention.head_count", path=path)
    kv_heads = _field(reader, "llama.attention.head_count_kv", heads, path=path)
    names = {t.name for t in reader.tensors}
    token_count = len(_field(reader, "tokenizer.ggml.tokens", path=path))
    values = {
        "num_layers": _field(reader, "llama.block_count", path=path),
        "hidden_size": _field(reader, "llama.embedding_length", path=path),
        "num_attention_heads": heads,
        "num_query_groups": kv_heads,
        "ffn_hidden_size": _field(reader, "llama.feed_forward_length", path=path),
        "vocab_size": _field(reader, "llama.vocab_size", token_count, path=path),
        "max_sequence_length": _field(reader, "llama.context_length", 2048, path=path),
        "rotary_base": _field(reader, "llama.rope.freq_base", 10000.0, path=path),
        "norm_epsilon": _field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5, path=path),
        "tie_embeddings": "output.weight" not in names,
        "qkv_bias": "blk.0.attn_q.bias" in names,
    }
    # GGUF integers arrive as numpy scalars: made Python ints here, then bounded (a huge count is refused before
    # it sizes anything); floats must be finite and positive.
    values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}
    cfg = validate_model_config(values, str(path), prefix="", names=GGUF_NAMES)
    sd: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", disable=not progress):
        if t.name in _TOP_NAMES:
            key = _TOP_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                continue  # e.g. rope_freqs: derived, not a weight
            key = f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dims fastest-first; numpy's shape is the row-major (Hugging Face) one.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = torch.from_numpy(values.reshape(shape).copy())
        if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
            w = unpermute_rope_rows(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
            w = unpermute_rope_rows(w, cfg.num_query_groups)
        sd[key] = w
    check_hf_state_dict(sd, cfg, str(path))
    tokenizer_json, ids = _tokenizer_json(reader, path)
    info: dict[str, Any] = {
        "format": "gguf",
        "path": str(path),
        "name": str(_field(reader, "general.name", "", path=path)),
        "file_type": int(_field(reader, "general.file_type", -1, path=path)),
        "model_type": "llama",
        "tokenizer_json": tokenizer_json,
        "bos_token_id": ids["bos_id"],
        "eos_token_id": ids["eos_id"],
    }
    json.loads(tokenizer_json)  # fail here, not at load time, if the tokenizer did not serialise
    return cfg, sd, info
