"""Per-block scale formats: how an fp32 scale is rounded, stored on the wire and read back.

Formats (``s<fmt>`` in a spec):

======  ==============  =====================================================================
fmt     stored as       rounding of the ideal scale ``s = amax / qmax``
======  ==============  =====================================================================
fp32    float32         exact (but see "tiny scales" below)
fp16    float16         round to nearest even; clamped to [-65504, 65504]
bf16    bfloat16        round to nearest even; clamped to the largest finite bf16
e8m0    uint8           power of two ``2**ceil(log2 s)`` (rounded UP, so no element clips);
                        byte = exponent + 127, exponent clamped to [-127, 127]; 0xFF = NaN (OCP MX)
e4m3    uint8           float8 e4m3fn bits, round to nearest even, clamped to [-448, 448]; 0x7F = NaN
======  ==============  =====================================================================

The clamps are symmetric because the same formats also store the (possibly negative) per-group minimum of
asymmetric integer codecs: an unclamped fp16 cast would turn a minimum below -65504 into -inf.

Tiny scales: fp32 and bf16 can hold positive scales below 2**-126 whose reciprocal overflows to inf (and
``0 * inf`` turns a block's zeros into NaN), so such scales are raised to 2**-126, the smallest normal; the
other formats cannot go that low.

A NaN scale marks a block whose input held NaN/Inf: the whole block decodes to NaN.
Quantizers compute ``x * inv`` with ``inv = 1 / decoded_scale`` (0 where the decoded scale is 0), in fp32:
this is what the CUDA kernels and Transformer Engine do, so every backend rounds identically.

Second level: super-block exponents
-----------------------------------
A block scale format alone cannot hold the range of the input dtypes: fp16 scales end at 65504 (int4 clipped
everything above 7 * 65504) and flush below 2^-24, e4m3 scales span only 448 / 2^-9 (int4:se4m3 zeroed blocks
below ~0.007 and clipped above 3,136), and fp32 inputs reach 2^128 and 2^-149. So every block codec (integers,
fp8, minifloats) normalizes its input by a power of two per *super-block* of ``SUPER_VALUES`` (4096) values
(``lcm(block, 4096)`` for block sizes that do not divide 4096) and sends the exponent:

- ``y = x * 2^-k`` (exact: a power of two, computed by :func:`pow2_mul`), the block codec quantizes ``y``;
  the decoder forms each value on ``y``'s scale and multiplies it by ``2^k`` (``pow2_mul``, one rounding:
  exact unless the result is an fp32 subnormal). Scaling the values rather than the scales matters at the top:
  ``s * 2^k`` may round past fp32's maximum, a value only where the input was there (then the clamp below).
- ``k`` is an int16 in the section ``exps`` (one per super-block, right after the scales at 2-byte alignment,
  so most small messages keep their size). It is chosen from the super-block's ``amax`` over its finite blocks
  (:func:`choose_exponents`):

  * narrow scale formats (fp16, e4m3; not nvfp4, whose fp32 tensor scale already adapts): the smallest ``k``
    with ``amax * 2^-k <= limit``, ``limit = element max * scale format max`` (int4:g32: 7 * 65504; the largest
    ideal block scale then lands in the format's top binade, below its maximum: no block can clip, and the
    smaller blocks keep the format's full dynamic range below it);
  * wide formats (fp32, bf16, e8m0, and nvfp4's two-level scale): ``k = 0`` while ``2^-64 <= amax < 2^64``
    (every real activation: the bytes of the scales are those of the plain format), else ``floor(log2 amax)``.

  Scaling by a power of two commutes with rounding, so a block whose scale is a normal number rounds exactly
  as it would with an unlimited exponent range: ``k`` changes which blocks fit, never how they round.
- What may still flush (narrow formats; ``M`` = the super-block's largest ``|x|``, ``q`` = the element max):
  after normalization ``M * 2^-k`` lies in ``(limit / 2, limit]``, so a block's ideal scale rounds to 0 only
  when its ``amax < M * min_pos / fmt_max``: ``M * 2^-40`` for fp16 (2^-24 / 65504), ``M * 2^-17.8`` for e4m3
  (2^-9 / 448). Blocks between that and the format's smallest normal scale keep a coarser scale. Either way
  such a block's error is at most ``4 * min_normal / fmt_max * M``: ``2^-28 M`` (fp16) or ``2^-12.8 M`` (e4m3),
  far below the quantization error of the super-block's largest block (``M / (2 q)`` for integers, at least
  ``2^-8 M`` even for int8; ``2^-(m+1) M`` for m-bit float elements, at least ``2^-4 M``). Every other block
  rounds as with an unlimited exponent range. nvfp4's e4m3 block scales hang off its per-message tensor scale
  (the format's own second level), so there ``M`` is the whole message's maximum and the ratio 2^-18.8.
  tests/reliability/test_codec_range.py checks these bounds.
- Decoded values are clamped to the output dtype's finite range (``base.clamp_to``).
- Super-blocks keep codecs block-local on ``lcm(block, 4096)``-value boundaries (``Codec.chunk_values``): a
  collective that cuts a message there gets the same bytes as for the whole message.
"""

