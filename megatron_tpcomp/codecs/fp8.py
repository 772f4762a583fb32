"""FP8 with one scale per block (``fp8`` = ``fp8-e4m3:b128:sfp32``, ``fp8-e5m2:b128``, ``fp8:b32:sfp16``, ...).

Wire layout for ``n`` values, block size ``B``, ``nb = ceil(n / B)`` blocks (the flattened row-major input is
zero-padded to ``nb * B`` values; sections start at 16-byte offsets, see ``base.py``):

=========  ===================  ===============================================================
section    type, count          content
=========  ===================  ===============================================================
codes      uint8, nb*B          FP8 bit patterns, one byte per value: E4M3 "fn" (OCP E4M3:
                                bias 7, no Inf, 0x7F/0xFF = NaN, max 448) or E5M2 (IEEE-like:
                                bias 15, Inf/NaN encodings, max 57344)
scales     scale fmt, nb        per-block scale ``s`` (default fp32; see ``scales.py``)
exps       int16, nsuper        super-block exponents ``k`` (``blocks.py``; 2-byte aligned)
=========  ===================  ===============================================================

Range: each super-block of ``lcm(B, 4096)`` values is normalized first, ``y = x * 2^-k`` (``scales.py``,
"Second level"): with fp16/e4m3 scales the largest ideal scale lands just below the format's maximum
(``amax * 2^-k <= fmax * 65504`` or ``fmax * 448``; before, ``fp8-e5m2:b128:se4m3`` decoded N(0,1) data to
zeros); with fp32/bf16/e8m0 scales ``k = 0`` for ``2^-64 <= amax < 2^64``.

Encode (all fp32, on ``y``): ideal ``s = amax / fmax`` per block, stored with ``scales.quantize_scales`` (the
quantizer uses the *decoded* scale); ``code = fp8(clamp(y * (1/s), -fmax, fmax))``, round to nearest, ties to
even. The clamp makes the result independent of the cast's overflow behaviour (torch's E5M2 cast overflows to
Inf, its E4M3 cast saturates in torch 2.13 but gave NaN in older versions) and of scale rounding (an fp16 scale
may round below ``amax / fmax``). The ideal scale is capped at ``fp32_max / (2 * fmax)`` (a guard: normalized
blocks stay far below it). Decode: ``x' = pow2_mul(float(code) * s, k)``, clamped to the output dtype's range.

A block holding NaN/Inf gets a NaN scale and zero codes: it decodes to NaN. An all-zero block gets zero codes
(and scale 0; e8m0, which has no zero, stores 2**-127) and decodes to exact zeros.
Bits per value: ``8 + scale_bits / B + 16 / 4096`` (8.25390625 for the default ``fp8``).

Backends produce the same wire layout, so any rank decodes any rank's payload with :meth:`Fp8Codec.decode`:
``torch`` (this reference; CPU and GPU), ``te`` (Transformer Engine's FP8 cast kernel on CUDA tensors, through
:meth:`Fp8Codec.with_cast`) and ``auto`` (``TPCOMP_BACKEND`` decides; its ``auto`` runs CUDA tensors through the
fused Triton kernels where triton imports, else casts with Transformer Engine where it imports). The choice is made
by the kernel dispatch, ``megatron_tpcomp/backends/``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch

from megatron_tpcomp.codecs.base import CodecError, PayloadLayout, divide
from megatron_tpcomp.codecs.blocks import EXPS_BITS, BlockCodec
from megatron_tpcomp.codecs.microscaling import FP32_MAX, FP32_TINY_SUB, half_ulp
from megatron_tpcomp.codecs.scales import decode_scales, quantize_scales, safe_reciprocal, storage_dtype
from megatron_tpcomp.spec import (
    CodecSpec,
    Example,
    Family,
    canonical,
    quote,
    register_family,
    small_int,
    spec_error,
)

#: (exponent bits, mantissa bits) -> (torch dtype, largest finite value, exponent of the smallest normal).
FP8_FORMATS: dict[tuple[int, int], tuple[torch.dtype, float, int]] = {
    (4, 3): (torch.float8_e4m3fn, 448.0, -6),
    (5, 2): (torch.float8_e5m2, 57344.0, -14),
}
BACKENDS = ("auto", "torch", "te")


class Fp8Codec(BlockCodec):
    """FP8 E4M3/E5M2 with one scale per block of ``cs.block`` values.

    Args:
        cs: a plain fp8 spec (``kind == "fp8"``, no modifiers).
        backend: ``"auto"`` | ``"torch"`` | ``"te"`` (see the module docstring): the kernel dispatch runs this
            codec's encode with that backend whatever ``TPCOMP_BACKEND`` says (``te``: raises where Transformer
            Engine cannot run). The wire format and :meth:`decode` are the same for every backend.
    """

    block_local = True

    def __init__(self, cs: CodecSpec, backend: str = "auto"):
        if cs.kind != "fp8" or cs.hadamard_block or cs.outliers:
            raise CodecError(f"Fp8Codec needs a plain fp8 spec, got {canonical(cs)!r}")
        if (cs.exp_bits, cs.man_bits) not in FP8_FORMATS:
            raise CodecError(f"fp8 has no element format e{cs.exp_bits}m{cs.man_bits}; expected e4m3 or e5m2")
        if backend not in BACKENDS:
            raise CodecError(f"unknown fp8 backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.cs = cs
        self.block = cs.block
        self.scale_fmt = cs.scale
        self.backend = backend
        self.exp_bits, self.man_bits = cs.exp_bits, cs.man_bits
        self.fp8_dtype, self.fmax, self.min_exp = FP8_FORMATS[(cs.exp_bits, cs.man_bits)]
        self.spec = canonical(cs)
        # Cap of the ideal scale: fmax * s stays <= fp32_max / 2 even after e8m0 rounds s up (by < 2x).
        self.scale_cap = FP32_MAX / (2.0 * self.fmax)
        self._init_range(self.fmax)

    def _sections(self, nblocks: int) -> list[tuple[str, torch.dtype, int]]:
        return [("codes", torch.uint8, nblocks * self.block), ("scales", storage_dtype(self.scale_fmt), nblocks)]

    def _scales(self, blocks: torch.Tensor, bad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored scales ``[nb]`` in the scale format, decoded fp32 scales ``[nb]``) of fp32 ``[nb, B]`` blocks."""
        ideal = divide(blocks.abs().amax(dim=1), self.fmax).clamp(max=self.scale_cap)
        return quantize_scales(ideal, self.scale_fmt, bad)

    def _cast(self, scaled: torch.Tensor) -> torch.Tensor:
        """uint8 FP8 bit patterns of scaled, clamped fp32 values (same shape): torch's cast, nearest even."""
        return scaled.to(self.fp8_dtype).view(torch.uint8)

    def with_cast(self, cast: Callable[[torch.Tensor], torch.Tensor]) -> Fp8Codec:
        """A copy of this codec whose reference encode casts the scaled, clamped fp32 blocks (``[nb, B]``, ``|v| <=
        fmax``) to FP8 codes (uint8 ``[nb, B]``) with ``cast``: how a backend with its own cast kernel (Transformer
        Engine) runs this codec, alone or inside ``+had``. The payload equals the reference's when ``cast`` rounds
        to nearest even."""
        twin = copy.copy(self)
        twin._cast = cast  # an instance attribute shadows the method, in the copy only
        return twin

    def _quantize(self, y: torch.Tensor, bad: torch.Tensor, payload: torch.Tensor, layout: PayloadLayout) -> None:
        stored, s = self._scales(y, bad)
        inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0)).unsqueeze(1)  # NaN-scale blocks: codes 0
        scaled = (y * inv).clamp(-self.fmax, self.fmax)
        codes = self._cast(scaled)
        layout.view(payload, "codes").copy_(codes.reshape(-1))
        layout.view(payload, "scales").copy_(stored)

    def _dequantize(self, payload: torch.Tensor, layout: PayloadLayout, nblocks: int) -> torch.Tensor:
        codes = layout.view(payload, "codes").view(self.fp8_dtype).to(torch.float32).view(nblocks, self.block)
        return codes * decode_scales(layout.view(payload, "scales"), self.scale_fmt).unsqueeze(1)

    def _bound_normalized(self, y: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on the error of normalized finite blocks ``y`` (fp32 ``[nb, B]``).

        With ``s`` the decoded block scale and ``v = |y| * (1/s)`` (as the encoder computes it):

        - rounding: round-to-nearest moves ``min(v, fmax)`` by at most half an FP8 ULP at that magnitude
          (``2**(e-m-1)`` in binade ``e``, the subnormal half-spacing below the smallest normal), times ``s``;
        - clipping: values with ``v > fmax`` lose ``|x| - fmax * s <= amax - fmax * s`` (only when the stored
          scale rounded below ``amax / fmax``: fp16/bf16/e4m3 scales, the overflow cap, or a scale of 0);
        - fp32 arithmetic: ``1/s``, ``x * (1/s)`` and ``code * s`` each round by ``<= 2**-24`` relative, in
          total below ``2**-20 * amax``, plus two fp32 subnormal spacings where products underflow.
        """
        blocks = y
        _, s = self._scales(blocks)
        inv = safe_reciprocal(s).unsqueeze(1)
        s = s.unsqueeze(1)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        mag = (blocks.abs() * inv).clamp(max=self.fmax)
        rounding = half_ulp(mag, self.min_exp, self.man_bits) * s
        clip = (amax - self.fmax * s).clamp(min=0)
        return rounding + clip + 2.0**-20 * amax + 2 * FP32_TINY_SUB


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------

#: Defaults of ``fp8``: blocks of 128 values, fp32 scales.
DEFAULTS = dict(block=128, scale="fp32")
#: Token -> element format (exponent bits, mantissa bits).
TOKENS = {"fp8": (4, 3), "fp8-e4m3": (4, 3), "fp8-e5m2": (5, 2)}


def _parse_token(token: str, spec: str) -> CodecSpec | None:
    """``fp8``, ``fp8-e4m3``, ``fp8-e5m2`` with the defaults; None for a token of another family (``fpN`` with
    N != 8 is a minifloat)."""
    m = re.fullmatch(r"fp(\d+)(?:-e\d+m\d+)?", token)
    if m is None or small_int(m.group(1)) != 8:
        return None
    if token not in TOKENS:
        raise spec_error(spec, f"unknown fp8 variant {quote(token)}", "fp8, fp8-e4m3 or fp8-e5m2")
    exp_bits, man_bits = TOKENS[token]
    return CodecSpec(kind="fp8", bits=8, exp_bits=exp_bits, man_bits=man_bits, **DEFAULTS)


def _canonical(cs: CodecSpec) -> str:
    return f"fp8-e{cs.exp_bits}m{cs.man_bits}:b{cs.block}:s{cs.scale}"


# Contract-suite bounds (relative L2 error on N(0,1)): m mantissa bits give a relative step 2^-m in a binade, RMS
# relative error ~2^-m/sqrt(12)*0.71: e4m3 0.0255, e5m2 0.051; plus 25% headroom (a lost bit fails).
# Bits: 8 + scale bits / block + the super-block exponents.
register_family(
    Family(
        kind="fp8",
        title="fp8",
        names="fp8, fp8-e4m3, fp8-e5m2",
        parse=_parse_token,
        canonical=_canonical,
        factory=Fp8Codec,
        examples=(
            Example("fp8", 0.032, 8 + 32 / 128 + EXPS_BITS),
            Example("fp8-e5m2:b128", 0.064, 8 + 32 / 128 + EXPS_BITS),
            Example("fp8:b32:sfp16", 0.03, 8 + 16 / 32 + EXPS_BITS),
            Example("fp8:b16:se8m0", 0.034, 8 + 8 / 16 + EXPS_BITS),
            Example("fp8-e5m2:b32:se4m3", 0.064, 8 + 8 / 32 + EXPS_BITS),
        ),
    )
)
