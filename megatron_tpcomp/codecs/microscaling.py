"""Block minifloats: OCP MXFP4, NVIDIA NVFP4 and FP3-FP6 block formats (``mxfp4``, ``nvfp4``, ``fp5:b32``, ...).

Element format EeMm (``bits = 1 + e + m``): the code's most significant bit is the sign, then ``e`` exponent
bits, then ``m`` mantissa bits. Exponent bias ``2**(e-1) - 1``; exponent field 0 is subnormal
(``mant / 2**m * 2**(1 - bias)``), any other field ``f`` is ``(1 + mant / 2**m) * 2**(f - bias)``. There is
no Inf or NaN encoding: every code is a finite value and encoding saturates at the largest one (the OCP MX
element convention). Examples: E2M1 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; E2M3 max 7.5; E3M2 max 28; E1M1 = 0, 1, 2, 3.

Wire layout for ``n`` values, block size ``B``, ``nb = ceil(n / B)`` blocks (the flattened row-major input is
zero-padded to ``nb * B`` values; sections start at 16-byte offsets, see ``base.py``):

============  ===================  ============================================================
section       type, count          content
============  ===================  ============================================================
codes         uint8, nb*B*bits/8   element codes, bit-packed as in ``bitpack.py`` (4 bits: two
                                   per byte, even index in the low nibble)
scales        scale fmt, nb        per-block scale (mxfp4 and fpN: e8m0; nvfp4: e4m3)
tensor_scale  float32, 1           nvfp4 only: the second-level, per-tensor scale ``t``
exps          int16, nsuper        super-block exponents ``k`` (``blocks.py``; 2-byte aligned)
============  ===================  ============================================================

Range: each super-block of ``lcm(B, 4096)`` values is normalized first, ``y = x * 2^-k`` (``scales.py``,
"Second level"), and everything below runs on ``y``: fp16/e4m3 block scales without a tensor scale put the
largest ideal scale just below the format's maximum (``amax * 2^-k <= emax * max``); e8m0, and nvfp4 (whose
tensor scale already adapts to the message), keep ``k = 0`` for ``2^-64 <= amax < 2^64``. Decoding multiplies
the decoded values by ``2^k`` (``pow2_mul``) and clamps them to the output dtype's range (mxfp4 rounds a
finite fp16 65504 to 4 * 2^14 = 65536, which was Inf).

Encode (all fp32), ``emax`` = largest element value (6 for E2M1):

- one-level (mxfp4, fpN): ideal block scale ``s = amax_block / emax``, stored with ``scales.quantize_scales``
  (e8m0 rounds up to a power of two, so no element clips); the quantizer uses the decoded ``s``.
- nvfp4 (two-level): ``t = amax_tensor / (emax * 448)``, so the largest block scale is e4m3's maximum 448.
  Block scale stored as ``e4m3(amax_block / emax / t)``; effective scale ``s = e4m3_value * t``. An all-zero
  (or all non-finite) tensor has ``t = 1`` and block scales 0. ``t`` is kept >= ``2**-117`` so that every
  nonzero ``s`` (>= ``2**-9 * t``, e4m3's smallest) is >= ``2**-126`` and has a finite fp32 reciprocal (a
  guard: normalized super-blocks have ``amax >= 2^-64``, far above that).
- ``v = x * (1/s)`` is rounded to the nearest element value, ties to the even multiple of the grid step
  (= even code for ``m >= 1``; for ``m = 0`` a tie between ``2**k`` and ``2**(k+1)`` goes up), and saturates
  at ``+-emax``. Negative values that round to 0 encode as +0.

Ideal scales (and ``t``) are capped so that ``emax * s <= fp32_max / 2`` (a guard; normalized blocks stay far
below). Decode: ``x' = pow2_mul(value(code) * s, k)``, clamped to the output dtype's finite range.

A block holding NaN/Inf gets a NaN scale (e8m0 0xFF, e4m3 0x7F) and zero codes: it decodes to NaN; it does not
take part in nvfp4's ``amax_tensor``. Bits per value: ``bits + scale_bits / B + 16 / 4096``, plus 128 bits per
message for nvfp4's tensor scale with its alignment (mxfp4 4.2539, nvfp4 4.5039 + 128/n, fp5:b32 5.2539).
"""

