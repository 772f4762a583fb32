"""Write any ``tpcomp convert`` source as a Megatron-LM ``torch_dist`` checkpoint with megatron-core's own saver::

    [torchrun --nproc-per-node N] python -m megatron_tpcomp.checkpoint.export SOURCE OUTPUT

Above ``convert`` (it reads every kind of source) and ``torch_dist`` (it writes that format).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from megatron_tpcomp.checkpoint.convert import read_source
from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import META_FILE
from megatron_tpcomp.checkpoint.metadata import read_metadata
from megatron_tpcomp.checkpoint.store import load_into, load_tpcomp_model
from megatron_tpcomp.checkpoint.torch_dist import require_psutil, save
from megatron_tpcomp.megatron.model import shard_state_dict


def export(source: str | Path, output: str | Path) -> Path:
    """Convert any ``tpcomp convert`` source into a ``torch_dist`` checkpoint at ``output``.

    Run alone (one process: a world of one rank, TP=1) or under ``torchrun --nproc-per-node N`` (N ranks, TP=N,
    over gloo): the stored tensors are the same global tensors either way; N only sets how the chunks are
    split into files. On the CPU only (megatron-core's CPU patches).
    """
    import torch.distributed as dist

    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    if torch.cuda.is_available():
        raise CheckpointError("torch_dist export runs on the CPU (gloo); run it with CUDA_VISIBLE_DEVICES=''")
    require_psutil()
    started = not dist.is_initialized()
    store_dir = None
    if started:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo")
        else:
            store_dir = tempfile.mkdtemp(prefix="tpcomp-export-")
            dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
    patches = cpu.enable_cpu(inference=False, checkpoint=True)
    try:
        tp = dist.get_world_size()
        M.init_parallel(tp)
        try:
            src = Path(source)
            if src.is_dir() and (src / META_FILE).is_file() and read_metadata(src).tp_size == tp:
                model, meta = load_tpcomp_model(src)
                cfg = meta.model_config
                tok = meta.tokenizer_path.read_text() if meta.tokenizer_path else None
                ids = {k: (meta.tokenizer or {}).get(k) for k in ("bos_id", "eos_id")}
            else:
                cfg, full, info = read_source(source, progress=False)
                stored = next(v.dtype for v in full.values() if isinstance(v, torch.Tensor))
                # fp16 sources widen exactly to fp32 (this package's models run in fp32 or bf16).
                model = M.build_gpt_model(cfg, tp, dtype=torch.bfloat16 if stored == torch.bfloat16 else torch.float32)
                load_into(model, shard_state_dict(full, dist.get_rank(), tp, cfg), str(source))
                del full
                tok = info.get("tokenizer_json")
                ids = {"bos_id": info.get("bos_token_id"), "eos_id": info.get("eos_token_id")}
            return save(model, output, model_config=cfg, tokenizer_json=tok, tokenizer_ids=ids)
        finally:
            M.destroy_parallel()
    finally:
        patches.__exit__(None, None, None)  # undoes only what this call installed
        if started:
            dist.destroy_process_group()
        if store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``[torchrun --nproc-per-node N] python -m megatron_tpcomp.checkpoint.export SOURCE OUTPUT``."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_tpcomp.checkpoint.export",
        description="Write any `tpcomp convert` source (HF model, GGUF, megatron-tpcomp checkpoint) as a Megatron-LM "
        "torch_dist checkpoint with megatron-core's own saver (alone: one rank; under torchrun: N ranks, TP=N).",
    )
    parser.add_argument("source")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.source, args.output)
    except CheckpointError as exc:
        print(f"torch_dist export: error: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get("RANK") or os.environ["RANK"] == "0":
        print(f"wrote torch_dist checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
