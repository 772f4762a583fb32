"""Megatron ``torch_dist`` checkpoints (megatron-core's ``dist_checkpointing``): read, load at any TP size, write.

What Megatron-LM's ``save_checkpoint`` writes with ``--ckpt-format torch_dist`` (its default in 0.16)::

    CKPT/
      latest_checkpointed_iteration.txt   "release" or the iteration number N
      iter_000000N/  (or release/)
        common.pt        everything not sharded: Megatron-LM's ``args`` (the architecture), ``iteration``,
                         ``checkpoint_version``, the content metadata (written first)
        __R_T.distcp     tensor chunks written by rank R (writer T), raw ``torch.save`` records
        .metadata        torch.distributed.checkpoint's index: every tensor's global shape, dtype and chunks, and
                         where each chunk lies (file, offset, length)
        metadata.json    {"sharded_backend": "torch_dist", ...} (written last)
      tokenizer.json, tokenizer_config.json   (only when :func:`save` wrote the checkpoint; optional)

A tensor is stored as its *global* (TP=1) tensor cut into chunks, so the files do not depend on the TP or PP size
that wrote them: reading for any TP size is reading the global tensor and cutting it with
:func:`~megatron_tpcomp.megatron.model.shard_state_dict`. Keys are megatron-core's ``sharded_state_dict`` keys,
which differ from ``state_dict`` keys in three ways this module undoes (checked in megatron-core 0.16.1:
``transformer_block.py``, ``transformer_layer.py``, ``gpt_layer_specs.py``, ``mlp.py``):

- layers are stacked: ``decoder.layers.self_attention.linear_qkv.weight`` is ``[num_layers, rows, hidden]``
  (``decoder.layers.<i>.<name>`` without the layer axis when the writer used ``non_homogeneous_layers`` or
  ``singleton_local_shards``);
- the norms carry Transformer Engine's names whatever the layer spec: ``self_attention.linear_qkv.
  layer_norm_weight`` is ``input_layernorm.weight``, ``mlp.linear_fc1.layer_norm_weight`` is
  ``pre_mlp_layernorm.weight``;
- SwiGLU's ``linear_fc1.weight`` is the global ``[gate; up]`` (``[2 * ffn, hidden]``, each rank's two halves put
  back in place), or two tensors ``linear_fc1.weight_w`` (gate) / ``_v`` (up) with ``singleton_local_shards``.

The architecture comes from ``common.pt``'s ``args`` (Megatron-LM's argument names), checked against the tensors'
shapes in ``.metadata``; an architecture this package's GPT model cannot express (LayerNorm, MoE, QK norm,
learned positions, biases other than QKV, RoPE scaling) is refused by name, never dropped.

Nothing in the directory is trusted. ``.metadata`` is a pickle; torch reads it with plain ``pickle.load``, so it
is unpickled here with only torch.distributed.checkpoint's own metadata classes allowed (:func:`_read_index`),
and only that parsed index is handed to torch's reader. ``common.pt`` and every chunk load weights-only. Every
file a chunk lies in must be a plain file of the directory, present and long enough, and the chunks of every model
tensor must cover it exactly, without overlap, before anything is read (:func:`_check_chunks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.checkpoint import megatron_args
from megatron_tpcomp.checkpoint.directories import install_partial_dir, make_partial_dir
from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import (
    COMMON_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    ITER_DIR,
    TOKENIZER_FILE,
    TRACKER_FILE,
    find_checkpoint,
    read_small,
    tracked_dir,
)
from megatron_tpcomp.checkpoint.megatron_args import TOKENIZER_CONFIG_FILE
from megatron_tpcomp.checkpoint.metadata import (
    CheckpointMeta,
    check_shard,
    expected_shard_shapes,
    validate_model_config,
)
from megatron_tpcomp.checkpoint.store import load_into
from megatron_tpcomp.megatron.model import ModelConfig, shard_state_dict

logger = logging.getLogger("megatron_tpcomp")

FORMAT = "megatron-torch_dist"
#: What Megatron-LM 0.16 passes to ``sharded_state_dict``/``dist_checkpointing.save`` for a model (its
#: ``_build_sharded_state_dict_metadata`` without the optimizer entries and the process group).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
#: Largest ``.metadata`` read: it lists every chunk of every tensor (model and optimizer); a 70B-class model
#: with a distributed optimizer at a few thousand ranks is tens of MB.
MAX_INDEX_BYTES = 1 << 30
_LAYER_KEY = re.compile(r"decoder\.layers\.(?:(\d+)\.)?(.+)")
#: Top-level names of model tensors in a sharded state dict; anything else (``optimizer.*``, ``rng_state``,
#: ``rerun_state_machine_state``) is training state this package does not read.
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.", "position_embeddings.")
#: Checkpoint key (inside a layer) -> our ``state_dict`` key (inside ``decoder.layers.<i>.``).
_LAYER_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias": "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
}
_FC1_HALVES = ("mlp.linear_fc1.weight_w", "mlp.linear_fc1.weight_v")  # singleton_local_shards: gate, up
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ------------------------------------------------------------------------------------------- finding one


# ------------------------------------------------------------------------------- the index (.metadata)


def _allowed_index_global(module: str, name: str) -> Any:
    """The object ``module.name`` if a torch.distributed.checkpoint index may refer to it, else None.

    Allowed: the dataclasses and enums of torch.distributed.checkpoint's ``metadata``, ``planner`` and
    ``filesystem`` modules (the index is built from them), ``torch.Size``, torch dtypes,
    ``torch.serialization._get_layout`` (maps a layout's name to the layout), ``collections.OrderedDict``.
    """
    import collections

    if module in (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint.filesystem",
    ):
        obj = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, None)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        return None
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if obj is torch.Size or isinstance(obj, torch.dtype) else None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    return None


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file with only :func:`_allowed_index_global` objects: anything else (a
    function to call, another class) is refused before it is looked up, so no code from the file runs."""

    def __init__(self, file: Any, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_index_global(module, name)
        if obj is None:
            raise CheckpointError(
                f"{self.where}: refers to {module}.{name}, which a torch.distributed.checkpoint index never holds; "
                "refusing to unpickle it"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.where}: holds a persistent reference; not a torch.distributed.checkpoint index")


def _read_index(d: Path) -> Any:
    """torch.distributed.checkpoint's ``Metadata`` of the checkpoint in ``d``, unpickled safely and checked:
    chunk files are plain files of ``d``, present and long enough for every chunk."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = d / INDEX_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the torch_dist save did not finish (torch.distributed.checkpoint writes it after "
            "every rank's chunks) or the directory is an incomplete copy"
        )
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path}: {size} bytes; expected at most {MAX_INDEX_BYTES} for a checkpoint index")
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # pickle.UnpicklingError, EOFError, TypeError from a malformed stream
        raise CheckpointError(f"{path}: not a readable torch.distributed.checkpoint index ({exc})") from None
    if not isinstance(index, Metadata) or not isinstance(getattr(index, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{path}: holds a {type(index).__name__}; expected torch.distributed.checkpoint Metadata")
    storage = getattr(index, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path}: lists no chunk locations (storage_data); not a file-system checkpoint")
    ends: dict[str, int] = {}
    for where, info in storage.items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        # A chunk is read from d/rel: a path elsewhere would make the reader open someone else's file.
        if not isinstance(rel, str) or rel != Path(rel).name or rel in ("", ".", ".."):
            raise CheckpointError(f"{path}: chunk {where} lies in {rel!r}; expected a file name inside {d}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise CheckpointError(f"{path}: chunk {where} has offset {offset!r}, length {length!r}; expected >= 0")
        ends[rel] = max(ends.get(rel, 0), offset + length)
    for rel, end in sorted(ends.items()):
        f = d / rel
        if not f.is_file():
            raise CheckpointError(
                f"{f} is missing ({len(ends)} chunk files listed in {INDEX_FILE}): the checkpoint is incomplete (a "
                "rank's files were not written or not copied)"
            )
        if f.stat().st_size < end:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, but {INDEX_FILE} places chunks up to byte {end} (truncated)"
            )
    return index


# ---------------------------------------------------------------------------------- config and common.pt


def _read_config(d: Path) -> dict[str, Any]:
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the torch_dist save did not finish (megatron-core writes it last) or the directory "
            "is an incomplete copy"
        )
    try:
        data = json.loads(read_small(path, "megatron-core's checkpoint config"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("sharded_backend") != "torch_dist":
        backend = data.get("sharded_backend") if isinstance(data, dict) else data
        raise CheckpointError(
            f"{path}: sharded_backend is {backend!r}; expected 'torch_dist' (other dist_checkpointing backends are "
            "not supported: re-save with Megatron-LM's --ckpt-format torch_dist)"
        )
    if data.get("common_backend", "torch") != "torch":
        raise CheckpointError(f"{path}: common_backend is {data.get('common_backend')!r}; expected 'torch'")
    return data


def _read_common(d: Path, common_pt_expected: bool = True) -> dict[str, Any]:
    """``common.pt`` loaded weights-only (argparse.Namespace and megatron-core's registered safe classes allowed).

    ``common_pt_expected``: False where ``metadata.json`` names no ``common_backend``, which is how
    megatron-core 0.17+ marks a checkpoint whose common state lives inside the index instead."""
    path = d / COMMON_FILE
    if not path.is_file():
        if not common_pt_expected:
            # megatron-core 0.17+ no longer writes common.pt: its saver keeps the common state (Megatron-LM's
            # args among it) as byte items inside the DCP index and chunk files, which this reader does not parse.
            raise CheckpointError(
                f"{d} has no {COMMON_FILE}: a torch_dist checkpoint written by megatron-core 0.17 or newer keeps "
                "Megatron-LM's args inside the index, which this reader does not read yet (checkpoints written by "
                "megatron-core 0.16 work); re-save it with megatron-core 0.16, or convert from its Hugging Face form"
            )
        raise CheckpointError(f"{path} is missing: an incomplete torch_dist checkpoint (it holds Megatron-LM's args)")
    allowed: list[Any] = [argparse.Namespace]
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS  # what Megatron-LM stores in args (enums, dtypes)

        allowed += list(SAFE_GLOBALS)
    except ImportError:
        pass
    try:
        with torch.serialization.safe_globals(allowed):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (zip), EOFError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be loaded weights-only ({first})") from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: holds a {type(common).__name__}; expected a dict")
    return common


#: Megatron-LM argument -> (value this package's model has, what to say). A checkpoint whose args differ in one
#: of these holds a model the local GPT spec here would build differently: refused, naming the argument.
_REQUIRED_ARGS: dict[str, tuple[Any, str]] = {
    "normalization": ("RMSNorm", "'RMSNorm'"),
    "swiglu": (True, "True (SwiGLU MLP)"),
    "add_bias_linear": (False, "False (no linear biases besides --add-qkv-bias)"),
    "position_embedding_type": ("rope", "'rope'"),
    "rotary_percent": (1.0, "1.0"),
    "rotary_interleaved": (False, "False"),
    "apply_layernorm_1p": (False, "False"),
    "qk_layernorm": (False, "False (no QK norm)"),
    "multi_latent_attention": (False, "False"),
    "use_rope_scaling": (False, "False (no Llama-3 RoPE scaling)"),
    "squared_relu": (False, "False"),
}


def model_config_from_args(args: Any, where: str, vocab_rows: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` that Megatron-LM's ``args`` describe.

    Args:
        args: the ``argparse.Namespace`` from ``common.pt``.
        where: named in every message.
        vocab_rows: rows of the stored embedding, used when the args lack ``padded_vocab_size``.

    Raises:
        CheckpointError: args missing, a field out of bounds (:func:`~.store.validate_model_config`), or an
            architecture this package's model cannot express (one line naming the argument and what was expected).
    """
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(
            f"{where}: holds no Megatron-LM 'args' (found {type(args).__name__}); the architecture is unknown"
        )
    a = vars(args)
    for name, (want, text) in _REQUIRED_ARGS.items():
        got = a.get(name, want if name not in ("normalization", "swiglu", "position_embedding_type") else None)
        same = math.isclose(got, want) if isinstance(want, float) and isinstance(got, (int, float)) else got == want
        if not same:
            raise CheckpointError(
                f"{where}: args.{name} is {got!r}; megatron-tpcomp's GPT model needs {text} (Llama-family models)"
            )
    experts = a.get("num_experts")
    if experts not in (None, 0):
        raise CheckpointError(f"{where}: args.num_experts is {experts!r}; expected None (mixture-of-experts models)")
    mtp = a.get("mtp_num_layers")
    if mtp not in (None, 0):
        raise CheckpointError(f"{where}: args.mtp_num_layers is {mtp!r}; expected None (multi-token prediction)")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if a.get(name) is None:
            raise CheckpointError(f"{where}: args.{name} is missing")
    heads = a["num_attention_heads"]
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    vocab = a.get("padded_vocab_size") or vocab_rows
    values = {
        "num_layers": a["num_layers"],
        "hidden_size": a["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "ffn_hidden_size": a["ffn_hidden_size"],
        "vocab_size": vocab,
        "max_sequence_length": a.get("max_position_embeddings") or a.get("seq_length"),
        "rotary_base": a.get("rotary_base", 10000),
        "norm_epsilon": a.get("norm_epsilon", 1e-5),
        "tie_embeddings": not a.get("untie_embeddings_and_output_weights", False),
        "qkv_bias": bool(a.get("add_qkv_bias", False)),
    }
    names = {
        "num_query_groups": "num_query_groups",
        "vocab_size": "padded_vocab_size",
        "max_sequence_length": "max_position_embeddings",
        "tie_embeddings": "untie_embeddings_and_output_weights (negated)",
        "qkv_bias": "add_qkv_bias",
    }
    cfg = validate_model_config(values, where, prefix="args.", names=names)
    kv = a.get("kv_channels")
    if kv is not None and kv != cfg.head_dim:
        raise CheckpointError(
            f"{where}: args.kv_channels is {kv!r}; megatron-tpcomp's GPT model needs hidden_size / "
            f"num_attention_heads = {cfg.head_dim}"
        )
    return cfg


# ----------------------------------------------------------------------------------------- the checkpoint


@dataclass
class TorchDistCheckpoint:
    """A ``torch_dist`` checkpoint opened and checked by :func:`open_checkpoint` (nothing loaded yet).

    Attributes:
        root: the directory given (holds the tracker file and, from :func:`save`, the tokenizer).
        path: the iteration directory (``release/``, ``iter_000000N/``, or ``root`` itself).
        iteration: None for a release.
        model_config: the architecture (from ``args``, checked against the stored shapes).
        dtype: the stored parameter dtype (``float32``, ``bfloat16`` or ``float16``).
        args: Megatron-LM's ``args``.
        index: torch.distributed.checkpoint's ``Metadata``.
        plan: checkpoint key -> ``(layer or None, our key inside the layer or model)``, for every model tensor.
        tokenizer_json, tokenizer_ids: ``tokenizer.json`` beside the checkpoint and its BOS/EOS ids, or None.
    """

    root: Path
    path: Path
    iteration: int | None
    model_config: ModelConfig
    dtype: str
    args: argparse.Namespace
    index: Any
    plan: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    tokenizer_json: str | None = None
    tokenizer_ids: dict[str, int | None] = field(default_factory=dict)

    def meta(self, tp_size: int, dtype: str | None = None) -> CheckpointMeta:
        """A :class:`~.store.CheckpointMeta` describing this checkpoint loaded at ``tp_size``."""
        tok = None
        if self.tokenizer_json is not None:
            tok = {"file": TOKENIZER_FILE, **self.tokenizer_ids}
        return CheckpointMeta(
            path=self.root,
            model_config=self.model_config,
            tp_size=tp_size,
            dtype=dtype or _our_dtype(self.dtype),
            tokenizer=tok,
            source=self.source_info(),
            compression=None,
            files={},
        )

    def source_info(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "path": str(self.root),
            "iteration": "release" if self.iteration is None else self.iteration,
            "dtype": self.dtype,
        }


def _our_dtype(stored: str) -> str:
    # fp16 weights widen exactly to fp32; this package's models run in fp32 or bf16.
    return "bfloat16" if stored == "bfloat16" else "float32"


def _tokenizer_beside(root: Path, d: Path) -> tuple[str | None, dict[str, int | None]]:
    """``tokenizer.json`` (and its BOS/EOS from ``tokenizer_config.json``) in ``root`` or ``d``, if any."""
    for base in (root, d):
        tj = base / TOKENIZER_FILE
        if not tj.is_file():
            continue
        text = tj.read_text()
        ids: dict[str, int | None] = {"bos_id": None, "eos_id": None}
        tc = base / TOKENIZER_CONFIG_FILE
        if tc.is_file():
            from tokenizers import Tokenizer

            try:
                config = json.loads(read_small(tc, "a tokenizer config"))
                tk = Tokenizer.from_str(text)
            except Exception as exc:  # ValueError (JSON), tokenizers' Exception
                raise CheckpointError(f"{tc}: unreadable beside {tj} ({exc})") from None
            for role, key in (("bos_token", "bos_id"), ("eos_token", "eos_id")):
                token = config.get(role) if isinstance(config, dict) else None
                if isinstance(token, dict):  # transformers' AddedToken form
                    token = token.get("content")
                ids[key] = tk.token_to_id(token) if isinstance(token, str) else None
        return text, ids
    return None, {}


def _plan(index: Any, cfg: ModelConfig, where: Path) -> dict[str, tuple[int | None, str]]:
    """Map every model tensor of the index to our keys, checking its shape; refuse tensors we have no place for."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    want = expected_shard_shapes(cfg, 1)
    plan: dict[str, tuple[int | None, str]] = {}

    def check(key: str, md: Any, shape: tuple[int, ...]) -> None:
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{where}: {key} is stored as {type(md).__name__}; expected a tensor")
        if tuple(md.size) != shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(md.size)}, but the args (num_layers={cfg.num_layers}, hidden_size="
                f"{cfg.hidden_size}, ffn_hidden_size={cfg.ffn_hidden_size}, heads={cfg.num_attention_heads}/"
                f"{cfg.num_query_groups}, vocab={cfg.vocab_size}) imply {shape}"
            )
        if md.properties.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{where}: {key} is {md.properties.dtype}; expected float32, bfloat16 or float16")
        _check_chunks(key, md, where)

    for key, md in index.state_dict_metadata.items():
        if not key.startswith(_MODEL_PREFIXES) or "._extra_state" in key:
            continue  # training state (optimizer, RNG), or Transformer Engine's per-module extra state (FP8)
        m = _LAYER_KEY.fullmatch(key)
        if m:
            layer = None if m[1] is None else int(m[1])
            name = m[2]
            ours = _LAYER_NAMES.get(name) or ("mlp.linear_fc1.weight" if name in _FC1_HALVES else None)
            if ours is None or f"decoder.layers.0.{ours}" not in want:
                raise CheckpointError(
                    f"{where}: holds {key}, which megatron-tpcomp's GPT model (RMSNorm, SwiGLU, RoPE, no biases "
                    "besides QKV) has no place for; refusing to drop it"
                )
            shape = want[f"decoder.layers.0.{ours}"]
            if name in _FC1_HALVES:
                shape = (shape[0] // 2, *shape[1:])
            if layer is None:
                shape = (cfg.num_layers, *shape)
            elif layer >= cfg.num_layers:
                raise CheckpointError(f"{where}: holds {key}, but the args say num_layers={cfg.num_layers}")
            check(key, md, shape)
            plan[key] = (layer, name)
            continue
        if key not in want:
            raise CheckpointError(
                f"{where}: holds {key}, which megatron-tpcomp's GPT model has no place for (tie_embeddings="
                f"{cfg.tie_embeddings}); refusing to drop it"
            )
        check(key, md, want[key])
        plan[key] = (None, key)
    # Every layer tensor of the model must be there, once: stacked or per layer, fc1 whole or as gate/up halves.
    covered: dict[str, set[int]] = {}
    for key, (layer, name) in plan.items():
        if not key.startswith("decoder.layers."):
            continue
        tag = name if name in _FC1_HALVES else _LAYER_NAMES[name]
        layers = set(range(cfg.num_layers)) if layer is None else {layer}
        if covered.get(tag, set()) & layers:
            raise CheckpointError(f"{where}: {key} stores layer(s) that another key also stores")
        covered.setdefault(tag, set()).update(layers)
    every = set(range(cfg.num_layers))
    for ours in sorted({k.split(".", 3)[3] for k in want if k.startswith("decoder.layers.0.")}):
        complete = covered.get(ours, set())
        if ours == "mlp.linear_fc1.weight":
            halves = covered.get(_FC1_HALVES[0], set()) & covered.get(_FC1_HALVES[1], set())
            if complete & halves:
                raise CheckpointError(f"{where}: fc1 of some layer is stored both whole and as gate/up halves")
            complete = complete | halves
        if complete != every:
            missing = sorted(every - complete)
            raise CheckpointError(
                f"{where}: no tensor for decoder.layers.{missing[0]}.{ours} ({len(missing)} layer(s) missing); "
                "expected every layer of the model"
            )
    for key in want:
        if not key.startswith("decoder.layers.") and key not in plan:
            raise CheckpointError(f"{where}: no tensor {key}; expected one for this model")
    return plan


def open_checkpoint(path: str | Path) -> TorchDistCheckpoint:
    """Open and check a ``torch_dist`` checkpoint (the directory with the tracker file, or an iteration
    directory): config, ``common.pt`` and its args, the index, every chunk file present and long enough, every
    model tensor's shape. Reads no tensor.

    Raises:
        CheckpointError: one line naming the file and what is wrong or missing.
    """
    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"checkpoint directory {given} does not exist")
    d = find_checkpoint(given)
    if d is None:
        raise CheckpointError(
            f"{given}: not a Megatron torch_dist checkpoint (no {CONFIG_FILE}, {COMMON_FILE} or {TRACKER_FILE})"
        )
    root = given
    if d != given:  # found through the tracker file
        iteration = tracked_dir(given)[1]  # type: ignore[index]
    else:  # the iteration directory itself
        m = ITER_DIR.fullmatch(given.name)
        iteration = int(m[1]) if m else None
        if (m or given.name == "release") and (given.parent / TRACKER_FILE).is_file():
            root = given.parent  # where the tracker (and a tokenizer written by save()) is
    config = _read_config(d)
    common = _read_common(d, common_pt_expected="common_backend" in config)
    index = _read_index(d)
    emb = index.state_dict_metadata.get("embedding.word_embeddings.weight")
    rows = int(emb.size[0]) if getattr(emb, "size", None) is not None and len(emb.size) == 2 else None
    where = str(d / COMMON_FILE)
    cfg = model_config_from_args(common.get("args"), where, rows)
    plan = _plan(index, cfg, d / INDEX_FILE)
    dtype = _DTYPE_NAMES[index.state_dict_metadata["embedding.word_embeddings.weight"].properties.dtype]
    tokenizer_json, ids = _tokenizer_beside(root, d)
    return TorchDistCheckpoint(
        root=root,
        path=d,
        iteration=iteration,
        model_config=cfg,
        dtype=dtype,
        args=common["args"],
        index=index,
        plan=plan,
        tokenizer_json=tokenizer_json,
        tokenizer_ids=ids,
    )


# ------------------------------------------------------------------------------------------- reading tensors


def _check_chunks(key: str, md: Any, where: Path) -> None:
    """The chunks of tensor ``key`` lie inside it, do not overlap and cover it exactly (else part of the tensor
    would keep whatever memory it was allocated with)."""
    shape = tuple(md.size)
    boxes = []
    for c in md.chunks:
        off, size = tuple(c.offsets), tuple(c.sizes)
        if len(off) != len(shape) or len(size) != len(shape):
            raise CheckpointError(f"{where}: a chunk of {key} has offsets {off}, sizes {size} for shape {shape}")
        if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(off, size, shape, strict=True)):
            raise CheckpointError(f"{where}: a chunk of {key} (offsets {off}, sizes {size}) lies outside {shape}")
        boxes.append((off, size))
    for i, (oa, sa) in enumerate(boxes):
        for ob, sb in boxes[i + 1 :]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(oa, sa, ob, sb, strict=True)):
                raise CheckpointError(f"{where}: chunks of {key} at offsets {oa} and {ob} overlap")
    covered = sum(math.prod(size) for _, size in boxes)
    if covered != math.prod(shape):
        raise CheckpointError(
            f"{where}: the chunks of {key} hold {covered} of its {math.prod(shape)} values; expected all of them"
        )


def _load_global(ckpt: TorchDistCheckpoint, key: str) -> torch.Tensor:
    """The global tensor ``key`` (stored dtype), read through torch.distributed.checkpoint's own file reader,
    handed the index :func:`open_checkpoint` checked (the reader's own ``pickle.load`` of ``.metadata`` never
    runs). In this process only (``no_dist``): no collective, whatever process group exists."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = ckpt.index
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    md = ckpt.index.state_dict_metadata[key]
    t = torch.empty(tuple(md.size), dtype=md.properties.dtype)  # every value is written: _check_chunks
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({key: t}, storage_reader=_Reader(ckpt.path), no_dist=True)
    except Exception as exc:  # CheckpointException wraps per-rank errors; torch.load errors of a damaged chunk
        text = " ".join(str(exc).split())
        raise CheckpointError(f"{ckpt.path}: cannot read {key} ({text[:300]})") from None
    return t


def iter_full_tensors(ckpt: TorchDistCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Our TP=1 ``state_dict`` entries (key, full tensor in the stored dtype), one checkpoint tensor at a time
    (a stacked tensor yields one entry per layer; fc1's gate/up halves are joined into ``[gate; up]``)."""
    halves: dict[int, dict[str, torch.Tensor]] = {}
    for key, (layer, name) in ckpt.plan.items():
        t = _load_global(ckpt, key)
        if not key.startswith("decoder.layers."):
            yield name, t
            continue
        per_layer = t.unbind(0) if layer is None else (t,)
        layers = range(ckpt.model_config.num_layers) if layer is None else (layer,)
        for i, part in zip(layers, per_layer, strict=True):
            if name in _FC1_HALVES:
                got = halves.setdefault(i, {})
                got[name] = part
                if len(got) == 2:
                    gate, up = got.pop(_FC1_HALVES[0]), got.pop(_FC1_HALVES[1])
                    yield f"decoder.layers.{i}.mlp.linear_fc1.weight", torch.cat([gate, up], dim=0)
                continue
            yield f"decoder.layers.{i}.{_LAYER_NAMES[name]}", part.clone()


def read_source(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``tpcomp convert``'s reader: (config, TP=1 state dict in the stored dtype, source info with the
    tokenizer beside the checkpoint, if any)."""
    ckpt = open_checkpoint(path)
    full = dict(iter_full_tensors(ckpt))
    check_shard(full, ckpt.model_config, 1, str(ckpt.path))
    info: dict[str, Any] = ckpt.source_info()
    if ckpt.tokenizer_json is not None:
        info["tokenizer_json"] = ckpt.tokenizer_json
        info["bos_token_id"] = ckpt.tokenizer_ids.get("bos_id")
        info["eos_token_id"] = ckpt.tokenizer_ids.get("eos_id")
    else:
        logger.warning(
            "megatron-tpcomp: %s has no %s beside it: the converted checkpoint has no tokenizer (copy one in "
            "before converting to run text generation)",
            ckpt.root,
            TOKENIZER_FILE,
        )
    return ckpt.model_config, full, info


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    parallel_output: bool = True,
    sequence_parallel: bool = False,
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """:func:`megatron_tpcomp.checkpoint.load_model` for a ``torch_dist`` checkpoint, at whatever TP size the
    parallel state has (every size that divides the model: the stored tensors are global).

    Each rank reads one checkpoint tensor at a time and keeps its own slice (peak memory: the local shard plus
    one global tensor, e.g. the embedding).

    Raises:
        CheckpointError: the checkpoint is incomplete or damaged, or the TP size does not divide the model.
    """
    from megatron.core import parallel_state

    from megatron_tpcomp.megatron.model import build_gpt_model

    ckpt = open_checkpoint(path)
    cfg = ckpt.model_config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    try:
        cfg.check_tp(tp)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.root}: cannot load at TP={tp}: {exc}") from None
    dtype = dtype or {"bfloat16": torch.bfloat16}.get(ckpt.dtype, torch.float32)
    model = build_gpt_model(
        cfg, tp, dtype=dtype, parallel_output=parallel_output, sequence_parallel=sequence_parallel, seed=0
    )
    local: dict[str, torch.Tensor] = {}
    for key, t in iter_full_tensors(ckpt):
        local[key] = shard_state_dict({key: t}, rank, tp, cfg)[key].to(dtype)
    check_shard(local, cfg, tp, f"{ckpt.path} (TP rank {rank} of {tp})", dtype=dtype)
    load_into(model, local, str(ckpt.path))
    return model, ckpt.meta(tp, _DTYPE_NAMES.get(dtype))


# ------------------------------------------------------------------------------------------------- writing


def require_psutil() -> None:
    # megatron-core's writer processes call psutil before their error handling: without it each one dies and
    # the saving rank waits for them forever.
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise CheckpointError(
            "megatron-core's torch_dist saver needs psutil (pip install psutil): without it its writer processes "
            "fail and the save waits forever"
        )


def save(
    model: torch.nn.Module,
    output: str | Path,
    *,
    model_config: ModelConfig,
    tokenizer_json: str | None = None,
    tokenizer_ids: Mapping[str, int | None] | None = None,
) -> Path:
    """Write ``model`` (this rank's TP shard; every rank of the default process group calls this, each with its
    shard) as a Megatron-LM ``torch_dist`` release checkpoint, with megatron-core's own saver
    (``dist_checkpointing.save`` of ``model.sharded_state_dict()``).

    ``common.pt`` holds Megatron-LM's ``args`` for the architecture (``--use-checkpoint-args`` works, with
    ``--ckpt-format torch_dist``); the tokenizer, if given, goes beside it with its ``tokenizer_config.json``.
    The directory is filled under a temporary name and renamed at the end; ``output`` must not exist.

    Raises:
        CheckpointError: ``output`` exists, psutil is missing, or the world is not one TP group.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    out = Path(output)
    require_psutil()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if dist.get_world_size() != tp:
        raise CheckpointError(f"save: the world has {dist.get_world_size()} ranks but TP={tp}; expected one TP group")
    rank = dist.get_rank()
    problem = None
    tmp = None
    if rank == 0:
        if os.path.lexists(out):
            problem = f"{out} already exists; a torch_dist checkpoint is written into a new directory"
        else:
            tmp = make_partial_dir(out)
    shared: list[Any] = [problem, str(tmp) if tmp else None]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise CheckpointError(shared[0])
    tmp = Path(shared[1])
    try:
        dtype = next(p.dtype for p in model.parameters())
        args = megatron_args.megatron_args(model_config, tp, _DTYPE_NAMES.get(dtype, "float32"))
        args.ckpt_format = "torch_dist"
        state = {
            "model": model.sharded_state_dict(metadata=dict(CONTENT_METADATA)),
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": 0,
        }
        release = tmp / "release"
        if rank == 0:
            release.mkdir()
        dist.barrier()
        dist_checkpointing.save(state, str(release), content_metadata=dict(CONTENT_METADATA))
        if rank == 0:
            (tmp / TRACKER_FILE).write_text("release")
            if tokenizer_json is not None:
                (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
                megatron_args.write_tokenizer_config(tmp, tokenizer_json, dict(tokenizer_ids or {}))
            install_partial_dir(tmp, out, False)
        dist.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
