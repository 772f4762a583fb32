"""``tpcomp``: the project's command line. A thin layer: each subcommand calls one function of the package.

Subcommands:
    convert         Hugging Face / GGUF / smollm2-135m -> TP-sharded Megatron-Core checkpoint; reshard; export to HF
    megatron-args   the Megatron-LM flags (architecture, TP, tokenizer) that load a converted checkpoint
    calibrate       per-layer statistics of the TP collectives, outlier channels, a per-layer config
    eval            quality cost of compressed TP communication on real text (perplexity, KL, top-1, greedy)
    generate        text generation through megatron-core's static engine with compressed TP communication: starts
                    one local process per TP rank (or, under torchrun, is one rank); Megatron-LM's flag names
    demo            SmolLM2-135M at TP=3 over local gloo processes: uncompressed vs a searched config vs INT4
    collectives-demo
                    compressed all-reduce over several local processes (gloo), side by side with the stock one
    specs           list the codec presets with their exact bits per value, or check one spec
    bench codecs    codec encode/decode throughput on this machine vs torch.clone
    bench collectives
                    compressed vs stock collectives, side by side, on a shaped link (network namespaces + tc)
    bench perf-table
                    fit the cost model (policy auto) to the benchmark outputs; predicted vs measured
    bench e2e       SmolLM2-135M at TP=3 through the static engine on a shaped link: TTFT/TPOT per codec vs stock
    bench kernels   GPU kernel bandwidth (INT4 CUDA, FP8 TE/torch) vs the device's memory bandwidth
    bench plot      PNG plots from the collectives / e2e benchmark JSON

Shared options are spelled alike everywhere: Megatron-LM's names first, the older ones as aliases
(--tensor-model-parallel-size / --tp, --load / --model, --num-tokens-to-generate / --gen-tokens,
--specs / --spec), --json FILE for reports, --out FILE for artifacts, --quiet for no progress output.
"""

from __future__ import annotations

import argparse
import sys

from megatron_tpcomp.cliutil import positive_int
from megatron_tpcomp.spec import describe_grammar

PRESETS = (
    "fp8",
    "fp8-e5m2:b128",
    "int8:g32",
    "int4:g32",
    "int4:g32:asym",
    "int4:g32+had",
    "int4:g32+outliers:k9",
    "mxfp4",
    "nvfp4",
    "fp5:b32",
    "fp6:b32",
)


def _cmd_specs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tpcomp specs",
        description="List codec presets, or validate SPEC and print its canonical form. " + describe_grammar(),
    )
    parser.add_argument("spec", nargs="?", help="a codec spec to check, e.g. int4:g32+had")
    parser.add_argument(
        "--hidden", type=positive_int, default=576, help="hidden size used for bits/value (default 576)"
    )
    parser.add_argument("--tokens", type=positive_int, default=512, help="tokens used for bits/value (default 512)")
    args = parser.parse_args(argv)

    from megatron_tpcomp.codecs import CodecError, sizing_codec

    shape = (args.tokens, args.hidden)
    specs = [args.spec] if args.spec else list(PRESETS)
    print(f"{'spec':<24} {'canonical':<36} {'bits/value':>10}  (message of {args.tokens} x {args.hidden})")
    for spec in specs:
        try:
            codec = sizing_codec(spec, args.hidden)  # calibrated tables: stand-ins of their sizes
        except CodecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{spec:<24} {codec.spec:<36} {codec.bits_per_value(shape):>10.4f}")
    return 0


_BENCHES = {
    "codecs": "codec_speed",
    "collectives": "collectives",
    "perf-table": "perf_table",
    "e2e": "e2e",
    "kernels": "kernels",
    "plot": "plots",
}


def _cmd_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpcomp bench", description="Benchmarks that print numbers and write JSON.")
    parser.add_argument(
        "what",
        choices=list(_BENCHES),
        help="codecs: encode/decode throughput vs torch.clone; collectives: compressed vs stock collectives over "
        "local ranks, on a tc-shaped link between network namespaces when root; perf-table: fit the cost model's "
        "table to their JSON outputs; e2e: TTFT/TPOT of SmolLM2 at TP=3 per codec on a shaped link; kernels: GPU "
        "kernel GB/s vs memory bandwidth; plot: PNGs from the JSON outputs",
    )
    if argv and argv[0] in _BENCHES:
        what, rest = argv[0], argv[1:]  # `tpcomp bench collectives --help` reaches the benchmark's own help
    else:
        args, rest = parser.parse_known_args(argv)
        what = args.what
    import importlib

    return importlib.import_module(f"megatron_tpcomp.bench.{_BENCHES[what]}").main(rest)


