"""Bit-exact ``@triton.jit`` helpers shared by the Triton codec kernels (``triton.py``: integers, ``triton_float.py``:
fp8 and block minifloats such as nvfp4).

Every helper computes exactly what the torch reference computes, on the interpreter and on the GPU alike:
powers of two are built from their bits, frexp is done on the bits, rounding to an integer is ``(t + 2^23) - 2^23``
(round half to even in fp32), float8/bf16 conversions are integer bit operations (Triton's interpreter rounds
float8 casts and fp32 -> bf16 wrongly and widens bf16 subnormals wrongly), and divisions are ``tl.math.div_rn``
at the call sites. The kernels are launched with ``enable_fp_fusion=False`` (no FMA contraction).

Scale formats (``codecs/scales.py``) as int codes of the constexpr ``SFMT``: 0 fp32, 1 fp16, 2 bf16, 3 e8m0,
4 e4m3 (:data:`SCALE_CODES`).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Scale format name -> the ``SFMT`` constexpr of :func:`_quantize_scale` / :func:`_load_scales`.
SCALE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "e8m0": 3, "e4m3": 4}


@triton.jit
def _pow2(e):
    """fp32 ``2^e`` for int32 ``e`` in [-126, 127], from its bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_mul(v, e):
    """``scales.pow2_mul``: ``v * f1 * f2`` (two exact steps), ``e`` clamped to [-252, 254]."""
    e = tl.minimum(tl.maximum(e, -252), 254)
    big = e > 127
    small = e < -126
    f1 = tl.where(big, _pow2(e * 0 + 127), tl.where(small, _pow2(e + 126), _pow2(e * 0)))
    f2 = tl.where(big, _pow2(e - 127), tl.where(small, _pow2(e * 0 - 126), _pow2(e)))
    return v * f1 * f2


@triton.jit
def _frexp_exp(a):
    """int32 ``e`` with ``a = m * 2^e``, ``m`` in [0.5, 1), for finite fp32 ``a > 0`` (subnormals included), and
    whether ``m == 0.5`` exactly (``a`` a power of two): frexp on the bits."""
    bits = a.to(tl.int32, bitcast=True)
    sub = ((bits >> 23) & 0xFF) == 0
    # Subnormals: scale by 2^64 (exact) and take 64 off the exponent.
    nbits = tl.where(sub, (a * 18446744073709551616.0).to(tl.int32, bitcast=True), bits)
    exp = ((nbits >> 23) & 0xFF) - 126 - tl.where(sub, 64, 0)
    return exp, (nbits & 0x7FFFFF) == 0, nbits & 0x7FFFFF


@triton.jit
def _choose_exponent(amax, NARROW: tl.constexpr, LIM_MANT_BITS: tl.constexpr, LIM_EXP: tl.constexpr):
    """``scales.choose_exponents`` for one finite fp32 ``amax >= 0`` (int32), frexp done on the bits."""
    exp, _, mant_bits = _frexp_exp(amax)
    if NARROW:
        k = exp - LIM_EXP + (mant_bits > LIM_MANT_BITS).to(tl.int32)
    else:
        inside = (amax >= 5.421010862427522e-20) & (amax < 18446744073709551616.0)
        k = tl.where(inside, 0, exp - 1)
    return tl.where(amax > 0, k, 0)


@triton.jit
def _rint(t):
    """Round half to even for fp32 ``|t| < 2^22`` (the quantized values are clamped to the code range first)."""
    a = tl.abs(t)
    r = (a + 8388608.0) - 8388608.0
    return tl.where(t < 0, -r, r)


@triton.jit
def _e4m3_bits(s):
    """float8 e4m3fn bits (int32) of fp32 ``s`` in [0, 448] (round to nearest even), integer operations only."""
    bits = s.to(tl.int32, bitcast=True)
    # Normal range (s >= 2^-6): round the 23-bit mantissa to 3 bits, rebias the exponent from 127 to 7.
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal = r - ((127 - 7) << 3)
    # Subnormals: multiples of 2^-9; the exact product s * 512 rounded to an integer (8 = the smallest normal).
    subn = _rint(s * 512.0).to(tl.int32)
    return tl.where(s >= 0.015625, normal, subn)


@triton.jit
def _e4m3_value(b):
    """fp32 value of e4m3fn bits ``b`` (int32 0..255); 0x7F/0xFF are NaN."""
    e = (b >> 3) & 0xF
    m = b & 7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True))
    val = tl.where((b & 0x80) != 0, -mag, mag)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), val)


