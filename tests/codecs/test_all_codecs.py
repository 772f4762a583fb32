"""Contract tests every codec must pass: shapes, sizes, dtypes, padding, non-finite values, strides, determinism,
exact bits per value and its stated error bound. One parametrized suite over every family, so a new codec
inherits all of them.

Every spec is built with ``make_codec``: if a family's module is missing, its tests FAIL (ImportError), they are
never skipped.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.spec import CodecSpec, parse_spec

# Static outlier tables (``+outliers`` without ``:k``): channels 0 and 3 exist in every shape used below
# (last dimension >= 5).
STATIC_CHANNELS = {"int4:g32+outliers": [0, 3]}

# spec -> (relative L2 error bound on N(0,1) data, exact nominal bits per value).
#
# Error bounds: theory for the format, checked against measurement (8 seeds x 3 input dtypes on [64, 2, 96],
# spread < 3%), plus 25% headroom so seeds and dtypes never matter while a codec that loses one bit of
# precision (error x2) fails.
# - symmetric bN:gG: uniform rounding noise step/sqrt(12) with step = amax_G/qmax; E[amax] of G normals is
#   ~2.35 (G=32), ~2.9 (G=128): int4 2.35/7/3.46 = 0.097, int8 0.0053, int7:g128 0.013, int5 with an e8m0 scale
#   (rounded up, ~1.4x larger on average) 0.07. int2 (qmax 1) is far from uniform noise: measured 0.59.
# - asym: step = (max - min)/(2^b - 1), range of 64 normals ~4.8: int3:g64 0.195; int6:g32 (~4.1/63) 0.019.
# - floats with m mantissa bits: relative step 2^-m in a binade, RMS relative error ~2^-m/sqrt(12)*0.71:
#   fp8 e4m3 0.0255, e5m2 0.051; e2m3 (fp6) 0.028; e3m2 0.053; e2m2 (fp5) 0.057; e3m1 0.10; e2m1 (fp4) ~0.095
#   with an fp16/e4m3 scale, 0.115 with e8m0 (rounded-up scales waste up to one binade); e1m2 0.145; fp3 0.32.
# - +had: orthonormal rotation of Gaussian data is Gaussian: same as the base codec.
# - +outliers: the outlier channels are nearly exact (bf16), so at most the base codec's error.
#
# Nominal bits: element bits + scale bits / block (+ offset bits / block for asym) + EXP; outliers at the nominal
# shape [2^20, 1024]: K bf16 channels plus the base codec on the other 1024 - K channels. Per-message constants
# (nvfp4's tensor scale, outlier indices, section alignment) amortize to < 1e-6 bits there.
#: One int16 super-block exponent per 4096 values (codecs/scales.py, "Second level").
EXP = 16 / 4096
CODECS: dict[str, tuple[float, float]] = {
    "int4:g32": (0.12, 4 + 16 / 32 + EXP),
    "int8:g32": (0.0066, 8 + 16 / 32 + EXP),
    "int3:g64:asym": (0.24, 3 + 32 / 64 + EXP),
    "int2:g16:sbf16": (0.7, 2 + 16 / 16 + EXP),
    "int5:g32:se8m0": (0.088, 5 + 8 / 32 + EXP),
    "int6:g32:asym": (0.024, 6 + 32 / 32 + EXP),
    "int7:g128:sfp32": (0.017, 7 + 32 / 128 + EXP),
    "fp8": (0.032, 8 + 32 / 128 + EXP),
    "fp8-e5m2:b128": (0.064, 8 + 32 / 128 + EXP),
    "fp8:b32:sfp16": (0.03, 8 + 16 / 32 + EXP),
    "mxfp4": (0.145, 4 + 8 / 32 + EXP),
    "nvfp4": (0.12, 4 + 8 / 16 + EXP),
    "fp3": (0.40, 3 + 8 / 32 + EXP),
    "fp4:b16:sfp16": (0.12, 4 + 16 / 16 + EXP),
    "fp4-e1m2:b32": (0.18, 4 + 8 / 32 + EXP),
    "fp5:b32": (0.072, 5 + 8 / 32 + EXP),
    "fp5-e3m1:b64:sbf16": (0.13, 5 + 16 / 64 + EXP),
    "fp6": (0.036, 6 + 8 / 32 + EXP),
    "fp6-e3m2:b32": (0.066, 6 + 8 / 32 + EXP),
    "int4:g32+had": (0.12, 4.5 + EXP),
    "int4:g32+had:b128": (0.12, 4.5 + EXP),  # rotation block larger than the quantization group
    "fp8+had:b64": (0.032, 8.25 + EXP),  # rotation block smaller than the quantization block
    "nvfp4+had:b16": (0.12, 4.5 + EXP),
    "int4:g32+outliers:k4": (0.12, (4 * 16 + 1020 * (4.5 + EXP)) / 1024),
    "int4:g32+outliers": (0.12, (2 * 16 + 1022 * (4.5 + EXP)) / 1024),  # static table of 2 channels
    "fp8+outliers:k2": (0.032, (2 * 16 + 1022 * (8.25 + EXP)) / 1024),
    "mxfp4+outliers:k1": (0.145, (1 * 16 + 1023 * (4.25 + EXP)) / 1024),
    "int4:g32+had+outliers:k4": (0.12, (4 * 16 + 1020 * (4.5 + EXP)) / 1024),
}
SPECS = list(CODECS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAMILY_MODULES = ["intx", "fp8", "microscaling", "hadamard", "outliers"]


def codec_for(spec: str) -> Codec:
    return make_codec(spec, outlier_channels=STATIC_CHANNELS.get(spec))


def roundtrip(codec: Codec, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    assert payload.numel() == codec.payload_nbytes(x.shape)
    assert payload.device == x.device
    return codec.decode(payload, x.shape, dtype)


# --- the list itself ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", FAMILY_MODULES)
def test_every_family_module_is_present(module: str) -> None:
    importlib.import_module(f"megatron_tpcomp.codecs.{module}")  # ImportError = failure, never a skip


def test_the_suite_covers_every_family() -> None:
    parsed = [parse_spec(s) for s in SPECS]
    kinds = {(cs.kind, cs.bits) for cs in parsed}
    assert {("int", b) for b in range(2, 9)} <= kinds
    assert {("minifloat", b) for b in (3, 4, 5, 6)} <= kinds
    assert ("fp8", 8) in kinds
    assert {(cs.exp_bits, cs.man_bits) for cs in parsed if cs.kind == "fp8"} == {(4, 3), (5, 2)}
    assert any(cs.asym for cs in parsed) and any(cs.tensor_scale for cs in parsed)
    assert {cs.scale for cs in parsed} == {"fp32", "fp16", "bf16", "e8m0", "e4m3"}
    assert any(cs.hadamard_block for cs in parsed) and any(cs.outliers_k for cs in parsed)
    assert any(cs.outliers and not cs.outliers_k for cs in parsed)  # a static table


# --- round trip: shapes, every input and output dtype, error --------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_shape_dtype_and_error(spec: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(64, 2, 96, generator=gen).to(dtype)
    payload = codec.encode(x)
    y = codec.decode(payload, x.shape, torch.float32)
    for out_dtype in DTYPES:
        out = codec.decode(payload, x.shape, out_dtype)
        assert out.shape == x.shape and out.dtype == out_dtype and out.is_contiguous()
        # The decode dtype only changes the final rounding: no codec may compute in a narrower type.
        assert torch.equal(out, y.to(out_dtype))
    rel = float((y - x.float()).norm() / x.float().norm())
    assert rel < CODECS[spec][0], f"{spec}: relative error {rel:.4f} >= {CODECS[spec][0]}"
    bound = codec.max_abs_error_bound(x)
    assert bound is not None and bound.shape == x.shape and bound.dtype == torch.float32
    assert bool(((y - x.float()).abs() <= bound).all())


@pytest.mark.parametrize("spec", SPECS)
def test_heavy_tailed_within_bound(spec: str, activations: torch.Tensor) -> None:
    codec = codec_for(spec)
    y = roundtrip(codec, activations)
    assert torch.isfinite(y).all()
    assert bool(((y - activations.float()).abs() <= codec.max_abs_error_bound(activations)).all())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1, 7), (3, 37), (5, 33), (2, 3, 11), (1000,), (1, 5)])
def test_sizes_not_divisible_by_the_block(spec: str, shape: tuple[int, ...], gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(shape, generator=gen)
    y = roundtrip(codec, x)
    assert y.shape == x.shape  # padding dropped exactly, shape preserved
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_input_decodes_to_exact_zeros(spec: str, dtype: torch.dtype) -> None:
    codec = codec_for(spec)
    for shape in [(4, 96), (3, 37)]:
        x = torch.zeros(shape, dtype=dtype)
        for out_dtype in DTYPES:
            y = roundtrip(codec, x, out_dtype)
            assert torch.equal(y, torch.zeros_like(y)), "zero scales must give zeros, not 0 * inf = NaN"


@pytest.mark.parametrize("spec", SPECS)
def test_tiny_input_stays_finite(spec: str, gen: torch.Generator) -> None:
    # Scales of fp32 subnormal blocks used to have an infinite reciprocal (0 * inf = NaN codes): finite in,
    # finite out, at every magnitude down to the smallest subnormal.
    codec = codec_for(spec)
    for magnitude in (1e-20, 1e-30, 1e-39, 1e-44):
        x = torch.randn(4, 96, generator=gen) * magnitude
        x[:, ::7] = 0.0  # zeros times an infinite reciprocal were the NaNs
        y = roundtrip(codec, x)
        assert torch.isfinite(y).all(), f"non-finite output for |x| ~ {magnitude}"
        assert float((y - x).norm()) <= float(x.norm())  # and no worse than sending zeros
    x = torch.randn(4, 96, generator=gen) * 1e-20
    assert bool(((roundtrip(codec, x) - x).abs() <= codec.max_abs_error_bound(x)).all())


# --- non-finite input -----------------------------------------------------------------------------------------


def _interval(lo: int, hi: int, block: int) -> tuple[int, int]:
    """The smallest [lo, hi) made of whole blocks that covers [lo, hi)."""
    return lo // block * block, -(-hi // block) * block


def expected_nonfinite(cs: CodecSpec, shape: tuple[int, int], pos: tuple[int, int], chosen: list[int]) -> torch.Tensor:
    """Bool ``[rows, h]`` mask of the values that must decode non-finite when only ``x[pos]`` is NaN/Inf.

    Block codecs: the whole block of ``cs.block`` flattened values holding it. ``+had``: the rotation block
    spreads it, every quantization block touched by that goes NaN, and the inverse rotation spreads those over
    every rotation block they touch. ``+outliers``: a value in an outlier channel (``chosen``) stays alone;
    otherwise the rule above applies inside the inner codec's ``[rows, h - K]`` tensor.
    """
    rows, h = shape
    r, c = pos
    mask = torch.zeros(rows, h, dtype=torch.bool)
    if cs.outliers and c in chosen:
        mask[r, c] = True
        return mask
    rest = [j for j in range(h) if j not in chosen] if cs.outliers else list(range(h))
    width = len(rest)
    p = r * width + rest.index(c)  # flat index in the tensor the block codec sees
    lo, hi = p, p + 1
    if cs.hadamard_block:
        lo, hi = _interval(lo, hi, cs.hadamard_block)
    lo, hi = _interval(lo, hi, cs.block)
    if cs.hadamard_block:
        lo, hi = _interval(lo, hi, cs.hadamard_block)
    inner = torch.zeros(rows * width, dtype=torch.bool)
    inner[lo : min(hi, rows * width)] = True
    mask[:, rest] = inner.view(rows, width)
    return mask


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("shape", "pos"), [((16, 256), (5, 77)), ((16, 256), (0, 0)), ((3, 37), (2, 36))])
def test_non_finite_input_poisons_exactly_its_block(
    spec: str, bad: float, shape: tuple[int, int], pos: tuple[int, int], gen: torch.Generator
) -> None:
    codec = codec_for(spec)
    cs = parse_spec(spec)
    x = torch.randn(shape, generator=gen)
    x[pos] = bad
    if cs.outliers:
        # Dynamic selection ranks NaN/Inf channels first, so the poisoned channel is always an outlier channel.
        chosen = STATIC_CHANNELS.get(spec) or [pos[-1]]
    else:
        chosen = []
    mask = expected_nonfinite(cs, shape, pos, chosen)
    # Reference: the same input with the damage replaced by finite values that leave every other block (and
    # nvfp4's tensor scale, and the dynamic outlier choice) as it was: zeros over the poisoned region, or a
    # huge value in a poisoned outlier channel.
    ref = x.clone()
    if cs.outliers and pos[-1] in chosen:
        ref[pos] = 1e30
    else:
        ref[mask] = 0.0
    y_ref = roundtrip(codec, ref)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = roundtrip(codec, x, out_dtype)
        assert torch.equal(~torch.isfinite(y), mask), f"non-finite at {(~torch.isfinite(y)).nonzero().tolist()[:8]}"
        if cs.outliers and pos[-1] in chosen:  # travels as is in bf16: NaN stays NaN, +-Inf keeps its sign
            assert torch.equal(y[pos].float(), x[pos]) or (math.isnan(bad) and torch.isnan(y[pos]))
        else:  # documented: the block decodes to NaN (never Inf, never a finite value)
            assert torch.isnan(y[mask]).all()
        assert torch.equal(y[~mask], y_ref[~mask].to(out_dtype)), "values outside the poisoned block changed"


# --- layout, strides, empty tensors, malformed payloads ---------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_non_contiguous_input_gives_the_contiguous_payload(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    base = torch.randn(96, 64, generator=gen)
    for x in (base.t(), base[::2, 1:], base.to(torch.bfloat16).t()[:, 3:], base.expand(2, 96, 64)):
        assert not x.is_contiguous()
        assert torch.equal(codec.encode(x), codec.encode(x.contiguous()))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0, 64), (64, 0)])
def test_empty_tensors(spec: str, shape: tuple[int, ...]) -> None:
    codec = codec_for(spec)
    x = torch.empty(shape, dtype=torch.bfloat16)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.payload_nbytes(shape)
    for out_dtype in DTYPES:
        y = codec.decode(payload, shape, out_dtype)
        assert y.shape == torch.Size(shape) and y.dtype == out_dtype
    assert codec.bits_per_value(shape) == 0.0


@pytest.mark.parametrize("spec", SPECS)
def test_wrong_payload_is_rejected(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(8, 64, generator=gen)
    payload = codec.encode(x)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(payload[:-16], x.shape, torch.float32)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(torch.cat([payload, torch.zeros(16, dtype=torch.uint8)]), x.shape, torch.float32)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(codec.encode(torch.randn(64, 64, generator=gen)), x.shape, torch.float32)
    with pytest.raises(CodecError, match="uint8"):
        codec.decode(payload.view(torch.int8), x.shape, torch.float32)
    with pytest.raises(CodecError):
        codec.decode(payload.view(1, -1), x.shape, torch.float32)  # 2-D


@pytest.mark.parametrize("spec", SPECS)
def test_unsupported_input_dtype_is_rejected(spec: str) -> None:
    with pytest.raises(CodecError, match="int32"):
        codec_for(spec).encode(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(CodecError, match="float64"):
        codec_for(spec).encode(torch.ones(8, 64, dtype=torch.float64))


# --- determinism, sizes, identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(256, 576, generator=gen).to(torch.bfloat16)
    first = codec.encode(x)
    assert torch.equal(codec.encode(x), first)
    assert torch.equal(codec.encode(x.clone()), first)
    assert torch.equal(codec_for(spec).encode(x), first)  # a fresh instance agrees byte for byte


@pytest.mark.parametrize("spec", SPECS)
def test_exact_bits_per_value(spec: str) -> None:
    codec = codec_for(spec)
    expected = CODECS[spec][1]
    nominal = codec.nominal_bits_per_value()
    assert nominal < 16
    assert abs(nominal - expected) < 1e-6, f"{spec}: nominal {nominal} bits, expected {expected}"
    # A large aligned message pays the same up to per-message constants (< 64 bytes over 4M values).
    assert abs(codec.bits_per_value((4096, 1024)) - nominal) < 1e-3
    # bits_per_value is exactly the payload size.
    assert codec.bits_per_value((4096, 1024)) == 8 * codec.payload_nbytes((4096, 1024)) / (4096 * 1024)


@pytest.mark.parametrize("spec", SPECS)
def test_canonical_spec_rebuilds_an_equivalent_codec(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    again = make_codec(codec.spec, outlier_channels=STATIC_CHANNELS.get(spec))
    assert again.spec == codec.spec and again == codec
    x = torch.randn(32, 64, generator=gen)
    assert torch.equal(again.encode(x), codec.encode(x))


# --- property: random shapes and magnitudes stay within the stated bound -----------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    cols=st.integers(5, 130),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 3e3]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_error_within_stated_bound(
    spec: str, rows: int, cols: int, scale: float, dtype: torch.dtype, seed: int
) -> None:
    codec = codec_for(spec)
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    y = roundtrip(codec, x)
    assert torch.isfinite(y).all()
    assert bool(((y - x.float()).abs() <= codec.max_abs_error_bound(x)).all())
