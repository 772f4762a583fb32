"""The compressed collectives' hot path makes no host synchronisation after warm-up (``pytest -k no_sync``).

A host synchronisation (the CPU waiting for the GPU) breaks CUDA-graph capture and stalls the launch queue. On a
CPU there is nothing to wait for, so these tests make every way of reading a tensor back to the host an error
instead (:func:`no_sync`):

- the Python entry points ``Tensor.item / tolist / __bool__ / __int__ / __float__ / __index__ / cpu / numpy /
  nonzero`` and ``torch.cuda.synchronize`` are patched to raise :class:`HostSync`;
- a ``TorchDispatchMode`` raises on the aten ops that read a value back or size an output from data, whoever
  calls them (C++ included): ``_local_scalar_dense`` (what ``item``/``bool``/``int``/``float`` run), ``nonzero``,
  ``masked_select``, ``unique``, ``equal``, ``is_nonzero``, boolean-mask indexing and ``repeat_interleave``
  with a tensor of repeats and no ``output_size``.

Each rank of a REAL gloo process group of 2 processes runs every case once to warm up (the rank-agreement check
of ``check_ranks="first"``, the kernel dispatch's choice, per-device constant caches), then again with the guard
on; the second result must equal the first bit for bit (same input). Cases: every codec family and modifier
(int, fp8, microscaling incl. nvfp4, ``+had``, ``+outliers`` static and dynamic, ``+chscale``) x every
all-reduce algorithm (one-shot, pipelined one-shot, two-shot, auto) and the all-gather / reduce-scatter entry
points, under ``TPCOMP_BACKEND=reference`` and ``auto`` (the fused CPU library where it runs the format), and
three small cases under ``TPCOMP_BACKEND=triton`` in Triton's interpreter. A compressed forward of a megatron-core
GPT model at TP=2 runs under the guard too. What does sync is shown to raise: ``check_finite=True``,
``check_ranks=True`` and the first call of ``check_ranks="first"`` (the agreement exchange reads its record
back), so the guard is known to bite inside a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_tpcomp.launch import run_distributed

# --------------------------------------------------------------------------------------------------- the guard


class HostSync(AssertionError):
    """A host synchronisation (or a data-dependent output size) was reached inside :func:`no_sync`."""


#: Tensor methods that read values back to the host.
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
#: aten ops that read a value back to the host or size their output from the data.
SYNC_OPS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive"}
    | {"is_nonzero", "equal"}
)
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


class _SyncOps(TorchDispatchMode):
    """Raise :class:`HostSync` on the aten ops of :data:`SYNC_OPS`, boolean-mask indexing and ``repeat_interleave``
    whose output size depends on a tensor; run every other op unchanged."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            raise HostSync(f"aten.{name} reads a tensor back to the host")
        if name in _INDEX_OPS and any(_is_mask(i) for i in args[1]) and not _masked_fill_path(name, args, kwargs):
            raise HostSync(f"aten.{name} with a boolean mask: the output size depends on the data")
        if name == "repeat_interleave" and func.overloadpacket is torch.ops.aten.repeat_interleave:
            if isinstance(args[0], torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor):
                if kwargs.get("output_size") is None:
                    raise HostSync("aten.repeat_interleave with tensor repeats and no output_size")
        return func(*args, **kwargs)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _masked_fill_path(name: str, args: tuple, kwargs: dict) -> bool:
    """True for ``x[mask] = scalar`` that ATen runs as ``masked_fill_`` (no sync): ``index_put`` without
    accumulation of a one-element CPU value with exactly one mask index (ATen's ``canDispatchToMaskedFill``).
    megatron-core's vocabulary-parallel embedding zeroes the rows of other ranks' tokens this way."""
    if name == "index":
        return False
    value = args[2]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    defined = [i for i in args[1] if i is not None]
    return not accumulate and value.numel() == 1 and value.device.type == "cpu" and len(defined) == 1


