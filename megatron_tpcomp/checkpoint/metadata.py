"""A megatron-tpcomp checkpoint's metadata (``tpcomp_checkpoint.json``): what it holds (:class:`CheckpointMeta`) and
its validation. Nothing in the file is trusted: :func:`read_metadata` checks every field against sane bounds
before any of them sizes an allocation, and :func:`check_shard` checks a shard's tensors against it."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import META_FILE, is_torch_dist
from megatron_tpcomp.megatron.model import ModelConfig

logger = logging.getLogger("megatron_tpcomp")


FORMAT = "megatron-tpcomp-checkpoint"


VERSION = 1


#: Largest TP size accepted (the shard list is built from it, so it must be bounded before anything is sized).
MAX_TP = 4096


#: Largest ``tpcomp_checkpoint.json`` read: a real one is a few KB, plus the compression config's tables (a
#: 70B-class model with a channel-scale table on every site is a few MB).
MAX_META_BYTES = 16 << 20


#: Inclusive bounds of the integer model fields: every released Llama-family model fits with a wide margin; a
#: corrupted or hostile value (3e9 vocabulary entries, 1e9 layers) does not.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 4096),
    "hidden_size": (1, 1 << 17),
    "num_attention_heads": (1, 4096),
    "num_query_groups": (1, 4096),
    "ffn_hidden_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 24),
    "max_sequence_length": (1, 1 << 24),
}


BOOL_FIELDS = ("tie_embeddings", "qkv_bias")


DTYPES = ("float32", "bfloat16")


META_KEYS = ("format", "version", "model_config", "tp_size", "dtype", "tokenizer", "source", "compression", "files")


_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class CheckpointMeta:
    """What ``tpcomp_checkpoint.json`` records.

    Attributes:
        path: the checkpoint directory.
        model_config: architecture (:class:`ModelConfig`).
        tp_size: tensor-parallel size the shards are cut for.
        dtype: ``float32`` or ``bfloat16`` (the stored parameter dtype).
        tokenizer: ``{"file": "tokenizer.json", "bos_id": int|None, "eos_id": int|None}`` or None.
        source: where the weights came from (path, format, architecture).
        compression: a per-layer compression config (``CompressionConfig.to_dict()``) or None.
        files: relative shard path -> ``{"bytes": int, "sha256": str}``.
    """

    path: Path
    model_config: ModelConfig
    tp_size: int
    dtype: str
    tokenizer: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    @property
    def tokenizer_path(self) -> Path | None:
        return self.path / self.tokenizer["file"] if self.tokenizer else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_config": self.model_config.to_dict(),
            "tp_size": self.tp_size,
            "dtype": self.dtype,
            "tokenizer": self.tokenizer,
            "source": self.source,
            "compression": self.compression,
            "files": self.files,
        }


def shard_relpath(tp_rank: int) -> str:
    return f"release/mp_rank_{tp_rank:02d}/model_optim_rng.pt"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_model_config(
    values: Mapping[str, Any], where: str, *, prefix: str = "model_config.", names: Mapping[str, str] | None = None
) -> ModelConfig:
    """A :class:`ModelConfig` from ``values`` after checking every field: integers where integers (a float such as
    ``3e9`` or a string is refused, not converted), within :data:`INT_BOUNDS`, finite positive floats, booleans,
    and the divisibility the attention layout needs.

    Args:
        where: the file the values came from (starts every message).
        prefix: printed before a field name (``model_config.`` for our metadata).
        names: field -> the key the file calls it (a Hugging Face ``config.json`` says ``num_hidden_layers``).

    Raises:
        CheckpointError: one line naming ``where``, the field, the bad value and what was expected.
    """
    names = names or {}

    def bad(name: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{where}: {prefix}{names.get(name, name)} is {value!r}; expected {expected}")

    if not isinstance(values, Mapping):
        raise CheckpointError(f"{where}: {prefix.rstrip('.') or 'model config'} must be an object")
    known = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown key(s) {unknown} in {prefix.rstrip('.') or 'the config'}; expected {known}"
        )
    missing = [k for k in known if k not in values]
    if missing:
        raise CheckpointError(f"{where}: {prefix}{names.get(missing[0], missing[0])} is missing")
    for name, (lo, hi) in INT_BOUNDS.items():
        v = values[name]
        if not _is_int(v) or not lo <= v <= hi:
            raise bad(name, v, f"an integer in [{lo}, {hi}]")
    for name in ("rotary_base", "norm_epsilon"):
        v = values[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise bad(name, v, "a finite number > 0")
    if values["norm_epsilon"] >= 1:
        raise bad("norm_epsilon", values["norm_epsilon"], "a finite number in (0, 1)")
    for name in BOOL_FIELDS:
        if not isinstance(values[name], bool):
            raise bad(name, values[name], "true or false")
    h, heads, groups = values["hidden_size"], values["num_attention_heads"], values["num_query_groups"]
    if h % heads:
        raise bad("hidden_size", h, f"a multiple of num_attention_heads={heads}")
    if heads % groups:
        raise bad("num_attention_heads", heads, f"a multiple of num_query_groups={groups}")
    if (h // heads) % 2:
        raise bad("hidden_size", h, f"an even head dim (RoPE rotates pairs); hidden_size / heads = {h // heads}")
    return ModelConfig(**{k: (float(values[k]) if k in ("rotary_base", "norm_epsilon") else values[k]) for k in known})


def validate_tp_size(tp: Any, cfg: ModelConfig, where: str) -> int:
    """``tp`` if it is an integer in [1, :data:`MAX_TP`] that divides the model (heads, FFN, vocabulary, KV groups).

    Raises:
        CheckpointError: naming ``where``, ``tp_size`` and the value.
    """
    if not _is_int(tp) or not 1 <= tp <= MAX_TP:
        raise CheckpointError(f"{where}: tp_size is {tp!r}; expected an integer in [1, {MAX_TP}]")
    try:
        cfg.check_tp(tp)
    except ValueError as exc:
        raise CheckpointError(f"{where}: tp_size is {tp}, which does not divide the model: {exc}") from None
    return tp


def validate_tokenizer(tok: Any, cfg: ModelConfig, where: str, ckpt_dir: Path | None) -> dict[str, Any] | None:
    if tok is None:
        return None
    if not isinstance(tok, Mapping) or set(tok) - {"file", "bos_id", "eos_id"} or "file" not in tok:
        raise CheckpointError(f"{where}: tokenizer is {tok!r}; expected {{'file': ..., 'bos_id': ..., 'eos_id': ...}}")
    name = tok["file"]
    # A plain file name inside the checkpoint: a path here would make every reader open a file elsewhere.
    if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
        raise CheckpointError(f"{where}: tokenizer.file is {name!r}; expected a file name inside the checkpoint")
    if ckpt_dir is not None and not (ckpt_dir / name).is_file():
        raise CheckpointError(f"{where}: tokenizer.file {name!r} is missing from {ckpt_dir}")
    for key in ("bos_id", "eos_id"):
        v = tok.get(key)
        if v is not None and (not _is_int(v) or not 0 <= v < cfg.vocab_size):
            raise CheckpointError(
                f"{where}: tokenizer.{key} is {v!r}; expected null or an integer in [0, {cfg.vocab_size})"
            )
    return dict(tok)


def validate_compression(comp: Any, cfg: ModelConfig, tp: int, where: str) -> dict[str, Any] | None:
    if comp is None:
        return None
    from megatron_tpcomp.config import CompressionConfig, ConfigError

    try:
        parsed = CompressionConfig.from_dict(comp, source=f"{where}: compression")
        parsed.check_model(cfg.num_layers, cfg.hidden_size, tp, target=f"the checkpoint ({where})")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return dict(comp)


def validate_metadata(data: Any, where: str, ckpt_dir: Path | None = None) -> CheckpointMeta:
    """Check a ``tpcomp_checkpoint.json`` mapping field by field and build its :class:`CheckpointMeta`.

    Nothing sized by the metadata is allocated before its bound is checked (``tp_size`` is bounded before the shard
    list is built). With ``ckpt_dir``, the listed shards must exist with their recorded sizes and the shard count
    must equal the number of shard directories present.

    Raises:
        CheckpointError: one line naming ``where``, the field, the bad value and what was expected.
    """
    _check_header(data, where)
    cfg = validate_model_config(data["model_config"], where)
    tp = validate_tp_size(data["tp_size"], cfg, where)
    dtype = data["dtype"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: dtype is {dtype!r}; expected one of {list(DTYPES)}")
    files = data["files"]
    _check_file_list(files, tp, where)
    tokenizer = validate_tokenizer(data.get("tokenizer"), cfg, where, ckpt_dir)
    source = data.get("source") or {}
    if not isinstance(source, dict):
        raise CheckpointError(f"{where}: source is {source!r}; expected an object")
    compression = validate_compression(data.get("compression"), cfg, tp, where)
    path = ckpt_dir if ckpt_dir is not None else Path(where).parent
    if ckpt_dir is not None:
        _check_shards_on_disk(ckpt_dir, files, tp, where)
    return CheckpointMeta(
        path=path,
        model_config=cfg,
        tp_size=tp,
        dtype=dtype,
        tokenizer=tokenizer,
        source=source,
        compression=compression,
        files=files,
    )


def _check_header(data: Any, where: str) -> None:
    """The metadata is an object of our format and version, with only known keys and the required ones."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{where}: 'format' must be {FORMAT!r}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{where}: version {data.get('version')!r} is not supported; expected {VERSION}")
    unknown = sorted(set(data) - set(META_KEYS))
    if unknown:
        raise CheckpointError(f"{where}: unknown key(s) {unknown}; expected {list(META_KEYS)}")
    for key in ("model_config", "tp_size", "dtype", "files"):
        if key not in data:
            raise CheckpointError(f"{where}: field {key!r} is missing")


