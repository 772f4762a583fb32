"""Kernel benchmark of the Triton codecs: GB/s of encode and decode-sum against the device's copy bandwidth.

``python -m megatron_tpcomp.bench.triton_kernels [--specs S,...] [--sizes decode,prefill] [--count 2] [--json OUT]``

- copy bandwidth: ``dst.copy_(src)`` of a 256 MiB bf16 buffer (CPU: 32 MiB), bytes read + written per second;
- encode: (input bytes + payload bytes) / time of ``backends/triton.py``'s ``encode``;
- decode-sum: (``count`` payloads + output bytes) / time of ``backends/triton.py``'s ``decode_sum``;
- the torch reference (``codec.encode`` / ``codec.decode_sum`` with ``TPCOMP_BACKEND=reference``) the same way.
Sizes: ``decode`` = one token of SmolLM2's hidden size (1 x 576 bf16), ``prefill`` = 8 MiB of bf16 (7281 x 576).
Formats: integers, fp8 (e4m3/e5m2), nvfp4 (two kernels per encode: the message amax, then the encode), with
``+had`` and ``+chscale`` (a fixed table of exponents -2..2 over the 576 channels: the cost does not depend on it).
Times are medians of ``--reps`` runs after 3 warm-ups (CUDA events on a GPU, perf_counter on CPU).
The target: encode and decode-sum at prefill sizes >= 70% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from megatron_tpcomp.backends import dispatch
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.codecs.base import CodecError

DEFAULT_SPECS = (
    "int4:g32",
    "int4:g32+had",
    "int4:g64:se4m3+had",
    "int4:g32:se4m3+had",
    "int5:g64:se4m3+had",
    "int6:g128+had:b128",
    "fp8",
    "fp8+had",
    "nvfp4",
    "nvfp4+had:b16",
    "int4:g64:se4m3+had+chscale",
)
SIZES = {"decode": (1, 576), "prefill": (8 * 2**20 // (2 * 576), 576)}
TARGET_FRACTION = 0.70


def _timer(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, reps: int = 10) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` on ``device`` (GB/s)."""
    n = (256 if device.type == "cuda" else 32) * 2**20 // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / _timer(device, lambda: dst.copy_(src), reps) / 1e9


def bench_one(spec: str, size: str, device: torch.device, count: int, reps: int, reference: bool) -> dict:
    """One row: GB/s of the Triton encode and decode-sum (and of the torch reference) for ``spec`` at ``size``."""
    tc = dispatch.triton_module()
    shape = SIZES[size]
    kw = {"channel_scale_exponents": [(c % 5) - 2 for c in range(shape[-1])]} if "chscale" in spec else {}
    codec = make_codec(spec, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(torch.bfloat16).to(device)
    in_bytes = x.numel() * x.element_size()
    payload = tc.encode(codec, x)
    payloads = torch.cat([payload] * count)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    row: dict = {"spec": codec.spec, "size": size, "shape": list(shape), "payload_bytes": payload.numel()}
    t_enc = _timer(device, lambda: tc.encode(codec, x), reps)
    t_dec = _timer(device, lambda: tc.decode_sum(codec, payloads, count, shape, torch.bfloat16, out), reps)
    row["encode_gbps"] = (in_bytes + payload.numel()) / t_enc / 1e9
    row["decode_sum_gbps"] = (count * payload.numel() + in_bytes) / t_dec / 1e9
    row["encode_us"], row["decode_sum_us"] = t_enc * 1e6, t_dec * 1e6
    if reference:
        with dispatch.forced("reference"):
            row["reference_encode_us"] = _timer(device, lambda: codec.encode(x), reps) * 1e6
            dec = lambda: codec.decode_sum(payloads, count, shape, torch.bfloat16)  # noqa: E731
            row["reference_decode_sum_us"] = _timer(device, dec, reps) * 1e6
    return row


def run(specs: list[str], sizes: list[str], count: int, reps: int, reference: bool) -> dict:
    """The whole benchmark as one JSON-able dict (device, copy bandwidth, one row per spec and size)."""
    if dispatch.triton_module() is None:
        raise RuntimeError(f"triton kernels unavailable: {dispatch.triton_unavailable_reason()}")
    interpreted = dispatch.triton_module().INTERPRETED
    device = torch.device("cpu" if interpreted or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not interpreted:
        raise RuntimeError("no CUDA device and TRITON_INTERPRET is not set: nothing can run the Triton kernels")
    copy = copy_bandwidth(device)
    rows = []
    for spec in specs:
        for size in sizes:
            row = bench_one(spec, size, device, count, reps, reference)
            row["encode_fraction_of_copy"] = row["encode_gbps"] / copy
            row["decode_sum_fraction_of_copy"] = row["decode_sum_gbps"] / copy
            if size == "prefill":
                row["meets_target"] = min(row["encode_fraction_of_copy"], row["decode_sum_fraction_of_copy"]) >= (
                    TARGET_FRACTION
                )
            rows.append(row)
            print(
                f"{row['spec']:28s} {size:8s} encode {row['encode_gbps']:8.1f} GB/s "
                f"({row['encode_fraction_of_copy']:.0%} of copy)  decode_sum x{count} {row['decode_sum_gbps']:8.1f} "
                f"GB/s ({row['decode_sum_fraction_of_copy']:.0%})",
                flush=True,
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return {
        "device": name,
        "copy_gbps": copy,
        "count": count,
        "reps": reps,
        "target_fraction": TARGET_FRACTION,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="comma-separated codec specs")
    parser.add_argument("--sizes", default="decode,prefill", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--count", type=int, default=2, help="payloads summed by decode-sum (default 2)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement (default 20)")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the torch reference")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            parser.error(f"--sizes: {s!r} is not one of {', '.join(SIZES)}")
    if args.count < 1 or args.reps < 1:
        parser.error(f"--count {args.count} / --reps {args.reps}: expected integers >= 1")
    try:
        result = run([s for s in args.specs.split(",") if s], sizes, args.count, args.reps, not args.no_reference)
    except (RuntimeError, CodecError) as exc:  # no device / no triton: one line, not a traceback
        print(f"megatron_tpcomp.bench.triton_kernels: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