@triton.jit
def _bf16_round_bits(x):
    """bf16 bits (int32, 0..0xFFFF) of fp32 ``x`` rounded to nearest even (finite ``x``; NaN is the caller's)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def _fwht(v, TILE_: tl.constexpr, HB: tl.constexpr, LOG_HB: tl.constexpr):
    """Unnormalized Walsh-Hadamard butterflies of every ``HB`` block of fp32 ``v`` ``[TILE_]``: stage ``h`` maps
    ``(v[j], v[j+h])`` of every ``2h`` chunk to ``(a + b, a - b)``, ``h = 1, 2, 4, ...`` (``hadamard.fwht``)."""
    for stage in tl.static_range(LOG_HB):
        w = tl.reshape(v, [TILE_ // (2 << stage), 2, 1 << stage])  # [chunks of 2h, (a, b), h]
        w = tl.permute(w, [0, 2, 1])
        a, b = tl.split(w)
        w = tl.join(a + b, a - b)
        w = tl.permute(w, [0, 2, 1])
        v = tl.reshape(w, [TILE_])
    return v


@triton.jit
def _load_input(x_ptr, up_ptr, pid, n, h, TILE_: tl.constexpr, IN_BF16: tl.constexpr, CH: tl.constexpr):
    """fp32 ``[TILE_]``: values ``pid * TILE_ ..`` of the flat input (0 past ``n``), times the ``+chscale`` factor
    ``up[i % h]`` (fp32 powers of two, exact unless the product leaves fp32's range, as in the reference) when
    ``CH``. bf16 arrives as its int16 bits: widening is a shift (the interpreter's cast is wrong for subnormals)."""
    idx = pid.to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    raw = tl.load(x_ptr + idx, mask=idx < n, other=0)
    if IN_BF16:
        v = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        v = raw.to(tl.float32)
    if CH:
        v = v * tl.load(up_ptr + idx % h, mask=idx < n, other=1.0)
    return v


@triton.jit
def _prerotate(v, signs_ptr, rot_c, TILE_: tl.constexpr, HB: tl.constexpr, LOG_HB: tl.constexpr):
    """``+had``'s encode side on one super-block ``v`` (fp32 ``[TILE_]``): ``(fwht(v * 2^-j * signs) * c, j)`` with
    ``j`` from the largest finite ``|v|`` (``hadamard._normalized``, the wide rule)."""
    fin = (v == v) & (tl.abs(v) != float("inf"))
    top = tl.max(tl.where(fin, tl.abs(v), 0.0), axis=0)
    j = _choose_exponent(top, False, 0, 0)
    v = _pow2_mul(v, -j)
    signs = tl.load(signs_ptr + tl.arange(0, HB))
    v = tl.reshape(tl.reshape(v, [TILE_ // HB, HB]) * signs[None, :], [TILE_])
    return _fwht(v, TILE_, HB, LOG_HB) * rot_c, j


@triton.jit
def _postrotate(acc, signs_ptr, rot_c, TILE_: tl.constexpr, HB: tl.constexpr, LOG_HB: tl.constexpr):
    """``R^T`` on fp32 ``[TILE_]``: ``fwht(acc) * c * signs`` (``hadamard.unrotate``)."""
    signs = tl.load(signs_ptr + tl.arange(0, HB))
    u = _fwht(acc, TILE_, HB, LOG_HB) * rot_c
    return tl.reshape(tl.reshape(u, [TILE_ // HB, HB]) * signs[None, :], [TILE_])


@triton.jit
def _clamp(v, top):
    """``clamp(v, -top, top)`` keeping NaN (and -0.0)."""
    return tl.where(v > top, top, tl.where(v < -top, -top, v))


@triton.jit
def _finish_out(out_ptr, down_ptr, res, pid, n, h, out_max, TILE_: tl.constexpr, OUT: tl.constexpr, CH: tl.constexpr):
    """Store fp32 ``res`` ``[TILE_]`` (already clamped per payload) as the output dtype (``OUT``: 0 fp32, 1 fp16,
    2 bf16). With ``CH`` (``+chscale``) first times ``down[i % h]`` (exact powers of two) and clamped to the output
    dtype's finite range (``out_max``), as ``ChannelScaleCodec._decode_sum`` does after the inner fp32 sum."""
    idx = pid.to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    if CH:
        res = _clamp(res * tl.load(down_ptr + idx % h, mask=idx < n, other=1.0), out_max)
    if OUT == 1:
        tl.store(out_ptr + idx, res.to(tl.float16), mask=idx < n)
    elif OUT == 2:
        # fp32 -> bf16 round to nearest even on the bits (the interpreter's bf16 cast does not round so);
        # NaN -> 0x7FC0.
        bf = tl.where(res != res, 0x7FC0, _bf16_round_bits(res)).to(tl.int16)
        tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + idx, bf, mask=idx < n)
    else:
        tl.store(out_ptr + idx, res, mask=idx < n)


@triton.jit
def _quantize_scale(ideal, bad, SFMT: tl.constexpr):
    """``scales.quantize_scales`` of fp32 ideal scales ``ideal >= 0`` (finite) with NaN marks ``bad``: (stored bits
    as int32 — fp32 bits, fp16/bf16 bits, or the e8m0/e4m3 byte — and the decoded fp32 scale, 0 where ``bad``:
    what the quantizer's ``nan_to_num`` gives)."""
    if SFMT == 0:  # fp32: tiny positive scales raised to 2^-126 (their reciprocal would overflow)
        sc = tl.where(ideal > 0, tl.maximum(ideal, 1.1754943508222875e-38), ideal)
        stored = tl.where(bad, 0x7FC00000, sc.to(tl.int32, bitcast=True))
        s = sc
    elif SFMT == 1:  # fp16: the cast rounds to nearest even (on the GPU and in the interpreter)
        hv = tl.minimum(tl.maximum(ideal, -65504.0), 65504.0).to(tl.float16)
        stored = tl.where(bad, 0x7E00, hv.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
        s = hv.to(tl.float32)
    elif SFMT == 2:  # bf16: tiny raised to 2^-126, clamped to bf16's max, rounded on the bits
        sc = tl.where(ideal > 0, tl.maximum(ideal, 1.1754943508222875e-38), ideal)
        rb = _bf16_round_bits(tl.minimum(sc, 3.3895313892515355e38))
        stored = tl.where(bad, 0x7FC0, rb)
        s = (rb << 16).to(tl.float32, bitcast=True)
    elif SFMT == 3:  # e8m0: 2^ceil(log2 s), exponent clamped to [-127, 127]; 0xFF = NaN
        exp, pow2, _ = _frexp_exp(tl.where(ideal > 0, ideal, 1.0))
        e = tl.where(pow2, exp - 1, exp)
        e = tl.minimum(tl.maximum(tl.where(ideal > 0, e, -127), -127), 127)
        stored = tl.where(bad, 0xFF, e + 127)
        # 2^-127 (byte 0) is an fp32 subnormal: its bits are 0x400000.
        s = tl.where(e == -127, 0x400000, (e + 127) << 23).to(tl.float32, bitcast=True)
    else:  # e4m3: integer rounding (the interpreter's float8 cast rounds wrongly)
        rb = _e4m3_bits(tl.minimum(tl.maximum(ideal, -448.0), 448.0))
        stored = tl.where(bad, 0x7F, rb)
        s = _e4m3_value(rb)
    return stored, tl.where(bad, 0.0, s)


@triton.jit
def _store_scales(payload_ptr, scales_off, gidx, stored, mask, SFMT: tl.constexpr):
    """Store int32 scale bits from :func:`_quantize_scale` at element ``gidx`` of the scales section."""
    if SFMT == 0:
        tl.store((payload_ptr + scales_off).to(tl.pointer_type(tl.int32)) + gidx, stored, mask=mask)
    elif SFMT == 1 or SFMT == 2:
        tl.store((payload_ptr + scales_off).to(tl.pointer_type(tl.int16)) + gidx, stored.to(tl.int16), mask=mask)
    else:
        tl.store(payload_ptr + scales_off + gidx, stored.to(tl.uint8), mask=mask)


@triton.jit
def _load_scales(payload_ptr, scales_off, gidx, mask, SFMT: tl.constexpr):
    """``scales.decode_scales``: fp32 scales at elements ``gidx`` of the scales section (NaN where marked; 0 where
    ``mask`` is off)."""
    if SFMT == 0:
        s = tl.load((payload_ptr + scales_off).to(tl.pointer_type(tl.float32)) + gidx, mask=mask, other=0.0)
    elif SFMT == 1:
        s = tl.load((payload_ptr + scales_off).to(tl.pointer_type(tl.float16)) + gidx, mask=mask, other=0.0)
        s = s.to(tl.float32)
    elif SFMT == 2:
        b = tl.load((payload_ptr + scales_off).to(tl.pointer_type(tl.int16)) + gidx, mask=mask, other=0)
        s = ((b.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    elif SFMT == 3:
        b = tl.load(payload_ptr + scales_off + gidx, mask=mask, other=0).to(tl.int32)
        s = tl.where(b == 0, 0x400000, b << 23).to(tl.float32, bitcast=True)
        s = tl.where(b == 0xFF, float("nan"), tl.where(mask, s, 0.0))
    else:
        s = _e4m3_value(tl.load(payload_ptr + scales_off + gidx, mask=mask, other=0).to(tl.int32))
    return s
