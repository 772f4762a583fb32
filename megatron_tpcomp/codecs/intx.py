"""Group-wise integer codecs, 2 to 8 bits (``int4:g32``, ``int8:g32``, ``int3:g64:asym``, ...).

Wire layout for an input of ``n`` values, group size ``G``, ``b`` bits, ``ng = ceil(n / G)`` groups (the
flattened row-major input is zero-padded to ``ng * G`` values; sections start at 16-byte offsets):

=========  ===================  ===============================================================
section    type, count          content
=========  ===================  ===============================================================
codes      uint8, ng*G*b/8      unsigned codes, bit-packed as in ``bitpack.py`` (int4: two per
                                byte, even index in the low nibble)
scales     scale fmt, ng        per-group scale ``s`` (default fp16)
mins       scale fmt, ng        ``asym`` only: per-group offset ``m``
=========  ===================  ===============================================================

Symmetric (default): ``qmax = 2**(b-1) - 1``, ideal ``s = amax / qmax``, stored rounded (see ``scales.py``);
``q = clamp(rint(x * (1/s)), -qmax, qmax)`` (rint = round half to even), ``code = q + 2**(b-1)``
(int4: codes 1..15, 8 is zero). Decode: ``x' = (code - 2**(b-1)) * s``.

Asymmetric: ideal ``s = (max - min) / (2**b - 1)``, ``m = round(min)``, ``code = clamp(rint((x - m) * (1/s)),
0, 2**b - 1)``; decode ``x' = code * s + m``.

All arithmetic is fp32. A group holding NaN/Inf gets a NaN scale and codes of zero: it decodes to NaN.
Exact bits per value for aligned sizes: ``b + 16/G`` (int4:g32 = 4.5, int8:g32 = 8.5), ``+16/G`` for asym.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs import bitpack
from megatron_tpcomp.codecs.base import (
    Codec,
    PayloadLayout,
    check_input,
    check_payload,
    divide,
    finite_blocks,
    from_blocks,
    native_decode_sum,
    native_encode,
    numel_of,
    to_blocks,
)
from megatron_tpcomp.codecs.scales import decode_scales, quantize_scales, safe_reciprocal, storage_dtype
from megatron_tpcomp.cpu_codecs import FORMAT_INT4, NativeFormat
from megatron_tpcomp.spec import CodecSpec, canonical


class IntCodec(Codec):
    """Group-wise integer quantization with one scale (and, if asymmetric, one offset) per group."""

    block_local = True

    def __init__(self, cs: CodecSpec):
        if cs.kind != "int" or cs.hadamard_block or cs.outliers:
            raise ValueError(f"IntCodec needs a plain integer spec, got {canonical(cs)!r}")
        self.cs = cs
        self.bits = cs.bits
        self.group = cs.block
        self.asym = cs.asym
        self.scale_fmt = cs.scale
        self.spec = canonical(cs)
        self.qmax = (1 << (cs.bits - 1)) - 1
        self.zero_code = 1 << (cs.bits - 1)

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        ngroups = -(-numel_of(shape) // self.group)
        sections = [
            ("codes", torch.uint8, bitpack.packed_nbytes(ngroups * self.group, self.bits)),
            ("scales", storage_dtype(self.scale_fmt), ngroups),
        ]
        if self.asym:
            sections.append(("mins", storage_dtype(self.scale_fmt), ngroups))
        return PayloadLayout(sections)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _asym_ideal_scale(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``(hi - lo) / levels``, capped at half of ``fp32 max / levels``: past that ``hi - lo`` (or ``code * s``
        at decode) overflows to inf and a finite group would decode to inf/NaN; the cap clips it instead (the
        clip is part of :meth:`max_abs_error_bound`). The factor 2 leaves room for the scale's rounding."""
        levels = (1 << self.bits) - 1
        return divide(hi - lo, levels).clamp(max=torch.finfo(torch.float32).max / levels / 2)

    def native_format(self) -> NativeFormat | None:
        if self.bits == 4 and not self.asym and self.scale_fmt == "fp16" and self.group % 2 == 0:
            return NativeFormat(FORMAT_INT4, self.group)
        return None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        native = native_encode(self, x, layout)
        if native is not None:
            return native
        payload = layout.allocate(x.device)
        if x.numel() == 0:
            return payload
        blocks, bad = finite_blocks(x, self.group)  # fp32 [nblocks, block], NaN/Inf blocks zeroed
        if self.asym:
            lo = blocks.amin(dim=1)
            hi = blocks.amax(dim=1)
            levels = (1 << self.bits) - 1
            stored_s, s = quantize_scales(self._asym_ideal_scale(lo, hi), self.scale_fmt, bad)
            stored_m, m = quantize_scales(lo, self.scale_fmt)
            inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0))
            codes = torch.clamp(torch.round((blocks - m.unsqueeze(1)) * inv.unsqueeze(1)), 0, levels)
            layout.view(payload, "mins").copy_(stored_m)
        else:
            amax = blocks.abs().amax(dim=1)
            stored_s, s = quantize_scales(divide(amax, self.qmax), self.scale_fmt, bad)
            inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0))
            q = torch.clamp(torch.round(blocks * inv.unsqueeze(1)), -self.qmax, self.qmax)
            codes = q + self.zero_code
        layout.view(payload, "codes").copy_(bitpack.pack(codes.to(torch.uint8), self.bits))
        layout.view(payload, "scales").copy_(stored_s)
        return payload

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        native = native_decode_sum(self, payload, 1, shape, dtype, layout)
        if native is not None:
            return native
        n = numel_of(shape)
        if n == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        ngroups = -(-n // self.group)
        codes = bitpack.unpack(layout.view(payload, "codes"), ngroups * self.group, self.bits)
        codes = codes.view(ngroups, self.group).to(torch.float32)
        s = decode_scales(layout.view(payload, "scales"), self.scale_fmt).unsqueeze(1)
        if self.asym:
            m = decode_scales(layout.view(payload, "mins"), self.scale_fmt).unsqueeze(1)
            values = codes * s + m
        else:
            values = (codes - self.zero_code) * s
        return from_blocks(values, shape, dtype)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Half a step plus any clipping caused by rounding the scale down, per element (fp32)."""
        blocks = to_blocks(x, self.group)
        if self.asym:
            lo, hi = blocks.amin(1), blocks.amax(1)
            _, s = quantize_scales(self._asym_ideal_scale(lo, hi), self.scale_fmt)
            _, m = quantize_scales(lo, self.scale_fmt)
            top = m + s * ((1 << self.bits) - 1)
            clip = torch.maximum(hi - top, m - lo).clamp(min=0)
        else:
            amax = blocks.abs().amax(1)
            _, s = quantize_scales(divide(amax, self.qmax), self.scale_fmt)
            clip = (amax - s * self.qmax).clamp(min=0)
        bound = 0.5 * s + clip + 1e-6 * blocks.abs().amax(1)
        return from_blocks(bound.unsqueeze(1).expand_as(blocks), x.shape, torch.float32)
