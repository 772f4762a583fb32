"""Does a compressed all_reduce survive CUDA-graph capture? One codec's encode + decode_sum, captured and replayed.

``python scripts/graph_check.py [--spec int4:g32+had] [--shape 4x576] [--dtype bf16] [--count 2]
[--modes auto,reference] [--json OUT]``

At world size 1 the plug-in's all_reduce sends nothing, so this checks what a captured TP all_reduce runs on
each rank around the collective: ``payload = codec.encode(x)`` (uint8 ``[P]``), the gathered buffer (``count``
payloads back to back, ``[count * P]``: what the all_gather of ``count`` ranks delivers) and
``codec.decode_sum(buffer, count, shape, dtype)``, all through the kernel dispatch (``megatron_tpcomp/backends/``) with
``TPCOMP_BACKEND`` set to each mode asked for (``auto``: the fused kernels; ``reference``: the torch reference on
CUDA tensors). For each mode it:

1. runs the sequence eagerly on input A (also the warm-up: Triton compiles, the rotation signs are cached on the
   device, so nothing is compiled or copied from the host inside the capture);
2. captures it in a ``torch.cuda.CUDAGraph`` on a static copy of A, replays, and compares with the eager result;
3. copies input B into the static input, replays, and compares with the eager result on B (a graph that replays
   stale output, or captured a host-side value of A, fails here).

Tolerance: none. Eager and replay launch the same kernels on the same bytes, and the encode/decode-sum kernels
and the reference are deterministic (no atomics, fixed reduction order), so the outputs must be bit-identical;
any difference means the captured graph is not what eager runs. Without CUDA it reports
``skipped: no CUDA`` and exits 0 (the GPU check reads that line); a failed mode exits 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch

from megatron_tpcomp import backends
from megatron_tpcomp.codecs import make_codec

DEFAULT_SPEC = "int4:g32+had"
DEFAULT_SHAPE = (4, 576)  # four tokens of SmolLM2's hidden size: a decode step's all_reduce at batch 4
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"4x576"`` -> ``(4, 576)``; raises ValueError naming the value unless every dimension is an int >= 1."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"shape {text!r}: expected dimensions >= 1 joined by 'x', such as 4x576")
    return dims


def _compressed_all_reduce(codec: Any, x: torch.Tensor, count: int) -> torch.Tensor:
    """What one rank of a ``count``-rank compressed all_reduce computes around the gather, on identical ranks:
    ``x`` (any shape) -> the sum of ``count`` decodes, ``x.dtype``, ``x.shape``."""
    payload = codec.encode(x)  # uint8 [P], through the dispatch
    gathered = payload.repeat(count)  # [count * P]: the all_gather's buffer when every rank holds x
    return codec.decode_sum(gathered, count, x.shape, x.dtype)


def check_mode(spec: str, shape: Sequence[int], dtype: torch.dtype, count: int, mode: str) -> dict[str, Any]:
    """Capture + replay vs eager with ``TPCOMP_BACKEND=mode`` on the current CUDA device (see the module docstring).
    Returns ``{"mode", "kernel", "ok", "error", "max_abs_diff_a", "max_abs_diff_b"}``."""
    with backends.forced(mode):
        return _check(spec, shape, dtype, count, mode)


def _check(spec: str, shape: Sequence[int], dtype: torch.dtype, count: int, mode: str) -> dict[str, Any]:
    codec = make_codec(spec)
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tuple(shape), generator=g).to(dtype).to(device)
    b = (3.0 * torch.randn(tuple(shape), generator=g)).to(dtype).to(device)  # other scales: other exponents
    row: dict[str, Any] = {"mode": mode, "kernel": None, "ok": False, "error": None}
    try:
        eager_a = _compressed_all_reduce(codec, a, count)
        eager_b = _compressed_all_reduce(codec, b, count)
        # Asked after the eager runs: in auto mode a kernel that failed there was switched to the reference.
        row["kernel"] = backends.choose(codec, "encode", device, dtype).backend
        static = a.clone()
        # Capture needs a side stream that has seen the warm-up (torch's documented recipe).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _compressed_all_reduce(codec, static, count)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _compressed_all_reduce(codec, static, count)
        graph.replay()
        torch.cuda.synchronize()
        same_a = torch.equal(captured, eager_a)
        row["max_abs_diff_a"] = float((captured.float() - eager_a.float()).abs().max())
        static.copy_(b)
        graph.replay()
        torch.cuda.synchronize()
        same_b = torch.equal(captured, eager_b)
        row["max_abs_diff_b"] = float((captured.float() - eager_b.float()).abs().max())
        row["ok"] = same_a and same_b
        if not row["ok"]:
            row["error"] = "replay differs from eager" + ("" if same_a else " on A") + ("" if same_b else " on B")
    except Exception as exc:  # noqa: BLE001 - a capture error (host sync, H2D copy) is the finding, reported
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        try:  # leave the device usable for the next mode; a failed capture may have poisoned the stream
            torch.cuda.synchronize()
        except Exception as sync_exc:  # noqa: BLE001
            row["error"] += f" (then synchronize: {type(sync_exc).__name__})"
    return row


def run(
    spec: str = DEFAULT_SPEC,
    shape: Sequence[int] = DEFAULT_SHAPE,
    dtype: torch.dtype = torch.bfloat16,
    count: int = 2,
    modes: Sequence[str] = ("auto", "reference"),
) -> dict[str, Any]:
    """The check as one JSON-able dict: ``status`` is ``ok``, ``failed`` or ``skipped`` (with ``reason``)."""
    result: dict[str, Any] = {
        "spec": make_codec(spec).spec,  # validates the spec before anything else (also on CPU)
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "count": count,
        "modes": [],
    }
    if not torch.cuda.is_available():
        return {**result, "status": "skipped", "reason": "no CUDA"}
    result["device"] = torch.cuda.get_device_name()
    result["modes"] = [check_mode(spec, shape, dtype, count, m) for m in modes]
    result["status"] = "ok" if all(m["ok"] for m in result["modes"]) else "failed"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/graph_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=DEFAULT_SPEC, help=f"codec spec (default {DEFAULT_SPEC})")
    parser.add_argument("--shape", default="x".join(map(str, DEFAULT_SHAPE)), help="tensor shape, e.g. 4x576")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--count", type=int, default=2, help="payloads summed, as from COUNT ranks (default 2)")
    parser.add_argument("--modes", default="auto,reference", help=f"comma-separated {backends.ENV} values")
    parser.add_argument("--json", metavar="OUT", help="write the result to this JSON file")
    args = parser.parse_args(argv)
    try:
        shape = parse_shape(args.shape)
    except ValueError as exc:
        parser.error(f"--shape: {exc}")
    if args.count < 1:
        parser.error(f"--count {args.count}: expected an integer >= 1")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in backends.NAMES]
    if bad or not modes:
        parser.error(f"--modes {args.modes!r}: expected a comma-separated list from {', '.join(backends.NAMES)}")
    try:
        result = run(args.spec, shape, DTYPES[args.dtype], args.count, modes)
    except ValueError as exc:  # CodecError is one: a bad spec, named by the spec parser
        parser.error(f"--spec {args.spec!r}: {exc}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if result["status"] == "skipped":
        print(f"skipped: {result['reason']}")
        return 0
    for m in result["modes"]:
        print(
            f"{result['spec']} {'x'.join(map(str, shape))} {result['dtype']} count={args.count} "
            f"{backends.ENV}={m['mode']} ({m['kernel']}): "
            + ("capture+replay == eager" if m["ok"] else f"FAILED: {m['error']}"),
            flush=True,
        )
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
