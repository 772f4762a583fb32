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
"""

from __future__ import annotations

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
    if bad is not None and bool(bad.any()):
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
