"""Megatron-Core text generation launcher with compressed TP communication (run it with ``torchrun``).

    torchrun --nproc-per-node 3 -m megatron_tpcomp.textgen --load CKPT --tensor-model-parallel-size 3 \\
        --tp-comm-compression int4:g32+had --prompts "The state of our union is" --output-path out.jsonl

``tpcomp generate --nproc-per-node 3 --load CKPT ...`` starts the same ranks itself (local, one machine); the
flags are Megatron-LM's where the two overlap (``--prompts``, ``--prompt-file`` with key ``text``, ``--top_k``,
``--output-path``, ``--distributed-timeout-minutes``), with the older names (``--prompt``, ``--prompts-file``,
``--top-k``, ``--output``, ``--dist-timeout``) kept as aliases.

Every process is one tensor-parallel rank (``torchrun``'s ``RANK``/``WORLD_SIZE``; gloo on CPU, NCCL on GPU). The
checkpoint is one written by ``tpcomp convert`` at the TP size used here; when it records a per-layer compression
config and no ``--tp-comm-compression*`` flag is given, that config is used. Generation runs through
megatron-core's static inference engine in batches of ``--micro-batch-size`` requests. Rank 0 writes one JSONL
record per prompt (text, token ids, time to first token, tokens per second) as soon as its batch is done and, at
the end, a compression summary (bytes sent per layer and collective against Megatron's uncompressed collectives).

Bad requests cost nothing: output paths, the compression config (against the checkpoint's layers, hidden size
and TP size) and every prompt are checked on every rank before the process group forms. A prompt that is empty
(no tokens) or whose tokens plus ``--num-tokens-to-generate`` exceed ``--inference-max-seq-length`` is reported
(one line naming its index and why) and skipped: its output record carries ``"error"`` instead of a generation,
and the other prompts are generated as usual (one such prompt would otherwise fail its whole batch).
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

from megatron_tpcomp.rankwarnings import quiet_rank_warnings

logger = logging.getLogger("megatron_tpcomp")

# At TP=1 Megatron's TP collectives are identities: there are no bytes to compress, so a "1.00x" summary would
# read as "compression did nothing useful" instead of "there was nothing to do".
NOOP_AT_TP1 = "compression is a no-op at TP=1 (nothing is exchanged)"


class _StoreNamingFlag(argparse.Action):
    """Stores the value and the option string the user typed (``args.<dest>_flag``), so that an error about the
    value names the spelling on the command line (``--output`` or ``--output-path``)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def build_parser(prog: str = "run_text_generation.py") -> argparse.ArgumentParser:
    """The launcher's options: Megatron-LM's names where the two overlap (``--load``,
    ``--tensor-model-parallel-size``, ``--prompts``, ``--prompt-file``, ``--num-tokens-to-generate``, ``--top_k``,
    ``--output-path``, ``--distributed-timeout-minutes``), the project's older names as aliases."""
    import megatron_tpcomp
    from megatron_tpcomp.cliutil import (
        AliasedStore,
        HelpFormatter,
        add_gen_tokens_argument,
        add_load_argument,
        add_quiet_argument,
        add_tp_argument,
        nonnegative_int,
        positive_float,
        positive_int,
    )

    p = argparse.ArgumentParser(
        prog=prog,
        description="Megatron-Core text generation (static engine) with compressed TP communication. "
        + (
            "Starts one local process per TP rank (torchrun's launcher); under torchrun, this process is one rank."
            if prog == "tpcomp generate"
            else "Start one process per TP rank with torchrun."
        ),
        formatter_class=HelpFormatter,
        epilog="Bad prompts: an empty prompt, or one whose tokens plus --num-tokens-to-generate exceed "
        "--inference-max-seq-length, is reported (its index and why) and skipped; its output record has an 'error' "
        "key instead of a generation. If no prompt is usable, the request is refused before any work.",
    )
    g = p.add_argument_group("model (Megatron names)")
    add_load_argument(g, None, "checkpoint directory written by `tpcomp convert`", required=True)
    add_tp_argument(
        g, None, "TP size; must equal the checkpoint's and torchrun's world size (default: the checkpoint's)"
    )
    g.add_argument(
        "--micro-batch-size", type=positive_int, default=4, help="requests generated together (static batch)"
    )
    g.add_argument("--bf16", action="store_true", help="compute in bfloat16 (default: the checkpoint's dtype)")
    g.add_argument(
        "--inference-max-seq-length",
        type=positive_int,
        default=1024,
        help="prompt + generated tokens, max; a longer request is skipped with an error record",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--prompts",
        dest="prompt",
        nargs="+",
        action="extend",
        default=[],
        metavar="PROMPT",
        help="one or more prompts (Megatron-LM's flag); an empty one is skipped with an error record",
    )
    g.add_argument(
        "--prompt",
        dest="prompt",
        action="append",
        default=[],
        help="one prompt (repeat for several; adds to --prompts)",
    )
    g.add_argument(
        "--prompt-file",
        "--prompts-file",
        dest="prompts_file",
        metavar="FILE",
        help='JSONL file, one object per line with the prompt under "text" (Megatron-LM\'s key) or "prompt"; '
        "the other keys are copied to the output record",
    )
    add_gen_tokens_argument(g, 32, "tokens to generate per prompt")
    g.add_argument(
        "--top_k",
        "--top-k",
        dest="top_k",
        action=AliasedStore,
        convert=nonnegative_int,
        default=1,
        metavar="K",
        help="1 = greedy",
    )
    g.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    g.add_argument("--seed", type=int, default=1234, help="sampling seed (same on every rank)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--output-path",
        "--out",
        "--output",
        dest="output",
        action=_StoreNamingFlag,
        metavar="FILE",
        help="JSONL file of results, one record per prompt (rank 0; checked before the run, its folder created); "
        "records are appended to FILE.partial as each batch finishes, renamed to FILE at the end (default: print "
        "them)",
    )
    g.add_argument(
        "--json",
        "--summary-json",
        dest="summary_json",
        action=_StoreNamingFlag,
        metavar="FILE",
        help="write the compression summary as JSON (rank 0)",
    )
    g.add_argument(
        "--distributed-timeout-minutes",
        type=positive_float,
        default=None,
        metavar="MIN",
        help="minutes before a stuck collective fails (default: 10, as Megatron-LM)",
    )
    g.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="the same in seconds (older name; give one of the two) (default: 600)",
    )
    add_quiet_argument(g, "rank 0 logs warnings and the summary only (no per-batch progress)")
    megatron_tpcomp.add_arguments(p)
    return p


