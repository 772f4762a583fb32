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
and renames it into place at the end, so an interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint import megatron_args
from megatron_tpcomp.megatron.model import ModelConfig

FORMAT = "megatron-tpcomp-checkpoint"
VERSION = 1
META_FILE = "tpcomp_checkpoint.json"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint or source file that cannot be used; the message names the file and the problem."""


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
            to be in memory at a time).
        model_config, tp_size, dtype: recorded in the metadata; tensors are cast to ``dtype``.
        tokenizer_json: contents of a ``tokenizers`` JSON file, saved as ``tokenizer.json``.
        tokenizer_ids: ``{"bos_id": ..., "eos_id": ...}`` recorded beside it.
        source, compression: recorded as given.
        force: replace an existing ``out_dir``; without it an existing path is an error.
        progress: show a progress bar over the shards.

    Raises:
        CheckpointError: ``out_dir`` exists and ``force`` is False.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; pass --force (force=True) to replace it")
    if dtype not in (torch.float32, torch.bfloat16):
        raise CheckpointError(f"dtype must be float32 or bfloat16, got {dtype}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for rank in tqdm(range(tp_size), desc=f"writing {out.name}", unit="shard", disable=not progress):
            sd = {
                k: (v.to(dtype).contiguous() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in shard_for_rank(rank).items()
            }
            rel = shard_relpath(rank)
            path = tmp / rel
            path.parent.mkdir(parents=True)
            # Megatron-LM's own keys too (args, iteration): --use-checkpoint-args reads the architecture.
            extras = megatron_args.shard_extras(model_config, tp_size, str(dtype).removeprefix("torch."))
            torch.save({"model": sd, "checkpoint_version": 3.0, **extras}, path)
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        (tmp / "latest_checkpointed_iteration.txt").write_text("release")
        tokenizer = None
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
            # BOS/EOS/PAD by text, for Megatron-LM's Hugging Face tokenizer (else its eod is None).
            megatron_args.write_tokenizer_config(tmp, tokenizer_json, dict(tokenizer_ids or {}))
            tokenizer = {"file": TOKENIZER_FILE, **dict(tokenizer_ids or {})}
        meta = CheckpointMeta(
            path=out,
            model_config=model_config,
            tp_size=tp_size,
            dtype=str(dtype).removeprefix("torch."),
            tokenizer=tokenizer,
            source=dict(source or {}),
            compression=dict(compression) if compression else None,
            files=files,
        )
        # The metadata is written last: a directory without it is never taken for a checkpoint.
        (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_metadata(ckpt_dir: str | Path) -> CheckpointMeta:
    """Read and validate ``tpcomp_checkpoint.json``.

    Raises:
        CheckpointError: missing directory or file, malformed JSON, wrong format/version, bad model config, or
            a listed shard that is missing or has the wrong size.
    """
    path = Path(ckpt_dir)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path} is missing: {path} is not a megatron-tpcomp checkpoint (or its conversion did not finish)"
        )
    try:
        data = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: 'format' must be {FORMAT!r}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: version {data.get('version')!r} is not supported; expected {VERSION}")
    try:
        cfg = ModelConfig.from_dict(data["model_config"])
        tp = int(data["tp_size"])
        files = dict(data["files"])
        dtype = str(data["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: bad or missing field: {exc}") from exc
    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"{meta_path}: dtype {dtype!r} is not float32 or bfloat16")
    if tp < 1 or sorted(files) != sorted(shard_relpath(r) for r in range(tp)):
        raise CheckpointError(f"{meta_path}: tp_size {tp} does not match the listed shards {sorted(files)}")
    for rel, info in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {rel} is missing")
        if f.stat().st_size != info.get("bytes"):
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, the metadata says {info.get('bytes')} (truncated or replaced)"
            )
    return CheckpointMeta(
        path=path,
        model_config=cfg,
        tp_size=tp,
        dtype=dtype,
        tokenizer=data.get("tokenizer"),
        source=data.get("source") or {},
        compression=data.get("compression"),
        files=files,
    )


def load_shard(meta: CheckpointMeta, tp_rank: int, *, verify: bool = True) -> dict[str, Any]:
    """The state dict of TP rank ``tp_rank`` (weights-only load, on the CPU).

    Args:
        verify: check the file's SHA-256 against the metadata (catches corruption that keeps the size).

    Raises:
        CheckpointError: rank out of range, checksum mismatch, or an unreadable file.
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


def load_model(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    parallel_output: bool = True,
    sequence_parallel: bool = False,
    verify: bool = True,
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build the checkpoint's GPTModel on this rank and load this rank's shard.

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
