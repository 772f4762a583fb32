"""The tensor-parallel Megatron-Core checkpoint directory: atomic save, verified weights-only load, metadata.

Layout (Megatron's legacy per-rank layout, so Megatron's ``--load`` finds the shards; plus one JSON file that
makes the directory self-describing)::

    CKPT/
      tpcomp_checkpoint.json               format, model config, TP size, tokenizer, source, compression config,
                                           and the size + SHA-256 of every shard (written last)
      latest_checkpointed_iteration.txt    "release"
      release/mp_rank_00/model_optim_rng.pt   {"model": state dict of TP rank 0, "checkpoint_version": 3.0,
                                              "args": Megatron-LM's args, "iteration": 0} (megatron_args.py)
      release/mp_rank_01/model_optim_rng.pt   ...
      tokenizer.json                       Hugging Face ``tokenizers`` file (when the source had a tokenizer)
      tokenizer_config.json                its BOS/EOS/PAD tokens, for Megatron-LM's Hugging Face tokenizer

A shard holds only tensors (and ``None`` for Megatron's empty ``_extra_state`` entries), plus Megatron-LM's
``args`` (an ``argparse.Namespace`` of plain values), and is loaded with ``torch.load(weights_only=True)`` with
only ``argparse.Namespace`` allowed besides: no pickled code ever runs. Saving writes into a temporary sibling directory
``.CKPT.partial-PID`` and renames it into place at the end, so an interrupted save never leaves a directory that
looks complete; a later save next to it removes such directories once their process is gone.

Nothing in the metadata is trusted: :func:`read_metadata` checks every field against sane bounds before any of
them sizes an allocation, :func:`load_shard` checks the tensors against the metadata, and :func:`save_checkpoint`
runs the same checks before it writes. ``force=True`` replaces only a directory this tool wrote
(:func:`check_replaceable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint import megatron_args
from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import META_FILE, is_torch_dist
from megatron_tpcomp.checkpoint.megatron_args import TOKENIZER_CONFIG_FILE
from megatron_tpcomp.megatron.model import ModelConfig

logger = logging.getLogger("megatron_tpcomp")

FORMAT = "megatron-tpcomp-checkpoint"
VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
ITERATION_FILE = "latest_checkpointed_iteration.txt"
#: Written into a Hugging Face export (``tpcomp convert --to hf``) so that ``--force`` may replace it later.
HF_EXPORT_MARKER = "tpcomp_hf_export.json"
HF_EXPORT_FORMAT = "megatron-tpcomp-hf-export"
#: Written into a temporary ``.NAME.partial-PID`` directory while it is being filled (host and PID of the writer),
#: removed before the rename: lets a later run on another host of a shared file system leave it alone.
OWNER_FILE = ".tpcomp-writer.json"

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


# ------------------------------------------------------------------------------------------------ validation


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


def _validate_tokenizer(tok: Any, cfg: ModelConfig, where: str, ckpt_dir: Path | None) -> dict[str, Any] | None:
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


def _validate_compression(comp: Any, cfg: ModelConfig, tp: int, where: str) -> dict[str, Any] | None:
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
    tokenizer = _validate_tokenizer(data.get("tokenizer"), cfg, where, ckpt_dir)
    source = data.get("source") or {}
    if not isinstance(source, dict):
        raise CheckpointError(f"{where}: source is {source!r}; expected an object")
    compression = _validate_compression(data.get("compression"), cfg, tp, where)
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


# ------------------------------------------------------------------------------ replacing, temporary directories


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _foreign_entries(out: Path) -> tuple[str | None, list[str]]:
    """(what tpcomp output ``out`` is: ``checkpoint``/``hf export``/None, the paths in it tpcomp did not write)."""
    top = {p.name for p in out.iterdir()}
    if META_FILE in top:
        kind, allowed = "checkpoint", {META_FILE, ITERATION_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "release"}
    elif HF_EXPORT_MARKER in top:
        kind, allowed = "hf export", {HF_EXPORT_MARKER, "config.json", "model.safetensors", TOKENIZER_FILE}
    else:
        return None, sorted(top)
    foreign = sorted(n for n in top if n not in allowed)
    release = out / "release"
    if kind == "checkpoint" and "release" in top:
        if release.is_symlink() or not release.is_dir():
            foreign.append("release")
        else:
            for rank_dir in sorted(release.iterdir()):
                rel = f"release/{rank_dir.name}"
                if not re.fullmatch(r"mp_rank_\d{2,}", rank_dir.name) or rank_dir.is_symlink() or not rank_dir.is_dir():
                    foreign.append(rel)
                    continue
                foreign += [f"{rel}/{p.name}" for p in sorted(rank_dir.iterdir()) if p.name != "model_optim_rng.pt"]
    return kind, foreign


def check_replaceable(out: str | Path, force: bool) -> None:
    """Raise unless ``out`` may be written: it does not exist, or ``force`` is set and it is an empty directory or
    one that tpcomp wrote (a checkpoint with ``tpcomp_checkpoint.json`` or an HF export with its marker) holding
    nothing else. Anything else (a file, a link, someone's directory) is never deleted.

    Raises:
        CheckpointError: one line naming ``out`` and why.
    """
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not force:
        raise CheckpointError(f"{out} already exists; pass --force (force=True) to replace it")
    refuse = "--force replaces only a directory written by tpcomp; refusing to delete it"
    if out.is_symlink():
        raise CheckpointError(f"{out} is a symbolic link, not a directory written by tpcomp; {refuse}")
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a directory written by tpcomp; {refuse}")
    kind, foreign = _foreign_entries(out)
    if kind is None and foreign:
        raise CheckpointError(
            f"{out} is a non-empty directory without {META_FILE} or {HF_EXPORT_MARKER} (not written by tpcomp); "
            f"{refuse}"
        )
    if foreign:
        raise CheckpointError(
            f"{out} is a tpcomp {kind} but also holds {foreign[:3]}, which tpcomp did not write; {refuse} "
            f"(move them out first)"
        )


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as gone: it will never finish a write)."""
    if pid <= 0:
        return False  # 0 and negatives address process groups in kill(); no writer has such a PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OverflowError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def _writer_host(tmp: Path) -> str | None:
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
        return str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Remove the ``.NAME.partial-PID`` (and ``.NAME.old-PID``) siblings of ``out`` that a killed run left behind.

    A directory is removed when its PID is no longer alive on this host (or is this process's own); one whose
    process still runs, or that was written on another host (shared file system), is left alone and mentioned.
    Each removal is logged with its size (logger ``megatron_tpcomp``, WARNING: reaches stderr without setup).

    Returns:
        the directories removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    host = socket.gethostname()
    removed = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        pid = int(m[2])
        if p.is_symlink() or not p.is_dir():
            logger.warning("megatron-tpcomp: %s is not a directory; left alone", p)
            continue
        writer = _writer_host(p)
        if writer is not None and writer != host:
            logger.warning("megatron-tpcomp: %s was written on host %s (PID %d there); left alone", p, writer, pid)
            continue
        if pid != os.getpid() and _pid_alive(pid):
            logger.warning("megatron-tpcomp: %s belongs to PID %d, which is still running; left alone", p, pid)
            continue
        size = _tree_bytes(p)
        shutil.rmtree(p)
        removed.append(p)
        who = "this process" if pid == os.getpid() else f"PID {pid}, which is no longer running"
        logger.warning("megatron-tpcomp: removed stale %s (%.1f MB) left by %s", p, size / 1e6, who)
    return removed


def make_partial_dir(out: Path) -> Path:
    """A fresh ``.NAME.partial-PID`` sibling of ``out`` with the writer's host and PID inside (see
    :data:`OWNER_FILE`), after removing stale ones of earlier runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if os.path.lexists(tmp):  # left alone above: a same-PID writer on another host of a shared file system
        raise CheckpointError(f"{tmp} exists and belongs to another writer; remove it if no conversion is running")
    tmp.mkdir()
    (tmp / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    return tmp


def install_partial_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename the filled ``tmp`` to ``out``, replacing what :func:`check_replaceable` allows (checked again now:
    ``out`` may have appeared or changed since the start)."""
    check_replaceable(out, force)
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    _fsync_dir(tmp)
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    _fsync_dir(out.parent)


# ---------------------------------------------------------------------------------------------- save and read


def save_checkpoint(
    out_dir: str | Path,
    shard_for_rank: Callable[[int], Mapping[str, Any]],
    *,
    model_config: ModelConfig,
    tp_size: int,
    dtype: torch.dtype,
    tokenizer_json: str | None = None,
    tokenizer_ids: Mapping[str, int | None] | None = None,
    source: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
) -> CheckpointMeta:
    """Write a checkpoint directory atomically.

    Args:
        out_dir: the checkpoint directory to create.
        shard_for_rank: ``tp_rank -> state dict`` of that rank (called once per rank, so only one shard needs
            to be in memory at a time); each is checked against the model config before it is written.
        model_config, tp_size, dtype: recorded in the metadata (validated first); tensors are cast to ``dtype``.
        tokenizer_json: contents of a ``tokenizers`` JSON file, saved as ``tokenizer.json``.
        tokenizer_ids: ``{"bos_id": ..., "eos_id": ...}`` recorded beside it.
        source, compression: recorded as given (the compression config is checked against the model).
        force: replace an existing ``out_dir`` that tpcomp wrote (:func:`check_replaceable`).
        progress: show a progress bar over the shards.

    Raises:
        CheckpointError: ``out_dir`` exists and may not be replaced, or the metadata or a shard is invalid.
    """
    out = Path(out_dir)
    check_replaceable(out, force)
    if dtype not in (torch.float32, torch.bfloat16):
        raise CheckpointError(f"dtype must be float32 or bfloat16, got {dtype}")
    where = f"metadata for {out}"
    cfg = validate_model_config(model_config.to_dict(), where)
    tp_size = validate_tp_size(tp_size, cfg, where)
    tokenizer = None
    if tokenizer_json is not None:
        tokenizer = _validate_tokenizer({"file": TOKENIZER_FILE, **dict(tokenizer_ids or {})}, cfg, where, None)
    comp = _validate_compression(dict(compression) if compression else None, cfg, tp_size, where)
    tmp = make_partial_dir(out)
    try:
        files = _write_shards(tmp, out, shard_for_rank, cfg, tp_size, dtype, progress)
        (tmp / ITERATION_FILE).write_text("release")
        if tokenizer_json is not None:
            _write_tokenizer(tmp, tokenizer_json, tokenizer or {})
        meta = CheckpointMeta(
            path=out,
            model_config=cfg,
            tp_size=tp_size,
            dtype=str(dtype).removeprefix("torch."),
            tokenizer=tokenizer,
            source=dict(source or {}),
            compression=comp,
            files=files,
        )
        _write_metadata(tmp, meta, where)
        install_partial_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_shards(
    tmp: Path,
    out: Path,
    shard_for_rank: Callable[[int], Mapping[str, Any]],
    cfg: ModelConfig,
    tp_size: int,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Write each rank's shard into ``tmp`` (floating tensors cast to ``dtype``, checked by :func:`check_shard`
    first, with Megatron-LM's keys beside the model); returns the metadata's ``files``: path -> size and SHA-256."""
    from tqdm import tqdm

    files: dict[str, dict[str, Any]] = {}
    for rank in tqdm(range(tp_size), desc=f"writing {out.name}", unit="shard", disable=not progress):
        sd = {
            k: (v.to(dtype).contiguous() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in shard_for_rank(rank).items()
        }
        rel = shard_relpath(rank)
        check_shard(sd, cfg, tp_size, f"{out}: shard {rel}", dtype=dtype)
        path = tmp / rel
        path.parent.mkdir(parents=True)
        # Megatron-LM's own keys too (args, iteration): --use-checkpoint-args reads the architecture.
        extras = megatron_args.shard_extras(cfg, tp_size, str(dtype).removeprefix("torch."))
        torch.save({"model": sd, "checkpoint_version": 3.0, **extras}, path)
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _write_tokenizer(tmp: Path, tokenizer_json: str, tokenizer: Mapping[str, Any]) -> None:
    """``tokenizer.json`` and, for Megatron-LM's Hugging Face tokenizer, its BOS/EOS/PAD tokens by text (else its
    eod is None)."""
    (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
    megatron_args.write_tokenizer_config(tmp, tokenizer_json, tokenizer)


def _write_metadata(tmp: Path, meta: CheckpointMeta, where: str) -> None:
    """Write ``meta`` as :data:`META_FILE` into the filled ``tmp`` after the checks a reader makes."""
    data = meta.to_json()
    validate_metadata(data, where, tmp)  # the same checks a reader makes, on what is about to be written
    # allow_nan=False: a NaN that slipped past the checks fails here instead of being written as 'NaN'.
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    # The metadata is written last: a directory without it is never taken for a checkpoint.
    (tmp / META_FILE).write_text(text)


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


def load_shard(meta: CheckpointMeta, tp_rank: int, *, verify: bool = True) -> dict[str, Any]:
    """The state dict of TP rank ``tp_rank`` (weights-only load, on the CPU), checked against the metadata
    (:func:`check_shard`: layer count, shapes, dtype, finite values).

    Args:
        verify: check the file's SHA-256 against the metadata (catches corruption that keeps the size).

    Raises:
        CheckpointError: rank out of range, checksum mismatch, an unreadable file, or tensors that do not match
            the metadata.
    """
    if not 0 <= tp_rank < meta.tp_size:
        raise CheckpointError(f"{meta.path}: TP rank {tp_rank} out of range for a TP={meta.tp_size} checkpoint")
    rel = shard_relpath(tp_rank)
    path = meta.path / rel
    if verify and _sha256(path) != meta.files[rel]["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match the metadata (the file is corrupted)")
    try:
        with megatron_args.safe_globals():  # the shard's Megatron-LM args are an argparse.Namespace
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (zip), EOFError
        raise CheckpointError(f"{path}: cannot be loaded as a weights-only torch file: {exc}") from exc
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict")
    check_shard(blob["model"], meta.model_config, meta.tp_size, str(path), dtype=meta.torch_dtype)
    return blob["model"]


def load_into(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """``model.load_state_dict`` that tolerates only missing ``_extra_state`` entries and names any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("_extra_state")]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and isinstance(own[k], torch.Tensor) and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"wrong shapes {wrong[:4]}"
        )
    tensors = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    model.load_state_dict(tensors, strict=False)


