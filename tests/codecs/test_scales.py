"""Scale formats: rounding rules and NaN marking."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.codecs.scales import decode_scales, encode_scales, quantize_scales, safe_reciprocal


def test_e8m0_rounds_up_to_a_power_of_two() -> None:
    s = torch.tensor([1.0, 1.5, 0.75, 2.0**-20, 3.0, 0.0, 3 * 2.0**126])
    _, dec = quantize_scales(s, "e8m0")
    assert dec.tolist() == [1.0, 2.0, 1.0, 2.0**-20, 4.0, 2.0**-127, 2.0**127]
    assert bool((dec[:-2] >= s[:-2]).all())  # never rounds down (except at the 2^127 clamp): no element clips


def test_fp16_rounds_to_nearest_and_clamps() -> None:
    s = torch.tensor([1.0 + 2**-11, 1.0 + 3 * 2**-11, 1e6])
    _, dec = quantize_scales(s, "fp16")
    assert dec.tolist() == [1.0, 1.0 + 2 * 2**-10, 65504.0]  # ties to even, then clamp


def test_e4m3_clamps_at_448() -> None:
    _, dec = quantize_scales(torch.tensor([500.0, 0.3]), "e4m3")
    assert dec[0] == 448.0 and abs(float(dec[1]) - 0.3) <= 0.3 * 2**-4


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16", "e8m0", "e4m3"])
def test_bad_blocks_are_marked_nan(fmt: str) -> None:
    stored = encode_scales(torch.tensor([1.0, 2.0]), fmt, bad=torch.tensor([False, True]))
    dec = decode_scales(stored, fmt)
    assert torch.isfinite(dec[0]) and torch.isnan(dec[1])


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(CodecError, match="unknown scale format 'fp12'"):
        encode_scales(torch.ones(2), "fp12")


def test_safe_reciprocal_of_zero_is_zero() -> None:
    assert safe_reciprocal(torch.tensor([0.0, 4.0])).tolist() == [0.0, 0.25]
