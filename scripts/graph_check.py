"""Do a compressed all_reduce and a whole compressed forward survive CUDA-graph capture? Captured, replayed, compared.

``python scripts/graph_check.py [--spec int4:g32+had] [--shape 4x576] [--dtype bf16] [--count 2]
[--modes auto,reference] [--forward-layers 2] [--tokens 2x16] [--json OUT]``

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

Then, unless ``--forward-layers 0``, a whole compressed forward (``forward`` in the JSON, per mode as above): a
random-initialised megatron-core GPT model of SmolLM2-135M's shape with ``--forward-layers`` layers (default 2;
hidden 576, 9 heads, 3 KV heads, ffn 1536, vocab 49152; bf16), rank 0 of a TP=3 model, with the plug-in enabled
(``megatron_tpcomp.enable(model, SPEC)``, algorithm one-shot). Captured: everything one rank's forward runs on the
device: embedding, attention, MLP, the row-parallel linears' all-reduces through the real plug-in path
(intercept -> config -> ``collectives.all_reduce`` -> one-shot -> ``codec.encode`` -> the transport's all-gather ->
``codec.decode_sum`` of 3 payloads, through the kernel dispatch), logits. Not captured: communication. A capture
cannot contain gloo calls and NCCL cannot put three ranks on one GPU, so the process group is torch's fake process
group (``torch.testing._internal.distributed.fake_pg``: a world of 3 in this one process whose collectives send
nothing): its all-gather fills every rank's slot with this rank's payload (a device copy, as if the two peers
held identical partial sums), and Megatron's stock all-reduce (the embedding's) leaves the input as it is. Where
a torch's fake all-gather does not replicate the payload (checked first), the one-shot module's all-gather is
replaced by that device copy and the JSON says so (``gather``). The logits are those of a rank whose peers are
its twins, not of a TP model: the check is that replay equals eager bit for bit, on two token batches (``A``,
then ``B`` copied into the static input), and that the compressed path ran inside the capture
(``captured_compressed_calls``: 2 per layer). Rank agreement (``TPCOMP_CHECK_RANKS``) runs in the eager warm-up
only (its first-call exchange is cached), as in a real captured decode step.

Tolerance: none. Eager and replay launch the same kernels on the same bytes, and the encode/decode-sum kernels
and the reference are deterministic (no atomics, fixed reduction order), so the outputs must be bit-identical;
any difference means the captured graph is not what eager runs. Without CUDA it reports
``skipped: no CUDA`` and exits 0 (the GPU check reads that line); a failed mode exits 1. Without megatron-core the
forward part prints ``skipped: forward: megatron-core is not installed`` and the all-reduce part still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Run as ``python scripts/graph_check.py``: the checkout's package, whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_tpcomp import backends  # noqa: E402
from megatron_tpcomp.codecs import make_codec  # noqa: E402
from megatron_tpcomp.rankwarnings import quiet_rank_warnings  # noqa: E402

DEFAULT_SPEC = "int4:g32+had"
DEFAULT_SHAPE = (4, 576)  # four tokens of SmolLM2's hidden size: a decode step's all_reduce at batch 4
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_FORWARD_LAYERS = 2
DEFAULT_TOKENS = (2, 16)  # two prompts of 16 tokens: a small prefill
FORWARD_TP = 3  # SmolLM2's 9 heads and 3 KV heads split 3 ways


def _tp_forward_check() -> Any:
    """``scripts/tp_forward_check.py`` (the SmolLM2 shape, ``parse_tokens``), loaded by path: scripts/ is no
    package."""
    path = Path(__file__).resolve().with_name("tp_forward_check.py")
    spec = importlib.util.spec_from_file_location("tp_forward_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# ------------------------------------------------------------------------------------- a whole compressed forward


@contextlib.contextmanager
def _fake_tp_world(tp: int, device: torch.device) -> Iterator[str]:
    """A fake process group of ``tp`` ranks in this process (rank 0) for the block; yields how the compressed
    all-gather gets its payloads (see the module docstring)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from megatron_tpcomp.collectives import one_shot
    from megatron_tpcomp.collectives.transport import all_gather_flat

    if dist.is_initialized():
        raise RuntimeError("graph_check: a process group already exists; the forward check needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    original = one_shot.all_gather_flat
    previous_check = os.environ.get("TPCOMP_CHECK_RANKS")
    try:
        payload = torch.arange(1, 4, dtype=torch.uint8, device=device)
        out = torch.zeros(3 * tp, dtype=torch.uint8, device=device)
        all_gather_flat(out, payload)
        if torch.equal(out, payload.repeat(tp)):
            how = "the fake process group's all-gather (replicates this rank's payload on the device)"
        else:

            def replicate(
                output: torch.Tensor, input_: torch.Tensor, group: Any = None, async_op: bool = False
            ) -> None:
                output.view(tp, -1).copy_(input_)  # what identical peers would deliver

            one_shot.all_gather_flat = replicate
            # The agreement record would be gathered by the same fake group: nothing to compare.
            os.environ["TPCOMP_CHECK_RANKS"] = "off"
            how = "one_shot.all_gather_flat replaced by a device copy (this torch's fake all-gather does not copy)"
        yield how
    finally:
        one_shot.all_gather_flat = original
        if previous_check is None:
            os.environ.pop("TPCOMP_CHECK_RANKS", None)
        else:
            os.environ["TPCOMP_CHECK_RANKS"] = previous_check
        dist.destroy_process_group()


def _capture_and_compare(
    fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor, on_capture: Callable[[], Any]
) -> dict[str, Any]:
    """Eager ``fn`` on A and B, then ``fn`` captured on a static copy of A and replayed on A and on B: the
    rows' ``ok``, ``max_abs_diff_a``/``_b`` and what ``on_capture()`` returned right after the capture.

    On CPU tensors (the tests' stand-in: no graph exists there) the "replay" is ``fn`` called again on the
    static input, so everything but the capture itself runs the same way."""
    eager_a, eager_b = fn(a), fn(b)
    static = a.clone()
    if a.device.type == "cpu":
        fn(static)  # the warm-up's stand-in
        captured = fn(static)
        seen = on_capture()

        def replay() -> None:
            captured.copy_(fn(static))

        sync: Callable[[], None] = lambda: None  # noqa: E731
    else:
        side = torch.cuda.Stream()  # capture needs a side stream that has seen the warm-up (torch's recipe)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(static)
        seen = on_capture()
        replay, sync = graph.replay, torch.cuda.synchronize
    row: dict[str, Any] = {"captured": seen}
    replay()
    sync()
    same_a = torch.equal(captured, eager_a)
    row["max_abs_diff_a"] = float((captured.float() - eager_a.float()).abs().max())
    static.copy_(b)
    replay()
    sync()
    same_b = torch.equal(captured, eager_b)
    row["max_abs_diff_b"] = float((captured.float() - eager_b.float()).abs().max())
    row["ok"] = same_a and same_b
    if not row["ok"]:
        row["error"] = "replay differs from eager" + ("" if same_a else " on A") + ("" if same_b else " on B")
    return row


def check_forward(
    spec: str = DEFAULT_SPEC,
    layers: int = DEFAULT_FORWARD_LAYERS,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    modes: Sequence[str] = ("auto", "reference"),
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The whole-forward capture on ``device`` (default: the current CUDA device; see the module docstring):
    ``{"status", "reason"?, "gather", "model", "modes": [{"mode", "ok", "error", "kernel",
    "captured_compressed_calls", ...}]}``. A CPU ``device`` is the tests' stand-in: the same set-up and
    comparisons with a second eager call in place of capture and replay (megatron-core's CPU patches on)."""
    tfc = _tp_forward_check()
    shape = tfc.model_shape(False, layers)
    result: dict[str, Any] = {"spec": make_codec(spec).spec, "tp": FORWARD_TP, "model": shape, "tokens": list(tokens)}
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return {**result, "status": "skipped", "reason": "megatron-core is not installed", "modes": []}
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron import model as M

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "cpu":
        from megatron_tpcomp.megatron import cpu

        cpu.enable_cpu()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, shape["vocab_size"], tuple(tokens), generator=g).to(device) for _ in range(2))
    positions = torch.arange(tokens[1], device=device).unsqueeze(0).expand(tokens[0], -1)
    with _fake_tp_world(FORWARD_TP, device) as how:
        result["gather"] = how
        M.init_parallel(FORWARD_TP, seed=1234)
        gpt = None
        try:
            gpt = M.build_gpt_model(shape, FORWARD_TP, dtype=torch.bfloat16, seed=1234).to(device)
            config = intercept.enable(gpt, CompressionConfig.from_spec(spec, algo="one-shot"), telemetry=True)
            gpt_codec = config.codec_for("mlp", 0)  # the codec object the plug-in calls (its rotation seed)

            def forward(ids: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return gpt(ids, positions, attention_mask=None)

            def compressed_calls() -> int:
                return sum(1 for _, s in intercept.telemetry_records if s.spec != "none")

            rows = []
            for mode in modes:
                row: dict[str, Any] = {"mode": mode, "ok": False, "error": None}
                try:
                    with backends.forced(mode):
                        intercept.reset_counts()
                        row.update(_capture_and_compare(forward, a, b, compressed_calls))
                        row["kernel"] = backends.choose(gpt_codec, "encode", device, torch.bfloat16).backend
                    # Recorded at capture time (Python runs once there): the compressed path is in the graph.
                    row["captured_compressed_calls"] = row.pop("captured") - 3 * 2 * layers
                    if row["ok"] and row["captured_compressed_calls"] != 2 * layers:
                        row["ok"] = False
                        row["error"] = (
                            f"{row['captured_compressed_calls']} compressed calls captured, expected {2 * layers}"
                        )
                except Exception as exc:  # noqa: BLE001 - a capture error (host sync, H2D copy) is the finding
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
                rows.append(row)
            result["modes"] = rows
        finally:
            if gpt is not None:
                intercept.disable(gpt)
            M.destroy_parallel()
    result["status"] = "ok" if all(r["ok"] for r in result["modes"]) else "failed"
    return result


def run(
    spec: str = DEFAULT_SPEC,
    shape: Sequence[int] = DEFAULT_SHAPE,
    dtype: torch.dtype = torch.bfloat16,
    count: int = 2,
    modes: Sequence[str] = ("auto", "reference"),
    forward_layers: int = DEFAULT_FORWARD_LAYERS,
    tokens: Sequence[int] = DEFAULT_TOKENS,
) -> dict[str, Any]:
    """The check as one JSON-able dict: ``status`` is ``ok``, ``failed`` or ``skipped`` (with ``reason``); the
    whole-forward capture's own dict is ``forward`` (absent with ``forward_layers=0`` or without CUDA)."""
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
    ok = all(m["ok"] for m in result["modes"])
    if forward_layers:
        result["forward"] = check_forward(spec, forward_layers, tokens, modes)
        ok = ok and result["forward"]["status"] != "failed"
    result["status"] = "ok" if ok else "failed"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/graph_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=DEFAULT_SPEC, help=f"codec spec (default {DEFAULT_SPEC})")
    parser.add_argument("--shape", default="x".join(map(str, DEFAULT_SHAPE)), help="tensor shape, e.g. 4x576")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--count", type=int, default=2, help="payloads summed, as from COUNT ranks (default 2)")
    parser.add_argument("--modes", default="auto,reference", help=f"comma-separated {backends.ENV} values")
    parser.add_argument(
        "--forward-layers",
        type=int,
        default=DEFAULT_FORWARD_LAYERS,
        help=f"layers of the captured whole forward (default {DEFAULT_FORWARD_LAYERS}; 0: skip that part)",
    )
    parser.add_argument("--tokens", default="x".join(map(str, DEFAULT_TOKENS)), help="BATCHxSEQUENCE of the forward")
    parser.add_argument("--json", metavar="OUT", help="write the result to this JSON file")
    args = parser.parse_args(argv)
    quiet_rank_warnings()  # megatron-core's notices about missing Transformer Engine / apex
    try:
        shape = parse_shape(args.shape)
    except ValueError as exc:
        parser.error(f"--shape: {exc}")
    try:
        tokens = _tp_forward_check().parse_tokens(args.tokens)
    except ValueError as exc:
        parser.error(f"--tokens: {exc}")
    if args.forward_layers < 0:
        parser.error(f"--forward-layers {args.forward_layers}: expected an integer >= 0")
    if args.count < 1:
        parser.error(f"--count {args.count}: expected an integer >= 1")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in backends.NAMES]
    if bad or not modes:
        parser.error(f"--modes {args.modes!r}: expected a comma-separated list from {', '.join(backends.NAMES)}")
    try:
        result = run(args.spec, shape, DTYPES[args.dtype], args.count, modes, args.forward_layers, tokens)
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
    fwd = result.get("forward")
    if fwd is not None and fwd["status"] == "skipped":
        print(f"skipped: forward: {fwd['reason']}")
    elif fwd is not None:
        print(f"forward: fake TP={fwd['tp']} world, all-gather by {fwd['gather']}")
        for m in fwd["modes"]:
            print(
                f"{fwd['spec']} forward ({fwd['model']['num_layers']} layers, SmolLM2 shape, tokens "
                f"{'x'.join(map(str, fwd['tokens']))}) {backends.ENV}={m['mode']} ({m.get('kernel')}): "
                + (
                    f"capture+replay == eager, {m['captured_compressed_calls']} compressed all-reduces captured"
                    if m["ok"]
                    else f"FAILED: {m['error']}"
                ),
                flush=True,
            )
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
