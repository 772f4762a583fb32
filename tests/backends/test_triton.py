"""Triton codec kernels (``megatron_tpcomp/backends/triton.py``) against the torch reference, bit for bit.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` is set while the kernel module is
imported): the whole kernel (loads, Hadamard butterflies, super-block exponent, group scales, rounding, packing,
unpacking, the rank-ordered fp32 sum, the clamp and the casts) executes on CPU tensors. With ``TRITON_INTERPRET``
unset and CUDA present (``scripts/gpu_check.sh``) the same tests compile the kernels for the GPU and run them on
CUDA tensors against the reference computed on the same device.

Every test goes through the product path: ``codec.encode`` / ``codec.decode_sum`` with ``TPCOMP_BACKEND=triton``
(the kernel dispatch routes to the kernel) against the same calls with ``TPCOMP_BACKEND=reference`` (the torch
definition of the wire format).

What the equality pins (no tolerance: payloads byte-equal, decodes bit-equal):
- IEEE division (``tl.math.div_rn``) for ``amax / qmax`` and ``1 / s``; round half to even of ``y * (1/s)``;
- fp16 scale rounding (the cast) and E4M3 scale rounding/decoding by integer bit operations;
- frexp-based super-block exponents and ``pow2_mul``'s two exact power-of-two products, fp32 subnormals included;
- the butterfly order of the rotation and the order of the fp32 sum over payloads (no FMA contraction);
- the bf16 output rounding (integer round to nearest even) and the fp16 output cast.
NaN decodes are compared as NaN at the same positions: the format defines "decodes to NaN", not NaN payload bits
(torch's own CPU and CUDA casts produce different NaN bits).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_tpcomp.backends import dispatch
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.codecs.base import CodecError

ON_GPU = torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET")


def _import_kernels():
    """The kernel module, built for the interpreter unless the tests run on a GPU (env restored after import;
    :func:`_interpreter_env` sets it again while this module's tests run: triton reads it at launch too)."""
    if ON_GPU:
        return dispatch.triton_module()
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return dispatch.triton_module()
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


tc = _import_kernels()


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TRITON_INTERPRET", "1")
        yield


pytestmark = [
    pytest.mark.skipif(tc is None, reason=f"triton not importable: {dispatch.triton_unavailable_reason()}"),
    # The interpreter evaluates both sides of every tl.where in numpy: overflow/NaN warnings of discarded lanes.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

#: The search's default candidates (int part) and the order of priority in the issue.
PRIORITY = (
    "int4:g32",
    "int4:g32+had",
    "int5:g64:se4m3+had",
    "int4:g64:se4m3+had",
    "int4:g32:se4m3+had",
    "int6:g128+had:b128",
)
#: Every format the kernels implement (with the default 32-value rotation where rotated).
ALL_FORMATS = tuple(
    f"int{b}:g{g}{s}{h}" for b in (4, 5, 6, 8) for g in (32, 64, 128) for s in ("", ":se4m3") for h in ("", "+had")
)


@pytest.fixture
def triton_mode(monkeypatch):
    """Returns ``run(mode, fn)``: ``fn()`` with ``TPCOMP_BACKEND=mode`` (``triton`` or ``reference``)."""

    def run(mode: str, fn):  # noqa: ANN001, ANN202
        with monkeypatch.context() as m:
            m.setenv(dispatch.ENV, mode)
            return fn()

    return run


def make_input(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``n`` values of ``dtype`` on DEVICE: gaussian with outliers; from 600 values on a NaN block, an Inf block,
    a zero block, tiny values (dtype subnormals) and the dtype's max; past 4096 a second super-block of tiny
    values only (its exponent differs from the first's)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[::97] *= 300.0
    info = torch.finfo(dtype)
    x = x.to(dtype)
    if n >= 600:
        x[40] = float("nan")
        x[130] = float("-inf")
        x[200] = float("inf")
        x[256:384] = 0.0
        x[384:416] = info.smallest_normal * torch.linspace(-0.9, 0.9, 32).to(dtype)  # subnormals
        x[450] = info.max
        x[451] = -info.max
        x[520:552] = info.tiny * 3
    if n > 4096 + 64:
        x[4096:] = x[4096:] * 1e-30 if dtype == torch.float32 else x[4096:] * info.tiny
    return x.to(DEVICE)


def assert_bits_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs {ref.dtype}"
    nan_g, nan_r = torch.isnan(got), torch.isnan(ref)
    assert torch.equal(nan_g, nan_r), f"{what}: NaN at {torch.nonzero(nan_g ^ nan_r).flatten()[:8].tolist()}"
    view = INT_VIEW[ref.dtype]
    g, r = got.masked_fill(nan_g, 0).view(view), ref.masked_fill(nan_r, 0).view(view)
    bad = torch.nonzero(g != r).flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} values differ, first at {bad[:4].tolist()}: "
        f"{got.flatten()[bad[:4]]} vs {ref.flatten()[bad[:4]]}"
    )


def check(triton_mode, spec: str, shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int = 0, **kw):  # noqa: ANN001
    """Encode ``count`` inputs and decode-sum them in both modes: bytes equal, decode bits equal."""
    codec = make_codec(spec, **kw)
    n = int(torch.tensor(shape).prod()) if shape else 1
    xs = [make_input(n, dtype, seed + r).view(shape) * (r + 1) for r in range(count)]
    ref = [triton_mode("reference", lambda x=x: codec.encode(x)) for x in xs]
    got = [triton_mode("triton", lambda x=x: codec.encode(x)) for x in xs]
    for r, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.device == b.device and a.numel() == b.numel(), f"{spec} {dtype} n={n}: payload size"
        diff = torch.nonzero(a != b).flatten()
        assert diff.numel() == 0, (
            f"{spec} {dtype} n={n} payload {r}: {diff.numel()} bytes differ, first {diff[:6].tolist()}"
        )
    payloads = torch.cat(ref)
    for out_dtype in {dtype, torch.float32}:
        want = triton_mode("reference", lambda d=out_dtype: codec.decode_sum(payloads, count, shape, d))
        have = triton_mode("triton", lambda d=out_dtype: codec.decode_sum(payloads, count, shape, d))
        assert_bits_equal(have, want, f"{spec} decode_sum x{count} {dtype}->{out_dtype} n={n}")


@pytest.mark.parametrize("spec", PRIORITY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpret_priority_formats_every_dtype(triton_mode, spec, dtype):
    """The searched formats: sizes across the group and 4096 boundaries, edge values, 1-3 payloads."""
    for n, count in ((1, 1), (45, 2), (700, 3), (4096 + 200, 2)):
        check(triton_mode, spec, (n,), dtype, count)


@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_interpret_every_format(triton_mode, spec):
    """Every implemented format once: one input across a 4096 boundary with NaN/Inf/zero/tiny/max blocks."""
    i = ALL_FORMATS.index(spec)
    check(triton_mode, spec, (3, 1400 + 8 * i), DTYPES[i % 3], 1 + i % 3, seed=i)


@pytest.mark.parametrize("spec", ["int4:g32+had:b16", "int5:g64:se4m3+had:b64", "int8:g128+had:b128"])
def test_interpret_other_rotation_blocks_and_seed(triton_mode, spec):
    """Other rotation blocks and a non-zero seed (the signs differ; the kernel must load the codec's)."""
    check(triton_mode, spec, (700,), torch.bfloat16, 2, hadamard_seed=7)


def test_interpret_overflowing_sums_and_saturation(triton_mode):
    """fp16 max in every payload: plain codecs clamp each payload and the fp32 sum rounds to Inf in fp16; +had
    clamps the rotated sum (saturates). Both must match the reference exactly."""
    for spec in ("int4:g32", "int5:g64:se4m3+had"):
        codec = make_codec(spec)
        x = torch.full((300,), 65504.0, dtype=torch.float16, device=DEVICE)
        payload = triton_mode("triton", lambda c=codec, x=x: c.encode(x))
        two = torch.cat([payload, payload])
        want = triton_mode("reference", lambda c=codec, p=two: c.decode_sum(p, 2, (300,), torch.float16))
        have = triton_mode("triton", lambda c=codec, p=two: c.decode_sum(p, 2, (300,), torch.float16))
        assert_bits_equal(have, want, spec)


def test_interpret_empty_noncontiguous_and_out(triton_mode):
    """Empty input, a transposed (non-contiguous) input and ``out=`` behave as in the reference."""
    codec = make_codec("int4:g32+had")
    empty = torch.empty(0, 8, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(
        triton_mode("triton", lambda: codec.encode(empty)), triton_mode("reference", lambda: codec.encode(empty))
    )
    x = make_input(40 * 20, torch.float32).view(40, 20).t()
    p_ref = triton_mode("reference", lambda: codec.encode(x))
    assert torch.equal(triton_mode("triton", lambda: codec.encode(x)), p_ref)
    out = torch.empty(20, 40, dtype=torch.bfloat16, device=DEVICE)
    res = triton_mode("triton", lambda: codec.decode_sum(p_ref, 1, (20, 40), torch.bfloat16, out=out))
    assert res.data_ptr() == out.data_ptr()
    want = triton_mode("reference", lambda: codec.decode_sum(p_ref, 1, (20, 40), torch.bfloat16))
    assert_bits_equal(res, want, "out=")


def test_interpret_dispatch_routes_and_refuses(triton_mode, monkeypatch):
    """The dispatch: ``triton`` routes supported formats to the kernels, ``reference`` and unsupported formats do
    not (the latter with the reason), ``auto`` leaves CPU tensors to the CPU library or the reference, a bad
    setting or a wrong payload size is a one-line CodecError."""
    supported, other = make_codec("int4:g32"), make_codec("int3:g32")
    dtype = torch.float32
    assert triton_mode("triton", lambda: dispatch.choose(supported, "encode", DEVICE, dtype)).backend == "triton"
    unsupported = triton_mode("triton", lambda: dispatch.choose(other, "decode", DEVICE, dtype))
    assert unsupported.backend == "reference" and "no Triton kernel for this format" in unsupported.reason
    assert triton_mode("reference", lambda: dispatch.choose(supported, "encode", DEVICE, dtype)).backend == "reference"
    auto = triton_mode("auto", lambda: dispatch.choose(supported, "encode", DEVICE, dtype))
    assert auto.backend == ("cuda" if ON_GPU and dispatch.available("cuda")[0] else "triton" if ON_GPU else "cpu")
    monkeypatch.setenv(dispatch.ENV, "fast")
    with pytest.raises(CodecError, match="TPCOMP_BACKEND='fast'"):
        supported.encode(torch.ones(3))
    monkeypatch.setenv(dispatch.ENV, "triton")
    with pytest.raises(CodecError, match="payload has shape"):
        supported.decode_sum(torch.zeros(5, dtype=torch.uint8, device=DEVICE), 1, (3,), torch.float32)
    with pytest.raises(CodecError, match="count=0"):
        supported.decode_sum(torch.zeros(0, dtype=torch.uint8, device=DEVICE), 0, (3,), torch.float32)


def test_interpret_bench_module_writes_json(tmp_path):
    """``python -m megatron_tpcomp.bench.triton_kernels`` (the GPU check's benchmark) on the decode size: one row
    per spec with positive GB/s and the copy bandwidth it is compared with."""
    from megatron_tpcomp.bench import triton_kernels as bench

    out = tmp_path / "bench.json"
    assert bench.main(["--specs", "int4:g32+had", "--sizes", "decode", "--reps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["copy_gbps"] > 0
    (row,) = result["results"]
    assert row["spec"] == "int4:g32:sfp16+had:b32" and row["shape"] == [1, 576]
    assert row["encode_gbps"] > 0 and row["decode_sum_gbps"] > 0 and row["reference_encode_us"] > 0


def _division_sensitive_maxima(qmax: int, count: int) -> torch.Tensor:
    """fp32 group maxima ``a`` whose fp16 scale differs between IEEE ``a / qmax`` and ``a * fp32(1 / qmax)``."""
    g = torch.Generator().manual_seed(qmax)
    a = torch.rand(1 << 20, generator=g) * 900 + 100
    exact = (a / torch.full_like(a, float(qmax))).to(torch.float16)
    approx = (a * torch.tensor(1.0 / qmax, dtype=torch.float32)).to(torch.float16)
    hits = a[exact != approx]
    assert hits.numel() >= count, f"only {hits.numel()} division-sensitive maxima for qmax {qmax}"
    return hits[:count]


@pytest.mark.parametrize("spec", ["int4:g32", "int5:g32", "int4:g32:se4m3", "int5:g64:se4m3+had"])
def test_interpret_pins_division_rounding_and_ties(triton_mode, spec):
    """Planted values where a shortcut would change bytes: group maxima whose scale differs between IEEE division
    and multiplying by the reciprocal; groups whose values sit exactly on .5 ties of ``y * (1/s)`` (round half to
    even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2); group maxima whose ideal E4M3 scale is exactly halfway between two E4M3
    values (normal and subnormal ties, round to even). Super-block 0 holds a value that fixes ``k = 0``."""
    codec = make_codec(spec)
    inner = codec.inner if hasattr(codec, "inner") else codec
    qmax, g = inner.qmax, inner.group
    limit = qmax * (448.0 if inner.scale_fmt == "e4m3" else 65504.0)
    groups = [torch.zeros(g) for _ in range(128)]
    groups[0][0] = limit * 0.9  # k = 0: the super-block maximum lies in (limit / 2, limit]
    for i, a in enumerate(_division_sensitive_maxima(qmax, 40)):
        groups[1 + i][:3] = torch.stack([a, -a * 0.37, a * 0.11])
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5])
    groups[50][0] = float(qmax)  # scale exactly 1: y * (1/s) = y
    groups[50][1 : 1 + ties.numel()] = ties
    e4m3_ties = [1.0625, 1.1875, 3.25 * 2**-1, 2.5 * 2**-9, 3.5 * 2**-9, 0.5 * 2**-9, 1.5 * 2**-9, 13.5 * 2**-9]
    for i, t in enumerate(e4m3_ties):
        groups[60 + i][0] = t * qmax
    x = torch.cat(groups).to(DEVICE)
    ref = triton_mode("reference", lambda: codec.encode(x))
    got = triton_mode("triton", lambda: codec.encode(x))
    diff = torch.nonzero(got != ref).flatten()
    assert diff.numel() == 0, f"{spec}: {diff.numel()} bytes differ, first {diff[:6].tolist()}"
    want = triton_mode("reference", lambda: codec.decode_sum(ref, 1, x.shape, torch.float32))
    assert_bits_equal(triton_mode("triton", lambda: codec.decode_sum(ref, 1, x.shape, torch.float32)), want, spec)


def test_interpret_auto_mode_falls_back_after_a_failing_first_call(monkeypatch, caplog):
    """``auto``: a kernel that raises on its first call (a compile error on an unsupported GPU) hands that codec and
    device type to the reference for good, with one warning; a CodecError (bad input) is raised, never hidden;
    ``triton`` (forced) raises whatever the kernel raised."""
    codec = make_codec("int4:g64:se4m3+had")
    key = (type(codec).__name__, codec.spec, codec.seed, "encode", "cuda", torch.bfloat16, "auto")
    auto = dispatch.Choice("triton", "TPCOMP_BACKEND=auto: triton implements this call and runs here")

    def broken():  # noqa: ANN202
        raise RuntimeError("PTX .version 9.9 does not support .target sm_70")

    monkeypatch.setattr(dispatch, "_choices", {})
    monkeypatch.setattr(dispatch, "_verified", set())
    with caplog.at_level("WARNING", logger=dispatch.__name__):
        assert dispatch._run(key, auto, codec, broken, lambda: "reference") == "reference"
    assert "the triton kernel failed" in caplog.text and "sm_70" in caplog.text
    assert dispatch._choices[key].backend == "reference"
    with pytest.raises(CodecError, match="bad"):
        dispatch._run(key[:-1] + ("x",), auto, codec, lambda: (_ for _ in ()).throw(CodecError("bad")), broken)
    forced = dispatch.Choice("triton", "TPCOMP_BACKEND=triton", "TPCOMP_BACKEND=triton")
    with pytest.raises(RuntimeError, match="sm_70"):
        dispatch._run(key, forced, codec, broken, lambda: "reference")


def test_interpret_encode_writes_every_payload_byte(triton_mode, monkeypatch):
    """The kernel's payload is allocated without a memset (only the alignment padding is zeroed): with fresh uint8
    allocations poisoned to 0xAB the bytes still equal the reference, so every code, scale and exponent byte is
    written, including partial last super-blocks."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = real_empty(*args, **kwargs)
        return t.fill_(0xAB) if t.dtype == torch.uint8 else t

    for spec in ("int4:g32", "int5:g64:se4m3+had", "int6:g128+had:b128"):
        codec = make_codec(spec)
        for n in (45, 4096 + 200):
            x = make_input(n, torch.float32, seed=n)
            ref = triton_mode("reference", lambda c=codec, x=x: c.encode(x))
            with monkeypatch.context() as m:
                m.setattr(torch, "empty", poisoned)
                got = triton_mode("triton", lambda c=codec, x=x: c.encode(x))
            assert torch.equal(got, ref), f"{spec} n={n}: {int((got != ref).sum())} bytes differ"


@pytest.mark.parametrize("spec", ["int4:g32", "int8:g64:se4m3"])
def test_interpret_plain_decode_goes_through_the_kernel(triton_mode, monkeypatch, spec):
    """``codec.decode`` of a plain codec (not only decode_sum) runs the kernel (counted by a pass-through wrapper)
    and matches the reference's bits."""
    codec = make_codec(spec)
    x = make_input(700, torch.float16, seed=3)
    payload = triton_mode("reference", lambda: codec.encode(x))
    want = triton_mode("reference", lambda: codec.decode(payload, x.shape, torch.float16))
    calls = []
    real = tc.decode_sum
    monkeypatch.setattr(tc, "decode_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_bits_equal(triton_mode("triton", lambda: codec.decode(payload, x.shape, torch.float16)), want, spec)
    assert calls == [1], "codec.decode did not reach the Triton kernel"


HOST_SYNCS = ("item", "tolist", "__bool__", "cpu", "nonzero")


@pytest.mark.parametrize(
    "spec",
    [
        "int4:g32",
        "int5:g64:se4m3+had",
        "int6:g128+had:b128",
        "fp8",
        "fp8-e5m2:b32:se4m3+had",
        "nvfp4",
        "nvfp4+had:b16",
        "int4:g32+chscale",
        "fp8+had+chscale",
        "nvfp4+chscale",
    ],
)
def test_interpret_no_sync_triton_path(triton_mode, monkeypatch, spec):
    """After warm-up, encode and decode-sum through the dispatch and the Triton kernels call no host-sync entry
    point (``Tensor.item/tolist/__bool__/cpu/nonzero`` patched to raise): graph-capturable, nvfp4's message amax
    (a device-side atomic max read by the second kernel) and ``+chscale``'s factors included; so does the torch
    reference. A payload check that reads back (``TPCOMP_CHECK_PAYLOADS=1`` on a dynamic ``+outliers`` payload)
    shows the patch bites. (``tests/collectives/test_no_sync.py`` covers every format inside the collectives.)"""
    kw = {"channel_scale_exponents": [(c % 9) - 4 for c in range(40)]} if "chscale" in spec else {}
    codec = make_codec(spec, **kw)
    x = make_input(5000, torch.bfloat16).view(125, 40)
    payload = triton_mode("triton", lambda: codec.encode(x))
    triton_mode("triton", lambda: codec.decode_sum(torch.cat([payload, payload]), 2, x.shape, torch.bfloat16))
    two = torch.cat([payload, payload])
    outliers = make_codec("int4:g32+outliers:k2")
    rows = x.float().reshape(-1, 100)
    sent = outliers.encode(rows)
    with monkeypatch.context() as m:
        for name in HOST_SYNCS:
            m.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host sync: Tensor.{_n}"))
        again = triton_mode("triton", lambda: codec.encode(x))
        triton_mode("triton", lambda: codec.decode_sum(two, 2, x.shape, torch.bfloat16))
        assert torch.equal(triton_mode("reference", lambda: codec.encode(x)), payload)
        m.setenv("TPCOMP_CHECK_PAYLOADS", "1")
        with pytest.raises(pytest.fail.Exception, match="host sync"):
            outliers.decode(sent, rows.shape, torch.float32)
    assert torch.equal(again, payload)
