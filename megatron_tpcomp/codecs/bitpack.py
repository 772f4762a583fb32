"""Packing of unsigned b-bit codes (1..8 bits) into bytes: the one bit order every low-bit codec uses.

Wire bit order (little-endian bit stream): code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, its least
significant bit first; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. For 4 bits this is the common
``byte[k] = code[2k] | code[2k+1] << 4``; for 8 bits the bytes are the codes.
"""

from __future__ import annotations

import torch

from megatron_tpcomp.codecs.base import CodecError


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits (the last byte partly used if not exact)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise CodecError(f"bit width {bits} out of range; expected 1..8")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes into bytes.

    Args:
        codes: uint8, 1-D, every value < 2**bits.
        bits: 1..8.

    Returns:
        uint8, 1-D, ``packed_nbytes(codes.numel(), bits)`` bytes.
    """
    _check_bits(bits)
    n = codes.numel()
    codes = codes.reshape(-1)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: a whole number of codes per byte
        per = 8 // bits
        pad = (-n) % per
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):
            out |= c[:, j] << (j * bits)
        return out
    # 3, 5, 6, 7 bits: 8 codes make exactly `bits` bytes; build them in an int64 word.
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=1)  # < 2**56, no overflow
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[count]`` codes from packed bytes (uint8, 1-D)."""
    _check_bits(bits)
    need = packed_nbytes(count, bits)
    if packed.numel() < need:
        raise CodecError(f"packed buffer has {packed.numel()} bytes; {count} codes of {bits} bits need {need}")
    packed = packed.reshape(-1)[:need]
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:count]
    groups = (count + 7) // 8
    pad = groups * bits - need
    b = torch.nn.functional.pad(packed.to(torch.int64), (0, pad)).view(groups, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((word.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:count]