from __future__ import annotations

import functools
import re

import torch

from megatron_tpcomp.codecs import bitpack
from megatron_tpcomp.codecs.base import CodecError, PayloadLayout, divide
from megatron_tpcomp.codecs.blocks import EXPS_BITS, BlockCodec
from megatron_tpcomp.codecs.scales import (
    E4M3_MAX,
    FP32_TINY_SUB,
    decode_scales,
    quantize_scales,
    safe_reciprocal,
    storage_dtype,
)
from megatron_tpcomp.spec import CodecSpec, Example, Family, canonical, register_family, small_int, spec_error

FP32_MAX = torch.finfo(torch.float32).max
__all__ = ["FP32_MAX", "FP32_TINY_SUB", "MINIFLOAT_FORMATS", "MinifloatCodec", "element_values", "half_ulp"]


def half_ulp(mag: torch.Tensor, min_exp: int, man_bits: int) -> torch.Tensor:
    """Half the spacing of a float grid with ``man_bits`` mantissa bits at magnitude ``mag`` (fp32, >= 0).

    The spacing in binade ``[2**e, 2**(e+1))`` is ``2**(e - man_bits)``; below the smallest normal ``2**min_exp``
    (subnormals, and 0) it is the subnormal spacing ``2**(min_exp - man_bits)``.
    """
    _, exp = torch.frexp(mag)  # mag = f * 2**exp with f in [0.5, 1): floor(log2 mag) = exp - 1
    e = torch.where(mag > 0, exp - 1, torch.full_like(exp, min_exp)).clamp(min=min_exp)
    return torch.ldexp(torch.full_like(mag, 0.5), e - man_bits)


#: Lower bound of nvfp4's tensor scale: e4m3's smallest positive value (2**-9) times it is fp32's smallest normal.
MIN_TENSOR_SCALE = 2.0**-117


@functools.lru_cache(maxsize=32)
def element_values(exp_bits: int, man_bits: int) -> tuple[float, ...]:
    """Non-negative values of EeMm indexed by magnitude code ``0 .. 2**(e+m) - 1`` (strictly increasing)."""
    bias = 2 ** (exp_bits - 1) - 1
    values = []
    for code in range(2 ** (exp_bits + man_bits)):
        field, mant = code >> man_bits, code & ((1 << man_bits) - 1)
        if field == 0:
            values.append(mant / 2**man_bits * 2.0 ** (1 - bias))
        else:
            values.append((1 + mant / 2**man_bits) * 2.0 ** (field - bias))
    return tuple(values)


