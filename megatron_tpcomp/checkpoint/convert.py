"""The converter: Hugging Face or GGUF -> tensor-parallel Megatron-Core checkpoint; reshard; export to HF.

Sources (detected from what ``SOURCE`` is):

- a directory with ``config.json`` and safetensors: a Hugging Face Llama / Mistral / Qwen2 / SmolLM model;
- a ``.gguf`` file: a llama.cpp model (dequantized to fp32, Q/K rows un-permuted, tokenizer rebuilt);
- a directory with ``tpcomp_checkpoint.json``: one of our checkpoints, resharded to ``--tp`` (or exported with
  ``--to hf``);
- a Megatron ``torch_dist`` checkpoint (megatron-core's ``dist_checkpointing``: the directory holding
  ``latest_checkpointed_iteration.txt``, or an ``iter_*``/``release`` directory), written at any TP/PP size
  (:mod:`.torch_dist`);

The command line (``tpcomp convert``, which also takes the embedded default model's name) is ``cli.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint import hf
from megatron_tpcomp.checkpoint.directories import (
    HF_EXPORT_FORMAT,
    HF_EXPORT_MARKER,
    check_replaceable,
    install_partial_dir,
    make_partial_dir,
)
from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import META_FILE
from megatron_tpcomp.checkpoint.metadata import CheckpointMeta, read_metadata
from megatron_tpcomp.checkpoint.store import load_shard, save_checkpoint
from megatron_tpcomp.megatron.model import ModelConfig, merge_shards, shard_state_dict

logger = logging.getLogger("megatron_tpcomp")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def read_source(source: str | Path, *, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Load any supported source as (config, Megatron TP=1 state dict, source info).

    Raises:
        CheckpointError: the source does not exist or is of no known kind.
    """
    path = Path(source)
    from megatron_tpcomp.checkpoint import torch_dist

    if torch_dist.find_checkpoint(path) is not None:  # Megatron's torch_dist (dist_checkpointing) format
        return torch_dist.read_source(path)
    if path.is_dir() and (path / META_FILE).exists():
        meta = read_metadata(path)
        shards = [load_shard(meta, r) for r in range(meta.tp_size)]
        full = merge_shards(shards, meta.model_config)
        info = dict(meta.source)
        info["resharded_from_tp"] = meta.tp_size
        if meta.tokenizer_path is not None:
            info["tokenizer_json"] = meta.tokenizer_path.read_text()
            info["bos_token_id"] = meta.tokenizer.get("bos_id")
            info["eos_token_id"] = meta.tokenizer.get("eos_id")
        info["compression"] = meta.compression
        return meta.model_config, full, info
    if path.is_dir():
        cfg, sd, info = hf.read_hf_checkpoint(path)
        return cfg, hf.hf_to_megatron(sd, cfg), info
    if path.is_file() and path.suffix.lower() == ".gguf":
        from megatron_tpcomp.checkpoint.gguf_source import read_gguf

        cfg, sd, info = read_gguf(path, progress=progress)
        return cfg, hf.hf_to_megatron(sd, cfg), info
    if not path.exists():
        raise CheckpointError(
            f"source {path} does not exist (expected a Hugging Face model directory, a .gguf file or a "
            "megatron-tpcomp or Megatron torch_dist checkpoint)"
        )
    raise CheckpointError(f"source {path}: not a directory or a .gguf file")


def convert(
    source: str | Path,
    output: str | Path,
    tp_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    compression: Any = None,
    force: bool = False,
    progress: bool = True,
) -> CheckpointMeta:
    """Convert ``source`` into a Megatron-Core checkpoint at ``output`` sharded for ``tp_size`` ranks.

    Args:
        compression: a per-layer compression config to record (a ``CompressionConfig``, whose errors then name
            its file, or its ``to_dict()``); it is checked against the model before anything is written. A
            resharded checkpoint keeps its own unless this is given (dropped, with a warning, when it was made
            for another TP size).
        force: replace ``output`` if it is a directory tpcomp wrote (never anything else).

    Raises:
        CheckpointError: bad source, ``output`` exists and may not be replaced, ``tp_size`` does not divide the
            model, or a compression config for another model.
    """
    from megatron_tpcomp.config import CompressionConfig, ConfigError

    out = Path(output)
    check_replaceable(out, force)  # before the (slow) source is read
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise CheckpointError(f"--tp must be an integer >= 1, got {tp_size!r}")
    cfg, full, info = read_source(source, progress=progress)
    try:
        cfg.check_tp(tp_size)
    except ValueError as exc:
        raise CheckpointError(f"cannot shard {source} for TP={tp_size}: {exc}") from None
    tokenizer_json = info.pop("tokenizer_json", None)
    ids = {"bos_id": info.pop("bos_token_id", None), "eos_id": info.pop("eos_token_id", None)}
    kept = info.pop("compression", None)
    if compression is not None:
        try:
            if not isinstance(compression, CompressionConfig):
                compression = CompressionConfig.from_dict(compression, source="compression config")
            compression.check_against(cfg, tp_size=tp_size, target=f"{source} at TP={tp_size}")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        compression = compression.to_dict()
    elif kept is not None and kept.get("model", {}).get("tp_size", tp_size) != tp_size:
        logger.warning(
            "megatron-tpcomp: %s records a compression config made for tp_size=%s; not kept at TP=%d (record one "
            "with --compression-config)",
            source,
            kept["model"]["tp_size"],
            tp_size,
        )
        kept = None
    meta = save_checkpoint(
        out,
        lambda r: shard_state_dict(full, r, tp_size, cfg),
        model_config=cfg,
        tp_size=tp_size,
        dtype=dtype,
        tokenizer_json=tokenizer_json,
        tokenizer_ids=ids,
        source=info,
        compression=compression if compression is not None else kept,
        force=force,
        progress=progress,
    )
    logger.info("megatron-tpcomp: wrote %s (TP=%d, %s)", out, tp_size, meta.dtype)
    return meta


def export_hf(ckpt: str | Path, output: str | Path, *, force: bool = False) -> Path:
    """Write a megatron-tpcomp checkpoint back as a Hugging Face model directory (safetensors), atomically.

    The directory also holds ``tpcomp_hf_export.json`` (what it was exported from), which is what lets a later
    ``force`` replace it; ``force`` never deletes a directory without it.
    """
    meta = read_metadata(ckpt)
    out = Path(output)
    check_replaceable(out, force)
    full = merge_shards([load_shard(meta, r) for r in range(meta.tp_size)], meta.model_config)
    sd = hf.megatron_to_hf(full, meta.model_config)
    tokenizer = meta.tokenizer_path.read_text() if meta.tokenizer_path else None
    tmp = make_partial_dir(out)
    try:
        model_type = meta.source.get("model_type", "llama")
        hf.write_hf_checkpoint(tmp, meta.model_config, sd, model_type=model_type, tokenizer_json=tokenizer)
        marker = {"format": HF_EXPORT_FORMAT, "version": 1, "exported_from": str(meta.path)}
        (tmp / HF_EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        install_partial_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