def dist_timeout_s(args: argparse.Namespace) -> float:
    """Seconds before a stuck collective fails: ``--distributed-timeout-minutes`` or ``--dist-timeout``."""
    minutes, seconds = args.distributed_timeout_minutes, args.dist_timeout
    if minutes is not None and seconds is not None:
        raise ValueError(
            f"--distributed-timeout-minutes {minutes:g} and --dist-timeout {seconds:g}: give one of the two"
        )
    if minutes is not None:
        return 60.0 * minutes
    return 600.0 if seconds is None else seconds


def read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prompts from ``--prompts``/``--prompt`` and ``--prompt-file``, as records ``{"prompt": str, ...}``.

    A file's line carries its prompt under ``"prompt"`` or, as Megatron-LM's ``--prompt-file``, ``"text"``
    (``"prompt"`` wins when both are there); the record keeps every key of the line."""
    records: list[dict[str, Any]] = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --prompt-file {path}: {exc}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None
            text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ValueError(
                    f'{path}:{n}: expected an object with a string "text" (or "prompt"), got {line[:80]!r}'
                )
            records.append({**rec, "prompt": text})
    if not records:
        raise ValueError("no prompts: give --prompts TEXT [TEXT ...], --prompt TEXT or --prompt-file FILE.jsonl")
    return records


def check_prompts(records: list[dict[str, Any]], tokenizer: Any, gen_tokens: int, max_seq_len: int) -> dict[int, str]:
    """Prompts the static engine cannot generate: index -> why (one line).

    Mirrors megatron-core's checks: the controller strips leading BOS tokens, a prompt of no tokens fails the
    attention's reshape, and a batch whose longest prompt plus ``gen_tokens`` exceeds ``max_seq_len`` raises
    ``MaxSequenceLengthOverflowError`` (and leaves the engine unusable for the next batch).
    """
    bad: dict[int, str] = {}
    for i, rec in enumerate(records):
        ids = tokenizer.tokenize(rec["prompt"])
        while ids and tokenizer.bos is not None and ids[0] == tokenizer.bos:
            ids.pop(0)
        if not ids:
            bad[i] = "empty prompt (no tokens)"
        elif len(ids) + gen_tokens > max_seq_len:
            bad[i] = (
                f"{len(ids)} prompt tokens + {gen_tokens} to generate exceed --inference-max-seq-length {max_seq_len}"
            )
    return bad


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
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.cliutil import check_config_for_model, check_output_file
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron.args import config_from_args
    from megatron_tpcomp.session import rank_session
    from megatron_tpcomp.tokenizer import TextTokenizer

    # Every rank checks the whole request before the process group forms: a bad one fails on all of them at once
    # (one rank failing alone would leave the others waiting in the rendezvous).
    if args.output:
        check_output_file(args.output, getattr(args, "output_flag", "--output-path"))
    if args.summary_json:
        check_output_file(args.summary_json, getattr(args, "summary_json_flag", "--json"))
    timeout_s = dist_timeout_s(args)
    meta = read_metadata(args.model)
    prompts = read_prompts(args)
    config = config_from_args(args)
    tp = args.tp or meta.tp_size
    if tp != meta.tp_size:
        raise ValueError(
            f"--tensor-model-parallel-size {tp}: {args.model} is sharded for TP={meta.tp_size}; reshard it with "
            f"`tpcomp convert {args.model} OUT --tp {tp}`"
        )
    world_env = os.environ.get("WORLD_SIZE")
    if world_env is not None and world_env.isdigit() and int(world_env) != tp:
        raise ValueError(f"torchrun started {world_env} processes but the TP size is {tp} (--nproc-per-node {tp})")
    where = getattr(args, "tp_comm_compression_config", None) or getattr(args, "tp_comm_compression", None) or "flags"
    if config is None and meta.compression:
        config = CompressionConfig.from_dict(meta.compression, source=f"{args.model}")
        where = f"{args.model} (its recorded compression config)"
        source = "checkpoint"
    else:
        source = "flags"
    if config is not None:
        check_config_for_model(config, meta.model_config, tp, where)
    tok = TextTokenizer.from_checkpoint(meta)
    bad = check_prompts(prompts, tok, args.gen_tokens, args.inference_max_seq_length)
    if len(bad) == len(prompts):
        i = min(bad)
        raise ValueError(f"no prompt can be generated: prompt {i}: {bad[i]} (and {len(bad) - 1} more)")
    _init_distributed(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story; the others report problems
        logger.setLevel(logging.WARNING)
    if world != tp:
        raise ValueError(f"torchrun started {world} processes but --tensor-model-parallel-size is {tp}")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else None
    with rank_session(args.model, tp, dtype=dtype, seed=args.seed, cpu=not cuda, cuda=cuda) as session:
        _generate(args, session, config, source, tok, prompts, bad)
    dist.destroy_process_group()
    return 0


def _generate(
    args: argparse.Namespace, session: Any, config: Any, source: str, tok: Any, prompts: list[dict[str, Any]],
    bad: dict[int, str],
) -> None:  # fmt: skip
    """Generate every prompt not in ``bad`` in micro-batches; rank 0 writes the records in input order and the
    summary."""
    from megatron_tpcomp.cliutil import ResultsFile, atomic_write_json
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron.generate import build_static_engine

    model, meta, tp, rank = session.model, session.meta, session.tp, dist.get_rank()
    _enable_compression(model, config, source, tp, rank)
    engine = build_static_engine(
        model,
        tok,
        vocab_size=meta.model_config.vocab_size,
        max_batch=args.micro_batch_size,
        max_seq_len=args.inference_max_seq_length,
        dtype=torch.bfloat16 if args.bf16 else meta.torch_dtype,
        progress=False,
    )
    torch.manual_seed(args.seed)
    if rank == 0:
        for i in sorted(bad):
            logger.warning("prompt %d skipped: %s", i, bad[i])
    out = ResultsFile(args.output) if rank == 0 and args.output else None
    try:
        _generate_batches(args, model, engine, tok, prompts, bad, _InOrder(out, rank))
    except BaseException:
        if out is not None:
            out.close()
            logger.warning("the %d record(s) finished are in %s", out.count, out.partial)
        raise
    summary = _summary(config, meta, intercept.telemetry_summary(), tp)
    if rank == 0:
        if out is not None:
            out.commit()
            logger.info("wrote %d results to %s", out.count, args.output)
        _log_summary(summary)
        if args.summary_json:
            atomic_write_json(args.summary_json, summary)


def _enable_compression(model: Any, config: Any, source: str, tp: int, rank: int) -> None:
    """Intercept ``model``'s collectives with ``config`` (telemetry on), or leave them stock; rank 0 says which."""
    from megatron_tpcomp.megatron import intercept

    if config is not None:
        intercept.enable(model, config, telemetry=True)
        if rank == 0 and tp == 1:
            logger.info("%s (from %s: default %s)", NOOP_AT_TP1, source, config.default.spec)
        elif rank == 0:
            logger.info("compression from %s: default %s, algo %s", source, config.default.spec, config.algo)
    elif rank == 0:
        logger.info("compression off (Megatron's own collectives)")


