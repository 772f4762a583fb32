"""Block minifloats: OCP MXFP4, NVIDIA NVFP4 and the FP3-FP6 block formats (``mxfp4``, ``nvfp4``, ``fp5:b32``).

Element format EeMm (``bits = 1 + e + m``): the code's most significant bit is the sign, then ``e`` exponent bits,
then ``m`` mantissa bits; exponent bias ``2**(e-1) - 1``; exponent field 0 is subnormal
(``mant / 2**m * 2**(1 - bias)``), otherwise ``(1 + mant / 2**m) * 2**(field - bias)``. There is no Inf or NaN
encoding: values saturate at the largest finite magnitude (the OCP MX element convention). E2M1 values:
0, 0.5, 1, 1.5, 2, 3, 4, 6.

Wire layout for ``n`` values, block size ``B``, ``nb = ceil(n / B)`` blocks (flattened row-major input,
zero-padded; sections at 16-byte offsets):

============  ===================  ============================================================
section       type, count          content
============  ===================  ============================================================
codes         uint8, nb*B*bits/8   element codes, bit-packed as in ``bitpack.py``
scales        scale fmt, nb        per-block scale (mxfp4/fpN: e8m0; nvfp4: e4m3)
tensor_scale  float32, 1           nvfp4 only: second-level scale ``t``
============  ===================  ============================================================

Encode: ideal block scale ``s = amax / emax`` (``emax`` = largest element value), rounded per ``scales.py``
(e8m0 rounds up to a power of two, so no element clips); ``v = x * (1/s)`` is rounded to the nearest element
value, ties to even mantissa. NVFP4 scales twice: ``t = amax_tensor / (6 * 448)`` (1 for an all-zero
tensor), the block scale is stored as ``e4m3(amax_block / 6 / t)`` and decodes to ``e4m3 * t``.
Decode: ``x' = value(code) * s``. A block holding NaN/Inf gets a NaN scale: it decodes to NaN.
Bits per value: ``bits + scale_bits / B`` (mxfp4 4.25, nvfp4 4.5 + 32/n, fp5:b32 5.25, fp6:b32 6.25).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs import bitpack
from megatron_tpcomp.codecs.base import (
    Codec,
    PayloadLayout,
    check_input,
    check_payload,
    from_blocks,
    nonfinite_blocks,
    numel_of,
    to_blocks,
)
from megatron_tpcomp.codecs.scales import E4M3_MAX, decode_scales, quantize_scales, safe_reciprocal, storage_dtype
from megatron_tpcomp.spec import CodecSpec, canonical


@functools.lru_cache(maxsize=32)
def element_values(exp_bits: int, man_bits: int) -> tuple[float, ...]:
    """Non-negative values of EeMm indexed by magnitude code ``0 .. 2**(e+m) - 1`` (increasing)."""
    bias = 2 ** (exp_bits - 1) - 1
    values = []
    for code in range(2 ** (exp_bits + man_bits)):
        field, mant = code >> man_bits, code & ((1 << man_bits) - 1)
        if field == 0:
            values.append(mant / 2**man_bits * 2.0 ** (1 - bias))
        else:
            values.append((1 + mant / 2**man_bits) * 2.0 ** (field - bias))
    return tuple(values)


class MinifloatCodec(Codec):
    """Block minifloat with one scale per ``cs.block`` values (and NVFP4's extra tensor scale)."""

    def __init__(self, cs: CodecSpec):
        if cs.kind != "minifloat" or cs.hadamard_block or cs.outliers:
            raise ValueError(f"MinifloatCodec needs a plain minifloat spec, got {canonical(cs)!r}")
        self.cs = cs
        self.bits = cs.bits
        self.exp_bits, self.man_bits = cs.exp_bits, cs.man_bits
        self.block = cs.block
        self.scale_fmt = cs.scale
        self.tensor_scale = cs.tensor_scale
        self.spec = canonical(cs)
        self.values = torch.tensor(element_values(cs.exp_bits, cs.man_bits), dtype=torch.float32)
        self.emax = float(self.values[-1])
        self.min_exp = 1 - (2 ** (cs.exp_bits - 1) - 1)  # exponent of the smallest normal binade

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        nblocks = -(-numel_of(shape) // self.block)
        sections = [
            ("codes", torch.uint8, bitpack.packed_nbytes(nblocks * self.block, self.bits)),
            ("scales", storage_dtype(self.scale_fmt), nblocks),
        ]
        if self.tensor_scale:
            sections.append(("tensor_scale", torch.float32, 1))
        return PayloadLayout(sections)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _half_step(self, mag: torch.Tensor) -> torch.Tensor:
        """Half the grid spacing of the binade holding ``mag`` (fp32, scaled domain)."""
        _, exp = torch.frexp(mag)
        binade = (exp - 1).clamp(min=self.min_exp)
        return torch.ldexp(torch.full_like(mag, 0.5), binade - self.man_bits)

    def _round_to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, sign in bit ``bits-1``) of the nearest element values, ties to even mantissa."""
        mag = v.abs().clamp(max=self.emax)
        step = 2.0 * self._half_step(mag)
        rounded = (torch.round(mag / step) * step).clamp(max=self.emax)  # round() is half-to-even
        values = self.values.to(v.device)
        mag_code = torch.searchsorted(values, rounded.contiguous())
        sign = ((v < 0) & (rounded > 0)).to(torch.int64) << (self.bits - 1)
        return (mag_code | sign).to(torch.uint8)

    def _scales(
        self, blocks: torch.Tensor, bad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(stored block scales, effective fp32 block scales, tensor scale or None)."""
        amax = blocks.abs().amax(dim=1)
        if not self.tensor_scale:
            stored, s = quantize_scales(amax / self.emax, self.scale_fmt, bad)
            return stored, s, None
        tmax = amax.max() if amax.numel() else amax.new_zeros(())
        t = torch.where(tmax > 0, tmax / (self.emax * E4M3_MAX), torch.ones_like(tmax)).reshape(1)
        stored, s = quantize_scales(amax / self.emax / t, self.scale_fmt, bad)
        return stored, s * t, t

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        payload = layout.allocate(x.device)
        if x.numel() == 0:
            if self.tensor_scale:
                layout.view(payload, "tensor_scale").fill_(1.0)
            return payload
        blocks = to_blocks(x, self.block)  # [nb, B] fp32
        bad = nonfinite_blocks(blocks)
        blocks = torch.where(bad.unsqueeze(1), torch.zeros_like(blocks), blocks)
        stored, s, t = self._scales(blocks, bad)
        inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0)).unsqueeze(1)
        codes = self._round_to_grid(blocks * inv)
        layout.view(payload, "codes").copy_(bitpack.pack(codes.reshape(-1), self.bits))
        layout.view(payload, "scales").copy_(stored)
        if t is not None:
            layout.view(payload, "tensor_scale").copy_(t)
        return payload

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        n = numel_of(shape)
        if n == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        nblocks = -(-n // self.block)
        codes = bitpack.unpack(layout.view(payload, "codes"), nblocks * self.block, self.bits).to(torch.int64)
        mag = self.values.to(payload.device)[codes & ((1 << (self.bits - 1)) - 1)]
        vals = torch.where((codes >> (self.bits - 1)) == 1, -mag, mag).view(nblocks, self.block)
        s = decode_scales(layout.view(payload, "scales"), self.scale_fmt)
        if self.tensor_scale:
            s = s * layout.view(payload, "tensor_scale")
        return from_blocks(vals * s.unsqueeze(1), shape, dtype)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per element: half the grid step at ``|x|/s`` times ``s``, plus clipping where the rounded scale made
        ``amax/s`` exceed the largest element (fp16/e4m3 scales round to nearest), plus fp32 round-off."""
        blocks = to_blocks(x, self.block)
        bad = torch.zeros(blocks.shape[0], dtype=torch.bool, device=blocks.device)
        _, s, _ = self._scales(blocks, bad)
        s = s.unsqueeze(1)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        mag = (blocks.abs() * safe_reciprocal(s)).clamp(max=self.emax)
        bound = self._half_step(mag) * s + (amax - self.emax * s).clamp(min=0) + 1e-6 * amax
        return from_blocks(bound, x.shape, torch.float32)
