"""Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM): config, safetensors, tensor layout.

Hugging Face layout (per layer ``i``, prefix ``model.layers.{i}.``):

- ``self_attn.q_proj.weight [np*hn, h]``, ``k_proj``/``v_proj`` ``[ng*hn, h]`` (Qwen2: also ``.bias``),
  ``o_proj.weight [h, np*hn]``; ``mlp.gate_proj``/``up_proj`` ``[ffn, h]``, ``mlp.down_proj [h, ffn]``;
  ``input_layernorm``/``post_attention_layernorm`` ``[h]``.
- ``model.embed_tokens.weight [vocab, h]``, ``model.norm.weight [h]``, ``lm_head.weight [vocab, h]`` (absent or
  ignored when embeddings are tied).

Megatron layout (TP=1, see :mod:`megatron_tpcomp.megatron.model`): ``linear_qkv`` fuses q, k, v per query group,
``linear_fc1`` is ``[gate; up]``; RoPE in both uses the same "rotate half" pairing, so no row permutation is
needed between them (GGUF differs: :mod:`.gguf_source`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.metadata import validate_model_config
from megatron_tpcomp.megatron.model import ModelConfig, fuse_qkv, split_qkv

#: Hugging Face ``model_type`` -> architecture class name written back on export.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: ModelConfig field -> the ``config.json`` key it comes from (named in errors).
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "max_sequence_length": "max_position_embeddings",
    "rotary_base": "rope_theta",
    "norm_epsilon": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "qkv_bias": "attention_bias",
}


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    # transformers 5 moved RoPE settings into "rope_parameters"; older configs have "rope_theta"/"rope_scaling".
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_config_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """:class:`ModelConfig` from a Hugging Face ``config.json`` mapping.

    Raises:
        CheckpointError: not a Llama-family model, or a feature this converter does not handle (MLP biases,
            a non-SiLU activation, RoPE scaling, a head dim other than ``hidden / heads``).
    """
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise CheckpointError(f"{source}: missing key {key!r}")
    for key in ("tie_word_embeddings", "attention_bias"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise CheckpointError(f"{source}: {key} is {cfg[key]!r}; expected true or false")
    heads = cfg["num_attention_heads"]
    try:
        rotary_base = _rope_theta(cfg)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{source}: rope_theta: {exc}") from None
    values = {
        "num_layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "ffn_hidden_size": cfg["intermediate_size"],
        "vocab_size": cfg["vocab_size"],
        "max_sequence_length": cfg.get("max_position_embeddings", 2048),
        "rotary_base": rotary_base,
        "norm_epsilon": cfg.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
    }
    # Integers must be integers (a 3e9 or "576" is refused, not converted), within bounds, and divisible.
    out = validate_model_config(values, source, prefix="", names=HF_NAMES)
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (expected silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    if cfg.get("head_dim") not in (None, out.head_dim):
        raise CheckpointError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    return out


def hf_config_from_model(cfg: ModelConfig, model_type: str = "llama") -> dict[str, Any]:
    """A Hugging Face ``config.json`` mapping for ``cfg`` (inverse of :func:`model_config_from_hf`)."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_sequence_length,
        "rope_theta": cfg.rotary_base,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = False
    elif not cfg.qkv_bias and model_type == "qwen2":
        raise CheckpointError("a Qwen2 export needs qkv_bias=True")
    return out


def _layer_keys(i: int, cfg: ModelConfig) -> list[str]:
    p = f"model.layers.{i}."
    keys = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
    keys += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    if cfg.qkv_bias:
        keys += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
    return keys


def expected_hf_keys(cfg: ModelConfig) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_layers):
        keys += _layer_keys(i, cfg)
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return keys


def check_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Raise CheckpointError naming missing keys and wrong shapes (``lm_head`` of a tied model may be present)."""
    missing = [k for k in expected_hf_keys(cfg) if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:4]}")
    h, hn, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads * hn, cfg.num_query_groups * hn
    shapes = {"embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,)}
    shapes |= {"q_proj.weight": (nq, h), "k_proj.weight": (nkv, h), "v_proj.weight": (nkv, h), "o_proj.weight": (h, nq)}
    shapes |= {"q_proj.bias": (nq,), "k_proj.bias": (nkv,), "v_proj.bias": (nkv,)}
    shapes |= {"gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f)}
    shapes |= {"layernorm.weight": (h,)}
    for key, t in sd.items():
        tail = ".".join(key.split(".")[-2:])
        want = next((s for suffix, s in shapes.items() if tail.endswith(suffix)), None)
        if want is not None and tuple(t.shape) != want:
            raise CheckpointError(f"{source}: {key} has shape {tuple(t.shape)}, the config implies {want}")


def hf_to_megatron(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> Megatron TP=1 state dict (new tensors; the input is not modified)."""
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"].clone()}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = p + "self_attn."
        out[m + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], cfg
        )
        if cfg.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"], cfg
            )
        out[m + "self_attention.linear_proj.weight"] = sd[a + "o_proj.weight"].clone()
        out[m + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"].clone()
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"].clone()
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"].clone()
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = sd["lm_head.weight"].clone()
    return out


def megatron_to_hf(sd: Mapping[str, Any], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron TP=1 state dict -> Hugging Face state dict (inverse of :func:`hf_to_megatron`)."""
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"].clone()}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"].clone()
        q, k, v = split_qkv(sd[m + "self_attention.linear_qkv.weight"], cfg)
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
        if cfg.qkv_bias:
            q, k, v = split_qkv(sd[m + "self_attention.linear_qkv.bias"], cfg)
            out[a + "q_proj.bias"], out[a + "k_proj.bias"], out[a + "v_proj.bias"] = q, k, v
        out[a + "o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"].clone()
        out[p + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"].clone()
        gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[p + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"].clone()
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"].clone()
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"].clone()
    return out


# ------------------------------------------------------------------------------------------------ directories


def read_hf_checkpoint(model_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Hugging Face model directory: ``config.json`` plus ``*.safetensors`` (sharded or not), or
    ``pytorch_model*.bin`` loaded weights-only.

    Returns:
        (model config, HF state dict (fp32 or the stored float dtype), source info incl. ``model_type``)

    Raises:
        CheckpointError: a missing or malformed file, naming it.
    """
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: {d} is not a Hugging Face model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: top level must be an object")
    cfg = model_config_from_hf(raw, str(cfg_path))
    files = sorted(d.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for f in files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{f}: not a readable safetensors file: {exc}") from exc
    else:
        bins = sorted(d.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{d}: no *.safetensors or pytorch_model*.bin weights found")
        for f in bins:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise CheckpointError(f"{f}: cannot be loaded weights-only: {exc}") from exc
    check_hf_state_dict(sd, cfg, str(d))
    tok = d / "tokenizer.json"
    info = {"format": "huggingface", "path": str(d), "model_type": raw["model_type"]}
    if tok.is_file():
        info["tokenizer_json"] = tok.read_text()
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(raw.get(key), int):
            info[key] = raw[key]
    return cfg, sd, info


def write_hf_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    sd: Mapping[str, torch.Tensor],
    *,
    model_type: str = "llama",
    tokenizer_json: str | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) into ``out_dir`` (created if missing;
    the caller makes sure it is new, e.g. a temporary directory renamed into place afterwards)."""
    from safetensors.torch import save_file

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config_from_model(cfg, model_type), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (d / "tokenizer.json").write_text(tokenizer_json)