class _InOrder:
    """Writes records in input order: record ``i`` goes out once records ``0..i-1`` have (rank 0 only: to the
    results file, or as JSON lines on stdout without one)."""

    def __init__(self, out: Any, rank: int) -> None:
        self.out, self.rank, self.emitted = out, rank, 0

    def emit(self, records: dict[int, dict[str, Any]]) -> None:
        while self.emitted in records:
            if self.rank == 0:
                if self.out is not None:
                    self.out.write(records[self.emitted])
                else:
                    sys.stdout.write(json.dumps(records[self.emitted]) + "\n")
                    sys.stdout.flush()
            self.emitted += 1


def _generate_batches(
    args: argparse.Namespace, model: Any, engine: Any, tok: Any, prompts: list[dict[str, Any]],
    bad: dict[int, str], writer: _InOrder,
) -> None:  # fmt: skip
    """Run the prompts not in ``bad`` through ``engine`` in micro-batches, timing each batch's first forward."""
    from megatron.core.inference.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, num_tokens_to_generate=args.gen_tokens)
    timer = _FirstForwardTimer(model)
    # A skipped prompt's error record goes out as soon as the records before it are done.
    done: dict[int, dict[str, Any]] = {i: {**prompts[i], "error": why} for i, why in bad.items()}
    todo = [i for i in range(len(prompts)) if i not in bad]
    writer.emit(done)
    for start in range(0, len(todo), args.micro_batch_size):
        batch = todo[start : start + args.micro_batch_size]
        timer.reset()
        results = engine.generate(prompts=[prompts[i]["prompt"] for i in batch], sampling_params=params)
        total = time.perf_counter() - timer.start
        ttft = (timer.first_end or time.perf_counter()) - timer.start
        for i, res in zip(batch, results, strict=True):
            ids = [int(t) for t in res.generated_tokens]
            done[i] = {
                **prompts[i],
                "generated_text": tok.detokenize(ids),
                "generated_tokens": ids,
                "ttft_ms": 1000.0 * ttft,
                "tokens_per_s": len(ids) / total if total > 0 else None,
                "batch_size": len(batch),
            }
        writer.emit(done)
        if writer.rank == 0 and not args.quiet:
            logger.info("generated %d/%d prompts", min(start + len(batch), len(todo)), len(todo))


