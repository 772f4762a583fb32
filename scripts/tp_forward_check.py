"""Compressed tensor-parallel forward of a random SmolLM2-shaped model, every TP rank on ONE device, over gloo.

``python scripts/tp_forward_check.py [--device cuda|cpu] [--tp 3] [--layers 30] [--small] [--tokens 2x128]
[--dtype bf16|fp32] [--specs fp8,int4:g32+had,searched] [--reps 5] [--timeout 300] [--json OUT]``

The model: a megatron-core ``GPTModel`` built by the plug-in's own model code (``megatron/model.py``: local layer
spec, RMSNorm, SwiGLU, RoPE, GQA) with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, ffn
1536, vocab 49152, tied embeddings), random weights from a fixed seed: every rank builds the same full model on
the CPU and keeps its shard (``use_cpu_initialization``), so the ranks hold one model between them. ``--layers N``
keeps the shape with fewer layers; ``--small`` is the tests' toy shape (2 layers, hidden 64, 8 heads, 4 KV heads,
vocab 128), for CI on a CPU.

TP size: SmolLM2-135M's 9 heads and 3 KV heads split 1 or 3 ways, not 2, so its shape runs at ``--tp 3`` (the
default; three processes share the device), which is also the TP size the shipped searched config was
calibrated for. ``--small`` runs at 2 or 4.

Transport: a gloo process group whose collectives get CUDA tensors. NCCL refuses two ranks on one GPU; gloo's
``allreduce`` and ``allgather`` (``all_gather_into_tensor`` maps onto it) accept CUDA tensors and stage them
through pinned host memory inside ``ProcessGroupGloo``, so the plug-in's transport (``collectives/transport.py``,
which puts uint8 CUDA payloads on the wire as they are) needs no host copy of its own. Each rank first probes
exactly the two calls the forward makes (a float all_reduce and the transport's flat uint8 all-gather on the
device) and fails with the probe's error if gloo refuses them; the JSON records the probe.

Each mode runs the same tokens through the model: ``uncompressed`` (the plug-in enabled with spec ``none``, i.e.
Megatron's own collectives: the project's tests pin that this is bit-identical to the plug-in disabled), then
each ``--specs`` entry through the plug-in's interception (``megatron_tpcomp.enable``): a spec (``fp8``,
``int4:g32+had``) or ``searched`` (the shipped per-layer config ``smollm2-135m-tp3-kl0.006.json``; it applies
only to the full shape at TP=3, otherwise the mode is reported as skipped with the config check's reason).
Per mode, in the JSON (``status`` ok | failed | skipped):

- ``max_abs_logit_diff``, ``top1_agreement`` (share of positions whose argmax matches), ``kl`` (mean over
  positions of KL(uncompressed || compressed), fp32 softmax over the full vocabulary) vs uncompressed;
- ``wire_bytes`` / ``raw_bytes``: bytes this rank sent / its collectives' input bytes in one forward, summed over
  every intercepted collective (stock ones at their ring cost, ``collectives.algorithms.STOCK``);
- ``ms_per_forward``: median of ``--reps`` timed forwards after the measured one (device synchronised);
- ``kernels``: which kernel backend ran each codec call, from the kernel dispatch's log lines
  (``megatron_tpcomp.backends.dispatch``), and any fallback warning it logged;
- ``ranks_identical``: every rank gathered bit-identical full logits (the collectives' guarantee).

Random weights make near-uniform logits, so top-1 agreement and KL say how much the codec perturbs the forward,
not how a trained model's quality changes (``tpcomp eval`` measures that on SmolLM2's real weights).
Without CUDA, ``--device cuda`` reports ``skipped: no CUDA`` (after validating the arguments) and exits 0, as does
a machine without megatron-core (``skipped: megatron-core is not installed ...``);
``--device cpu`` runs everything on the CPU (megatron-core's CPU patches). Exit 1 when a mode failed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Run as ``python scripts/tp_forward_check.py``: the checkout's package, whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_tpcomp.rankwarnings import quiet_rank_warnings  # noqa: E402

SMOLLM2_135M = {
    "num_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_query_groups": 3,
    "ffn_hidden_size": 1536,
    "vocab_size": 49152,
    "max_sequence_length": 2048,
    "rotary_base": 100000.0,
    "tie_embeddings": True,
}
SMALL = {  # megatron/model.py's ModelConfig defaults: splits 1, 2 and 4 ways
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_query_groups": 4,
    "ffn_hidden_size": 128,
    "vocab_size": 128,
    "max_sequence_length": 128,
}
SEARCHED = "searched"
SEARCHED_FILE = "smollm2-135m-tp3-kl0.006.json"
DEFAULT_SPECS = ("fp8", "int4:g32+had", SEARCHED)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SEED = 1234
_DISPATCH_LINE = re.compile(r"megatron-tpcomp: (\S+) (encode|decode) on (\w+) (\w+): backend (\w+) \((.*)\)$")


def parse_tokens(text: str) -> tuple[int, int]:
    """``"2x128"`` -> ``(2, 128)`` (batch, sequence); raises ValueError naming the value otherwise."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 2 or any(d < 1 for d in dims):
        raise ValueError(f"tokens {text!r}: expected BATCHxSEQUENCE with both >= 1, such as 2x128")
    return dims  # type: ignore[return-value]


