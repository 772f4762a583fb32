"""Kernel bandwidth on a GPU: ``tpcomp bench kernels``.

For every message size and kernel this measures the median time of one call and reports the bandwidth it
achieves against the device's memory bandwidth. Kernels (``--kernels``) and the backends that run them
(``--backends``: ``TPCOMP_BACKEND``'s names, ``megatron_tpcomp/backends/``):

==========================  =====================  ============================================================
kernel                      backends               call
==========================  =====================  ============================================================
``copy``                    torch                  ``x.clone()``: the copy baseline (the practical peak)
``int4_quantize``           cuda, reference        ``int4_quantize_cuda(x, G)`` / ``IntCodec.encode(x)``
``int4_dequantize``         cuda, reference        ``int4_dequantize_cuda(p, ...)`` / ``IntCodec.decode(p, ...)``
``int4_dequantize_sum``     cuda, reference        N payloads ``[N, P]`` decoded and summed in fp32 (N = 2, 4:
                                                   ``--sum-payloads``), the one-shot all-reduce's receive side
``fp8_encode``              te, reference          ``Fp8Codec(backend="te" | "torch").encode(x)``
``fp8_decode``              reference              ``Fp8Codec.decode``: one implementation (torch) for every
                                                   backend, the wire format is the same, so it is timed once
==========================  =====================  ============================================================

Bytes (``bytes_read + bytes_written``, :func:`traffic`) are the compulsory traffic of the operation: every input
read once and every output written once, nothing else, for a message of ``numel`` values of ``dtype`` (element
size ``e``) and a payload of ``P = codec.payload_nbytes(shape)`` bytes (wire layout with its 16-byte padding):

- copy: reads ``numel * e``, writes ``numel * e``;
- int4_quantize, fp8_encode: reads ``numel * e``, writes ``P``;
- int4_dequantize, fp8_decode: reads ``P``, writes ``numel * e`` (the output has the input's dtype);
- int4_dequantize_sum with N payloads: reads ``N * P``, writes ``numel * e``.

Achieved GB/s = bytes / median time (10^9 bytes per second). An implementation that moves more than that (the
torch reference codecs run several ops, each through memory) shows it as a lower GB/s, which is the point.
Two peaks: the nominal HBM bandwidth of the device from :data:`NOMINAL_GBPS` (datasheet numbers, matched on
the device name; None when unknown) and the measured ``copy`` bandwidth at the same size (the practical peak;
at decode sizes it is launch-bound, like every kernel there). Both percentages are reported.

CUDA timing: CUDA events around each call; before each timed call a 256 MiB buffer is zeroed (``--no-flush-l2``
turns it off) so the message does not sit in L2 (50 MiB on H100/H200: 8 MiB would otherwise measure L2) and the
call queues behind it, which hides the host's launch latency; medians of ``--reps`` after ``--warmup`` calls.
``--device cpu`` runs the same harness with the reference codecs and ``time.perf_counter`` (a harness check,
not a kernel benchmark).

Target (a goal, not a test): the INT4 CUDA kernels (quantize and dequantize_sum) at prefill sizes (>= 8 MiB)
reach >= 70% of the nominal HBM bandwidth (of the copy bandwidth where the device is not in the table).

From Python: :func:`run`; from the shell: ``tpcomp bench kernels`` or ``python -m megatron_tpcomp.bench.kernels``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial

import torch

from megatron_tpcomp.backends import BackendUnavailableError, forced
from megatron_tpcomp.backends import available as backend_available
from megatron_tpcomp.backends import cuda_int4 as kern
from megatron_tpcomp.bench.common import check_json_path, message, parse_size, report, size_label, split_list, time_call
from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.spec import parse_spec

DEFAULT_SIZES = "16KiB,64KiB,8MiB,64MiB"  # two decode-sized messages, two prefill-sized ones
KERNELS = ("copy", "int4_quantize", "int4_dequantize", "int4_dequantize_sum", "fp8_encode", "fp8_decode")
BACKENDS = ("cuda", "te", "reference")
DEFAULT_GROUP = 32
DEFAULT_FP8_SPEC = "fp8"
DEFAULT_SUM_PAYLOADS = (2, 4)
DEFAULT_REPS = {"cuda": 50, "cpu": 10}
DEFAULT_WARMUP = 5
L2_FLUSH_BYTES = 256 << 20
#: Messages at least this large count as prefill-sized for the target.
PREFILL_MIN_BYTES = 8 << 20
TARGET_FRACTION = 0.70
TARGET_KERNELS = ("int4_quantize", "int4_dequantize_sum")

#: Nominal memory bandwidth in GB/s (NVIDIA datasheets), matched on the words of ``torch.cuda.get_device_name()``
#: (upper case, ``-`` and ``_`` read as spaces): every word of a key must be a word of the name; first match wins,
#: so specific keys come first ("NVIDIA H100 80GB HBM3" is the SXM part; "A10" does not match "A100").
NOMINAL_GBPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H200",), "H200", 4800.0),
    (("H100", "PCIE"), "H100 PCIe", 2000.0),
    (("H100", "NVL"), "H100 NVL", 3900.0),
    (("H100",), "H100 SXM", 3350.0),
    (("A100", "80GB"), "A100 80GB", 2039.0),
    (("A100", "40GB"), "A100 40GB", 1555.0),
    (("L40S",), "L40S", 864.0),
    (("L4",), "L4", 300.0),
    (("A10",), "A10", 600.0),
)


def nominal_bandwidth(device_name: str) -> tuple[str, float] | tuple[None, None]:
    """``(table entry, GB/s)`` of the first :data:`NOMINAL_GBPS` key whose words all occur in ``device_name``,
    else ``(None, None)``."""
    words = set(device_name.upper().replace("-", " ").replace("_", " ").split())
    for key, label, gbps in NOMINAL_GBPS:
        if all(k in words for k in key):
            return label, gbps
    return None, None


def traffic(
    kernel: str,
    numel: int,
    dtype: torch.dtype,
    *,
    group: int = DEFAULT_GROUP,
    fp8_spec: str = DEFAULT_FP8_SPEC,
    n_payloads: int = 1,
) -> tuple[int, int]:
    """``(bytes_read, bytes_written)`` of one call of ``kernel`` on ``numel`` values of ``dtype`` (see the module
    docstring): inputs read once, outputs written once, payloads as ``payload_nbytes`` of the wire layout."""
    elem = torch.empty((), dtype=dtype).element_size()
    dense = numel * elem
    if kernel == "copy":
        return dense, dense
    if kernel.startswith("int4_"):
        payload = make_codec(f"int4:g{group}").payload_nbytes((numel,))
    elif kernel.startswith("fp8_"):
        payload = make_codec(fp8_spec).payload_nbytes((numel,))
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel in ("int4_quantize", "fp8_encode"):
        return dense, payload
    if kernel in ("int4_dequantize", "fp8_decode"):
        return payload, dense
    if kernel == "int4_dequantize_sum":
        return n_payloads * payload, dense
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


def time_calls(
    fn: Callable[[], object], device: torch.device, reps: int, warmup: int, flush: torch.Tensor | None = None
) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones: CUDA events on a CUDA device
    (``flush`` zeroed before each timed call, outside the timed span), ``time.perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return [time_call(fn) for _ in range(reps)]
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)]


def _reference_dequantize_sum(
    codec: Codec, payloads: torch.Tensor, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """What ``int4_dequantize_sum_cuda`` computes, with the reference codec: fp32 sum in row order, cast once."""
    acc = codec.decode(payloads[0], shape, torch.float32)
    for i in range(1, payloads.shape[0]):
        acc += codec.decode(payloads[i], shape, torch.float32)
    return acc.to(dtype)


def _on_reference(fn: Callable[..., object], *args: object) -> Callable[[], object]:
    """``fn(*args)`` with ``TPCOMP_BACKEND=reference``: the torch codecs, even where a fused kernel would run."""

    def call() -> object:
        with forced("reference"):
            return fn(*args)

    return call


def _cases(
    x: torch.Tensor, kernels: Sequence[str], backends: Sequence[str], group: int, fp8_spec: str, sums: Sequence[int]
) -> list[tuple[str, str, int, Callable[[], object]]]:
    """``(kernel, backend, n_payloads, fn)`` for every requested kernel and backend on message ``x``."""
    shape, dtype = tuple(x.shape), x.dtype
    out: list[tuple[str, str, int, Callable[[], object]]] = []
    if "copy" in kernels:
        out.append(("copy", "torch", 1, x.clone))
    int4_kernels = [k for k in kernels if k.startswith("int4_")]
    int4_backends = [b for b in ("cuda", "reference") if b in backends]
    if int4_kernels and int4_backends:
        ref = make_codec(f"int4:g{group}")
        payload = ref.encode(x)
        for backend in int4_backends:
            cuda = backend == "cuda"
            for kernel in int4_kernels:
                if kernel == "int4_quantize":
                    fn = partial(kern.int4_quantize_cuda, x, group) if cuda else _on_reference(ref.encode, x)
                    out.append((kernel, backend, 1, fn))
                elif kernel == "int4_dequantize":
                    if cuda:
                        fn = partial(kern.int4_dequantize_cuda, payload, shape, group, dtype)
                    else:
                        fn = _on_reference(ref.decode, payload, shape, dtype)
                    out.append((kernel, backend, 1, fn))
                else:
                    for n in sums:
                        # N different payloads, as N ranks would send (the kernel's work does not depend on them)
                        p = torch.stack([ref.encode(x * (1.0 + 0.25 * i)) for i in range(n)])
                        if cuda:
                            fn = partial(kern.int4_dequantize_sum_cuda, p, shape, group, dtype)
                        else:
                            fn = _on_reference(_reference_dequantize_sum, ref, p, shape, dtype)
                        out.append((kernel, backend, n, fn))
    cs = parse_spec(fp8_spec)
    if "fp8_encode" in kernels:
        for backend in [b for b in ("te", "reference") if b in backends]:
            codec = Fp8Codec(cs, backend="te" if backend == "te" else "torch")
            out.append(("fp8_encode", backend, 1, partial(codec.encode, x)))
    if "fp8_decode" in kernels and "reference" in backends:
        codec = Fp8Codec(cs, backend="torch")
        out.append(("fp8_decode", "reference", 1, partial(codec.decode, codec.encode(x), shape, dtype)))
    return out


def device_info(device: torch.device) -> dict:
    """Name of the device and its nominal bandwidth (``nominal_gbps`` None when not in :data:`NOMINAL_GBPS`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label, gbps = nominal_bandwidth(name)
    else:
        name, label, gbps = "cpu", None, None
    return {"device": device.type, "device_name": name, "nominal_entry": label, "nominal_gbps": gbps}


def _check_run_args(
    dev: torch.device,
    kernels: Sequence[str],
    backends: Sequence[str],
    group: int,
    fp8_spec: str,
    sum_payloads: Sequence[int],
    reps: int,
    warmup: int,
) -> None:
    """Raise ValueError naming the bad argument of :func:`run` (BackendUnavailableError: CUDA asked, none here)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps} and {warmup}")
    bad = [k for k in kernels if k not in KERNELS] + [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown kernel(s)/backend(s) {bad}; kernels {KERNELS}, backends {BACKENDS}")
    if group not in kern.INT4_CUDA_GROUPS:
        raise ValueError(f"group must be one of {kern.INT4_CUDA_GROUPS}, got {group}")
    if any(n < 1 for n in sum_payloads):
        raise ValueError(f"sum payload counts must be >= 1, got {list(sum_payloads)}")
    if parse_spec(fp8_spec).kind != "fp8":
        raise ValueError(f"fp8 spec {fp8_spec!r} is not an fp8 spec")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"no CUDA device: {cuda_unavailable_reason()}")


def _usable_backends(backends: Sequence[str], dev: torch.device, log: Callable[[str], None]) -> list[str]:
    """The backends of ``backends`` that can run on ``dev`` here; each one left out is logged with the reason."""
    usable = []
    for b in backends:
        if b != "reference" and dev.type != "cuda":
            log(f"skipping backend {b!r}: it runs on CUDA tensors only (--device {dev.type})")
            continue
        ok, why = backend_available(b)
        if not ok:
            log(f"skipping backend {b!r}: {why}")
            continue
        usable.append(b)
    return usable


def _message_fields(x: torch.Tensor) -> dict:
    return {"bytes": x.numel() * x.element_size(), "shape": list(x.shape), "numel": x.numel()}


def _run_fields(reps: int, warmup: int, l2_flush: bool, date: str) -> dict:
    return {"reps": reps, "warmup": warmup, "l2_flush": l2_flush, "torch": torch.__version__, "date": date}


def run(
    sizes: Sequence[int] = (16 << 10, 64 << 10, 8 << 20, 64 << 20),
    *,
    device: str = "cuda",
    kernels: Sequence[str] = KERNELS,
    backends: Sequence[str] = BACKENDS,
    group: int = DEFAULT_GROUP,
    fp8_spec: str = DEFAULT_FP8_SPEC,
    sum_payloads: Sequence[int] = DEFAULT_SUM_PAYLOADS,
    dtype: torch.dtype = torch.bfloat16,
    reps: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    flush_l2: bool = True,
    nominal_gbps: float | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time every kernel on every backend at every size.

    Args:
        sizes: message sizes in bytes of ``dtype`` (rounded down to whole ``[tokens, 576]`` rows).
        device: ``"cuda"`` or ``"cpu"`` (the harness with the reference codecs).
        kernels: a subset of :data:`KERNELS`.
        backends: a subset of :data:`BACKENDS`; one that cannot run here is skipped with a logged reason
            (``copy`` always runs, as the practical peak).
        group: INT4 group size; fp8_spec: the FP8 codec spec; sum_payloads: N of ``int4_dequantize_sum``.
        reps: timed calls per case (median reported; default 50 on CUDA, 10 on the CPU); warmup: untimed ones.
        flush_l2: zero a 256 MiB buffer before each timed CUDA call.
        nominal_gbps: override the nominal bandwidth (else looked up in :data:`NOMINAL_GBPS`).
        log: skip notes and progress.

    Returns:
        One record per (size, kernel, backend, N): ``kernel, backend, spec, n_payloads, device, device_name,
        nominal_entry, dtype, requested_bytes, bytes`` (input message bytes), ``shape, numel, bytes_read,
        bytes_written, median_ms, min_ms, gbps, nominal_gbps, pct_nominal, copy_gbps`` (copy at this size),
        ``pct_copy, reps, warmup, l2_flush, torch, date`` (UTC, ISO). Percentages are None when a peak is unknown.

    Raises:
        ValueError: bad arguments. megatron_tpcomp.backends.BackendUnavailableError: ``device="cuda"`` without a
        CUDA device.
    """
    dev = torch.device(device)
    reps = DEFAULT_REPS.get(dev.type, 10) if reps is None else reps
    _check_run_args(dev, kernels, backends, group, fp8_spec, sum_payloads, reps, warmup)
    usable = _usable_backends(backends, dev, log)
    info = device_info(dev)
    if nominal_gbps is not None:
        info.update(nominal_entry="--nominal-gbps", nominal_gbps=float(nominal_gbps))
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=dev) if flush_l2 and dev.type == "cuda" else None
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    records: list[dict] = []
    for nbytes in sizes:
        x = message(nbytes, dtype).to(dev)
        cases = _cases(x, kernels, usable, group, fp8_spec, sum_payloads)
        if "copy" not in kernels:  # the practical peak is always measured
            cases.insert(0, ("copy", "torch", 1, x.clone))
        copy_gbps = None
        for kernel, backend, n, fn in cases:
            times = time_calls(fn, dev, reps, warmup, flush)
            med = statistics.median(times)
            read, written = traffic(kernel, x.numel(), dtype, group=group, fp8_spec=fp8_spec, n_payloads=n)
            gbps = (read + written) / med / 1e9 if med > 0 else float("inf")
            if kernel == "copy":
                copy_gbps = gbps
            spec = "" if kernel == "copy" else (f"int4:g{group}" if kernel.startswith("int4_") else fp8_spec)
            nominal = info["nominal_gbps"]
            records.append(
                dict(
                    kernel=kernel,
                    backend=backend,
                    spec=spec,
                    n_payloads=n,
                    **info,
                    dtype=str(dtype).replace("torch.", ""),
                    requested_bytes=int(nbytes),
                    **_message_fields(x),
                    bytes_read=read,
                    bytes_written=written,
                    median_ms=med * 1e3,
                    min_ms=min(times) * 1e3,
                    gbps=gbps,
                    pct_nominal=100.0 * gbps / nominal if nominal else None,
                    copy_gbps=copy_gbps,
                    pct_copy=100.0 * gbps / copy_gbps if copy_gbps else None,
                    **_run_fields(reps, warmup, flush is not None, date),
                )
            )
            log(f"  {size_label(nbytes):>7} {_kernel_label(records[-1]):<36} {med * 1e3:9.4f} ms {gbps:9.3f} GB/s")
    return records


