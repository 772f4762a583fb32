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
exps       int16, nsuper        super-block exponents ``k`` (``blocks.py``; 2-byte aligned)
=========  ===================  ===============================================================

Range: each super-block of ``lcm(G, 4096)`` values is first normalized, ``y = x * 2^-k`` (``scales.py``,
"Second level"); everything below runs on ``y``, and decoding multiplies ``s`` (and ``m``) by ``2^k``. With
fp16/e4m3 scales ``k`` puts the largest ideal scale of the super-block just below the format's maximum
(``amax * 2^-k <= qmax * 65504``; asymmetric: ``<= 65504``), so no group clips and the others keep fp16's 40
binades (e4m3: 17.8) below it; fp32/bf16/e8m0 scales keep ``k = 0`` for ``2^-64 <= amax < 2^64``.
Decoded values are formed on ``y`` and then multiplied by ``2^k``.

Symmetric (default): ``qmax = 2**(b-1) - 1``, ideal ``s = amax / qmax``, stored rounded (see ``scales.py``);
``q = clamp(rint(y * (1/s)), -qmax, qmax)`` (rint = round half to even), ``code = q + 2**(b-1)``
(int4: codes 1..15, 8 is zero). Decode: ``x' = pow2_mul((code - 2**(b-1)) * s, k)``, clamped to the output
dtype's finite range.

Asymmetric: ideal ``s = (max - min) / (2**b - 1)``, ``m = round(min)``, ``code = clamp(rint((y - m) * (1/s)),
0, 2**b - 1)``; decode ``x' = pow2_mul(code * s + m, k)``, clamped.

All arithmetic is fp32. A group holding NaN/Inf gets a NaN scale and codes of zero: it decodes to NaN.
Exact bits per value for aligned sizes: ``b + 16/G + 16/4096`` (int4:g32 = 4.50390625, int8:g32 = 8.50390625),
``+16/G`` for asym.
"""

from __future__ import annotations

import re

import torch

from megatron_tpcomp.codecs import bitpack
from megatron_tpcomp.codecs.base import PayloadLayout, divide
from megatron_tpcomp.codecs.blocks import EXPS_BITS, BlockCodec
from megatron_tpcomp.codecs.scales import (
    decode_scales,
    quantize_scales,
    safe_reciprocal,
    storage_dtype,
)
from megatron_tpcomp.spec import CodecSpec, Example, Family, canonical, register_family, small_int, spec_error


class IntCodec(BlockCodec):
    """Group-wise integer quantization with one scale (and, if asymmetric, one offset) per group."""

    block_local = True

    def __init__(self, cs: CodecSpec):
        if cs.kind != "int" or cs.hadamard_block or cs.outliers:
            raise ValueError(f"IntCodec needs a plain integer spec, got {canonical(cs)!r}")
        self.cs = cs
        self.bits = cs.bits
        self.group = self.block = cs.block
        self.asym = cs.asym
        self.scale_fmt = cs.scale
        self.spec = canonical(cs)
        self.qmax = (1 << (cs.bits - 1)) - 1
        self.zero_code = 1 << (cs.bits - 1)
        # Asymmetric groups store their minimum in the scale format too: it reaches amax, not amax / qmax.
        self._init_range(1.0 if cs.asym else self.qmax)

    def _sections(self, nblocks: int) -> list[tuple[str, torch.dtype, int]]:
        sections = [
            ("codes", torch.uint8, bitpack.packed_nbytes(nblocks * self.group, self.bits)),
            ("scales", storage_dtype(self.scale_fmt), nblocks),
        ]
        if self.asym:
            sections.append(("mins", storage_dtype(self.scale_fmt), nblocks))
        return sections

    def _asym_ideal_scale(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``(hi - lo) / levels``, capped at half of ``fp32 max / levels``: past that ``hi - lo`` (or ``code * s``
        at decode) overflows to inf. Normalized groups stay far below the cap (``|y| < 2^64``); it is a guard."""
        levels = (1 << self.bits) - 1
        return divide(hi - lo, levels).clamp(max=torch.finfo(torch.float32).max / levels / 2)

    def _quantize(self, y: torch.Tensor, bad: torch.Tensor, payload: torch.Tensor, layout: PayloadLayout) -> None:
        if self.asym:
            lo = y.amin(dim=1)
            hi = y.amax(dim=1)
            levels = (1 << self.bits) - 1
            stored_s, s = quantize_scales(self._asym_ideal_scale(lo, hi), self.scale_fmt, bad)
            stored_m, m = quantize_scales(lo, self.scale_fmt)
            inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0))
            codes = torch.clamp(torch.round((y - m.unsqueeze(1)) * inv.unsqueeze(1)), 0, levels)
            layout.view(payload, "mins").copy_(stored_m)
        else:
            amax = y.abs().amax(dim=1)
            stored_s, s = quantize_scales(divide(amax, self.qmax), self.scale_fmt, bad)
            inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0))
            q = torch.clamp(torch.round(y * inv.unsqueeze(1)), -self.qmax, self.qmax)
            codes = q + self.zero_code
        layout.view(payload, "codes").copy_(bitpack.pack(codes.to(torch.uint8), self.bits))
        layout.view(payload, "scales").copy_(stored_s)

    def _dequantize(self, payload: torch.Tensor, layout: PayloadLayout, nblocks: int) -> torch.Tensor:
        codes = bitpack.unpack(layout.view(payload, "codes"), nblocks * self.group, self.bits)
        codes = codes.view(nblocks, self.group).to(torch.float32)
        s = decode_scales(layout.view(payload, "scales"), self.scale_fmt).unsqueeze(1)
        if self.asym:
            m = decode_scales(layout.view(payload, "mins"), self.scale_fmt).unsqueeze(1)
            return codes * s + m
        return (codes - self.zero_code) * s

    def _bound_normalized(self, y: torch.Tensor) -> torch.Tensor:
        """Half a step plus any clipping caused by rounding the scale down, per element (fp32)."""
        if self.asym:
            lo, hi = y.amin(1), y.amax(1)
            _, s = quantize_scales(self._asym_ideal_scale(lo, hi), self.scale_fmt)
            _, m = quantize_scales(lo, self.scale_fmt)
            top = m + s * ((1 << self.bits) - 1)
            clip = torch.maximum(hi - top, m - lo).clamp(min=0)
        else:
            amax = y.abs().amax(1)
            _, s = quantize_scales(divide(amax, self.qmax), self.scale_fmt)
            clip = (amax - s * self.qmax).clamp(min=0)
        bound = 0.5 * s + clip + 1e-6 * y.abs().amax(1)
        return bound.unsqueeze(1).expand_as(y)


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------