def model_shape(small: bool, layers: int | None) -> dict[str, Any]:
    """The model's ``ModelConfig`` fields: SmolLM2-135M's (or the toy shape), with ``layers`` layers if given."""
    shape = dict(SMALL if small else SMOLLM2_135M)
    if layers is not None:
        shape["num_layers"] = layers
    return shape


def searched_config_path() -> Path:
    return Path(str(importlib.resources.files("megatron_tpcomp.configs").joinpath(SEARCHED_FILE)))


def resolve_modes(specs: list[str], shape: dict[str, Any], tp: int) -> tuple[list[tuple[str, str]], list[str]]:
    """``--specs`` -> ([(mode name, spec or config path)], [skip reasons]). Raises ValueError (ConfigError,
    CodecError) naming a bad spec; the searched config is skipped, with the reason, where it does not fit."""
    from megatron_tpcomp.config import CompressionConfig, ConfigError

    modes, skipped = [], []
    for spec in specs:
        if spec == SEARCHED:
            path = searched_config_path()
            config = CompressionConfig.load(path)
            try:
                config.check_model(shape["num_layers"], shape["hidden_size"], tp, target="this run's model")
            except ConfigError as exc:
                skipped.append(f"{SEARCHED} config: {exc}")
                continue
            modes.append((SEARCHED, str(path)))
        else:
            modes.append((spec, CompressionConfig.from_spec(spec).default.spec))
    return modes, skipped


# ------------------------------------------------------------------------------------------------- one rank


def _probe_gloo_cuda(rank: int, world_size: int, device: torch.device) -> dict[str, str]:
    """The two calls the forward makes, on ``device`` tensors: a float all_reduce (Megatron's stock reduce) and
    the transport's flat uint8 all-gather (the compressed payloads). Raises RuntimeError naming the call."""
    import torch.distributed as dist

    from megatron_tpcomp.collectives.transport import all_gather_flat

    found = {}
    x = torch.full((4,), float(rank + 1), device=device)
    try:
        dist.all_reduce(x)
    except Exception as exc:
        raise RuntimeError(f"gloo all_reduce of a {device.type} tensor failed: {exc}") from exc
    expected = world_size * (world_size + 1) / 2
    if not torch.equal(x.cpu(), torch.full((4,), expected)):
        raise RuntimeError(f"gloo all_reduce on {device.type}: got {x.tolist()}, expected {expected}")
    found["all_reduce"] = "ok"
    payload = torch.full((3,), rank, dtype=torch.uint8, device=device)
    out = torch.empty(3 * world_size, dtype=torch.uint8, device=device)
    try:
        all_gather_flat(out, payload)
    except Exception as exc:
        raise RuntimeError(f"gloo all-gather of {device.type} uint8 payloads failed: {exc}") from exc
    if out.cpu().tolist() != [r for r in range(world_size) for _ in range(3)]:
        raise RuntimeError(f"gloo all-gather on {device.type}: got {out.tolist()}")
    found["all_gather_flat"] = "ok"
    return found


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _kernels(lines: list[str], specs: set[str]) -> list[dict[str, str]]:
    """The dispatch's log lines about the codecs ``specs`` (canonical; a wrapper's inner codec counts, as
    ``int4:g32:sfp16`` for ``int4:g32:sfp16+had:b32``) -> ``[{spec, op, device, dtype, backend, reason}]``; a line
    about a kernel that failed and handed its calls to the reference as ``{"warning": line}``."""
    rows = []
    keys = ("spec", "op", "device", "dtype", "backend", "reason")
    for line in lines:
        m = _DISPATCH_LINE.match(line)
        if m is None:
            if any(spec.split("+")[0] in line for spec in specs):
                rows.append({"warning": line})
            continue
        if any(spec == m.group(1) or spec.startswith(m.group(1) + "+") for spec in specs):
            rows.append(dict(zip(keys, m.groups(), strict=True)))
    return rows


def _gathered_logits(logits: torch.Tensor, world_size: int) -> torch.Tensor:
    """Vocab-parallel ``[b, s, V/TP]`` -> full ``[b, s, V]`` fp32 on the CPU (gathered outside the plug-in)."""
    import torch.distributed as dist

    local = logits.float().cpu().contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=-1)


