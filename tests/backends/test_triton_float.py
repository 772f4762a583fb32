"""Triton kernels of the float formats (``backends/triton_float.py``: fp8, nvfp4, mxfp4, fp3-fp6) and of
``+chscale`` on every inner codec against the torch reference, bit for bit.

Same harness as ``test_triton.py`` (its helpers and interpreter fixture): without a GPU the kernels run in Triton's
interpreter on CPU tensors; ``TPCOMP_BACKEND=triton`` vs ``TPCOMP_BACKEND=reference`` through the public codec
calls; payloads byte-equal, decodes bit-equal (NaN compared as NaN at the same positions).

What the equality pins beyond the integer kernels: E4M3/E5M2 element rounding (torch's cast, nearest even, the sign
of zero kept), minifloat codes (``_codes``: ties to the even code, saturation, -0 -> +0), every scale format's
rounding (fp32 tiny clamp, fp16 cast, bf16 and e8m0 on the bits, e4m3), nvfp4's two-level scale with the message
amax formed across programs (atomic max), the ``+had`` padding of the last inner block (+0, not a rotated -0),
and ``+chscale``'s exact factors (including products that overflow to Inf) with the clamp after the sum.
"""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.backends import dispatch
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.codecs.base import CodecError
from tests.backends import test_triton as base
from tests.backends.test_triton import DEVICE, DTYPES, assert_bits_equal, check, make_input, tc

# The base module's fixtures, used here too: the interpreter environment (module-scoped, autouse) and the
# ``TPCOMP_BACKEND`` switch.
_interpreter_env = base._interpreter_env
triton_mode = base.triton_mode

