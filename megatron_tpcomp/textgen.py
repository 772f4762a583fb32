"""Megatron-Core text generation launcher with compressed TP communication (run it with ``torchrun``).

    torchrun --nproc-per-node 3 examples/run_text_generation.py --load CKPT --tensor-model-parallel-size 3 \\
        --tp-comm-compression int4:g32+had --prompt "The state of our union is" --output out.jsonl

Every process is one tensor-parallel rank (``torchrun``'s ``RANK``/``WORLD_SIZE``; gloo on CPU, NCCL on GPU). The
checkpoint is one written by ``tpcomp convert`` at the TP size used here; when it records a per-layer compression
config and no ``--tp-comm-compression*`` flag is given, that config is used. Generation runs through
megatron-core's static inference engine in batches of ``--micro-batch-size`` requests. Rank 0 writes one JSONL
record per prompt (text, token ids, time to first token, tokens per second) and, at the end, a compression
summary (bytes sent per layer and collective against Megatron's uncompressed collectives).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_tpcomp")


def build_parser() -> argparse.ArgumentParser:
    import megatron_tpcomp

    p = argparse.ArgumentParser(
        prog="run_text_generation.py",
        description=__doc__.split("\n\n")[0] + " Start one process per TP rank with torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model (Megatron names)")
    g.add_argument("--load", required=True, help="checkpoint directory written by `tpcomp convert`")
    g.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=None,
        help="TP size; must equal the checkpoint's and torchrun's world size (default: the checkpoint's)",
    )
    g.add_argument("--micro-batch-size", type=int, default=4, help="requests generated together (static batch)")
    g.add_argument("--bf16", action="store_true", help="compute in bfloat16 (default: the checkpoint's dtype)")
    g.add_argument("--inference-max-seq-length", type=int, default=1024, help="prompt + generated tokens, max")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument("--prompts-file", help='JSONL file, one {"prompt": "..."} per line (other keys are copied)')
    g.add_argument("--num-tokens-to-generate", type=int, default=32, help="tokens to generate per prompt")
    g.add_argument("--top-k", type=int, default=1, help="1 = greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234, help="sampling seed (same on every rank)")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="JSONL file of results (rank 0); default: print them")
    g.add_argument("--summary-json", help="write the compression summary as JSON (rank 0)")
    g.add_argument("--dist-timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    megatron_tpcomp.add_arguments(p)
    return p


def read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prompts from ``--prompt`` and ``--prompts-file``, as records ``{"prompt": str, ...}``."""
    records: list[dict[str, Any]] = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --prompts-file {path}: {exc}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f'{path}:{n}: expected an object with a string "prompt", got {line[:80]!r}')
            records.append(rec)
    if not records:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    return records


class _FirstForwardTimer:
    """Records when the first forward of a generation call ends: the prefill, i.e. the time to first token of
    every request in a static batch."""

    def __init__(self, model: torch.nn.Module):
        self.start = 0.0
        self.first_end: float | None = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        if self.first_end is None:
            self.first_end = time.perf_counter()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.first_end = None