def _raiser(name: str) -> Callable[..., Any]:
    def raise_(*args: Any, **kwargs: Any) -> Any:
        raise HostSync(f"{name} reads a tensor back to the host")

    return raise_


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Within the block, every host read-back of a tensor raises :class:`HostSync` (see the module docstring)."""
    own = {name: torch.Tensor.__dict__[name] for name in SYNC_METHODS if name in torch.Tensor.__dict__}
    saved_sync = torch.cuda.synchronize
    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, _raiser(f"Tensor.{name}"))
        torch.cuda.synchronize = _raiser("torch.cuda.synchronize")
        with _SyncOps():
            yield
    finally:
        for name in SYNC_METHODS:  # put back what torch.Tensor defined itself; uncover what it inherits
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)
        torch.cuda.synchronize = saved_sync


def _where(exc: BaseException) -> str:
    """The exception and the innermost frames of this package that led to it (so a failure names the line)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) != Path(__file__)]
    ours = [f for f in frames if "megatron_tpcomp" in f.filename] or frames
    at = ", ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno}" for f in ours[-3:])
    return f"{type(exc).__name__}: {exc} (at {at})"


# --------------------------------------------------------------------------------------------------- the cases

#: [s, b, h]: s divides by 2 (reduce-scatter), h = 576 (SmolLM2's hidden size; the +chscale table's length).
SHAPE = (8, 2, 576)
H = SHAPE[-1]
#: A calibrated-like static outlier table and channel-scale table (the codecs' parameters outside the spec).
OUTLIER_TABLE = (3, 100, 400, 575)
CHSCALE_TABLE = tuple((c % 7) - 3 for c in range(H))

#: Every codec family and modifier: integers (symmetric, asymmetric, e4m3/e8m0 scales), +had with rotation blocks
#: equal to, smaller and larger than the group, +chscale, fp8 (e4m3, e5m2), microscaling (mxfp4, nvfp4, fp6),
#: +outliers with a static table and with per-message (dynamic) selection.
SPECS = (
    "int4:g32",
    "int4:g32+had",
    "int5:g64:se4m3+had",
    "int6:g128+had:b128",
    "int4:g64:se4m3+had+chscale",
    "int8:g32:se8m0",
    "int4:g32:asym",
    "fp8",
    "fp8+had",
    "fp8-e5m2:b32:se4m3",
    "mxfp4",
    "nvfp4",
    "nvfp4+had:b16",
    "fp6",
    "int4:g32+outliers",
    "int4:g32+had+outliers:k4",
    "int5:g64:se4m3+had+rows:k2",
)
#: all-reduce algorithms (``one-shot/piped``: the pipelined one-shot of large CPU messages), all-gather along the
#: first and last dimension, reduce-scatter.
OPS = ("one-shot", "one-shot/piped", "two-shot", "auto", "gather0", "gather-1", "scatter0")
BACKENDS = ("reference", "auto")


def make_codec_for(spec: str) -> Any:
    from megatron_tpcomp.codecs import make_codec

    if spec.endswith("+outliers"):
        return make_codec(spec, outlier_channels=list(OUTLIER_TABLE))
    if spec.endswith("+chscale"):
        return make_codec(spec, channel_scale_exponents=list(CHSCALE_TABLE))
    return make_codec(spec)


#: The other input dtypes (the fused CPU library and the casts differ per dtype), on a few formats and paths.
DTYPE_CASES = tuple(
    (spec, op, dtype)
    for dtype in (torch.float16, torch.float32)
    for spec in ("int4:g32+had", "fp8", "nvfp4", "int4:g32+outliers")
    for op in ("one-shot/piped", "two-shot", "scatter0")
)


