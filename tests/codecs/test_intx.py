"""Integer codecs: exact wire bytes on hand-worked examples, on-grid round trips, exact sizes, and the stated
error bound for every width, mode, group size and scale format."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.codecs.intx import IntCodec
from megatron_tpcomp.spec import parse_spec

SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}

# --- exact bytes, worked by hand ---------------------------------------------------------------------------------


def test_hand_computed_int4_payload() -> None:
    # int4:g4, one group [1, -2, 3.5, 7]. Super-block exponent: the smallest k with 7 <= 7 * 65504 * 2^k; 7 =
    # 0.875 * 2^3, 458528 = 0.8746 * 2^19, so k = 3 - 19 + 1 = -15 and y = x * 2^15. amax_y = 229376, scale =
    # fp16(229376 / 7) = 32768 (0x7800, the top binade); q = rint(y / 32768) = rint(x) = 1, -2, 4, 7 (3.5 ties
    # to even: 4); codes = q + 8 = 9, 6, 12, 15 -> byte0 = 9 | 6<<4 = 0x69, byte1 = 12 | 15<<4 = 0xFC.
    # Layout: codes at 0 (2 bytes), scales at 16 (2 bytes), exps at 18 (int16 -15 = 0xFFF1), total 32.
    codec = make_codec("int4:g4")
    payload = codec.encode(torch.tensor([1.0, -2.0, 3.5, 7.0]))
    expected = torch.zeros(32, dtype=torch.uint8)
    expected[0], expected[1] = 0x69, 0xFC
    expected[16], expected[17] = 0x00, 0x78  # fp16 32768, little-endian
    expected[18], expected[19] = 0xF1, 0xFF  # int16 -15
    assert torch.equal(payload, expected)
    assert torch.equal(codec.decode(payload, (4,), torch.float32), torch.tensor([1.0, -2.0, 4.0, 7.0]))


def test_hand_computed_int3_payload() -> None:
    # int3:g8, [0, 1, 2, 3, -1, -2, -3, 0.5]: qmax 3, amax 3 = 0.75 * 2^2 against 3 * 65504 = 0.7496 * 2^18:
    # k = -15, scale fp16(3 * 2^15 / 3) = 32768; q = 0,1,2,3,-1,-2,-3,0 (0.5 ties to even: 0);
    # codes = q + 4 = 4,5,6,7,3,2,1,4. Bit stream, each code LSB first:
    #   4:001 5:101 6:011 7:111 3:110 2:010 1:100 4:001
    #   stream bits 0..7   = 0,0,1,1,0,1,0,1 -> 0b10101100 = 0xAC
    #   stream bits 8..15  = 1,1,1,1,1,1,0,0 -> 0b00111111 = 0x3F
    #   stream bits 16..23 = 1,0,1,0,0,0,0,1 -> 0b10000101 = 0x85
    codec = make_codec("int3:g8")
    payload = codec.encode(torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, -2.0, -3.0, 0.5]))
    expected = torch.zeros(32, dtype=torch.uint8)
    expected[0], expected[1], expected[2] = 0xAC, 0x3F, 0x85
    expected[16], expected[17] = 0x00, 0x78  # fp16 32768
    expected[18], expected[19] = 0xF1, 0xFF  # k = -15
    assert torch.equal(payload, expected)


def test_hand_computed_asymmetric_payload() -> None:
    # int2:g4:asym, [0, 1, 2, 3]: the minimum is stored in fp16 too, so the limit is 65504 = 0.9995 * 2^16;
    # amax 3 = 0.75 * 2^2 -> k = -14, y = x * 2^14: min 0, scale (49152 - 0)/3 = 16384 (0x7400) -> codes 0,1,2,3
    # packed LSB first: 0b11100100 = 0xE4. Sections: codes (1 byte) at 0, scales at 16, mins at 32 (fp16 0.0),
    # exps at 34 (int16 -14 = 0xFFF2), total 48.
    codec = make_codec("int2:g4:asym")
    payload = codec.encode(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    expected = torch.zeros(48, dtype=torch.uint8)
    expected[0] = 0xE4
    expected[17] = 0x74  # fp16 16384 at offset 16; the fp16 0.0 minimum at offset 32 is all zero bytes
    expected[34], expected[35] = 0xF2, 0xFF
    assert torch.equal(payload, expected)
    assert torch.equal(codec.decode(payload, (4,), torch.float32), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_symmetric_codes_never_use_the_most_negative_code(gen: torch.Generator) -> None:
    # q in [-7, 7] -> codes 1..15; code 0 would decode to -8*s and break symmetry.
    codec = make_codec("int4:g32")
    codes = codec.encode(torch.randn(64, 32, generator=gen))[: 64 * 16]
    assert not bool(((codes & 0xF) == 0).any()) and not bool(((codes >> 4) == 0).any())
    assert bool(((codes & 0xF) == 1).any())  # but -qmax is used (each group's amax, when negative)


# --- exact round trip of values on the grid -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("scale", ["fp16", "bf16", "fp32"])
def test_values_on_the_grid_round_trip_exactly(bits: int, asym: bool, scale: str) -> None:
    qmax = 2 ** (bits - 1) - 1
    group = 16
    gen = torch.Generator().manual_seed(bits)
    step = 2.0**-3  # power of two: exact in every scale format, so the stored scale equals the ideal one
    if asym:
        levels = 2**bits - 1
        q = torch.randint(0, levels + 1, (8, group), generator=gen).float()
        q[:, 0], q[:, 1] = 0, levels  # min and max present: scale = (max-min)/levels = step exactly
        x = q * step - 1.0  # minimum -1.0, exact in fp16/bf16
    else:
        q = torch.randint(-qmax, qmax + 1, (8, group), generator=gen).float()
        q[:, 0] = qmax  # amax present: scale = amax/qmax = step exactly
        x = q * step
    codec = make_codec(f"int{bits}:g{group}:s{scale}" + (":asym" if asym else ""))
    assert torch.equal(codec.decode(codec.encode(x), x.shape, torch.float32), x)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([8, 16, 32, 64]),
    groups=st.integers(1, 6),
    exponent=st.integers(-12, 12),
    seed=st.integers(0, 2**16),
)
def test_property_grid_values_round_trip_exactly(bits: int, group: int, groups: int, exponent: int, seed: int) -> None:
    # Values q * 2^e with |q| <= qmax and the group's amax = qmax * 2^e: the fp16 scale 2^e is exact, so every
    # value is on the grid and must come back bit for bit.
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (groups, group), generator=torch.Generator().manual_seed(seed)).float()
    q[:, 0] = qmax
    x = q * 2.0**exponent
    codec = make_codec(f"int{bits}:g{group}")
    assert torch.equal(codec.decode(codec.encode(x), x.shape, torch.float32), x)


# --- sizes --------------------------------------------------------------------------------------------------------


#: One int16 super-block exponent per 4096 values.
EXP_BITS = 16 / 4096


@pytest.mark.parametrize(
    ("spec", "bits"),
    [
        ("int4:g32", 4.5),
        ("int8:g32", 8.5),
        ("int4:g32:asym", 5.0),
        ("int8:g32:asym", 9.0),
        ("int4:g128", 4.125),
        ("int2:g16", 3.0),
        ("int3:g64:asym", 3.5),
        ("int8:g32:sfp32", 9.0),
        ("int5:g32:se8m0", 5.25),
    ],
)
def test_exact_bits_per_value(spec: str, bits: float) -> None:
    codec = make_codec(spec)
    assert codec.bits_per_value((4096, 576)) == bits + EXP_BITS
    assert codec.nominal_bits_per_value() == bits + EXP_BITS


@pytest.mark.parametrize(
    ("bits", "group", "scale", "asym"),
    [
        (bits, group, scale, asym)
        for bits in range(2, 9)
        for group in (8, 32, 256)
        for scale in ("fp32", "fp16", "e8m0")
        for asym in (False, True)
        if not (asym and scale == "e8m0")  # asym needs an fp offset (the grammar rejects it; see test_spec)
    ],
)
def test_bits_per_value_formula(bits: int, group: int, scale: str, asym: bool) -> None:
    # b bits per value plus one scale per group, plus one offset per group when asymmetric, plus one exponent
    # per super-block.
    codec = make_codec(f"int{bits}:g{group}:s{scale}" + (":asym" if asym else ""))
    expected = bits + SCALE_BITS[scale] * (2 if asym else 1) / group + EXP_BITS
    assert codec.bits_per_value((512, 1024)) == expected  # 2^19 values: whole groups, 16-byte aligned sections


def test_small_messages_pay_a_whole_group_and_alignment() -> None:
    # 1 value of int4:g32: 16 code bytes, fp16 scale at offset 16, the int16 exponent at 18, end aligned to 32.
    assert make_codec("int4:g32").payload_nbytes((1,)) == 32
    # 576 values (one decode token of SmolLM2): 288 code bytes, 18 scales at 288 -> 324, exponent -> 326 -> 336
    # bytes: the exponent costs nothing here, since it is not 16-byte aligned.
    assert make_codec("int4:g32").payload_nbytes((1, 576)) == 336
    # asym adds a third section: 288 codes, 18 scales at 288 (-> 324), 18 mins at 336 (-> 372), exp -> 374 -> 384.
    assert make_codec("int4:g32:asym").payload_nbytes((1, 576)) == 384
    assert make_codec("int4:g32").payload_nbytes((0, 576)) == 0
    layout = make_codec("int4:g32").layout((3, 4096))  # 3 super-blocks
    assert layout.sections["exps"].count == 3 and layout.sections["exps"].offset == 6144 + 768


# --- error bound --------------------------------------------------------------------------------------------------

BOUND_CASES = [
    (bits, asym, group, scale)
    for bits in range(2, 9)
    for asym in (False, True)
    for group, scale in ((32, "fp16"), (8, "bf16"), (128, "fp32"), (64, "e8m0"), (16, "e4m3"))
    if not (asym and scale in ("e8m0", "e4m3"))
]


@pytest.mark.parametrize(("bits", "asym", "group", "scale"), BOUND_CASES)
def test_error_within_stated_bound(
    bits: int, asym: bool, group: int, scale: str, gen: torch.Generator, activations: torch.Tensor
) -> None:
    codec = make_codec(f"int{bits}:g{group}:s{scale}" + (":asym" if asym else ""))
    # Heavy-tailed rows (clipping and scale saturation matter) and shifted normal rows (asym offsets matter).
    x = torch.cat([activations[:32].float(), torch.randn(32, 576, generator=gen) + 3])
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    err = (y - x).abs()
    bound = codec.max_abs_error_bound(x)
    assert bound.shape == x.shape and torch.isfinite(bound).all()
    assert bool((err <= bound).all()), f"worst excess {float((err - bound).max()):.3g}"
    # The bound is not vacuous: somewhere the error comes within a factor 2 of it (rounding errors spread
    # uniformly over [0, s/2], so over thousands of values the largest gets close to s/2).
    assert float((err / bound).max()) > 0.5


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(2, 8),
    asym=st.booleans(),
    group=st.sampled_from([8, 16, 32, 64, 128]),
    scale=st.sampled_from(["fp16", "bf16", "fp32", "e8m0", "e4m3"]),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 90)),
    exponent=st.integers(-20, 20),
    shift=st.sampled_from([0.0, 1.0, -100.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_property_error_within_stated_bound(
    bits: int,
    asym: bool,
    group: int,
    scale: str,
    shape: tuple[int, int],
    exponent: int,
    shift: float,
    dtype: torch.dtype,
    seed: int,
) -> None:
    assume(not (asym and scale in ("e8m0", "e4m3")))
    codec = make_codec(f"int{bits}:g{group}:s{scale}" + (":asym" if asym else ""))
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent + shift).to(dtype)
    assume(bool(torch.isfinite(x).all()))  # 2^20 overflows fp16 input; non-finite input has its own tests
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.isfinite(y).all()
    assert bool(((y - x.float()).abs() <= codec.max_abs_error_bound(x)).all())


def test_values_beyond_the_fp16_scale_range_do_not_saturate() -> None:
    # Before the super-block exponent, every value clipped at 7 * 65504 = 458528.
    codec = make_codec("int4:g32")
    x = torch.full((32,), 1e6)
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, x, rtol=2.0**-10)  # only the fp16 rounding of the scale (2^-11) remains
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


@pytest.mark.parametrize("scale", ["fp16", "bf16"])
def test_asymmetric_minimum_below_the_scale_range_stays_finite(scale: str) -> None:
    # Regression: the group minimum -1e6 used to be stored as fp16 -inf, decoding the whole group to -inf.
    codec = make_codec(f"int4:g4:asym:s{scale}")
    x = torch.tensor([-1e6, -5e5, 0.0, 1.0]) if scale == "fp16" else torch.tensor([-3.4e38, 0.0, 1.0, 2.0])
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.isfinite(y).all()
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


@pytest.mark.parametrize("spec", ["int4:g4:asym:sfp32", "int2:g4:asym:sbf16", "int8:g4:asym:sfp32"])
def test_asymmetric_range_beyond_fp32_stays_finite(spec: str) -> None:
    # Regression: max - min = 6.8e38 overflowed fp32, the scale became inf and the group decoded to NaN/inf.
    # Finite input must decode finite (the range clips, which the bound accounts for).
    codec = make_codec(spec)
    x = torch.tensor([-3.4e38, 0.0, 1.0, 3.4e38])
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.isfinite(y).all()
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


def test_constant_group_is_exact_in_asym_mode() -> None:
    # max == min: scale 0, every code 0, value = the stored minimum (exact in fp16 for 2.5).
    codec = make_codec("int4:g8:asym")
    x = torch.full((2, 8), 2.5)
    assert torch.equal(codec.decode(codec.encode(x), x.shape, torch.float32), x)


def test_codec_rejects_specs_that_are_not_plain_integers() -> None:
    with pytest.raises(ValueError, match="plain integer spec"):
        IntCodec(parse_spec("int4:g32+had"))
    with pytest.raises(ValueError, match="plain integer spec"):
        IntCodec(parse_spec("fp8"))
