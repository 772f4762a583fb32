"""Codec throughput on this machine (`tpcomp bench codecs`): encode and decode GB/s of input, beside ``torch.clone``
of the same tensor.

Throughput is input bytes (``numel * element size`` of the input dtype) over the median time of one call.
Each repetition times a clone, an encode and a decode back to back, so machine noise (other processes, turbo
clocks) hits codec and baseline alike; medians over ``reps`` repetitions after a warm-up. The ratio
``codec_time / clone_time`` says how many memory passes a codec costs: a fused one-pass codec would be near
1-2; the torch reference codecs run several ops per value.

Messages are ``[tokens, 576]`` (SmolLM2-135M's hidden size), N(0, 1) with one channel 300x larger, like the
row-parallel partials the codecs compress. ``torch.get_num_threads()`` is left at torch's default and reported.

Use ``tpcomp bench codecs`` or ``python tools/bench_codecs.py``; from Python, :func:`run`.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

from megatron_tpcomp.bench.common import DTYPES, check_json_path, message, parse_size, report, size_label, time_call
from megatron_tpcomp.codecs import Codec, CodecError, make_codec

# One spec per family and mode: fp8 (both element formats), integers (8/4/3 bits, symmetric and asymmetric),
# block minifloats (MXFP4, NVFP4, FP3/FP5/FP6), and both modifiers.
DEFAULT_SPECS = (
    "fp8,fp8-e5m2:b128,int8:g32,int4:g32,int4:g32:asym,int3:g64:asym,mxfp4,nvfp4,fp3,fp5:b32,fp6-e3m2:b32,"
    "int4:g32+had,int4:g32+outliers:k9"
)
DEFAULT_SIZES = "8MiB,16KiB"  # a prefill-like message and a decode-like one
WARMUP = 3


def try_make_codec(spec: str) -> Codec | None:
    """The codec for ``spec``, or None (with a printed note) when its family's module is not installed yet.

    A malformed spec still raises CodecError: that is the caller's mistake, not a missing module.
    """
    try:
        return make_codec(spec)
    except ImportError as exc:
        print(f"note: skipping {spec!r}: its codec module is not available ({exc})")
        return None


def measure(codec: Codec, x: torch.Tensor, reps: int) -> dict:
    """Median encode, decode and clone times (seconds) of ``x``, alternating the three in every repetition."""
    payload = codec.encode(x)
    for _ in range(WARMUP):
        codec.decode(codec.encode(x), x.shape, x.dtype)
        x.clone()
    enc, dec, clone = [], [], []
    for _ in range(reps):
        clone.append(time_call(x.clone))
        enc.append(time_call(lambda: codec.encode(x)))
        dec.append(time_call(lambda: codec.decode(payload, x.shape, x.dtype)))
    return {"encode": statistics.median(enc), "decode": statistics.median(dec), "clone": statistics.median(clone)}


def run(specs: Sequence[str], sizes: Sequence[int], dtype: torch.dtype = torch.bfloat16, reps: int = 20) -> list[dict]:
    """Measure every spec at every size.

    Args:
        specs: codec specs; one whose module is missing is skipped with a printed note.
        sizes: approximate message sizes in bytes of ``dtype`` input.
        dtype: the input (and decode) dtype.
        reps: timed repetitions per measurement (medians are reported).

    Returns:
        One record per (size, spec) with keys ``spec, canonical, dtype, bytes, shape, bits_per_value,
        encode_ms, decode_ms, clone_ms, encode_gbps, decode_gbps, clone_gbps, encode_vs_clone,
        decode_vs_clone, reps, threads``. GB/s are of input bytes (10^9 bytes per second).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    codecs = {spec: try_make_codec(spec) for spec in specs}
    records = []
    for nbytes in sizes:
        x = message(nbytes, dtype)
        in_bytes = x.numel() * x.element_size()
        for spec, codec in codecs.items():
            if codec is None:
                continue
            t = measure(codec, x, reps)
            records.append(
                dict(
                    spec=spec,
                    canonical=codec.spec,
                    dtype=str(dtype).replace("torch.", ""),
                    bytes=in_bytes,
                    shape=list(x.shape),
                    bits_per_value=codec.bits_per_value(x.shape),
                    encode_ms=t["encode"] * 1e3,
                    decode_ms=t["decode"] * 1e3,
                    clone_ms=t["clone"] * 1e3,
                    encode_gbps=in_bytes / t["encode"] / 1e9,
                    decode_gbps=in_bytes / t["decode"] / 1e9,
                    clone_gbps=in_bytes / t["clone"] / 1e9,
                    encode_vs_clone=t["encode"] / t["clone"],
                    decode_vs_clone=t["decode"] / t["clone"],
                    reps=reps,
                    threads=torch.get_num_threads(),
                )
            )
    return records


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of :func:`run`'s records."""
    head = (
        f"{'spec':<22} {'size':>7} {'bits':>6} {'enc GB/s':>9} {'dec GB/s':>9} {'clone GB/s':>10} "
        f"{'enc/clone':>9} {'dec/clone':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['spec']:<22} {size_label(r['bytes']):>7} {r['bits_per_value']:>6.3f} {r['encode_gbps']:>9.3f} "
            f"{r['decode_gbps']:>9.3f} {r['clone_gbps']:>10.2f} "
            f"{r['encode_vs_clone']:>8.1f}x {r['decode_vs_clone']:>8.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from megatron_tpcomp.cliutil import HelpFormatter, add_specs_argument

    parser = argparse.ArgumentParser(
        prog="tpcomp bench codecs",
        formatter_class=HelpFormatter,
        description="Codec encode/decode throughput (GB/s of input) vs torch.clone of the same tensor, medians "
        "of alternating runs. Messages are [tokens, 576] (SmolLM2 hidden size) with one outlier channel.",
    )
    add_specs_argument(parser, DEFAULT_SPECS, "comma-separated codec specs")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"message sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch / codec threads (default: torch's default); match the collective benchmark's threads per rank "
        "(1 for 2 ranks on 2 cores) when the output feeds `tpcomp bench perf-table`",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list to FILE")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    specs = [s for s in args.specs.split(",") if s]
    try:
        for s in specs:
            try:
                make_codec(s)  # fail fast on a typo, before minutes of timing
            except ImportError:
                pass  # a family whose module is missing: run() skips it with a note
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        check_json_path(args.json)
    except (CodecError, ValueError) as exc:
        parser.error(str(exc))
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"{args.dtype} input, medians of {args.reps} after {WARMUP} warm-up calls"
    )
    records = run(specs, sizes, DTYPES[args.dtype], args.reps)
    return report(records, format_table(records), [], args.json)


if __name__ == "__main__":
    raise SystemExit(main())