#: Defaults of ``intN``: groups of 32 values, fp16 scales, symmetric.
DEFAULTS = dict(block=32, scale="fp16")


def _parse_token(token: str, spec: str) -> CodecSpec | None:
    """``int2`` .. ``int8`` with the defaults; None for a token of another family."""
    m = re.fullmatch(r"int(\d+)", token)
    if m is None:
        return None
    bits = small_int(m.group(1))
    if not 2 <= bits <= 8:
        raise spec_error(spec, f"integer width {bits} out of range", "int2 .. int8")
    return CodecSpec(kind="int", bits=bits, **DEFAULTS)


def _canonical(cs: CodecSpec) -> str:
    return f"int{cs.bits}:g{cs.block}" + (":asym" if cs.asym else "") + f":s{cs.scale}"


# Contract-suite bounds (relative L2 error on N(0,1)): uniform rounding noise step/sqrt(12) with step =
# amax_G/qmax, E[amax] of G normals ~2.35 (G=32), ~2.9 (G=128): int4 0.097, int8 0.0053, int7:g128 0.013, int5
# with an e8m0 scale (rounded up, ~1.4x larger) 0.07; int2 (qmax 1) is far from uniform noise: measured 0.59.
# asym: step = (max - min)/(2^b - 1): int3:g64 0.195, int6:g32 0.019. Plus 25% headroom (a lost bit fails).
# Bits: b + scale bits / G (+ offset bits / G for asym) + the super-block exponents.
register_family(
    Family(
        kind="int",
        title="integer",
        names="int2..int8",
        parse=_parse_token,
        canonical=_canonical,
        factory=IntCodec,
        options=frozenset({"block", "scale", "asym"}),
        examples=(
            Example("int4:g32", 0.12, 4 + 16 / 32 + EXPS_BITS),
            Example("int8:g32", 0.0066, 8 + 16 / 32 + EXPS_BITS),
            Example("int3:g64:asym", 0.24, 3 + 32 / 64 + EXPS_BITS),
            Example("int2:g16:sbf16", 0.7, 2 + 16 / 16 + EXPS_BITS),
            Example("int5:g32:se8m0", 0.088, 5 + 8 / 32 + EXPS_BITS),
            Example("int6:g32:asym", 0.024, 6 + 32 / 32 + EXPS_BITS),
            Example("int7:g128:sfp32", 0.017, 7 + 32 / 128 + EXPS_BITS),
        ),
    )
)
