"""Bit packing: round trips for every width and count, and the documented bit order against an independent
bit-by-bit reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.codecs.bitpack import pack, packed_nbytes, unpack


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented order, one bit at a time: code i fills stream bits [i*b, (i+1)*b), LSB first; stream bit j
    is bit j % 8 of byte j // 8."""
    out = [0] * packed_nbytes(len(codes), bits)
    for i, code in enumerate(codes):
        for k in range(bits):
            j = i * bits + k
            out[j // 8] |= ((code >> k) & 1) << (j % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 8, 9, 15, 17, 1001])
def test_round_trip_and_reference_order(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack(packed, count, bits), codes)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=70))))
def test_property_matches_reference(case: tuple[int, list[int]]) -> None:
    bits, values = case
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.tolist() == reference_pack(values, bits)
    assert unpack(packed, len(values), bits).tolist() == values


def test_int4_low_nibble_holds_the_even_index() -> None:
    # byte[k] = code[2k] | code[2k+1] << 4; an odd count leaves the last high nibble zero.
    assert pack(torch.tensor([0x1, 0xA, 0x3], dtype=torch.uint8), 4).tolist() == [0xA1, 0x03]


def test_two_bit_order_by_hand() -> None:
    # codes 1, 2, 3, 0, 3: byte0 = 1 | 2<<2 | 3<<4 | 0<<6 = 0b00111001 = 0x39; byte1 = 3.
    assert pack(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0x39, 0x03]


def test_three_bit_order_by_hand() -> None:
    # codes 5 (101), 3 (011), 7 (111): stream LSB first = 1,0,1, 1,1,0, 1,1,1 -> byte0 bits0..7 = 1,0,1,1,1,0,1,1
    # = 0b11011101 = 0xDD; byte1 bit0 = 1 -> 0x01.
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0xDD, 0x01]


def test_eight_codes_of_b_bits_fill_exactly_b_bytes() -> None:
    # All-ones codes: every stream bit is 1, so b full bytes and no spill into a (b+1)-th.
    for bits in range(1, 9):
        codes = torch.full((8,), 2**bits - 1, dtype=torch.uint8)
        assert pack(codes, bits).tolist() == [0xFF] * bits


def test_unpack_reads_only_the_bytes_it_needs() -> None:
    codes = torch.tensor([7, 0, 5], dtype=torch.uint8)
    packed = torch.cat([pack(codes, 3), torch.full((5,), 0xFF, dtype=torch.uint8)])  # trailing garbage
    assert unpack(packed, 3, 3).tolist() == [7, 0, 5]


def test_non_contiguous_codes() -> None:
    codes = torch.arange(32, dtype=torch.uint8).view(4, 8).t() % 8  # strided
    assert torch.equal(pack(codes, 3), pack(codes.contiguous(), 3))


def test_bad_width_and_short_buffer() -> None:
    with pytest.raises(CodecError, match="bit width 9 out of range; expected 1..8"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(CodecError, match="bit width 0"):
        unpack(torch.zeros(4, dtype=torch.uint8), 4, 0)
    with pytest.raises(CodecError, match="has 2 bytes; 8 codes of 3 bits need 3"):
        unpack(torch.zeros(2, dtype=torch.uint8), 8, 3)