def _summary(config: Any, meta: Any, traffic: dict[str, dict[str, float]], tp: int) -> dict[str, Any]:
    wire = sum(r["wire_bytes"] for r in traffic.values())
    base = sum(r["baseline_wire_bytes"] for r in traffic.values())
    layers = {}
    if config is not None:
        for layer in range(meta.model_config.num_layers):
            layers[str(layer)] = {b: config.setting_for(b, layer).spec for b in ("attention", "mlp")}
    return {
        "compression": config.to_dict() if config is not None else None,
        "tp": tp,
        "per_layer_codec": layers,
        "wire_bytes_per_rank": wire,
        "uncompressed_bytes_per_rank": base,
        "bytes_saved_per_rank": base - wire,
        "ratio": base / wire if wire else None,
        "per_site": traffic,
    }


def _log_summary(summary: dict[str, Any]) -> None:
    if summary["compression"] is None:
        logger.info("compression summary: off")
    elif summary.get("tp") == 1:
        logger.info("compression summary: %s", NOOP_AT_TP1)
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


def main(argv: list[str] | None = None, prog: str = "run_text_generation.py") -> int:
    """Parse the launcher's flags and run this rank; 2 for a bad request, 1 for a failed run."""
    quiet_rank_warnings()  # every torchrun rank runs main(): no missing-TE/apex notices per rank
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    name = prog.removesuffix(".py")
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.collectives import CollectiveError
    from megatron_tpcomp.megatron.compat import MegatronCompatError

    try:
        return run(args)
    except (ValueError, CheckpointError) as exc:  # ConfigError, CodecError, OutputPathError are ValueErrors
        print(f"{name}: error: {exc}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    except (CollectiveError, MegatronCompatError, AssetError, dist.DistError) as exc:
        # One line per rank (a peer's failure shows up on every rank as a communication error); the traceback
        # with TPCOMP_DEBUG=1.
        if os.environ.get("TPCOMP_DEBUG", "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        rank = os.environ.get("RANK", "?")
        text = str(exc).strip().splitlines()
        line = f"{type(exc).__name__}: {text[0] if text else ''}"
        print(f"{name}: rank {rank}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # torchrun --nproc-per-node N -m megatron_tpcomp.textgen --load CKPT ...
    raise SystemExit(main(prog="python -m megatron_tpcomp.textgen"))