def _rank(rank: int, world_size: int, opts: dict[str, Any]) -> dict[str, Any]:
    """One TP rank: build its shard, run every mode, return the full logits' digest and (rank 0) the logits."""
    from megatron_tpcomp.collectives.algorithms import STOCK
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron import model as M

    device = torch.device(opts["device"])
    probe: dict[str, str] = {}
    if device.type == "cuda":
        torch.cuda.set_device(0)  # every rank on the one device
        device = torch.device("cuda", 0)
        probe = _probe_gloo_cuda(rank, world_size, device)
    else:
        from megatron_tpcomp.megatron import cpu

        cpu.enable_cpu()
    M.init_parallel(world_size, seed=SEED)
    gpt = None
    handler = _LogLines()
    log = logging.getLogger("megatron_tpcomp.backends.dispatch")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        dtype = DTYPES[opts["dtype"]]
        gpt = M.build_gpt_model(opts["shape"], world_size, dtype=dtype, seed=SEED).to(device)
        b, s = opts["tokens"]
        g = torch.Generator().manual_seed(SEED + 1)
        tokens = torch.randint(0, opts["shape"]["vocab_size"], (b, s), generator=g).to(device)
        positions = torch.arange(s).unsqueeze(0).expand(b, -1).to(device)
        calls: list[tuple[str, int, int, str]] = []

        def count(call: intercept.Dispatch, proceed: Any) -> Any:
            out = proceed()
            raw = call.tensor.numel() * call.tensor.element_size() if call.tensor is not None else 0
            op = call.op if call.op in STOCK else ("reduce_scatter" if "scatter" in call.op else "all_gather")
            wire = call.stats.wire_bytes if call.stats is not None else STOCK[op].wire_bytes(raw, world_size)
            calls.append((call.op, raw, wire, call.stats.spec if call.stats is not None else "none"))
            return out

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return gpt(tokens, positions, attention_mask=None)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        rows = []
        for name, spec in [("uncompressed", "none"), *opts["modes"]]:
            config = CompressionConfig.load(spec) if name == SEARCHED else CompressionConfig.from_spec(spec)
            intercept.enable(gpt, config, telemetry=True)
            calls.clear()
            with intercept.dispatch_hook(count):
                logits = _gathered_logits(forward(), world_size)
            measured = list(calls)
            times = []
            for _ in range(opts["reps"]):
                sync()
                t0 = time.perf_counter()
                forward()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            intercept.disable(gpt)
            rows.append(
                {
                    "name": name,
                    "spec": spec if name != SEARCHED else SEARCHED_FILE,
                    "logits": logits if rank == 0 else None,
                    "digest": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                    "calls": len(measured),
                    "compressed_calls": sum(1 for c in measured if c[3] != "none"),
                    "raw_bytes": sum(c[1] for c in measured),
                    "wire_bytes": sum(c[2] for c in measured),
                    "ms_per_forward": statistics.median(times) if times else None,
                    "ms_all": [round(t, 3) for t in times],
                    # The dispatch logs each choice once per process: look up this mode's specs in all lines.
                    "kernels": _kernels(handler.lines, {c[3] for c in measured} - {"none"}),
                }
            )
        return {"probe": probe, "rows": rows}
    finally:
        log.removeHandler(handler)
        if gpt is not None:
            intercept.disable(gpt)
        M.destroy_parallel()


