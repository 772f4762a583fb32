"""Integer codecs: exact wire bytes on a hand-worked example, on-grid round trips, sizes, every width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import make_codec


def test_hand_computed_int4_payload() -> None:
    # int4:g4, one group [1, -2, 3.5, 7]: amax 7, scale = fp16(7/7) = 1.0 (0x3C00); q = rint(x) = 1, -2, 4, 7
    # (3.5 ties to even: 4); codes = q + 8 = 9, 6, 12, 15 -> bytes 0x69, 0xFC.
    # Layout: codes at 0 (2 bytes), scales at 16 (2 bytes), total aligned to 32.
    codec = make_codec("int4:g4")
    payload = codec.encode(torch.tensor([1.0, -2.0, 3.5, 7.0]))
    expected = torch.zeros(32, dtype=torch.uint8)
    expected[0], expected[1] = 0x69, 0xFC
    expected[16], expected[17] = 0x00, 0x3C  # fp16 1.0, little-endian
    assert torch.equal(payload, expected)
    assert torch.equal(codec.decode(payload, (4,), torch.float32), torch.tensor([1.0, -2.0, 4.0, 7.0]))


def test_hand_computed_asymmetric_payload() -> None:
    # int2:g4:asym, [0, 1, 2, 3]: min 0, scale (3-0)/3 = 1 -> codes 0,1,2,3 packed LSB first: 0b11100100 = 0xE4.
    codec = make_codec("int2:g4:asym")
    payload = codec.encode(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert int(payload[0]) == 0xE4
    assert torch.equal(codec.decode(payload, (4,), torch.float32), torch.tensor([0.0, 1.0, 2.0, 3.0]))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("asym", [False, True])
def test_values_on_the_grid_round_trip_exactly(bits: int, asym: bool) -> None:
    qmax = 2 ** (bits - 1) - 1
    group = 16
    gen = torch.Generator().manual_seed(bits)
    scale = 2.0**-3  # power of two: exact in fp16, and amax = qmax * scale makes the stored scale exact
    if asym:
        levels = 2**bits - 1
        q = torch.randint(0, levels + 1, (8, group), generator=gen).float()
        q[:, 0], q[:, 1] = 0, levels  # min and max present: scale = (max-min)/levels exactly
        x = q * scale - 1.0
    else:
        q = torch.randint(-qmax, qmax + 1, (8, group), generator=gen).float()
        q[:, 0] = qmax  # amax present
        x = q * scale
    spec = f"int{bits}:g{group}" + (":asym" if asym else "")
    codec = make_codec(spec)
    assert torch.equal(codec.decode(codec.encode(x), x.shape, torch.float32), x)


@pytest.mark.parametrize(
    ("spec", "bits"),
    [
        ("int4:g32", 4.5),
        ("int8:g32", 8.5),
        ("int4:g32:asym", 5.0),
        ("int4:g128", 4.125),
        ("int2:g16", 3.0),
        ("int8:g32:sfp32", 9.0),
        ("int5:g32:se8m0", 5.25),
    ],
)
def test_exact_bits_per_value(spec: str, bits: float) -> None:
    codec = make_codec(spec)
    assert codec.bits_per_value((4096, 576)) == bits
    assert codec.nominal_bits_per_value() == bits


def test_small_messages_pay_a_whole_group_and_alignment() -> None:
    # 1 value of int4:g32: 16 code bytes, fp16 scale at offset 16, end aligned to 32 bytes.
    assert make_codec("int4:g32").payload_nbytes((1,)) == 32
    # 576 values (one decode token of SmolLM2): 288 code bytes, 18 scales at 288 -> 324 -> 336 bytes.
    assert make_codec("int4:g32").payload_nbytes((1, 576)) == 336


def test_scale_saturates_instead_of_overflowing() -> None:
    codec = make_codec("int4:g32")
    x = torch.full((32,), 1e6)
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, torch.full_like(y, 65504.0 * 7))  # documented: fp16 scale clamps at 65504


def test_symmetric_codes_never_use_the_most_negative_code() -> None:
    # q in [-7, 7] -> codes 1..15; code 0 would decode to -8*s and break symmetry.
    codec = make_codec("int4:g32")
    x = torch.randn(64, 32)
    codes = codec.encode(x)[: 64 * 16]
    assert not bool(((codes & 0xF) == 0).any()) and not bool(((codes >> 4) == 0).any())


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