def _check_file_list(files: Any, tp: int, where: str) -> None:
    """``files`` lists exactly the ``tp`` shard paths, each with a size and a SHA-256 (``tp`` already bounded)."""
    if not isinstance(files, dict) or len(files) != tp:
        n = len(files) if isinstance(files, dict) else type(files).__name__
        raise CheckpointError(f"{where}: tp_size is {tp}, but 'files' lists {n} shard(s); expected one per TP rank")
    expected = {shard_relpath(r) for r in range(tp)}
    if set(files) != expected:
        raise CheckpointError(
            f"{where}: tp_size {tp} does not match the listed shards {sorted(files)[:4]}; "
            f"expected {sorted(expected)[:4]}"
        )
    for rel, info in sorted(files.items()):
        if not isinstance(info, dict) or not _is_int(info.get("bytes")) or info["bytes"] < 0:
            raise CheckpointError(f"{where}: files[{rel!r}] is {info!r}; expected {{'bytes': int >= 0, 'sha256': hex}}")
        if not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            raise CheckpointError(f"{where}: files[{rel!r}].sha256 is {info.get('sha256')!r}; expected 64 hex digits")


def _check_shards_on_disk(ckpt_dir: Path, files: Mapping[str, Mapping[str, Any]], tp: int, where: str) -> None:
    """``ckpt_dir`` holds ``tp`` shard directories and every listed shard with its recorded size."""
    present = sum(1 for p in (ckpt_dir / "release").glob("mp_rank_*") if p.is_dir())
    if present != tp:
        raise CheckpointError(
            f"{where}: tp_size is {tp}, but {ckpt_dir / 'release'} holds {present} mp_rank_* shard "
            f"directories; expected {tp}"
        )
    for rel, info in sorted(files.items()):
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{ckpt_dir}: shard {rel} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, the metadata says {info['bytes']} (truncated or replaced)"
            )