# ----------------------------------------------------------------------------------------------- the report


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Full logits ``[b, s, V]`` fp32 of a mode vs uncompressed: max |diff|, top-1 agreement, mean KL(ref||out)."""
    ref, out = ref.double(), out.double()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "max_abs_logit_diff": float((ref - out).abs().max()),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
        "kl": float(kl.mean()),
    }


def run(
    device: str = "cuda",
    tp: int = 3,
    small: bool = False,
    layers: int | None = None,
    tokens: tuple[int, int] = (2, 128),
    dtype: str | None = None,
    specs: tuple[str, ...] = DEFAULT_SPECS,
    reps: int = 5,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """The check as one JSON-able dict (see the module docstring). Validates everything before looking at the
    device: a bad spec or a shape that does not split ``tp`` ways raises ValueError naming it."""
    from megatron_tpcomp.megatron.model import ModelConfig

    if device == "cpu" and torch.cuda.is_available():
        raise ValueError(
            "--device cpu needs a machine without CUDA: megatron-core's CPU patches (megatron/cpu.py) refuse to "
            "install where CUDA is available; use --device cuda"
        )
    shape = model_shape(small, layers)
    ModelConfig.from_dict(shape).check_tp(tp)  # ValueError: "TP size 2 does not divide: ..."
    dtype = dtype or ("bf16" if device == "cuda" else "fp32")
    modes, skipped = resolve_modes(list(specs), shape, tp)
    result: dict[str, Any] = {
        "device": device,
        "tp": tp,
        "model": {"name": "small" if small else "smollm2-135m-shape", **shape, "weights": f"random, seed {SEED}"},
        "tokens": list(tokens),
        "dtype": dtype,
        "torch": torch.__version__,
        "modes": [],
        "skipped_modes": skipped,
    }
    if device == "cuda" and not torch.cuda.is_available():
        return {**result, "status": "skipped", "reason": "no CUDA"}
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        reason = "megatron-core is not installed (scripts/fetch_gpu_wheels.sh fetches the wheel the GPU check installs)"
        return {**result, "status": "skipped", "reason": reason}
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.megatron.compat import megatron_version

    result["megatron_core"] = str(megatron_version())
    if device == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
        result["transport"] = "gloo, CUDA tensors (ProcessGroupGloo stages them through pinned host memory)"
    else:
        result["transport"] = "gloo, CPU tensors"
    opts = {"device": device, "shape": shape, "tokens": tokens, "dtype": dtype, "modes": modes, "reps": reps}
    t0 = time.perf_counter()
    ranks = run_distributed(_rank, tp, opts, timeout_s=timeout_s)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["gloo_probe"] = ranks[0]["probe"]
    rows = ranks[0]["rows"]
    result["ranks_identical"] = all(
        [r["digest"] for r in other["rows"]] == [r["digest"] for r in rows] for other in ranks[1:]
    )
    ref = rows[0]["logits"]
    for row in rows:
        logits = row.pop("logits")
        row.pop("digest")
        row.update(compare(ref, logits))
        row["finite"] = bool(torch.isfinite(logits).all())
        row["ok"] = row["finite"] and (row["name"] == "uncompressed" or row["wire_bytes"] < rows[0]["wire_bytes"])
        result["modes"].append(row)
    result["status"] = "ok" if result["ranks_identical"] and all(m["ok"] for m in result["modes"]) else "failed"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/tp_forward_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where every rank runs")
    parser.add_argument("--tp", type=int, default=3, help="TP size = processes sharing the device (default 3)")
    parser.add_argument("--small", action="store_true", help="the tests' toy shape instead of SmolLM2-135M's")
    parser.add_argument("--layers", type=int, help="transformer layers (default: the shape's own, 30 or 2)")
    parser.add_argument("--tokens", default="2x128", help="BATCHxSEQUENCE of the prompt (default 2x128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype (default bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--specs", default=",".join(DEFAULT_SPECS), help=f"comma-separated specs or '{SEARCHED}'")
    parser.add_argument("--reps", type=int, default=5, help="timed forwards per mode (default 5)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole multi-process run")
    parser.add_argument("--json", metavar="OUT", help="write the result to this JSON file")
    args = parser.parse_args(argv)
    quiet_rank_warnings()  # megatron-core's notices about missing Transformer Engine / apex
    try:
        tokens = parse_tokens(args.tokens)
    except ValueError as exc:
        parser.error(f"--tokens: {exc}")
    for flag, value, low in (("--tp", args.tp, 1), ("--layers", args.layers, 1), ("--reps", args.reps, 0)):
        if value is not None and value < low:
            parser.error(f"{flag} {value}: expected an integer >= {low}")
    specs = tuple(s.strip() for s in args.specs.split(",") if s.strip())
    if not specs:
        parser.error(f"--specs {args.specs!r}: expected a comma-separated list of codec specs or '{SEARCHED}'")
    try:
        result = run(args.device, args.tp, args.small, args.layers, tokens, args.dtype, specs, args.reps, args.timeout)
    except ValueError as exc:  # ConfigError and CodecError are ValueErrors: a bad spec, a TP size that does not split
        parser.error(str(exc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    for reason in result["skipped_modes"]:
        print(f"skipped: {reason}")
    if result["status"] == "skipped":
        print(f"skipped: {result['reason']}")
        return 0
    print(
        f"TP={result['tp']} {result['model']['name']} ({result['model']['num_layers']} layers) on "
        f"{result.get('device_name', result['device'])}, {result['dtype']}, tokens {args.tokens}, "
        f"megatron-core {result['megatron_core']}, ranks identical: {result['ranks_identical']}"
    )
    for m in result["modes"]:
        backends = sorted({k["backend"] for k in m["kernels"] if "backend" in k}) or ["-"]
        print(
            f"  {m['name']:>14}: {m['wire_bytes']:>9} B sent/forward, {m['ms_per_forward'] or 0:8.2f} ms/forward, "
            f"max|dlogit| {m['max_abs_logit_diff']:.4g}, top-1 {m['top1_agreement']:.4f}, KL {m['kl']:.3g}, "
            f"kernels {','.join(backends)}" + ("" if m["ok"] else "  FAILED"),
            flush=True,
        )
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
