"""Codec throughput on this machine: encode and decode GB/s of input, beside ``torch.clone`` of the same tensor.

Measurements alternate codec and clone calls in one run and report medians, so machine noise hits both alike.
The ratio ``codec_time / clone_time`` says how many memory passes a codec costs: a fused one-pass codec would
be near 1-2; the torch reference runs several ops per value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from megatron_tpcomp.codecs import CodecError, make_codec

DEFAULT_SPECS = (
    "fp8,fp8-e5m2:b128,int8:g32,int4:g32,int4:g32:asym,int4:g32+had,int4:g32+outliers:k9,mxfp4,nvfp4,fp5:b32"
)
DEFAULT_SIZES = "16KiB,8MiB"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = 576  # SmolLM2-135M's hidden size: messages are [tokens, 576]


def parse_size(text: str) -> int:
    """Bytes from '16KiB', '8MiB', '1GiB' or a plain integer."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "b": 1}
    low = text.strip().lower()
    for suffix, mult in units.items():
        if low.endswith(suffix) and low[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(low[: -len(suffix)]) * mult)
    if low.isdigit():
        return int(low)
    raise ValueError(f"bad size {text!r}; expected e.g. 16KiB, 8MiB or a byte count")


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(specs: Sequence[str], sizes: Sequence[int], dtype: torch.dtype = torch.bfloat16, reps: int = 20) -> list[dict]:
    """Measure every spec at every size; returns one record per (spec, size)."""
    records = []
    elem = torch.empty((), dtype=dtype).element_size()
    for nbytes in sizes:
        tokens = max(1, nbytes // (elem * HIDDEN))
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(0)).to(dtype)
        x[:, 7] *= 300.0
        in_bytes = x.numel() * elem
        for spec in specs:
            codec = make_codec(spec)
            payload = codec.encode(x)
            for _ in range(2):  # warm-up
                codec.decode(codec.encode(x), x.shape, dtype)
                x.clone()
            enc, dec, clone = [], [], []
            for _ in range(reps):
                clone.append(_time(x.clone))
                enc.append(_time(lambda: codec.encode(x)))  # noqa: B023 - called immediately
                dec.append(_time(lambda: codec.decode(payload, x.shape, dtype)))  # noqa: B023
            m_enc, m_dec, m_clone = (statistics.median(v) for v in (enc, dec, clone))
            records.append(
                dict(
                    spec=spec,
                    canonical=codec.spec,
                    dtype=str(dtype).replace("torch.", ""),
                    bytes=in_bytes,
                    shape=list(x.shape),
                    bits_per_value=codec.bits_per_value(x.shape),
                    encode_ms=m_enc * 1e3,
                    decode_ms=m_dec * 1e3,
                    clone_ms=m_clone * 1e3,
                    encode_gbps=in_bytes / m_enc / 1e9,
                    decode_gbps=in_bytes / m_dec / 1e9,
                    clone_gbps=in_bytes / m_clone / 1e9,
                    encode_vs_clone=m_enc / m_clone,
                    decode_vs_clone=m_dec / m_clone,
                    reps=reps,
                    threads=torch.get_num_threads(),
                )
            )
    return records


def format_table(records: list[dict]) -> str:
    head = (
        f"{'spec':<22} {'size':>9} {'bits':>6} {'enc GB/s':>9} {'dec GB/s':>9} {'clone GB/s':>10} "
        f"{'enc/clone':>9} {'dec/clone':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['spec']:<22} {r['bytes'] / 1024:>7.0f}Ki {r['bits_per_value']:>6.3f} {r['encode_gbps']:>9.3f} "
            f"{r['decode_gbps']:>9.3f} {r['clone_gbps']:>10.2f} "
            f"{r['encode_vs_clone']:>8.1f}x {r['decode_vs_clone']:>8.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpcomp bench codecs",
        description="Codec encode/decode throughput (GB/s of input) vs torch.clone of the same tensor, medians "
        "of alternating runs. Messages are [tokens, 576] (SmolLM2 hidden size) with one outlier channel.",
    )
    parser.add_argument("--specs", default=DEFAULT_SPECS, help=f"comma-separated codec specs (default {DEFAULT_SPECS})")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"message sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list to FILE")
    args = parser.parse_args(argv)
    try:
        specs = [s for s in args.specs.split(",") if s]
        for s in specs:
            make_codec(s)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    except (CodecError, ValueError) as exc:
        parser.error(str(exc))
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    records = run(specs, sizes, DTYPES[args.dtype], args.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, median of {args.reps}")
    print(format_table(records))
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        import os

        os.replace(tmp, args.json)  # never leave a half-written file under the final name
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