class MinifloatCodec(BlockCodec):
    """Block minifloat EeMm with one scale per ``cs.block`` values (and NVFP4's extra per-tensor scale).

    Args:
        cs: a plain minifloat spec (``kind == "minifloat"``, no modifiers).
    """

    def __init__(self, cs: CodecSpec):
        if cs.kind != "minifloat" or cs.hadamard_block or cs.outliers:
            raise CodecError(f"MinifloatCodec needs a plain minifloat spec, got {canonical(cs)!r}")
        if cs.exp_bits < 1 or cs.man_bits < 0 or 1 + cs.exp_bits + cs.man_bits != cs.bits or cs.bits > 8:
            raise CodecError(f"bad minifloat element format e{cs.exp_bits}m{cs.man_bits} for {cs.bits} bits")
        self.cs = cs
        self.bits = cs.bits
        self.exp_bits, self.man_bits = cs.exp_bits, cs.man_bits
        self.block = cs.block
        self.scale_fmt = cs.scale
        self.tensor_scale = cs.tensor_scale
        self.spec = canonical(cs)
        self.values = torch.tensor(element_values(cs.exp_bits, cs.man_bits), dtype=torch.float32)
        self._values_on: dict[str, torch.Tensor] = {}  # device -> self.values there (a cache: no copy per call)
        self.emax = float(self.values[-1])
        self.min_exp = 2 - 2 ** (cs.exp_bits - 1)  # exponent of the smallest normal: 1 - bias
        self.sign_bit = 1 << (cs.bits - 1)
        # Caps of the ideal scales: emax * s <= fp32_max / 2, even after e8m0 rounds s up (by < 2x).
        self.scale_cap = FP32_MAX / (2.0 * self.emax)
        self.tensor_scale_cap = FP32_MAX / (2.0 * self.emax * E4M3_MAX)
        self._init_range(self.emax, tensor_scale=cs.tensor_scale)

    def _sections(self, nblocks: int) -> list[tuple[str, torch.dtype, int]]:
        sections = [
            ("codes", torch.uint8, bitpack.packed_nbytes(nblocks * self.block, self.bits)),
            ("scales", storage_dtype(self.scale_fmt), nblocks),
        ]
        if self.tensor_scale:
            sections.append(("tensor_scale", torch.float32, 1))
        return sections

    def _init_payload(self, payload: torch.Tensor, layout: PayloadLayout) -> None:
        if self.tensor_scale:
            layout.view(payload, "tensor_scale").fill_(1.0)  # the value for empty and all-zero tensors

    def _scales(
        self, blocks: torch.Tensor, bad: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scales of fp32 ``[nb, B]`` blocks (non-finite blocks already zeroed).

        Returns:
            stored block scales ``[nb]`` (scale format), effective fp32 block scales ``[nb]`` (NaN where
            ``bad``), and the fp32 tensor scale ``[1]`` (nvfp4) or None.
        """
        amax = blocks.abs().amax(dim=1)
        if not self.tensor_scale:
            stored, s = quantize_scales(divide(amax, self.emax).clamp(max=self.scale_cap), self.scale_fmt, bad)
            return stored, s, None
        tmax = amax.amax()
        t = divide(tmax, self.emax * E4M3_MAX).clamp(MIN_TENSOR_SCALE, self.tensor_scale_cap)
        t = torch.where(tmax > 0, t, torch.ones_like(t)).reshape(1)
        stored, s = quantize_scales(divide(amax, self.emax) / t, self.scale_fmt, bad)
        return stored, s * t, t

    def _codes(self, v: torch.Tensor) -> torch.Tensor:
        """Element codes (uint8, sign in bit ``bits - 1``) of the element values nearest to fp32 ``v``.

        In binade ``e`` (``e = min_exp`` for subnormals) the grid step is ``2**(e - m)`` and the magnitude code
        is ``(e - min_exp) * 2**m + k`` with ``k = |v| / step``; rounding ``k`` (half to even) up to ``2**(m+1)``
        gives exactly the code of the next binade's first value, so one formula covers every case.
        """
        mag = v.abs().clamp(max=self.emax)  # saturate: no element clips past the largest value
        _, exp = torch.frexp(mag)
        e = torch.where(mag > 0, exp - 1, torch.full_like(exp, self.min_exp)).clamp(min=self.min_exp)
        k = torch.round(torch.ldexp(mag, self.man_bits - e))  # exact power-of-two scaling; round = half-to-even
        code = ((e - self.min_exp) << self.man_bits) + k.to(torch.int32)
        sign = ((v < 0) & (code > 0)).to(torch.int32) * self.sign_bit  # -0 encodes as +0
        return (code | sign).to(torch.uint8)

    def _quantize(self, y: torch.Tensor, bad: torch.Tensor, payload: torch.Tensor, layout: PayloadLayout) -> None:
        stored, s, t = self._scales(y, bad)
        inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0)).unsqueeze(1)  # NaN-scale blocks: codes 0
        codes = self._codes(y * inv)
        layout.view(payload, "codes").copy_(bitpack.pack(codes.reshape(-1), self.bits))
        layout.view(payload, "scales").copy_(stored)
        if t is not None:
            layout.view(payload, "tensor_scale").copy_(t)

    def _values(self, device: torch.device) -> torch.Tensor:
        """fp32 ``[2**(bits-1)]`` element values on ``device``, cached per device: a host-to-device copy per decode
        would wait for the host (and cannot be captured in a CUDA graph)."""
        key = str(device)
        values = self._values_on.get(key)
        if values is None:
            values = self._values_on[key] = self.values.to(device)
        return values

    def _dequantize(self, payload: torch.Tensor, layout: PayloadLayout, nblocks: int) -> torch.Tensor:
        codes = bitpack.unpack(layout.view(payload, "codes"), nblocks * self.block, self.bits).to(torch.int64)
        mag = self._values(payload.device)[codes & (self.sign_bit - 1)]
        vals = torch.where(codes >= self.sign_bit, -mag, mag).view(nblocks, self.block)
        s = decode_scales(layout.view(payload, "scales"), self.scale_fmt)
        if self.tensor_scale:
            s = s * layout.view(payload, "tensor_scale")  # the same fp32 product as the encoder's
        return vals * s.unsqueeze(1)

    def _bound_normalized(self, y: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on the error of normalized finite blocks ``y`` (fp32 ``[nb, B]``).

        With ``s`` the effective block scale and ``v = |y| * (1/s)`` (as the encoder computes it):

        - rounding: half the element grid step at ``min(v, emax)`` (``2**(e-m-1)`` in binade ``e``, the
          subnormal half-step below ``2**min_exp``), times ``s``;
        - clipping: values with ``v > emax`` lose at most ``amax - emax * s`` (fp16/bf16/e4m3 scales rounding
          down, e4m3's range limit without a tensor scale, the overflow caps, or a block scale of 0);
        - fp32 arithmetic: ``1/s``, ``x * (1/s)`` and ``value * s`` each round by ``<= 2**-24`` relative, in
          total below ``2**-20 * amax``, plus two fp32 subnormal spacings where products underflow.
        """
        blocks = y
        _, s, _ = self._scales(blocks)
        inv = safe_reciprocal(s).unsqueeze(1)
        s = s.unsqueeze(1)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        mag = (blocks.abs() * inv).clamp(max=self.emax)
        rounding = half_ulp(mag, self.min_exp, self.man_bits) * s
        clip = (amax - self.emax * s).clamp(min=0)
        return rounding + clip + 2.0**-20 * amax + 2 * FP32_TINY_SUB


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------

#: Element formats of ``fpN``: bits -> allowed (exponent, mantissa) pairs; the first is the default.
MINIFLOAT_FORMATS: dict[int, tuple[tuple[int, int], ...]] = {
    3: ((1, 1),),
    4: ((2, 1), (1, 2), (3, 0)),
    5: ((2, 2), (3, 1), (1, 3)),
    6: ((2, 3), (3, 2)),
}
#: Defaults of ``fpN`` and ``mxfp4`` (= ``fp4-e2m1:b32:se8m0``): blocks of 32 values, e8m0 scales.
DEFAULTS = dict(block=32, scale="e8m0")
#: Defaults of ``nvfp4``: e2m1 in blocks of 16 values, e4m3 scales, plus one fp32 per-tensor scale.
NVFP4_DEFAULTS = dict(block=16, scale="e4m3")


def _parse_token(token: str, spec: str) -> CodecSpec | None:
    """``mxfp4``, ``nvfp4``, ``fp3`` .. ``fp6`` (optionally ``-eXmY``) with the defaults; None for a token of
    another family (``fp8`` included)."""
    if token == "mxfp4":
        return CodecSpec(kind="minifloat", bits=4, exp_bits=2, man_bits=1, **DEFAULTS)
    if token == "nvfp4":
        return CodecSpec(kind="minifloat", bits=4, exp_bits=2, man_bits=1, tensor_scale=True, **NVFP4_DEFAULTS)
    m = re.fullmatch(r"fp(\d+)(?:-e(\d+)m(\d+))?", token)
    if m is None:
        return None
    bits = small_int(m.group(1))
    if bits == 8:
        return None  # the fp8 family's
    if bits not in MINIFLOAT_FORMATS:
        raise spec_error(spec, f"minifloat width {bits} out of range", "fp3, fp4, fp5, fp6 or fp8")
    allowed = MINIFLOAT_FORMATS[bits]
    if m.group(2) is None:
        e, mm = allowed[0]
    else:
        e, mm = small_int(m.group(2)), small_int(m.group(3))
        if (e, mm) not in allowed:
            names = ", ".join(f"fp{bits}-e{a}m{b}" for a, b in allowed)
            raise spec_error(spec, f"fp{bits} has no element format e{e}m{mm}", names)
    return CodecSpec(kind="minifloat", bits=bits, exp_bits=e, man_bits=mm, **DEFAULTS)


def _canonical(cs: CodecSpec) -> str:
    if cs.tensor_scale:  # nvfp4 is the only preset with a tensor scale
        return f"nvfp4:b{cs.block}:s{cs.scale}"
    return f"fp{cs.bits}-e{cs.exp_bits}m{cs.man_bits}:b{cs.block}:s{cs.scale}"


# Contract-suite bounds (relative L2 error on N(0,1)): m mantissa bits give a relative step 2^-m in a binade, RMS
# relative error ~2^-m/sqrt(12)*0.71: e2m3 (fp6) 0.028, e3m2 0.053, e2m2 (fp5) 0.057, e3m1 0.10, e2m1 (fp4)
# ~0.095 with an fp16/e4m3 scale, 0.115 with e8m0 (rounded-up scales waste up to one binade), e1m2 0.145, e3m0
# 0.205, fp3 0.32; e1m3 measures 0.040 (one exponent bit: much of the range is subnormal). Plus 25% headroom (a
# lost bit fails). Bits: element bits + scale bits / block + the super-block exponents (nvfp4's tensor scale
# amortizes to < 1e-6 bits on the nominal message).
register_family(
    Family(
        kind="minifloat",
        title="minifloat",
        names="mxfp4, nvfp4, fp3, fp4, fp5, fp6 (optionally -eXmY, e.g. fp6-e3m2)",
        parse=_parse_token,
        canonical=_canonical,
        factory=MinifloatCodec,
        examples=(
            Example("mxfp4", 0.145, 4 + 8 / 32 + EXPS_BITS),
            Example("nvfp4", 0.12, 4 + 8 / 16 + EXPS_BITS),
            Example("fp3", 0.40, 3 + 8 / 32 + EXPS_BITS),
            Example("fp4:b16:sfp16", 0.12, 4 + 16 / 16 + EXPS_BITS),
            Example("fp4-e1m2:b32", 0.18, 4 + 8 / 32 + EXPS_BITS),
            Example("fp4-e3m0:b32", 0.25, 4 + 8 / 32 + EXPS_BITS),
            Example("fp4:b32:se4m3", 0.13, 4 + 8 / 32 + EXPS_BITS),
            Example("fp5-e1m3:b16:sfp16", 0.05, 5 + 16 / 16 + EXPS_BITS),
            Example("fp5:b32", 0.072, 5 + 8 / 32 + EXPS_BITS),
            Example("fp5-e3m1:b64:sbf16", 0.13, 5 + 16 / 64 + EXPS_BITS),
            Example("fp6", 0.036, 6 + 8 / 32 + EXPS_BITS),
            Example("fp6-e3m2:b32", 0.066, 6 + 8 / 32 + EXPS_BITS),
        ),
    )
)