def _init_distributed(timeout_s: float) -> None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("RANK/WORLD_SIZE are not set: start this script with torchrun (one process per TP rank)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def run(args: argparse.Namespace) -> int:
    from megatron_tpcomp.checkpoint import load_model, read_metadata
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M
    from megatron_tpcomp.megatron.args import config_from_args
    from megatron_tpcomp.megatron.generate import build_static_engine
    from megatron_tpcomp.tokenizer import TextTokenizer

    meta = read_metadata(args.load)  # every rank: a bad checkpoint fails before the process group forms
    prompts = read_prompts(args)
    config = config_from_args(args)
    tp = args.tensor_model_parallel_size or meta.tp_size
    _init_distributed(args.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story; the others report problems
        logger.setLevel(logging.WARNING)
    if world != tp:
        raise ValueError(f"torchrun started {world} processes but --tensor-model-parallel-size is {tp}")
    if not torch.cuda.is_available():
        cpu.enable_cpu_inference()
    M.init_parallel(tp, seed=args.seed)
    model, meta = load_model(args.load, dtype=torch.bfloat16 if args.bf16 else None)
    if torch.cuda.is_available():
        model = model.cuda()
    source = "flags"
    if config is None and meta.compression:
        config, source = CompressionConfig.from_dict(meta.compression, source=f"{args.load}"), "checkpoint"
    if config is not None:
        intercept.enable(model, config, telemetry=True)
        if rank == 0:
            logger.info("compression from %s: default %s, algo %s", source, config.default.spec, config.algo)
    elif rank == 0:
        logger.info("compression off (Megatron's own collectives)")
    tok = TextTokenizer.from_checkpoint(meta)
    engine = build_static_engine(
        model,
        tok,
        vocab_size=meta.model_config.vocab_size,
        max_batch=args.micro_batch_size,
        max_seq_len=args.inference_max_seq_length,
        dtype=torch.bfloat16 if args.bf16 else meta.torch_dtype,
        progress=False,
    )
    from megatron.core.inference.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, num_tokens_to_generate=args.num_tokens_to_generate
    )
    timer = _FirstForwardTimer(model)
    out_records = []
    torch.manual_seed(args.seed)
    for start in range(0, len(prompts), args.micro_batch_size):
        batch = prompts[start : start + args.micro_batch_size]
        timer.reset()
        results = engine.generate(prompts=[r["prompt"] for r in batch], sampling_params=params)
        total = time.perf_counter() - timer.start
        ttft = (timer.first_end or time.perf_counter()) - timer.start
        for rec, res in zip(batch, results, strict=True):
            ids = [int(t) for t in res.generated_tokens]
            out_records.append(
                {
                    **rec,
                    "generated_text": tok.detokenize(ids),
                    "generated_tokens": ids,
                    "ttft_ms": 1000.0 * ttft,
                    "tokens_per_s": len(ids) / total if total > 0 else None,
                    "batch_size": len(batch),
                }
            )
        if rank == 0:
            logger.info("generated %d/%d prompts", min(start + len(batch), len(prompts)), len(prompts))
    summary = _summary(config, meta, intercept.telemetry_summary())
    if rank == 0:
        _write_outputs(args, out_records, summary)
    intercept.disable(model)
    M.destroy_parallel()
    dist.destroy_process_group()
    return 0


def _summary(config: Any, meta: Any, traffic: dict[str, dict[str, float]]) -> dict[str, Any]:
    wire = sum(r["wire_bytes"] for r in traffic.values())
    base = sum(r["baseline_wire_bytes"] for r in traffic.values())
    layers = {}
    if config is not None:
        for layer in range(meta.model_config.num_layers):
            layers[str(layer)] = {b: config.setting_for(b, layer).spec for b in ("attention", "mlp")}
    return {
        "compression": config.to_dict() if config is not None else None,
        "per_layer_codec": layers,
        "wire_bytes_per_rank": wire,
        "uncompressed_bytes_per_rank": base,
        "bytes_saved_per_rank": base - wire,
        "ratio": base / wire if wire else None,
        "per_site": traffic,
    }


def _write_outputs(args: argparse.Namespace, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if args.output:
        Path(args.output).write_text(lines)
        logger.info("wrote %d results to %s", len(records), args.output)
    else:
        sys.stdout.write(lines)
    if summary["compression"] is None:
        logger.info("compression summary: off")
    else:
        codecs = sorted({s for blocks in summary["per_layer_codec"].values() for s in blocks.values()})
        logger.info(
            "compression summary: %.2f MB sent per rank instead of %.2f MB (%.2fx, %.2f MB saved); codecs: %s",
            summary["wire_bytes_per_rank"] / 1e6,
            summary["uncompressed_bytes_per_rank"] / 1e6,
            summary["ratio"] or 1.0,
            summary["bytes_saved_per_rank"] / 1e6,
            ", ".join(codecs),
        )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    from megatron_tpcomp.checkpoint import CheckpointError

    try:
        return run(args)
    except (ValueError, CheckpointError) as exc:  # ConfigError and CodecError are ValueErrors
        print(f"run_text_generation: error: {exc}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
