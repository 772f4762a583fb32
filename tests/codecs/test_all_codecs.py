"""Contract tests every codec must pass: shapes, sizes, dtypes, padding, non-finite values, determinism and its
stated error bound. One parametrized suite over every family, so a new codec inherits all of them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from tests.conftest import heavy_tailed

SPECS = [
    "int4:g32",
    "int8:g32",
    "int3:g64:asym",
    "int2:g16:sbf16",
    "fp8",
    "fp8-e5m2:b128",
    "fp8:b32:sfp16",
    "mxfp4",
    "nvfp4",
    "fp5:b32",
    "fp6-e3m2:b32",
    "fp4:b16:sfp16",
    "fp3",
    "int4:g32+had",
    "nvfp4+had:b16",
    "int4:g32+outliers:k4",
    "fp8+outliers:k2",
    "int4:g32+had+outliers:k4",
]
# Relative L2 error on N(0,1) data each codec must beat. Derived from the element step: for b-bit symmetric
# integers with a per-group absmax scale the RMS error is about step/sqrt(12) with step = amax/qmax, amax of 32
# normal values ~2.5: int4 ~0.10, int8 ~0.006, int3 asym (7 levels over max-min) ~0.17, int2 ~0.5;
# fp8 e4m3 ~2^-4/sqrt(3)... measured 0.02, e5m2 0.04; 4-bit floats ~0.10-0.12; fp5 e2m2 0.06; fp6 e3m2 0.05;
# fp3 0.35. Bounds below are ~1.3-1.5x those values so that seeds do not matter but a broken codec fails.
REL_ERR = {
    "int4:g32": 0.13,
    "int8:g32": 0.01,
    "int3:g64:asym": 0.25,
    "int2:g16:sbf16": 0.7,
    "fp8": 0.03,
    "fp8-e5m2:b128": 0.06,
    "fp8:b32:sfp16": 0.03,
    "mxfp4": 0.16,
    "nvfp4": 0.13,
    "fp5:b32": 0.08,
    "fp6-e3m2:b32": 0.07,
    "fp4:b16:sfp16": 0.13,
    "fp3": 0.45,
    "int4:g32+had": 0.13,
    "nvfp4+had:b16": 0.13,
    "int4:g32+outliers:k4": 0.13,
    "fp8+outliers:k2": 0.03,
    "int4:g32+had+outliers:k4": 0.13,
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def codec_for(spec: str) -> Codec:
    return make_codec(spec)


def roundtrip(codec: Codec, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    assert payload.numel() == codec.payload_nbytes(x.shape)
    return codec.decode(payload, x.shape, dtype)


def test_every_spec_has_an_error_bound() -> None:
    assert set(SPECS) == set(REL_ERR)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_shape_dtype_and_error(spec: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(64, 2, 96, generator=gen).to(dtype)
    for out_dtype in DTYPES:
        y = roundtrip(codec, x, out_dtype)
        assert y.shape == x.shape and y.dtype == out_dtype and y.is_contiguous()
    y = roundtrip(codec, x)
    rel = float((y - x.float()).norm() / x.float().norm())
    assert rel < REL_ERR[spec], f"{spec}: relative error {rel:.4f} >= {REL_ERR[spec]}"
    bound = codec.max_abs_error_bound(x)
    assert bound is not None and bound.shape == x.shape
    assert bool(((y - x.float()).abs() <= bound).all())


@pytest.mark.parametrize("spec", SPECS)
def test_heavy_tailed_within_bound(spec: str) -> None:
    codec = codec_for(spec)
    x = heavy_tailed((128, 576), seed=3)
    y = roundtrip(codec, x)
    assert torch.isfinite(y).all()
    assert bool(((y - x.float()).abs() <= codec.max_abs_error_bound(x)).all())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1, 7), (3, 37), (5, 33), (2, 3, 11), (1000,)])
def test_sizes_not_divisible_by_the_block(spec: str, shape: tuple[int, ...], gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(shape, generator=gen)
    y = roundtrip(codec, x)
    assert y.shape == x.shape
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


@pytest.mark.parametrize("spec", SPECS)
def test_all_zero_input_decodes_to_exact_zeros(spec: str) -> None:
    codec = codec_for(spec)
    x = torch.zeros(4, 96, dtype=torch.bfloat16)
    y = roundtrip(codec, x)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_never_becomes_finite(spec: str, bad: float, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(16, 256, generator=gen)
    x[5, 77] = bad
    y = roundtrip(codec, x)
    # The poisoned value itself must not come back finite (documented: its block decodes to NaN;
    # an outlier channel keeps it as is in bf16).
    assert not torch.isfinite(y[5, 77])
    # Damage stays local: rows other than the poisoned one are finite (blocks and rotations never straddle
    # 256-value rows here, and outlier selection is per channel).
    others = torch.cat([y[:5], y[6:]])
    assert torch.isfinite(others).all()


@pytest.mark.parametrize("spec", SPECS)
def test_non_contiguous_input_gives_the_contiguous_payload(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    base = torch.randn(96, 64, generator=gen)
    x = base.t()  # [64, 96], strided
    assert not x.is_contiguous()
    assert torch.equal(codec.encode(x), codec.encode(x.contiguous()))
    sliced = base[::2, 1:]
    assert torch.equal(codec.encode(sliced), codec.encode(sliced.contiguous()))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0, 64)])
def test_empty_tensors(spec: str, shape: tuple[int, ...]) -> None:
    codec = codec_for(spec)
    x = torch.empty(shape, dtype=torch.bfloat16)
    payload = codec.encode(x)
    assert payload.numel() == codec.payload_nbytes(shape)
    y = codec.decode(payload, shape, torch.bfloat16)
    assert y.shape == torch.Size(shape)


@pytest.mark.parametrize("spec", SPECS)
def test_wrong_payload_size_is_rejected(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(8, 64, generator=gen)
    payload = codec.encode(x)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(payload[:-16], x.shape, torch.float32)
    with pytest.raises(CodecError, match="uint8"):
        codec.decode(payload.view(torch.int8), x.shape, torch.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_unsupported_input_dtype_is_rejected(spec: str) -> None:
    with pytest.raises(CodecError, match="int32"):
        codec_for(spec).encode(torch.ones(64, dtype=torch.int32))


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_and_compressing(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    x = torch.randn(256, 576, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    assert torch.equal(codec.encode(x), codec.encode(x.clone()))
    assert torch.equal(make_codec(spec).encode(x), codec.encode(x))  # a fresh instance agrees
    assert codec.bits_per_value(x.shape) < 16
    assert codec.nominal_bits_per_value() < 16


@pytest.mark.parametrize("spec", SPECS)
def test_canonical_spec_rebuilds_an_equivalent_codec(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    again = make_codec(codec.spec)
    x = torch.randn(32, 64, generator=gen)
    assert again.spec == codec.spec
    assert torch.equal(again.encode(x), codec.encode(x))


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    cols=st.integers(5, 130),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 3e3]),
    seed=st.integers(0, 2**16),
)
def test_property_error_within_stated_bound(spec: str, rows: int, cols: int, scale: float, seed: int) -> None:
    codec = codec_for(spec)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    y = roundtrip(codec, x)
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())