from __future__ import annotations

import math

import torch

from megatron_tpcomp.codecs.base import CodecError

_STORAGE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "e8m0": torch.uint8,
    "e4m3": torch.uint8,
}
FP16_MAX = 65504.0
E4M3_MAX = 448.0
BF16_MAX = torch.finfo(torch.bfloat16).max
MIN_NORMAL = torch.finfo(torch.float32).tiny  # 2**-126: 1 / MIN_NORMAL = 2**126 is still finite
#: Smallest fp32 subnormal: products that land in fp32's subnormal range round to a multiple of it.
FP32_TINY_SUB = 2.0**-149


def storage_dtype(fmt: str) -> torch.dtype:
    """The dtype of the scale section on the wire for scale format ``fmt``."""
    try:
        return _STORAGE[fmt]
    except KeyError:
        raise CodecError(f"unknown scale format {fmt!r}; expected one of {', '.join(_STORAGE)}") from None


def encode_scales(scale: torch.Tensor, fmt: str, bad: torch.Tensor | None = None) -> torch.Tensor:
    """Round ideal fp32 scales to format ``fmt`` for the wire.

    Args:
        scale: fp32 ``[nblocks]``, finite and >= 0.
        fmt: one of ``fp32, fp16, bf16, e8m0, e4m3``.
        bad: optional bool ``[nblocks]``; True stores a NaN scale (block had non-finite input).

    Returns:
        ``[nblocks]`` tensor of ``storage_dtype(fmt)``.
    """
    scale = scale.to(torch.float32)
    if fmt in ("fp32", "bf16"):  # see "Tiny scales" in the module docstring
        scale = torch.where(scale > 0, scale.clamp(min=MIN_NORMAL), scale)
    if fmt == "fp32":
        out = scale.clone()
    elif fmt == "fp16":
        out = scale.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    elif fmt == "bf16":
        out = scale.clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16)
    elif fmt == "e8m0":
        # frexp: s = m * 2**e with m in [0.5, 1); ceil(log2 s) = e - 1 when m == 0.5 exactly, else e.
        mant, exp = torch.frexp(scale)
        e = torch.where(mant == 0.5, exp - 1, exp)
        e = torch.where(scale > 0, e, torch.full_like(e, -127)).clamp(-127, 127)
        out = (e + 127).to(torch.uint8)
    elif fmt == "e4m3":
        out = scale.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        storage_dtype(fmt)  # raises with the list of valid formats
        raise AssertionError("unreachable")
    if bad is not None:  # unconditionally: a Python branch on ``bad.any()`` would be a host sync on a GPU
        nan = {"e8m0": 0xFF, "e4m3": 0x7F}.get(fmt)
        out = out.masked_fill(bad, nan if nan is not None else float("nan"))
    return out


