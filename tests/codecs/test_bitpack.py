"""Bit packing: round trips for every width and the documented bit order."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.codecs.bitpack import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_round_trip(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.numel() == packed_nbytes(count, bits)
    assert torch.equal(unpack(packed, count, bits), codes)


def test_int4_low_nibble_holds_the_even_index() -> None:
    assert pack(torch.tensor([0x1, 0xA, 0x3], dtype=torch.uint8), 4).tolist() == [0xA1, 0x03]


def test_three_bit_order_by_hand() -> None:
    # codes 5 (101), 3 (011), 7 (111): stream LSB first = 1,0,1, 1,1,0, 1,1,1 -> byte0 bits0..7 = 1,0,1,1,1,0,1,1
    # = 0b11011101 = 0xDD; byte1 bit0 = 1 -> 0x01.
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0xDD, 0x01]


def test_bad_width_and_short_buffer() -> None:
    with pytest.raises(CodecError, match="bit width 9"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(CodecError, match="need 3"):
        unpack(torch.zeros(2, dtype=torch.uint8), 8, 3)