def _cmd_demo(argv: list[str]) -> int:
    from megatron_tpcomp import demo

    return demo.main(argv)


def _cmd_collectives_demo(argv: list[str]) -> int:
    from megatron_tpcomp import collectives_demo

    return collectives_demo.main(argv)


def _cmd_convert(argv: list[str]) -> int:
    from megatron_tpcomp import checkpoint_cli as cli

    return cli.main(argv)


def _cmd_megatron_args(argv: list[str]) -> int:
    from megatron_tpcomp import checkpoint_cli as cli

    return cli.megatron_args_main(argv)


def _cmd_generate(argv: list[str]) -> int:
    """``tpcomp generate``: under torchrun (``RANK``/``WORLD_SIZE`` set) this process is one rank; otherwise start
    one local rank per TP rank with torchrun's launcher and wait for them."""
    import os
    import subprocess

    from megatron_tpcomp import textgen

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return textgen.main(argv, prog="tpcomp generate")
    args = textgen.build_parser("tpcomp generate").parse_args(argv)  # --help and usage errors before any spawn
    tp = args.tp
    if tp is None:
        from megatron_tpcomp.checkpoint import read_metadata

        tp = read_metadata(args.model).tp_size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)]
    cmd += ["-m", "megatron_tpcomp.textgen", *argv]
    return subprocess.run(cmd, check=False).returncode


def _cmd_calibrate(argv: list[str]) -> int:
    from megatron_tpcomp import calibration

    return calibration.main(argv)


def _cmd_eval(argv: list[str]) -> int:
    from megatron_tpcomp import evaluation

    return evaluation.main(argv)


COMMANDS = {
    "convert": _cmd_convert,
    "megatron-args": _cmd_megatron_args,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "calibrate": _cmd_calibrate,
    "demo": _cmd_demo,
    "collectives-demo": _cmd_collectives_demo,
    "specs": _cmd_specs,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nRun `tpcomp SUBCOMMAND --help` for the options of each.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from megatron_tpcomp import __version__

        print(f"tpcomp (megatron-tpcomp) {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"tpcomp: unknown subcommand {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except Exception as exc:
        if not isinstance(exc, _project_errors()):
            raise  # a bug: the full traceback is the useful report
        return _report_error(cmd, exc)


def _project_errors() -> tuple[type[BaseException], ...]:
    """The project's own error types: a bad input or a failed run, reported in one line (not a bug)."""
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.cliutil import OutputPathError
    from megatron_tpcomp.codecs import CodecError
    from megatron_tpcomp.collectives import CollectiveError
    from megatron_tpcomp.config import ConfigError
    from megatron_tpcomp.launch import DistributedRunError
    from megatron_tpcomp.megatron.compat import MegatronCompatError

    return (
        AssetError,
        CheckpointError,
        OutputPathError,
        CodecError,
        CollectiveError,
        ConfigError,
        DistributedRunError,
        MegatronCompatError,
    )


def _report_error(cmd: str, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr and return 1; the full traceback (every rank's, for a failed
    distributed run) goes to a log file named in the line, and to stderr too with ``TPCOMP_DEBUG=1``."""
    import os
    import time
    import traceback

    from megatron_tpcomp.launch import DistributedRunError

    full = "".join(traceback.format_exception(exc))
    if os.environ.get("TPCOMP_DEBUG", "") not in ("", "0"):
        print(full, file=sys.stderr, end="")
    if isinstance(exc, DistributedRunError):
        line = exc.one_line()
    else:
        text = str(exc).strip()
        line = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    try:
        from megatron_tpcomp.assets import cache_dir

        logs = cache_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"tpcomp-{cmd}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.write_text(f"tpcomp {cmd}\n{full}")
        where = f"full traceback in {log}"
    except OSError:
        where = "TPCOMP_DEBUG=1 shows the full traceback"
    print(f"tpcomp {cmd}: error: {line} ({where})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
