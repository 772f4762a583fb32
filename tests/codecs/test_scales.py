"""Scale formats: storage dtypes, rounding rules (RNE, clamps, e8m0 rounding up), and NaN marking."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.codecs.scales import (
    choose_exponents,
    decode_scales,
    encode_scales,
    pow2_mul,
    quantize_scales,
    safe_reciprocal,
    storage_dtype,
)

FORMATS = ["fp32", "fp16", "bf16", "e8m0", "e4m3"]


def test_storage_dtypes() -> None:
    expected = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.uint8]
    assert [storage_dtype(f) for f in FORMATS] == expected
    with pytest.raises(CodecError, match="unknown scale format 'fp12'; expected one of fp32, fp16"):
        storage_dtype("fp12")


def test_fp32_is_exact() -> None:
    s = torch.tensor([0.0, 2.0**-126, 3.3e-7, 1.0, 7e37])
    stored, dec = quantize_scales(s, "fp32")
    assert stored.dtype == torch.float32 and torch.equal(dec, s)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_tiny_scales_rise_to_the_smallest_normal(fmt: str) -> None:
    # 1 / 1e-40 overflows fp32 to inf, and a quantizer's 0 * inf is NaN: positive scales below 2^-126 become
    # 2^-126 (reciprocal 2^126, finite); zero stays zero (all-zero blocks).
    s = torch.tensor([1e-40, 1e-45, 0.0, 2.0**-125])
    _, dec = quantize_scales(s, fmt)
    assert dec.tolist() == [2.0**-126, 2.0**-126, 0.0, 2.0**-125]
    assert torch.isfinite(safe_reciprocal(dec)).all()


def test_fp16_rounds_to_nearest_even_and_clamps() -> None:
    ulp = 2.0**-10  # fp16 spacing in [1, 2)
    s = torch.tensor([1.0 + ulp / 2, 1.0 + 3 * ulp / 2, 1.0 + 0.6 * ulp, 65504.0, 65520.0, 1e6, 2.0**-25 * 3])
    _, dec = quantize_scales(s, "fp16")
    # Ties go to the even mantissa (1.0, then 1 + 2 ulp); past 65504 the value clamps instead of becoming inf
    # (65520 would round to inf in a plain cast); 1.5 * 2^-24 is a subnormal tie between 2^-24 and 2^-23 -> even
    # mantissa 2^-23.
    assert dec.tolist() == [1.0, 1.0 + 2 * ulp, 1.0 + ulp, 65504.0, 65504.0, 65504.0, 2.0**-23]


def test_fp16_and_bf16_clamp_negative_offsets_too() -> None:
    # Asymmetric integer codecs store their (negative) group minimum in the scale format: it must saturate,
    # never become -inf (which would decode every value of the group to -inf).
    _, dec16 = quantize_scales(torch.tensor([-1e6, -65504.0]), "fp16")
    assert dec16.tolist() == [-65504.0, -65504.0]
    _, dec_bf = quantize_scales(torch.tensor([-3.4e38, 3.4e38]), "bf16")
    assert torch.isfinite(dec_bf).all() and dec_bf[1] == torch.finfo(torch.bfloat16).max


def test_bf16_rounds_to_nearest_even() -> None:
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    _, dec = quantize_scales(torch.tensor([1.0 + ulp / 2, 1.0 + 3 * ulp / 2, 1.0 + 0.4 * ulp]), "bf16")
    assert dec.tolist() == [1.0, 1.0 + 2 * ulp, 1.0]


def test_e8m0_rounds_up_to_a_power_of_two() -> None:
    s = torch.tensor([1.0, 1.5, 0.75, 2.0**-20, 3.0, 1.0000001, 0.0, 2.0**-130, 3 * 2.0**126])
    stored, dec = quantize_scales(s, "e8m0")
    # Exact powers of two stay put (1.0, 2^-20); everything else goes UP to the next power (1.0000001 -> 2);
    # 0 and fp32 subnormals below 2^-127 go to the smallest code 2^-127; the exponent clamps at 2^127.
    assert dec.tolist() == [1.0, 2.0, 1.0, 2.0**-20, 4.0, 2.0, 2.0**-127, 2.0**-127, 2.0**127]
    # byte = exponent + 127.
    assert stored.tolist() == [127, 128, 127, 107, 129, 128, 0, 0, 254]


def test_e8m0_never_rounds_down_and_loses_at_most_a_factor_of_two(gen: torch.Generator) -> None:
    s = torch.exp2(torch.rand(10_000, generator=gen) * 200 - 100)  # 2^-100 .. 2^100, all mantissas
    _, dec = quantize_scales(s, "e8m0")
    assert bool((dec >= s).all()), "a scale rounded down would clip the block's largest element"
    assert bool((dec < 2 * s).all())
    mant, _ = torch.frexp(dec)
    assert bool((mant == 0.5).all()), "every decoded e8m0 scale is a power of two"


def test_e4m3_rounds_to_nearest_even_and_clamps() -> None:
    ulp = 2.0**-3  # e4m3 spacing in [1, 2)
    s = torch.tensor([1.0 + ulp / 2, 1.0 + 3 * ulp / 2, 0.3, 448.0, 500.0, 2.0**-9, 2.0**-11, -500.0])
    stored, dec = quantize_scales(s, "e4m3")
    # 0.3 lies in [0.25, 0.5) where the spacing is 2^-5: nearest is 0.3125. 2^-9 is the smallest subnormal;
    # 2^-11 is below half of it and rounds to 0. Out of range clamps to +-448 (the plain cast gives NaN).
    assert dec.tolist() == [1.0, 1.0 + 2 * ulp, 0.3125, 448.0, 448.0, 2.0**-9, 0.0, -448.0]
    assert stored[0] == 0x38  # 1.0 = sign 0, exponent 7 (bias 7), mantissa 0 -> 0b0_0111_000


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_blocks_are_marked_nan(fmt: str) -> None:
    stored = encode_scales(torch.tensor([1.0, 2.0, 0.0]), fmt, bad=torch.tensor([False, True, True]))
    dec = decode_scales(stored, fmt)
    assert dec[0] == 1.0 and torch.isnan(dec[1:]).all()
    if fmt == "e8m0":
        assert stored[1:].tolist() == [0xFF, 0xFF]  # the OCP MX NaN encoding
    if fmt == "e4m3":
        assert stored[1:].tolist() == [0x7F, 0x7F]  # e4m3fn's NaN (S.1111.111)


@pytest.mark.parametrize("fmt", FORMATS)
def test_finite_scales_never_decode_to_nan_or_inf(fmt: str, gen: torch.Generator) -> None:
    s = torch.cat([torch.zeros(1), torch.exp2(torch.rand(1000, generator=gen) * 250 - 125), torch.tensor([3.4e38])])
    stored, dec = quantize_scales(s, fmt)
    assert stored.dtype == storage_dtype(fmt)
    assert torch.isfinite(dec).all()
    assert torch.equal(decode_scales(stored, fmt), dec)


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(CodecError, match="unknown scale format 'fp12'"):
        encode_scales(torch.ones(2), "fp12")
    with pytest.raises(CodecError, match="unknown scale format 'e5m2'"):
        decode_scales(torch.ones(2, dtype=torch.uint8), "e5m2")


def test_safe_reciprocal_of_zero_is_zero() -> None:
    assert safe_reciprocal(torch.tensor([0.0, 4.0, 0.5])).tolist() == [0.0, 0.25, 2.0]


# --- second level: super-block exponents --------------------------------------------------------------------------


def test_pow2_mul_rounds_once_over_the_whole_exponent_range() -> None:
    # Against float64, where v * 2^e is exact: the result must be that value rounded once to fp32, for every
    # exponent the codecs use (two-step factors beyond +-126 included) and values from subnormal to near max.
    g = torch.Generator().manual_seed(0)
    v = torch.cat(
        [
            torch.randn(2000, generator=g) * 2.0 ** torch.randint(-149, 128, (2000,), generator=g).float(),
            torch.tensor([2.0**-149, 3 * 2.0**-149, 1.0, -1.5, torch.finfo(torch.float32).max]),
        ]
    )
    v = v[torch.isfinite(v)]
    for e in [-252, -200, -160, -149, -127, -126, -100, -1, 0, 1, 100, 127, 128, 200, 254]:
        got = pow2_mul(v, torch.tensor(e))
        want = (v.double() * 2.0**e).float()  # one rounding (overflow to Inf as fp32 would)
        assert torch.equal(got, want), f"e = {e}"
    assert torch.equal(pow2_mul(torch.tensor([1.0]), torch.tensor(1000)), torch.tensor([float("inf")]))  # clamped e


def test_choose_exponents_narrow_rule_is_the_smallest_k_that_fits() -> None:
    limit = 7 * 65504.0
    amax = torch.tensor([0.0, 7.0, limit, limit * 1.0001, 2.0**-149, 3.4e38, 1e-30, 1.0])
    k = choose_exponents(amax, limit)
    assert k[0] == 0  # an all-zero super-block
    for a, kk in zip(amax.tolist()[1:], k.tolist()[1:], strict=True):
        assert a <= limit * 2.0**kk and a > limit * 2.0 ** (kk - 1), (a, kk)  # exact in float64


def test_choose_exponents_wide_rule_keeps_real_activations_unscaled() -> None:
    amax = torch.tensor([0.0, 2.0**-64, 1.0, 6e4, 2.0**64 * 0.999, 2.0**64, 3.4e38, 2.0**-65, 2.0**-149])
    assert choose_exponents(amax, None).tolist() == [0, 0, 0, 0, 0, 64, 127, -65, -149]