pytestmark = [
    pytest.mark.skipif(tc is None, reason=f"triton not importable: {dispatch.triton_unavailable_reason()}"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

#: fp8 and nvfp4, every element and scale format, plain and rotated: each x every dtype x sizes.
MAIN_FORMATS = (
    "fp8",
    "fp8+had",
    "fp8-e5m2:b128",
    "fp8-e5m2:b32:se4m3+had:b64",
    "fp8:b32:sfp16",
    "fp8:b16:se8m0",
    "fp8:b64:sbf16",
    "nvfp4",
    "nvfp4+had:b16",
)
#: The other minifloats the same kernels take (one input each).
OTHER_FORMATS = (
    "mxfp4",
    "mxfp4+had",
    "fp3",
    "fp4-e3m0:b32",
    "fp4:b16:sfp16",
    "fp5-e1m3:b16:sfp16",
    "fp5-e3m1:b64:sbf16",
    "fp6-e3m2:b32",
    "fp4:b32:se4m3",
    "fp8-e5m2:b256:sfp32+had:b256",
)
#: ``+chscale`` on integer, fp8 and nvfp4 inner codecs, plain and rotated.
CHSCALE_FORMATS = (
    "int4:g32+chscale",
    "int5:g64:se4m3+had+chscale",
    "fp8+chscale",
    "fp8-e5m2:b32:se4m3+had+chscale",
    "nvfp4+chscale",
    "nvfp4+had:b16+chscale",
)
H = 48  # channels of the +chscale tests: not a power of two, not a divisor of the 4096-value tile


def channel_exponents(h: int = H) -> list[int]:
    """Exponents in [-16, 16] with both extremes; channels 450 % h and 451 % h (where make_input puts the dtype's
    max) get +16, so fp32/bf16 maxima overflow to Inf when scaled (the reference's NaN block)."""
    e = [((c * 7) % 33) - 16 for c in range(h)]
    e[450 % h] = e[451 % h] = 16
    return e


@pytest.mark.parametrize("spec", MAIN_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpret_float_formats_every_dtype(triton_mode, spec, dtype):
    """Sizes across the block and 4096 boundaries (and not multiples of the block), NaN/Inf/zero blocks, dtype
    subnormals and maxima, a tiny second super-block, 1-3 payloads."""
    for n, count in ((1, 1), (45, 2), (700, 3), (4096 + 200, 2)):
        check(triton_mode, spec, (n,), dtype, count)


@pytest.mark.parametrize("spec", OTHER_FORMATS)
def test_interpret_other_minifloats(triton_mode, spec):
    i = OTHER_FORMATS.index(spec)
    check(triton_mode, spec, (3, 1400 + 8 * i), DTYPES[i % 3], 1 + i % 3, seed=i)


@pytest.mark.parametrize("spec", CHSCALE_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpret_chscale_every_inner(triton_mode, spec, dtype):
    """``+chscale`` folded into the kernels: exponents -16..16 over 48 channels, rows across the 4096 boundary,
    scaled maxima overflowing to Inf, 1-3 payloads (the sum is clamped after the channel scaling)."""
    for rows, count in ((1, 1), (15, 3), (90, 2)):
        check(triton_mode, spec, (rows, H), dtype, count, channel_scale_exponents=channel_exponents())


def test_interpret_chscale_errors_match_the_reference(triton_mode):
    """A shape that does not fit the table is the reference's one-line CodecError, on both calls."""
    codec = make_codec("fp8+chscale", channel_scale_exponents=channel_exponents())
    with pytest.raises(CodecError, match="has 40 channels; the '\\+chscale' table has 48"):
        triton_mode("triton", lambda: codec.encode(torch.zeros(3, 40, device=DEVICE)))
    with pytest.raises(CodecError, match="not a whole number of rows"):
        triton_mode("triton", lambda: tc.decode_sum(codec, torch.zeros(1, dtype=torch.uint8), 1, (50,), torch.float32))


@pytest.mark.parametrize("spec", ["nvfp4", "nvfp4+had:b16"])
def test_interpret_nvfp4_tensor_scale_edges(triton_mode, spec):
    """The message amax comes from another program (the third super-block holds the maximum), an all-zero message
    (``t = 1``), an all-NaN message (NaN scales, ``t = 1``), an empty one, a tiny and a huge one."""
    codec = make_codec(spec)
    big = make_input(3 * 4096 + 100, torch.float32, seed=5)
    big[2 * 4096 + 7] = 5.0e4
    cases = {
        "max in the third super-block": big,
        "zeros": torch.zeros(700, device=DEVICE),
        "nan": torch.full((300,), float("nan"), device=DEVICE),
        "empty": torch.zeros(0, device=DEVICE),
        "tiny": make_input(700, torch.float32, seed=6) * 1e-30,
        "huge": make_input(700, torch.float32, seed=7).nan_to_num(0.0, 0.0, 0.0) * 1e30,
    }
    for what, x in cases.items():
        ref = triton_mode("reference", lambda x=x: codec.encode(x))
        got = triton_mode("triton", lambda x=x: codec.encode(x))
        assert torch.equal(got, ref), f"{spec} {what}: {int((got != ref).sum())} bytes differ"
        want = triton_mode("reference", lambda x=x, p=ref: codec.decode_sum(p, 1, x.shape, torch.bfloat16))
        have = triton_mode("triton", lambda x=x, p=ref: codec.decode_sum(p, 1, x.shape, torch.bfloat16))
        assert_bits_equal(have, want, f"{spec} {what}")


def _division_sensitive(emax: float, fmt: str, count: int) -> torch.Tensor:
    """Up to ``count`` fp32 block maxima in ``[emax / 2, 3.5 emax)`` whose scale, rounded to ``fmt``, differs between
    IEEE ``a / emax`` and ``a * fp32(1 / emax)`` (at least ``count`` for fp32 scales, 5 for fp16)."""
    g = torch.Generator().manual_seed(int(emax))
    a = (torch.rand(1 << 18, generator=g) * 3 + 0.5) * emax
    exact, approx = a / torch.full_like(a, emax), a * torch.tensor(1.0 / emax, dtype=torch.float32)
    to = {"fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}.get(fmt)
    if to is not None:
        exact, approx = exact.to(to).float(), approx.to(to).float()
    hits = a[exact != approx][:count]
    need = {"fp32": count, "fp16": 5}.get(fmt, 0)
    assert hits.numel() >= need, f"only {hits.numel()} division-sensitive maxima for {emax} {fmt}"
    return hits


def _planted(spec: str) -> torch.Tensor:
    """fp32 blocks of ``spec``'s block size whose codes or scales sit on rounding decisions (see the test)."""
    codec = make_codec(spec)
    inner = codec.inner if hasattr(codec, "inner") else codec
    b = inner.block
    emax = inner.fmax if hasattr(inner, "fmax") else inner.emax
    blocks = [torch.zeros(b) for _ in range(max(4096 // b, 80))]
    # Block 0 fixes the super-block exponent at 0 (narrow rule: in (limit / 2, limit]) or nvfp4's t at 1.
    limit = {"fp16": 65504.0, "e4m3": 448.0}.get(inner.scale_fmt, 1.0) * emax
    blocks[0][0] = 2688.0 if getattr(inner, "tensor_scale", False) else limit * 0.9
    # Element ties with a block scale of exactly 1 (amax = emax): round half to even, the sign of zero.
    if emax == 448.0:  # e4m3: 1 | 1.125, 1.125 | 1.25, subnormal steps of 2^-9
        ties = [1.0625, 1.1875, 2.5 * 2**-9, 3.5 * 2**-9, 0.5 * 2**-9, 1.5 * 2**-9, 13.5 * 2**-9, 0.25 * 2**-9]
    elif emax == 57344.0:  # e5m2: 1 | 1.25, 1.25 | 1.5, subnormal steps of 2^-16
        ties = [1.125, 1.375, 0.5 * 2**-16, 1.5 * 2**-16, 2.5 * 2**-16, 3.5 * 2**-16, 0.25 * 2**-16, 3.0 * 2**-16]
    else:  # e2m1: 0 0.5 1 1.5 2 3 4 6
        ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.1]
    t = torch.tensor(ties)
    blocks[1][0] = emax
    blocks[1][1 : 1 + t.numel()] = t
    blocks[2][0] = -emax
    blocks[2][1 : 1 + t.numel()] = -t
    # Scale rounding: maxima whose stored scale differs between IEEE division and the reciprocal's product.
    for i, a in enumerate(_division_sensitive(emax, inner.scale_fmt, 20)):
        blocks[3 + i][:3] = torch.stack([a, -a * 0.37, a * 0.11])
    # e4m3 scale ties (normal and subnormal), bf16 ties (1 + 2^-8, 1 + 3 * 2^-8) and e8m0 exact powers of two.
    scale_points = [1.0625, 1.1875, 2.5 * 2**-9, 3.5 * 2**-9, 1 + 2**-8, 1 + 3 * 2**-8, 8.0, 2**-20, 2**-130]
    for i, s in enumerate(scale_points):
        blocks[30 + i][0] = s * emax
    return torch.cat(blocks)


@pytest.mark.parametrize(
    "spec", ["fp8", "fp8:b32:sfp16", "fp8-e5m2:b32:se4m3", "fp8:b64:sbf16", "fp8:b16:se8m0", "nvfp4", "mxfp4"]
)
def test_interpret_float_pins_rounding_and_ties(triton_mode, spec):
    """Planted values where a shortcut would change bytes: element values exactly halfway between two E4M3, E5M2
    or E2M1 values (normal and subnormal; round half to even, ``-tiny`` keeping the fp8 sign and becoming +0 in a
    minifloat); block maxima whose fp16/fp32 scale differs between IEEE division and the reciprocal's product;
    ideal scales on e4m3 and bf16 ties, e8m0 powers of two (not rounded up) and subnormal ideal scales."""
    codec = make_codec(spec)
    x = _planted(spec).to(DEVICE)
    ref = triton_mode("reference", lambda: codec.encode(x))
    got = triton_mode("triton", lambda: codec.encode(x))
    diff = torch.nonzero(got != ref).flatten()
    assert diff.numel() == 0, f"{spec}: {diff.numel()} bytes differ, first {diff[:6].tolist()}"
    want = triton_mode("reference", lambda: codec.decode_sum(ref, 1, x.shape, torch.float32))
    assert_bits_equal(triton_mode("triton", lambda: codec.decode_sum(ref, 1, x.shape, torch.float32)), want, spec)


def test_interpret_float_decodes_every_code(triton_mode):
    """Every fp8 byte (E4M3 NaN 0x7F/0xFF, E5M2 Inf and NaN, -0) and every nvfp4 nibble decodes as the reference:
    payloads written directly, not by an encoder."""
    for spec in ("fp8:b128", "fp8-e5m2:b128", "nvfp4"):
        codec = make_codec(spec)
        n = 4096
        payload = torch.zeros(codec.payload_nbytes((n,)), dtype=torch.uint8)
        layout = codec.layout((n,))
        codes = layout.view(payload, "codes")
        codes.copy_(torch.arange(codes.numel()) % 256)
        scales = layout.view(payload, "scales")
        if spec == "nvfp4":
            scales.fill_(0x38)  # e4m3 1.0
            layout.view(payload, "tensor_scale").fill_(0.75)
        else:
            scales.copy_(torch.linspace(0.5, 2.0, scales.numel()))
        payload = payload.to(DEVICE)
        for dtype in DTYPES:
            want = triton_mode("reference", lambda c=codec, d=dtype, p=payload: c.decode(p, (4096,), d))
            have = triton_mode("triton", lambda c=codec, d=dtype, p=payload: c.decode(p, (4096,), d))
            assert_bits_equal(have, want, f"{spec} every code -> {dtype}")


def test_interpret_float_encode_writes_every_payload_byte(triton_mode, monkeypatch):
    """No memset of the payload: with fresh uint8 allocations poisoned to 0xAB the bytes still equal the reference
    (codes, scales, nvfp4's tensor scale, exponents, partial last super-blocks)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = real_empty(*args, **kwargs)
        return t.fill_(0xAB) if t.dtype == torch.uint8 else t

    for spec in ("fp8", "fp8-e5m2:b32:se4m3+had", "nvfp4", "fp6-e3m2:b32"):
        codec = make_codec(spec)
        for n in (45, 4096 + 200):
            x = make_input(n, torch.float32, seed=n)
            ref = triton_mode("reference", lambda c=codec, x=x: c.encode(x))
            with monkeypatch.context() as m:
                m.setattr(torch, "empty", poisoned)
                got = triton_mode("triton", lambda c=codec, x=x: c.encode(x))
            assert torch.equal(got, ref), f"{spec} n={n}: {int((got != ref).sum())} bytes differ"


def test_interpret_float_dispatch_routes_and_refuses(triton_mode):
    """fp8/nvfp4/+chscale route to the kernels under ``triton``; a block size the kernels do not take runs the
    reference with the reason listing what they take; the kernel module's own entry refuses it with a one-line
    CodecError naming the spec; ``Fp8Codec(backend="torch")`` stays on the reference."""
    dtype = torch.bfloat16
    for spec, kw in (("fp8", {}), ("nvfp4+had:b16", {}), ("fp8+chscale", {"channel_scale_exponents": [1, 2]})):
        codec = make_codec(spec, **kw)
        for op in ("encode", "decode"):
            choice = triton_mode("triton", lambda c=codec, op=op: dispatch.choose(c, op, DEVICE, dtype))
            assert choice.backend == "triton", (spec, op, choice)
    other = make_codec("fp8:b48")
    choice = triton_mode("triton", lambda: dispatch.choose(other, "encode", DEVICE, dtype))
    assert choice.backend == "reference" and "no Triton kernel for this format" in choice.reason
    assert "fp8-e4m3/fp8-e5m2" in choice.reason and "+chscale" in choice.reason
    with pytest.raises(CodecError, match=r"no Triton kernel for 'fp8-e4m3:b48:sfp32'; expected int<N>") as err:
        tc.encode(other, torch.ones(48, device=DEVICE))
    assert "\n" not in str(err.value)
    from megatron_tpcomp.codecs.fp8 import Fp8Codec

    torch_fp8 = Fp8Codec(make_codec("fp8").cs, backend="torch")
    assert triton_mode("triton", lambda: dispatch.choose(torch_fp8, "encode", DEVICE, dtype)).backend == "reference"


def test_interpret_bench_module_covers_float_and_chscale(tmp_path):
    """The GPU kernel benchmark runs the new formats (nvfp4's two kernels, +chscale with its table) at the decode
    size: one row each with positive GB/s."""
    import json

    from megatron_tpcomp.bench import triton_kernels as bench

    out = tmp_path / "bench.json"
    specs = "nvfp4+had:b16,fp8-e5m2:b32:se4m3,int4:g64:se4m3+had+chscale"
    assert bench.main(["--specs", specs, "--sizes", "decode", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["spec"] for r in rows] == [
        "nvfp4:b16:se4m3+had:b16",
        "fp8-e5m2:b32:se4m3",
        "int4:g64:se4m3+had:b32+chscale",
    ]
    assert all(r["encode_gbps"] > 0 and r["decode_sum_gbps"] > 0 for r in rows)


def test_interpret_float_seed_noncontiguous_and_out(triton_mode):
    """A non-zero rotation seed (the kernel must load the codec's signs), a transposed (non-contiguous) input and
    ``out=`` on the float and ``+chscale`` paths behave as in the reference."""
    for spec, kw in (
        ("fp8-e5m2:b64+had:b128", {"hadamard_seed": 7}),
        ("nvfp4+had:b16", {"hadamard_seed": 3}),
        ("fp8+had+chscale", {"hadamard_seed": 5, "channel_scale_exponents": channel_exponents(20)}),
    ):
        codec = make_codec(spec, **kw)
        x = make_input(20 * 40, torch.float32, seed=11).view(20, 40).t()  # [40, 20], not contiguous
        assert not x.is_contiguous()
        ref = triton_mode("reference", lambda c=codec, x=x: c.encode(x))
        assert torch.equal(triton_mode("triton", lambda c=codec, x=x: c.encode(x)), ref), spec
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
        res = triton_mode(
            "triton", lambda c=codec, p=ref, o=out, s=x.shape: c.decode_sum(p, 1, s, torch.bfloat16, out=o)
        )
        assert res.data_ptr() == out.data_ptr()
        want = triton_mode("reference", lambda c=codec, p=ref, s=x.shape: c.decode_sum(p, 1, s, torch.bfloat16))
        assert_bits_equal(res, want, f"{spec} out=")