def make_input(
    rank: int, salt: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Row-parallel-like partial of ``dtype``: N(0, 1) with one channel 50x larger, different per rank and case."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * rank + salt))
    x[..., 3] *= 50.0
    return x.to(dtype)


@contextlib.contextmanager
def _pipelined(on: bool) -> Iterator[None]:
    """Within the block, the one-shot all-reduce pipelines messages of 8 KiB and up in 8 KiB chunks (``on``)."""
    from megatron_tpcomp.collectives import chunking

    saved = chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES
    if on:
        chunking.PIPELINE_MIN_BYTES = chunking.PIPELINE_CHUNK_BYTES = 8192
    try:
        yield
    finally:
        chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = saved


def run_op(x: torch.Tensor, codec: Any, op: str, stats: list | None = None) -> torch.Tensor:
    """One collective call of case ``op`` (see :data:`OPS`) with the default checks (``check_ranks="first"``)."""
    from megatron_tpcomp import collectives

    if op.startswith("gather"):
        return collectives.all_gather(x, codec, dim=int(op[6:]), stats=stats)
    if op == "scatter0":
        return collectives.reduce_scatter(x, codec, dim=0, stats=stats)
    with _pipelined(op == "one-shot/piped"):
        return collectives.all_reduce(x, codec, algo=op.split("/")[0], stats=stats)


def _case(
    rank: int, salt: int, spec: str, op: str, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, Any]:
    """Warm up, then the same call under :func:`no_sync`: ``("ok", stats)`` or what went wrong."""
    codec = make_codec_for(spec)
    x = make_input(rank, salt, shape, dtype)
    stats: list = []
    try:
        warm = run_op(x, codec, op)
    except Exception as exc:  # noqa: BLE001 - reported per case
        return f"warm-up failed: {_where(exc)}", None
    try:
        with no_sync():
            again = run_op(x, codec, op, stats)
    except Exception as exc:  # noqa: BLE001 - a HostSync names the line
        return _where(exc), None
    if not torch.equal(again, warm):
        return "the result under the guard differs from the warm-up's for the same input", None
    return "ok", (stats[0].algo, stats[0].chunks, stats[0].spec)


def _guard_bites(rank: int) -> dict[str, str]:
    """What must raise under the guard: plain syncs, and the collectives' documented syncing options."""
    from megatron_tpcomp import agreement, collectives

    out: dict[str, str] = {}
    x = make_input(rank, 99)

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            with no_sync():
                fn()
        except HostSync as exc:
            out[name] = f"HostSync: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported
            out[name] = f"other: {_where(exc)}"
        else:
            out[name] = "no error"

    attempt("item", lambda: x.float().sum().item())
    attempt("bool", lambda: bool((x > 0).any()))
    attempt("mask_index", lambda: x[x > 0])
    attempt("int", lambda: int(x.float().amax()))
    # Collectives: the first call of a fingerprint under check_ranks="first" exchanges (and reads back) a record,
    # as does every call with check_ranks=True; check_finite counts NaN/Inf on the host. Each runs on both ranks,
    # so the group stays consistent after the error (the exchange's all-gather has completed on both).
    agreement.reset()
    attempt("first_call", lambda: collectives.all_reduce(x, "int4:g32"))
    collectives.all_reduce(x, "int4:g32")  # agreed now (the exchange above raised after the all-gather)
    attempt("check_ranks_always", lambda: collectives.all_reduce(x, "int4:g32", check_ranks=True))
    attempt("check_finite", lambda: collectives.all_reduce(x, "int4:g32", check_finite=True))
    out["after"] = (
        "ok" if torch.equal(collectives.all_reduce(x, "int4:g32"), collectives.all_reduce(x, "int4:g32")) else "differs"
    )
    return out


def _collective_cases(rank: int, world_size: int, backend: str) -> dict:
    os.environ["TPCOMP_BACKEND"] = backend
    out: dict = {"guard": _guard_bites(rank)}
    for i, spec in enumerate(SPECS):
        for j, op in enumerate(OPS):
            out[(spec, op)] = _case(rank, 10 * i + j, spec, op)
    for k, (spec, op, dtype) in enumerate(DTYPE_CASES):
        out[(spec, op, dtype)] = _case(rank, 500 + k, spec, op, SHAPE, dtype)
    return out


@pytest.fixture(scope="module", params=BACKENDS, ids=lambda b: f"backend-{b}")
def collective_runs(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, run_distributed(_collective_cases, 2, request.param, timeout_s=300, pg_timeout_s=120)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("spec", SPECS)
def test_no_sync_hot_path(collective_runs: tuple[str, list[dict]], spec: str, op: str) -> None:
    """After one warm-up call, the same call makes no host sync and gives the same bits, on both ranks."""
    _, results = collective_runs
    for rank, res in enumerate(results):
        verdict, _ = res[(spec, op)]
        assert verdict == "ok", f"rank {rank}: {verdict}"


@pytest.mark.parametrize("spec,op,dtype", DTYPE_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_no_sync_hot_path_other_dtypes(
    collective_runs: tuple[str, list[dict]], spec: str, op: str, dtype: torch.dtype
) -> None:
    """fp16 and fp32 inputs: no host sync after warm-up, the same bits."""
    _, results = collective_runs
    for rank, res in enumerate(results):
        verdict, _ = res[(spec, op, dtype)]
        assert verdict == "ok", f"rank {rank}: {verdict}"


def test_no_sync_cases_took_the_paths_they_name(collective_runs: tuple[str, list[dict]]) -> None:
    """The cases ran compressed, with the algorithm (and pipelining) they are named for: the guard covered them."""
    _, results = collective_runs
    expected = {"one-shot": "one-shot", "one-shot/piped": "one-shot", "two-shot": "two-shot", "auto": "one-shot"}
    expected |= {"gather0": "all-gather", "gather-1": "all-gather", "scatter0": "all-to-all"}
    for res in results:
        for spec in SPECS:
            for op in OPS:
                verdict, info = res[(spec, op)]
                if verdict != "ok":
                    continue  # test_no_sync_hot_path reports it
                algo, chunks, used = info
                assert algo == expected[op], (spec, op, algo)
                assert used != "none", (spec, op)
                codec = make_codec_for(spec)
                piped = op == "one-shot/piped" and codec.block_local
                assert (chunks > 1) == piped, (spec, op, chunks)


def test_no_sync_guard_bites(collective_runs: tuple[str, list[dict]]) -> None:
    """The guard raises on known syncs, inside a collective too: ``check_ranks=True``, ``check_finite=True`` and the
    first (agreement) call of ``check_ranks="first"`` are not graph-safe, as documented; the group works after."""
    _, results = collective_runs
    for res in results:
        guard = res["guard"]
        for name in ("item", "bool", "mask_index", "int", "first_call", "check_ranks_always", "check_finite"):
            assert guard[name].startswith("HostSync"), (name, guard[name])
        assert guard["after"] == "ok"


# --------------------------------------------------------------------- decisions depend on shapes, not values


def _decisions(rank: int, world_size: int) -> dict:
    """The collectives' and the dispatch's choices for inputs of one shape with very different values."""
    from megatron_tpcomp.backends import dispatch

    os.environ["TPCOMP_BACKEND"] = "auto"
    inputs = {
        "zeros": torch.zeros(SHAPE, dtype=torch.bfloat16),
        "normal": make_input(rank, 7),
        "huge": torch.full(SHAPE, 3.0e38, dtype=torch.float32).to(torch.bfloat16) * (1 - 2 * (rank % 2)),
        "nonfinite": make_input(rank, 8).index_fill_(2, torch.tensor([5]), float("nan")),
    }
    log = logging.getLogger("megatron_tpcomp.backends.dispatch")
    log.setLevel(logging.INFO)
    out: dict = {}
    for name, x in inputs.items():
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, _r=records: _r.append(record.getMessage())  # type: ignore[method-assign]
        log.addHandler(handler)
        dispatch.reset()  # decide afresh for this input
        try:
            per_case = {}
            for spec in ("int4:g32", "int4:g32+had", "fp8", "nvfp4", "int4:g32+outliers:k4"):
                for op in ("auto", "one-shot/piped", "gather0", "scatter0"):
                    stats: list = []
                    run_op(x, make_codec_for(spec), op, stats)
                    s = stats[0]
                    per_case[(spec, op)] = (s.algo, s.chunks, s.spec, s.wire_bytes, s.fallback)
        finally:
            log.removeHandler(handler)
        out[name] = (per_case, sorted(records))
    return out


def test_no_sync_auto_choices_depend_on_shape_only() -> None:
    """``auto`` (algorithm, pipelining, backend) chooses the same for zeros, normal values, values near bf16's
    maximum and NaN input of one shape: nothing is decided from the data."""
    results = run_distributed(_decisions, 2, timeout_s=240)
    for res in results:
        reference = res["zeros"]
        assert reference[1], "the dispatch logged no backend choice: the test would prove nothing"
        for name in ("normal", "huge", "nonfinite"):
            assert res[name][0] == reference[0], name
            assert res[name][1] == reference[1], name


def test_no_sync_policy_auto_depends_on_shape_only() -> None:
    """Policy ``auto`` (the cost model, per message) picks the same path for inputs of one shape whatever their
    values."""
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.costmodel import CostModel

    model = CostModel.default()
    seen = set()
    for spec in ("int4:g32", "int4:g32+had", "fp8+outliers:k2"):
        codec = make_codec(spec)
        for shape in ((2, 1, 576), (256, 2, 576), (4096, 1, 576)):
            for op in ("all_reduce", "all_gather", "reduce_scatter"):
                values = (torch.zeros(shape), torch.full(shape, 1e30), torch.full(shape, float("nan")))
                choices = {model.choose_message(op, x, codec, 2, "auto") for x in values}
                assert len(choices) == 1, (spec, shape, op, choices)
                seen |= choices
    assert len(seen) > 1, f"every message got the same choice {seen}: the test would prove nothing"


# ------------------------------------------------------------------------------ a compressed megatron forward

TOKENS = (2, 16)
#: Representative settings: a rotated integer codec, fp8, nvfp4, dynamic outliers, a per-layer config with
#: two-shot, sequence parallel (reduce-scatter + all-gather) and policy ``auto`` (the cost model per message).
FORWARD_CASES: dict[str, tuple[Any, bool]] = {
    "int4:g32+had": ("int4:g32+had", False),
    "fp8": ("fp8", False),
    "nvfp4": ("nvfp4", False),
    "int4:g32+outliers:k4": ("int4:g32+outliers:k4", False),
    "per-layer two-shot": (
        {"default": "int5:g64:se4m3+had", "algo": "two-shot", "layers": {"0": {"mlp": "mxfp4@one-shot"}}},
        False,
    ),
    "sequence-parallel int4:g32": ("int4:g32", True),
    "policy auto": ({"default": "int4:g32+had", "policy": "auto"}, False),
}


def _slow_link_table(path: Path) -> None:
    """A performance table whose TP=2 link is slow (8 Mbit/s): policy ``auto`` compresses every message."""
    from megatron_tpcomp.costmodel import CodecSpeed, CostModel, Link

    model = CostModel.default()
    model.links[2] = Link(alpha_s=20e-6, beta_bytes_per_s=1e6, source="test")
    model.codecs["*"] = CodecSpeed(40e-6, 0.3e9, 40e-6, 1e9, source="test")
    path.write_text(json.dumps(model.to_json()))


def _guarded(call: Any, proceed: Callable[[], Any]) -> Any:
    """A dispatch hook: the plug-in's whole part of one intercepted collective (site, config and codec lookup,
    policy, the compressed collective) runs under :func:`no_sync`."""
    with no_sync():
        return proceed()


def _forward(rank: int, world_size: int, backend: str, table: str) -> dict:
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M

    os.environ["TPCOMP_BACKEND"] = backend
    cpu.enable_cpu()
    M.init_parallel(world_size)
    cfg = M.ModelConfig()
    tokens = torch.randint(0, cfg.vocab_size, TOKENS, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(TOKENS[1]).unsqueeze(0).expand(TOKENS[0], -1)
    models = {sp: M.build_gpt_model(cfg, world_size, seed=0, sequence_parallel=sp) for sp in (False, True)}
    out: dict = {}
    try:
        with torch.no_grad():
            for name, (setting, sp) in FORWARD_CASES.items():
                gpt = models[sp]
                if isinstance(setting, dict):
                    perf = {"perf_table": table} if setting.get("policy") == "auto" else {}
                    config = CompressionConfig.from_dict({**setting, **perf})
                else:
                    config = setting
                intercept.enable(gpt, config, telemetry=True)
                warm = gpt(tokens, positions, attention_mask=None)
                intercept.reset_counts()
                try:
                    with intercept.dispatch_hook(_guarded):
                        again = gpt(tokens, positions, attention_mask=None)
                except Exception as exc:  # noqa: BLE001 - reported per case
                    out[name] = (_where(exc), 0)
                    continue
                finally:
                    intercept.disable(gpt)
                compressed = sum(1 for _, s in intercept.telemetry_records if s.spec != "none")
                out[name] = ("ok" if torch.equal(again, warm) else "differs from the warm-up", compressed)
    finally:
        for gpt in models.values():
            intercept.disable(gpt)
        M.destroy_parallel()
    return out


@pytest.mark.megatron
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_sync_megatron_forward(backend: str, tmp_path: Path) -> None:
    """A compressed forward of a megatron-core GPT model at TP=2 (gloo) after a warm-up forward: no host sync in
    any intercepted collective (everything the plug-in does per collective runs under the guard), the same logits,
    every forward TP collective compressed.

    The guard wraps the intercepted collectives, not megatron-core's own code: on a CPU it cannot tell a device sync
    from a read of a CPU tensor, and megatron-core's forward reads CPU tensors (its RNG tracker compares the CPU
    generator's state with ``.item()`` around attention; its vocabulary-parallel embedding masks with a boolean
    index), which are not device syncs on a GPU."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    _slow_link_table(tmp_path / "table.json")
    results = run_distributed(_forward, 2, backend, str(tmp_path / "table.json"), timeout_s=300, pg_timeout_s=120)
    for rank, res in enumerate(results):
        for name in FORWARD_CASES:
            verdict, compressed = res[name]
            assert verdict == "ok", f"rank {rank}, {name}: {verdict}"
            assert compressed >= 4, f"rank {rank}, {name}: only {compressed} compressed collectives"


# ------------------------------------------------------------------------ the Triton kernels in the interpreter

_TRITON_SCRIPT = """
import os, sys
from megatron_tpcomp.backends import dispatch
if dispatch.triton_module() is None:
    print("SKIP " + str(dispatch.triton_unavailable_reason()))
    sys.exit(0)
from megatron_tpcomp.launch import run_distributed
from tests.collectives.test_no_sync import _triton_ranks
print("RESULT", run_distributed(_triton_ranks, 2, timeout_s=240, start_method="spawn"))
"""


def _triton_ranks(rank: int, world_size: int) -> list[str]:
    os.environ["TPCOMP_BACKEND"] = "triton"
    return [_case(rank, 50 + i, spec, op, (2, 2, 576))[0] for i, (spec, op) in enumerate(TRITON_CASES)]


#: Small, because the interpreter runs every kernel instruction in numpy.
TRITON_CASES = (("int4:g32", "one-shot"), ("int5:g64:se4m3+had", "two-shot"), ("int4:g32+had", "scatter0"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_sync_triton_interpreter() -> None:
    """``TPCOMP_BACKEND=triton`` in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported: a
    fresh interpreter process whose ranks are spawned with it): the Triton hot path inside the collectives."""
    pytest.importorskip("triton", reason="triton is not installed")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("SKIP", "RESULT"))]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    if lines[-1].startswith("SKIP"):
        pytest.skip(f"the Triton kernels do not import: {lines[-1][5:]}")
    assert lines[-1] == "RESULT " + repr([["ok"] * len(TRITON_CASES)] * 2), lines[-1]