def expected_shard_shapes(cfg: ModelConfig, tp_size: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in one TP rank's state dict (the same for every rank; Megatron layout of
    :mod:`megatron_tpcomp.megatron.model`; ``_extra_state`` entries are not listed)."""
    h, v, f, hn = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hn  # per group: its queries, a key, a value
    out: dict[str, tuple[int, ...]] = {
        "embedding.word_embeddings.weight": (v // tp_size, h),  # vocab-parallel
        "decoder.final_layernorm.weight": (h,),
    }
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = (v // tp_size, h)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attention.linear_qkv.weight"] = (qkv_rows // tp_size, h)
        if cfg.qkv_bias:
            out[p + "self_attention.linear_qkv.bias"] = (qkv_rows // tp_size,)
        out[p + "self_attention.linear_proj.weight"] = (h, cfg.num_attention_heads * hn // tp_size)
        out[p + "pre_mlp_layernorm.weight"] = (h,)
        out[p + "mlp.linear_fc1.weight"] = (2 * f // tp_size, h)  # [gate_r; up_r]
        out[p + "mlp.linear_fc2.weight"] = (h, f // tp_size)
    return out


def _describe(cfg: ModelConfig, tp: int) -> str:
    return (
        f"num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}, "
        f"ffn_hidden_size={cfg.ffn_hidden_size}, TP={tp}"
    )


def check_shard(
    sd: Mapping[str, Any], cfg: ModelConfig, tp_size: int, where: str, *, dtype: torch.dtype | None = None
) -> None:
    """Check one rank's state dict against the model config: the layer count (no layer missing or extra), every
    shape (hidden size, vocabulary, FFN, heads), the dtype, and that every float is finite.

    Raises:
        CheckpointError: naming ``where``, the first offending key, what it holds and what the metadata implies.
    """
    want = expected_shard_shapes(cfg, tp_size)
    own = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    layers = {int(m[1]) for k in own if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if layers and (max(layers) + 1 != cfg.num_layers or len(layers) != cfg.num_layers):
        raise CheckpointError(
            f"{where}: holds layers {min(layers)}..{max(layers)} ({len(layers)} layers), but the metadata says "
            f"num_layers={cfg.num_layers}"
        )
    missing = [k for k in want if k not in own]
    unexpected = [k for k in own if k not in want]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: does not match the metadata ({_describe(cfg, tp_size)}): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for key, shape in want.items():
        t = own[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: {key} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(t.shape)}, but the metadata ({_describe(cfg, tp_size)}) implies "
                f"{shape}"
            )
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(f"{where}: {key} is {t.dtype}, but the metadata says {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: {key} holds {bad} NaN/Inf value(s); expected finite weights")


def read_metadata(ckpt_dir: str | Path) -> CheckpointMeta:
    """Read and validate ``tpcomp_checkpoint.json`` (see :func:`validate_metadata`).

    Raises:
        CheckpointError: missing directory or file, an oversized or malformed file, wrong format/version, any
            field out of bounds, or a listed shard that is missing or has the wrong size.
    """
    path = Path(ckpt_dir)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not meta_path.is_file():
        hint = f"; it is a Megatron torch_dist checkpoint: `tpcomp convert {path} OUT --tp N` converts it"
        raise CheckpointError(
            f"{meta_path} is missing: {path} is not a megatron-tpcomp checkpoint (or its conversion did not finish)"
            + (hint if is_torch_dist(path) else "")
        )
    size = meta_path.stat().st_size
    if size > MAX_META_BYTES:
        raise CheckpointError(f"{meta_path}: {size} bytes; expected at most {MAX_META_BYTES} (not our metadata)")
    try:
        # NaN/Infinity literals parse (as Python's json does) so that the field check names the field holding one.
        data = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{meta_path}: not valid JSON: {exc}") from exc
    return validate_metadata(data, str(meta_path), path)
