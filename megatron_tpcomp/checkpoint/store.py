"""The tensor-parallel Megatron-Core checkpoint directory: atomic save and verified weights-only load.

Layout (Megatron's legacy per-rank layout, so Megatron's ``--load`` finds the shards; plus one JSON file that
makes the directory self-describing, :mod:`.metadata`)::

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
only ``argparse.Namespace`` allowed besides: no pickled code ever runs. Saving fills a temporary sibling directory
and renames it into place at the end (:mod:`.directories`), so an interrupted save never leaves a directory that
looks complete. :func:`save_checkpoint` runs the metadata checks before it writes; :func:`load_shard` checks
the tensors against the metadata.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint import megatron_args
from megatron_tpcomp.checkpoint.directories import (
    check_replaceable,
    install_partial_dir,
    make_partial_dir,
    sha256_file,
)
from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import META_FILE, TOKENIZER_FILE, TRACKER_FILE
from megatron_tpcomp.checkpoint.metadata import (
    CheckpointMeta,
    check_shard,
    read_metadata,
    shard_relpath,
    validate_compression,
    validate_metadata,
    validate_model_config,
    validate_tokenizer,
    validate_tp_size,
)
from megatron_tpcomp.megatron.model import ModelConfig

logger = logging.getLogger("megatron_tpcomp")


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
        tokenizer = validate_tokenizer({"file": TOKENIZER_FILE, **dict(tokenizer_ids or {})}, cfg, where, None)
    comp = validate_compression(dict(compression) if compression else None, cfg, tp_size, where)
    tmp = make_partial_dir(out)
    try:
        files = _write_shards(tmp, out, shard_for_rank, cfg, tp_size, dtype, progress)
        (tmp / TRACKER_FILE).write_text("release")
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
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
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
    if verify and sha256_file(path) != meta.files[rel]["sha256"]:
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
