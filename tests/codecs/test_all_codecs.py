"""Contract tests every codec must pass: shapes, sizes, dtypes, padding, non-finite values, strides, determinism,
exact bits per value and its stated error bound. One parametrized suite over the examples every family and
modifier registers (``megatron_tpcomp.spec.Example``), so a new family is tested by registering it; a toy family
registered from this module shows that (and that nothing else has to change).

Every spec is built with ``make_codec``: if a family's module is missing, its tests FAIL (ImportError), they are
never skipped.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.codecs.base import check_input, check_payload, clamp_to, numel_of
from megatron_tpcomp.spec import (
    CodecSpec,
    Example,
    Family,
    canonical,
    describe_grammar,
    examples,
    families,
    parse_spec,
    register_family,
    registered_family,
    unregister_family,
)

# --- a family registered in one place: this module ---------------------------------------------------------------


class ToyCodec(Codec):
    """``toy8``: every value as one FP8 E5M2 byte, no scale (saturating at 57344, NaN for a non-finite value: the
    NaN rule with blocks of one value)."""

    FMAX = 57344.0

    def __init__(self, cs: CodecSpec):
        self.cs = cs
        self.spec = canonical(cs)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return numel_of(shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        v = x.reshape(-1).to(torch.float32).clamp(-self.FMAX, self.FMAX)
        v = torch.where(torch.isfinite(x.reshape(-1)), v, torch.full_like(v, math.nan))
        return v.to(torch.float8_e5m2).view(torch.uint8)

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        check_payload(payload, self.payload_nbytes(shape), self.spec)
        values = payload.view(torch.float8_e5m2).to(torch.float32)
        return clamp_to(values, dtype).reshape(tuple(shape)).to(dtype)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor:
        # Clipping past 57344, else half a step: 2^-3 relative (2 mantissa bits), 2^-17 among subnormals.
        a = x.abs().to(torch.float32)
        return (a - self.FMAX).clamp(min=0) + torch.maximum(a * 2.0**-3, torch.full_like(a, 2.0**-17))


def _parse_toy(token: str, spec: str) -> CodecSpec | None:
    return CodecSpec(kind="toy", bits=8, block=1) if token == "toy8" else None


TOY = Family(
    kind="toy",
    title="toy",
    names="toy8",
    parse=_parse_toy,
    canonical=lambda cs: "toy8",
    factory=ToyCodec,
    options=frozenset(),
    examples=(Example("toy8", 0.064, 8.0),),
)


@pytest.fixture(autouse=True)
def toy_family() -> Iterator[Family]:
    """The toy family is registered during every test of this module, and only then."""
    with registered_family(TOY) as family:
        yield family


def test_a_family_registered_in_one_place_is_parsed_canonicalised_and_built() -> None:
    cs = parse_spec("TOY8")
    assert cs == CodecSpec(kind="toy", bits=8, block=1) and canonical(cs) == "toy8"
    codec = make_codec("toy8")
    assert isinstance(codec, ToyCodec) and codec.cs == cs and codec.spec == "toy8"
    assert codec.chunk_alignment == 256  # the default of a codec that does not say
    assert "toy8" in describe_grammar()
    with pytest.raises(CodecError, match="unknown codec 'toy9'; expected none, .*toy8"):
        parse_spec("toy9")
    with pytest.raises(CodecError, match="option 'b4' applies to fp8, integer, minifloat codecs only"):
        parse_spec("toy8:b4")
    with pytest.raises(ValueError, match="'toy' is taken"):
        register_family(TOY)
    unregister_family("toy")
    try:
        with pytest.raises(CodecError, match="unknown codec 'toy8'"):
            parse_spec("toy8")
        assert "toy8" not in describe_grammar()
    finally:
        register_family(TOY)  # the fixture unregisters it


# --- the list itself ----------------------------------------------------------------------------------------------

#: spec -> its example: what the families and modifiers registered, and the toy family of this module.
EXAMPLES: dict[str, Example] = {ex.spec: ex for ex in (*examples(), *TOY.examples)}
SPECS = list(EXAMPLES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAMILY_MODULES = ["intx", "fp8", "microscaling", "hadamard", "outliers", "chscale"]


def codec_for(spec: str) -> Codec:
    return make_codec(spec, outlier_channels=EXAMPLES[spec].outlier_channels)


def roundtrip(codec: Codec, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    assert payload.numel() == codec.payload_nbytes(x.shape)
    assert payload.device == x.device
    return codec.decode(payload, x.shape, dtype)


@pytest.mark.parametrize("module", FAMILY_MODULES)
def test_every_family_module_is_present(module: str) -> None:
    importlib.import_module(f"megatron_tpcomp.codecs.{module}")  # ImportError = failure, never a skip


def test_every_registered_family_has_examples() -> None:
    kinds = {parse_spec(s).kind for s in SPECS}
    assert {f.kind for f in families()} <= kinds
    assert {"fp8", "int", "minifloat", "toy"} <= kinds


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


def test_codecs_carry_their_spec_and_chunk_alignment() -> None:
    for spec in SPECS:
        codec = codec_for(spec)
        cs = parse_spec(spec)
        assert codec.cs is not None and canonical(codec.cs) == codec.spec
        assert codec.cs == cs
        expected = 256 if cs.kind == "toy" else math.lcm(cs.block, max(cs.hadamard_block, 1))
        assert codec.chunk_alignment == expected, spec


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
    assert rel < EXAMPLES[spec].rel_error, f"{spec}: relative error {rel:.4f} >= {EXAMPLES[spec].rel_error}"
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
        chosen = list(EXAMPLES[spec].outlier_channels or [pos[-1]])
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
        assert torch.equal(codec.max_abs_error_bound(x), codec.max_abs_error_bound(x.contiguous()))


@pytest.mark.parametrize("spec", SPECS)
def test_input_dtype_only_matters_through_its_values(spec: str, gen: torch.Generator) -> None:
    # bf16 and fp16 inputs widen to fp32 exactly, so they encode exactly like their fp32 values.
    codec = codec_for(spec)
    x32 = torch.randn(5, 77, generator=gen) * 3
    for dtype in (torch.bfloat16, torch.float16):
        x = x32.to(dtype)
        assert torch.equal(codec.encode(x), codec.encode(x.float()))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0, 64), (64, 0)])
def test_empty_tensors(spec: str, shape: tuple[int, ...]) -> None:
    codec = codec_for(spec)
    for dtype in DTYPES:
        x = torch.empty(shape, dtype=dtype)
        payload = codec.encode(x)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == codec.payload_nbytes(shape)
        for out_dtype in DTYPES:
            y = codec.decode(payload, shape, out_dtype)
            assert y.shape == torch.Size(shape) and y.dtype == out_dtype
        assert codec.max_abs_error_bound(x).shape == torch.Size(shape)
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
    expected = EXAMPLES[spec].bits
    nominal = codec.nominal_bits_per_value()
    assert nominal < 16
    assert abs(nominal - expected) < 1e-6, f"{spec}: nominal {nominal} bits, expected {expected}"
    # A large aligned message pays the same up to per-message constants (< 64 bytes over 4M values), and +rows
    # its K bf16 rows per message (K * 16 bits per row of the message).
    per_message = parse_spec(spec).rows_k * 16 / 4096
    assert abs(codec.bits_per_value((4096, 1024)) - nominal - per_message) < 1e-3
    # bits_per_value is exactly the payload size.
    assert codec.bits_per_value((4096, 1024)) == 8 * codec.payload_nbytes((4096, 1024)) / (4096 * 1024)


@pytest.mark.parametrize("spec", SPECS)
def test_canonical_spec_rebuilds_an_equivalent_codec(spec: str, gen: torch.Generator) -> None:
    codec = codec_for(spec)
    again = make_codec(codec.spec, outlier_channels=EXAMPLES[spec].outlier_channels)
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