def load_tpcomp_model(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    parallel_output: bool = True,
    sequence_parallel: bool = False,
    verify: bool = True,
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build a megatron-tpcomp checkpoint's GPTModel on this rank and load this rank's shard
    (:func:`megatron_tpcomp.checkpoint.load_model` also loads Megatron ``torch_dist`` checkpoints).

    Megatron's parallel state must be initialised with the checkpoint's TP size (reshard with ``tpcomp
    convert`` for another one). On a machine without CUDA call ``megatron_tpcomp.megatron.cpu.enable_cpu()``
    first.

    Returns:
        (model in eval mode, metadata)

    Raises:
        CheckpointError: TP size mismatch, or a shard that does not fit the model.
    """
    from megatron.core import parallel_state

    from megatron_tpcomp.megatron.model import build_gpt_model

    meta = read_metadata(ckpt_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != meta.tp_size:
        raise CheckpointError(
            f"{meta.path} is sharded for TP={meta.tp_size} but this run uses TP={tp}; reshard it with "
            f"`tpcomp convert {meta.path} OUT --tp {tp}`"
        )
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = build_gpt_model(
        meta.model_config,
        tp,
        dtype=dtype or meta.torch_dtype,
        parallel_output=parallel_output,
        sequence_parallel=sequence_parallel,
        seed=0,
    )
    shard = load_shard(meta, rank, verify=verify)
    load_into(model, shard, str(meta.path / shard_relpath(rank)))
    return model, meta