def decode_scales(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 ``[nblocks]`` scales from their wire form (NaN where a block was marked non-finite)."""
    if fmt in ("fp32", "fp16", "bf16"):
        return stored.to(torch.float32)
    if fmt == "e8m0":
        e = stored.to(torch.int32) - 127
        out = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)
        return out.masked_fill(stored == 0xFF, float("nan"))
    if fmt == "e4m3":
        return stored.view(torch.float8_e4m3fn).to(torch.float32)
    storage_dtype(fmt)
    raise AssertionError("unreachable")


def quantize_scales(
    ideal: torch.Tensor, fmt: str, bad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ideal scales for the wire and return ``(stored, decoded_fp32)``: quantizers use the decoded value."""
    stored = encode_scales(ideal, fmt, bad)
    return stored, decode_scales(stored, fmt)


def safe_reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` in fp32, 0 where the scale is 0 (all-zero block: every code becomes 0, no NaN)."""
    inv = torch.reciprocal(scale)
    return torch.where(scale == 0, torch.zeros_like(inv), inv)


# ------------------------------------------------------------------------------------- second-level exponents

#: Values per super-block (one int16 exponent each) for block sizes dividing it; else ``lcm(block, 4096)``.
SUPER_VALUES = 4096
#: Largest finite stored value of the scale formats whose range needs the top-binade rule.
NARROW_FORMAT_MAX = {"fp16": FP16_MAX, "e4m3": E4M3_MAX}
#: Wide formats keep ``k = 0`` while the super-block maximum lies in ``[2^-WIDE_WINDOW, 2^WIDE_WINDOW)``.
WIDE_WINDOW = 64
#: Exponents applied by :func:`pow2_mul` are clamped to this range (beyond it every fp32 result is 0 or Inf).
POW2_MIN, POW2_MAX = -252, 254


def super_values(block: int) -> int:
    """Values per super-block for quantization blocks of ``block`` values: ``lcm(block, 4096)``."""
    return math.lcm(int(block), SUPER_VALUES)


def range_limit(scale_fmt: str, element_max: float, tensor_scale: bool = False) -> float | None:
    """``limit`` of the top-binade rule (see the module docstring): the largest ``amax`` a super-block may have
    after normalization, ``element_max * format max``, or None for wide formats (the window rule)."""
    if tensor_scale or scale_fmt not in NARROW_FORMAT_MAX:
        return None
    limit = float(element_max) * NARROW_FORMAT_MAX[scale_fmt]
    assert float(torch.tensor(limit, dtype=torch.float32)) == limit, "limit must be exact in fp32"
    return limit


def choose_exponents(amax: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Super-block exponents ``k`` (int32 ``[nsuper]``) from the super-blocks' fp32 ``amax`` (finite, >= 0).

    ``limit`` set (narrow formats): the smallest ``k`` with ``amax <= limit * 2^k``. None (wide): 0 when
    ``2^-64 <= amax < 2^64``, else ``floor(log2 amax)``. ``amax == 0`` gives 0. Exact (``frexp``), the same
    integer rule as ``kernels/int4_core.h`` (``tpc_range_exponent``).
    """
    amax = amax.to(torch.float32)
    mant, exp = torch.frexp(amax)  # amax = mant * 2^exp, mant in [0.5, 1)
    exp = exp.to(torch.int32)
    if limit is None:
        inside = (amax >= 2.0**-WIDE_WINDOW) & (amax < 2.0**WIDE_WINDOW)
        k = torch.where(inside, torch.zeros_like(exp), exp - 1)
    else:
        lim_mant, lim_exp = math.frexp(limit)
        k = exp - lim_exp + (mant > lim_mant).to(torch.int32)
    return torch.where(amax > 0, k, torch.zeros_like(k))


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^e`` for int32 ``e`` in [-126, 127], built from its bits (exact on every device)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def pow2_factors(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(f1, f2)`` with ``v * f1 * f2`` = ``v * 2^e`` rounded once (see :func:`pow2_mul`)."""
    e = e.to(torch.int32).clamp(POW2_MIN, POW2_MAX)
    big, small = e > 127, e < -126
    f1 = torch.where(big, _pow2(torch.full_like(e, 127)), torch.where(small, _pow2(e + 126), _pow2(e * 0)))
    f2 = torch.where(big, _pow2(e - 127), torch.where(small, _pow2(torch.full_like(e, -126)), _pow2(e)))
    return f1, f2


def pow2_mul(v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``v * 2^e`` (fp32; ``e`` int, broadcast against ``v``), rounded once: the exponent is applied in two exact
    fp32 steps ``(v * f1) * f2`` where it leaves the range of one fp32 power of two (``e > 127``: ``2^127`` then
    ``2^(e-127)``; ``e < -126``: ``2^(e+126)`` then ``2^-126``, so only the last product can leave the normal
    range). Every backend (``kernels/``) computes these two products. ``e`` is clamped to [-252, 254]."""
    f1, f2 = pow2_factors(e)
    return v * f1 * f2


def expand_super(k: torch.Tensor, blocks_per_super: int, nblocks: int) -> torch.Tensor:
    """Per-super-block values ``[nsuper]`` repeated for each of the ``nblocks`` blocks: ``[nblocks]``."""
    return k.repeat_interleave(blocks_per_super)[:nblocks]


def super_amax(block_amax: torch.Tensor, blocks_per_super: int) -> torch.Tensor:
    """fp32 ``[nsuper]``: the largest of each super-block's block maxima (``[nblocks]``, finite, >= 0)."""
    nb = block_amax.numel()
    pad = (-nb) % blocks_per_super
    padded = torch.nn.functional.pad(block_amax.to(torch.float32), (0, pad))
    return padded.view(-1, blocks_per_super).amax(dim=1) if padded.numel() else padded