def cuda_unavailable_reason() -> str | None:
    """Why ``--device cuda`` cannot run here (None when a CUDA device is visible)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def _kernel_label(r: dict) -> str:
    name = r["kernel"] + (f" x{r['n_payloads']}" if r["kernel"] == "int4_dequantize_sum" else "")
    return f"{name} [{r['backend']}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of :func:`run`'s records."""
    head = (
        f"{'kernel [backend]':<36} {'size':>7} {'read B':>11} {'written B':>11} {'ms':>9} {'GB/s':>9} "
        f"{'% nominal':>9} {'% copy':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{_kernel_label(r):<36} {size_label(r['requested_bytes']):>7} "
            f"{r['bytes_read']:>11} {r['bytes_written']:>11} "
            f"{r['median_ms']:>9.4f} {r['gbps']:>9.3f} {_pct(r['pct_nominal']):>9} {_pct(r['pct_copy']):>7}"
        )
    return "\n".join(lines)


def target_lines(records: list[dict]) -> list[str]:
    """One line per INT4 CUDA quantize / dequantize_sum record at a prefill size: % of peak vs the 70% goal
    (nominal HBM bandwidth; the copy bandwidth where the device is not in the table)."""
    lines = []
    for r in records:
        if r["backend"] != "cuda" or r["kernel"] not in TARGET_KERNELS or r["requested_bytes"] < PREFILL_MIN_BYTES:
            continue
        pct, peak = (r["pct_nominal"], "nominal HBM") if r["pct_nominal"] is not None else (r["pct_copy"], "copy")
        verdict = "met" if pct is not None and pct >= 100 * TARGET_FRACTION else "NOT met"
        lines.append(
            f"target {_kernel_label(r)} {size_label(r['requested_bytes'])}: {_pct(pct)} of {peak} bandwidth "
            f"(goal >= {100 * TARGET_FRACTION:.0f}%): {verdict}"
        )
    if not lines:
        lines.append(
            "target: no INT4 CUDA kernel record at a prefill size (>= 8 MiB): the target applies to the CUDA "
            "kernels on a GPU"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """``tpcomp bench kernels``: parse options, :func:`run`, print the table and the targets, write ``--json``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sizes, kernels, backends, sums = _lists(args)
    except (CodecError, ValueError) as exc:
        parser.error(str(exc))
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not _gpu_usable(backends):
        return 2
    _announce(args)
    records = run(
        sizes,
        device=args.device,
        kernels=kernels,
        backends=backends,
        group=args.group,
        fp8_spec=args.fp8_spec,
        sum_payloads=sums,
        reps=args.reps,
        warmup=args.warmup,
        flush_l2=not args.no_flush_l2,
        nominal_gbps=args.nominal_gbps,
        log=(lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True)),
    )
    return report(records, format_table(records), target_lines(records), args.json)


def _parser() -> argparse.ArgumentParser:
    from megatron_tpcomp.cliutil import HelpFormatter, add_quiet_argument

    parser = argparse.ArgumentParser(
        prog="tpcomp bench kernels",
        formatter_class=HelpFormatter,
        description="GB/s of the INT4 CUDA kernels and the FP8 encode/decode (Transformer Engine and torch) vs "
        "the device's nominal memory bandwidth and a measured copy, at decode and prefill sizes. Bytes are the "
        "compulsory traffic (inputs read once, outputs written once); see the module docstring.",
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"bf16 message sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)} (default all)")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)} (default all; cpu: reference)"
    )
    parser.add_argument("--group", type=int, default=DEFAULT_GROUP, help=f"INT4 group size (default {DEFAULT_GROUP})")
    parser.add_argument("--fp8-spec", default=DEFAULT_FP8_SPEC, help=f"FP8 codec spec (default {DEFAULT_FP8_SPEC})")
    parser.add_argument("--sum-payloads", default="2,4", help="N of int4_dequantize_sum (default 2,4)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per case (default 50 on cuda, 10 on cpu)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed calls (default {DEFAULT_WARMUP})")
    parser.add_argument("--no-flush-l2", action="store_true", help="do not zero 256 MiB before each timed CUDA call")
    parser.add_argument("--nominal-gbps", type=float, default=None, help="nominal bandwidth (default: table lookup)")
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list to FILE")
    add_quiet_argument(parser, "no progress or skip lines (the table and errors only)")
    return parser


def _lists(args: argparse.Namespace) -> tuple[list[int], list[str], list[str], list[int]]:
    """(sizes, kernels, backends, sum payload counts) from the command line; ValueError names a bad one."""
    sizes = [parse_size(s) for s in split_list(args.sizes)]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"--sizes needs positive sizes, got {args.sizes!r}")
    kernels = split_list(args.kernels)
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        raise ValueError(f"--kernels: unknown {bad or args.kernels!r}; expected {', '.join(KERNELS)}")
    backends = split_list(args.backends)
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise ValueError(f"--backends: unknown {bad or args.backends!r}; expected {', '.join(BACKENDS)}")
    sums = [int(n) for n in split_list(args.sum_payloads)]
    if any(n < 1 for n in sums):
        raise ValueError(f"--sum-payloads needs counts >= 1, got {args.sum_payloads!r}")
    if args.group not in kern.INT4_CUDA_GROUPS:
        raise ValueError(f"--group must be one of {kern.INT4_CUDA_GROUPS}, got {args.group}")
    if parse_spec(args.fp8_spec).kind != "fp8":
        raise ValueError(f"--fp8-spec {args.fp8_spec!r} is not an fp8 spec")
    check_json_path(args.json)
    return sizes, kernels, backends, sums


def _gpu_usable(backends: list[str]) -> bool:
    """Whether a CUDA device and one of the GPU ``backends`` can run here; if not, say why on stderr."""
    gpu = [b for b in backends if b != "reference"]
    reasons = {b: backend_available(b) for b in gpu}
    no_device = cuda_unavailable_reason()
    if no_device is not None or (gpu and not any(ok for ok, _ in reasons.values())):
        print("error: cannot benchmark the GPU kernels here:", file=sys.stderr)
        if no_device is not None:
            print(f"  device: {no_device}", file=sys.stderr)
        for b, (ok, why) in reasons.items():
            if not ok:
                print(f"  backend {b!r}: {why}", file=sys.stderr)
        print("  (--device cpu runs the harness with the reference codecs)", file=sys.stderr)
        return False
    return True


def _announce(args: argparse.Namespace) -> None:
    """The header line: device, nominal bandwidth, torch, message shape, repetitions, L2 flushing."""
    dev = torch.device(args.device)
    info = device_info(dev)
    nominal = args.nominal_gbps if args.nominal_gbps is not None else info["nominal_gbps"]
    print(
        f"device {info['device_name']}, nominal bandwidth "
        f"{'unknown (not in the table)' if nominal is None else f'{nominal:g} GB/s'}; torch {torch.__version__}; "
        f"bf16 [tokens, 576] messages; medians of {args.reps or DEFAULT_REPS[dev.type]} calls after {args.warmup} "
        f"warm-up{'; L2 flushed before each call' if dev.type == 'cuda' and not args.no_flush_l2 else ''}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
