"""Fused Triton codecs for the float block formats: ``fp8`` (E4M3/E5M2 codes) and the block minifloats (``nvfp4``
with its two-level tensor scale, ``mxfp4``, ``fp3``-``fp6``), every scale format (fp32, fp16, bf16, e8m0, e4m3),
plain, ``+had`` and/or ``+chscale``; byte-identical encodes and bit-identical decodes to ``codecs/fp8.py`` and
``codecs/microscaling.py``. Called by ``backends/triton.py`` (its ``encode`` / ``decode_sum`` route here).

One program handles one super-block of 4096 values (block sizes dividing 4096), as the integer kernels do:

- encode: load (bf16 on the bits), ``+chscale`` factor ``2^e_c``, ``+had`` pre-normalization and rotation (values
  past the rotated length set to +0, the reference's padding of the last block), NaN/Inf blocks zeroed and marked,
  super-block exponent ``k`` (narrow rule for fp16/e4m3 scales without a tensor scale, else the wide window),
  ``y = pow2_mul(v, -k)``; ideal scale ``div_rn(amax, emax)`` (capped; nvfp4: ``div_rn(., t)``), scale rounding
  per format on the bits (``triton_common._quantize_scale``), ``inv = div_rn(1, s)`` (0 for a zero or NaN scale),
  ``v = y * inv``, element code: ``e = max(floor(log2 |v|), min_exp)`` from the exponent bits, ``code = ((e -
  min_exp) << m) + rint(|v| * 2^(m - e))`` (round half to even: for fp8 exactly torch's E4M3/E5M2 cast on
  ``clamp(v, -fmax, fmax)``, sign bit copied from ``v`` so ``-0`` is 0x80; for minifloats the reference's
  ``_codes``, saturating at ``emax``, a negative value rounding to 0 is +0), codes packed 8 at a time into
  ``bits`` bytes (1 byte per code for fp8).
- nvfp4's tensor scale ``t = amax_tensor / (6 * 448)`` (clamped to ``[2^-117, cap]``; 1 for an all-zero message)
  needs the whole message's amax before any block scale: a first kernel (:func:`_amax_kernel`) forms each
  super-block's normalized ``amax`` and ``atomic_max``-es its fp32 bits (non-negative floats order as integers, so
  the maximum is exact and independent of the order) into a one-int32 device buffer; the encode kernel reads it,
  every program computes ``t`` alike, program 0 stores it. Two launches on one stream, no host sync
  (graph-capturable).
- decode-sum: per payload in rank order the codes' values (from the bits; E4M3 0x7F NaN, E5M2 Inf/NaN) times the
  decoded scale (nvfp4: ``scale * t`` of that payload), ``pow2_mul`` by ``k``, clamped and added in fp32 (``+had``:
  shifted by ``k_r - K``, added, rotated back once, ``pow2_mul`` by ``K``); ``+chscale`` multiplies the fp32 sum by
  ``2^-e_c`` and clamps to the output dtype (``chscale.py``); one cast to the output dtype (bf16 on the bits).

Pinned operations (what the interpreter tests compare bit for bit): every division is ``tl.math.div_rn``; rounding
to an integer is ``(t + 2^23) - 2^23``; E4M3/E5M2/E2M1 codes and E4M3/bf16/e8m0 scales are rounded with integer
bit operations (the interpreter's float8 casts round wrongly); the fp16 scale is the hardware cast (round to
nearest even in both); powers of two are built from their bits; no FMA (``enable_fp_fusion=False``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from megatron_tpcomp.backends.triton_common import (
    SCALE_CODES,
    _choose_exponent,
    _clamp,
    _finish_out,
    _load_input,
    _load_scales,
    _postrotate,
    _pow2,
    _pow2_mul,
    _prerotate,
    _quantize_scale,
    _rint,
    _store_scales,
)
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.codecs.microscaling import MIN_TENSOR_SCALE, MinifloatCodec
from megatron_tpcomp.codecs.scales import E4M3_MAX, NARROW_FORMAT_MAX

TILE = 4096
#: Block sizes the float kernels take (they divide the 4096-value super-block).
BLOCKS = (16, 32, 64, 128, 256)
#: Element format ids of the ``FP8`` constexpr: minifloat (saturating, no NaN), E4M3fn, E5M2.
_FP8_KIND = {(4, 3): 1, (5, 2): 2}


def supports_inner(inner: object) -> bool:
    """True for an Fp8Codec or MinifloatCodec (not a subclass) with a block size in :data:`BLOCKS`."""
    return type(inner) in (Fp8Codec, MinifloatCodec) and inner.block in BLOCKS


# ------------------------------------------------------------------------------------------------ jit helpers


@triton.jit
def _float_code(mag, MAN: tl.constexpr, MIN_EXP: tl.constexpr):
    """Magnitude code (int32) of the float grid with ``MAN`` mantissa bits and smallest normal exponent
    ``MIN_EXP`` nearest to fp32 ``mag`` (>= 0, at most the largest value), ties to the even code."""
    e = tl.maximum(((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, MIN_EXP)
    k = _rint(mag * _pow2(MAN - e))  # exact power-of-two scaling to [2^m, 2^(m+1)] (or below, subnormal)
    return ((e - MIN_EXP) << MAN) + k.to(tl.int32)


@triton.jit
def _float_value(c, EXP: tl.constexpr, MAN: tl.constexpr, MIN_EXP: tl.constexpr, FP8: tl.constexpr):
    """fp32 value of element codes ``c`` (int32, sign in bit ``EXP + MAN``); E4M3fn 0x7F is NaN, E5M2's top
    exponent field is Inf (mantissa 0) or NaN."""
    sign_bit: tl.constexpr = 1 << (EXP + MAN)
    mc = c & (sign_bit - 1)
    field = mc >> MAN
    mant = mc & ((1 << MAN) - 1)
    sub = mant.to(tl.float32) * _pow2(field * 0 + (MIN_EXP - MAN))
    norm = (((field + (MIN_EXP + 126)) << 23) | (mant << (23 - MAN))).to(tl.float32, bitcast=True)
    mag = tl.where(field == 0, sub, norm)
    if FP8 == 1:
        mag = tl.where(mc == 0x7F, float("nan"), mag)
    elif FP8 == 2:
        mag = tl.where(field == 31, tl.where(mant == 0, float("inf"), float("nan")), mag)
    return tl.where((c & sign_bit) != 0, -mag, mag)


@triton.jit
def _normalized(
    x_ptr,
    up_ptr,
    signs_ptr,
    pid,
    n,
    n_inner,
    h,
    rot_c,
    TILE_: tl.constexpr,
    B: tl.constexpr,
    NARROW: tl.constexpr,
    LIM_MANT_BITS: tl.constexpr,
    LIM_EXP: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    IN_BF16: tl.constexpr,
    CH: tl.constexpr,
):
    """(normalized fp32 blocks ``y`` ``[TILE_ // B, B]``, NaN marks ``[TILE_ // B]``, stored exponent ``k + j``) of
    super-block ``pid``: ``BlockCodec._encode_blocks`` up to the quantizer."""
    v = _load_input(x_ptr, up_ptr, pid, n, h, TILE_, IN_BF16, CH)
    j = 0
    if HB > 0:
        v, j = _prerotate(v, signs_ptr, rot_c, TILE_, HB, LOG_HB)
        # Past the rotated values the reference pads the inner codec's last block with +0 (a rotated zero
        # block here may hold -0, whose fp8 code differs).
        v = tl.where(pid.to(tl.int64) * TILE_ + tl.arange(0, TILE_) < n_inner, v, 0.0)
    blocks = tl.reshape(v, [TILE_ // B, B])
    nonfin = ((blocks != blocks) | (tl.abs(blocks) == float("inf"))).to(tl.int32)
    bad = tl.max(nonfin, axis=1) > 0
    blocks = tl.where(bad[:, None], 0.0, blocks)
    k = _choose_exponent(tl.max(tl.max(tl.abs(blocks), axis=1), axis=0), NARROW, LIM_MANT_BITS, LIM_EXP)
    return _pow2_mul(blocks, -k), bad, k + j


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _amax_kernel(
    x_ptr,
    up_ptr,
    signs_ptr,
    tmax_ptr,
    n,
    n_inner,
    h,
    rot_c,
    TILE_: tl.constexpr,
    B: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    IN_BF16: tl.constexpr,
    CH: tl.constexpr,
):
    """nvfp4's first pass: ``tmax = max |y|`` over every block (int32 fp32 bits at ``tmax_ptr``, zeroed before)."""
    pid = tl.program_id(0)
    y, bad, k = _normalized(
        x_ptr, up_ptr, signs_ptr, pid, n, n_inner, h, rot_c, TILE_, B, False, 0, 0, HB, LOG_HB, IN_BF16, CH
    )
    top = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
    tl.atomic_max(tmax_ptr, top.to(tl.int32, bitcast=True))


@triton.jit
def _encode_kernel(
    x_ptr,
    payload_ptr,
    signs_ptr,
    up_ptr,
    tmax_ptr,
    n,
    n_inner,
    h,
    nblocks,
    scales_off,
    tscale_off,
    exps_off,
    rot_c,
    cap,
    tcap,
    TILE_: tl.constexpr,
    B: tl.constexpr,
    BITS_: tl.constexpr,
    EXP: tl.constexpr,
    MAN: tl.constexpr,
    MIN_EXP: tl.constexpr,
    EMAX: tl.constexpr,
    FP8: tl.constexpr,
    SFMT: tl.constexpr,
    NARROW: tl.constexpr,
    LIM_MANT_BITS: tl.constexpr,
    LIM_EXP: tl.constexpr,
    TSCALE: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    IN_BF16: tl.constexpr,
    CH: tl.constexpr,
):
    pid = tl.program_id(0)
    y, bad, kj = _normalized(
        x_ptr,
        up_ptr,
        signs_ptr,
        pid,
        n,
        n_inner,
        h,
        rot_c,
        TILE_,
        B,
        NARROW,
        LIM_MANT_BITS,
        LIM_EXP,
        HB,
        LOG_HB,
        IN_BF16,
        CH,
    )
    ideal = tl.math.div_rn(tl.max(tl.abs(y), axis=1), tl.full([TILE_ // B], EMAX, tl.float32))
    if TSCALE:
        tmax = tl.load(tmax_ptr).to(tl.float32, bitcast=True)
        t = tl.math.div_rn(tmax, tmax * 0.0 + EMAX * 448.0)
        t = tl.minimum(tl.maximum(t, 6.018531076210112e-36), tcap)  # [2^-117, cap]
        t = tl.where(tmax > 0, t, 1.0)
        ideal = tl.math.div_rn(ideal, tl.full([TILE_ // B], 1.0, tl.float32) * t)
        tl.store((payload_ptr + tscale_off).to(tl.pointer_type(tl.float32)), t, mask=pid == 0)
    else:
        ideal = tl.minimum(ideal, cap)
    stored, s = _quantize_scale(ideal, bad, SFMT)
    if TSCALE:
        s = s * t
    # 1 / s only where s != 0 (the interpreter would warn about the division it then discards).
    inv = tl.where(s == 0, 0.0, tl.math.div_rn(tl.full([TILE_ // B], 1.0, tl.float32), tl.where(s == 0, 1.0, s)))
    v = y * inv[:, None]
    if FP8 > 0:
        c = tl.minimum(tl.maximum(v, -EMAX), EMAX)
        code = _float_code(tl.abs(c), MAN, MIN_EXP) | ((c.to(tl.int32, bitcast=True) >> 24) & 0x80)
    else:
        code = _float_code(tl.minimum(tl.abs(v), EMAX), MAN, MIN_EXP)
        code = code | tl.where((v < 0) & (code > 0), 1 << (BITS_ - 1), 0)  # -0 encodes as +0
    if BITS_ == 8:
        idx = pid.to(tl.int64) * TILE_ + tl.arange(0, TILE_)
        tl.store(payload_ptr + idx, tl.reshape(code, [TILE_]).to(tl.uint8), mask=idx < nblocks * B)
    else:
        # 8 codes into BITS_ bytes: code i of a unit at bits [i*b, (i+1)*b) of a little-endian word (bitpack.py).
        units = tl.reshape(code.to(tl.int64), [TILE_ // 8, 8])
        word = tl.sum(units << (tl.arange(0, 8) * BITS_).to(tl.int64)[None, :], axis=1)
        unit_idx = tl.arange(0, TILE_ // 8)
        unit_ok = (pid.to(tl.int64) * (TILE_ // 8) + unit_idx) < nblocks * (B // 8)
        code_base = payload_ptr + pid.to(tl.int64) * (TILE_ // 8 * BITS_) + unit_idx * BITS_
        for i in tl.static_range(BITS_):
            tl.store(code_base + i, ((word >> (8 * i)) & 0xFF).to(tl.uint8), mask=unit_ok)
    gidx = pid.to(tl.int64) * (TILE_ // B) + tl.arange(0, TILE_ // B)
    _store_scales(payload_ptr, scales_off, gidx, stored, gidx < nblocks, SFMT)
    tl.store((payload_ptr + exps_off).to(tl.pointer_type(tl.int16)) + pid, kj.to(tl.int16))


@triton.jit
def _decode_tile(
    payload_ptr,
    pid,
    nblocks,
    scales_off,
    tscale_off,
    exps_off,
    TILE_: tl.constexpr,
    B: tl.constexpr,
    BITS_: tl.constexpr,
    EXP: tl.constexpr,
    MAN: tl.constexpr,
    MIN_EXP: tl.constexpr,
    FP8: tl.constexpr,
    SFMT: tl.constexpr,
    TSCALE: tl.constexpr,
):
    """(fp32 ``[TILE_ // B, B]`` values in the normalized domain, int32 ``k``) of super-block ``pid`` of one
    payload; blocks past ``nblocks`` read as zero codes and scales (their values are dropped)."""
    if BITS_ == 8:
        idx = pid.to(tl.int64) * TILE_ + tl.arange(0, TILE_)
        codes = tl.load(payload_ptr + idx, mask=idx < nblocks * B, other=0).to(tl.int32)
    else:
        unit_idx = tl.arange(0, TILE_ // 8)
        unit_ok = (pid.to(tl.int64) * (TILE_ // 8) + unit_idx) < nblocks * (B // 8)
        code_base = payload_ptr + pid.to(tl.int64) * (TILE_ // 8 * BITS_) + unit_idx * BITS_
        word = tl.zeros([TILE_ // 8], tl.int64)
        for i in tl.static_range(BITS_):
            word = word | (tl.load(code_base + i, mask=unit_ok, other=0).to(tl.int64) << (8 * i))
        shifts = (tl.arange(0, 8) * BITS_).to(tl.int64)
        codes = ((word[:, None] >> shifts[None, :]) & ((1 << BITS_) - 1)).to(tl.int32)
    vals = _float_value(tl.reshape(codes, [TILE_ // B, B]), EXP, MAN, MIN_EXP, FP8)
    gidx = pid.to(tl.int64) * (TILE_ // B) + tl.arange(0, TILE_ // B)
    s = _load_scales(payload_ptr, scales_off, gidx, gidx < nblocks, SFMT)
    if TSCALE:
        s = s * tl.load((payload_ptr + tscale_off).to(tl.pointer_type(tl.float32)))  # the encoder's fp32 product
    k = tl.load((payload_ptr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32)
    return vals * s[:, None], k


@triton.jit
def _decode_sum_kernel(
    payload_ptr,
    out_ptr,
    signs_ptr,
    down_ptr,
    count,
    nbytes,
    n,
    h,
    nblocks,
    scales_off,
    tscale_off,
    exps_off,
    rot_c,
    clamp_max,
    out_max,
    TILE_: tl.constexpr,
    B: tl.constexpr,
    BITS_: tl.constexpr,
    EXP: tl.constexpr,
    MAN: tl.constexpr,
    MIN_EXP: tl.constexpr,
    FP8: tl.constexpr,
    SFMT: tl.constexpr,
    TSCALE: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    OUT: tl.constexpr,
    CH: tl.constexpr,
):
    pid = tl.program_id(0)
    if HB > 0:
        top = tl.load((payload_ptr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes  # pointer steps: no int32 overflow of r * nbytes
            top = tl.maximum(top, tl.load((pr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32))
        vals, k = _decode_tile(
            payload_ptr, pid, nblocks, scales_off, tscale_off, exps_off, TILE_, B, BITS_, EXP, MAN, MIN_EXP, FP8,
            SFMT, TSCALE,
        )  # fmt: skip
        acc = _pow2_mul(vals, k - top)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes
            vals, k = _decode_tile(
                pr, pid, nblocks, scales_off, tscale_off, exps_off, TILE_, B, BITS_, EXP, MAN, MIN_EXP, FP8, SFMT,
                TSCALE,
            )  # fmt: skip
            acc += _pow2_mul(vals, k - top)
        u = _postrotate(tl.reshape(acc, [TILE_]), signs_ptr, rot_c, TILE_, HB, LOG_HB)
        res = _clamp(_pow2_mul(u, top), clamp_max)
    else:
        vals, k = _decode_tile(
            payload_ptr, pid, nblocks, scales_off, tscale_off, exps_off, TILE_, B, BITS_, EXP, MAN, MIN_EXP, FP8,
            SFMT, TSCALE,
        )  # fmt: skip
        acc = _clamp(_pow2_mul(vals, k), clamp_max)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes
            vals, k = _decode_tile(
                pr, pid, nblocks, scales_off, tscale_off, exps_off, TILE_, B, BITS_, EXP, MAN, MIN_EXP, FP8, SFMT,
                TSCALE,
            )  # fmt: skip
            acc += _clamp(_pow2_mul(vals, k), clamp_max)
        res = tl.reshape(acc, [TILE_])
    _finish_out(out_ptr, down_ptr, res, pid, n, h, out_max, TILE_, OUT, CH)


# ------------------------------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=8)
def _dummy_int32(device: str) -> torch.Tensor:
    # The encode kernel's tmax_ptr where no tensor scale is read: no allocation or memset per call.
    return torch.zeros(1, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _fp32(value: float) -> float:
    """``value`` rounded to fp32 (as torch's clamp rounds a Python bound for an fp32 tensor); cached: no tensor is
    created per codec call."""
    return float(torch.tensor(value, dtype=torch.float32))


def constexprs(inner: Fp8Codec | MinifloatCodec) -> dict:
    """The format's constexprs, shared by encode and decode-sum (encode-only ones included); a fresh dict."""
    return dict(_constexprs(inner))


@functools.lru_cache(maxsize=64)
def _constexprs(inner: Fp8Codec | MinifloatCodec) -> dict:
    fp8 = type(inner) is Fp8Codec
    emax = inner.fmax if fp8 else inner.emax
    tscale = (not fp8) and inner.tensor_scale
    narrow = not tscale and inner.scale_fmt in NARROW_FORMAT_MAX
    lim_mant_bits = lim_exp = 0
    if narrow:
        lim_mant, lim_exp = math.frexp(emax * NARROW_FORMAT_MAX[inner.scale_fmt])
        lim_mant_bits = int(torch.tensor(lim_mant, dtype=torch.float32).view(torch.int32)) & 0x7FFFFF
    return dict(
        B=inner.block,
        BITS_=8 if fp8 else inner.bits,
        EXP=inner.exp_bits,
        MAN=inner.man_bits,
        MIN_EXP=inner.min_exp,
        EMAX=float(emax),
        FP8=_FP8_KIND[(inner.exp_bits, inner.man_bits)] if fp8 else 0,
        SFMT=SCALE_CODES[inner.scale_fmt],
        NARROW=narrow,
        LIM_MANT_BITS=lim_mant_bits,
        LIM_EXP=lim_exp,
        TSCALE=tscale,
    )


#: Constexprs only the encode kernel takes.
ENCODE_ONLY = ("EMAX", "NARROW", "LIM_MANT_BITS", "LIM_EXP")


def encode(
    inner: Fp8Codec | MinifloatCodec,
    x: torch.Tensor,
    n_inner: int,
    had: tuple[torch.Tensor, float, int],
    up: tuple[torch.Tensor, int] | None,
    opts: dict,
) -> torch.Tensor:
    """Payload of ``inner`` for flat ``x`` (``n`` values; ``n_inner >= n`` after ``+had``'s padding).

    Args:
        had: (fp32 rotation signs ``[HB]`` on ``x.device``, ``c``, ``HB``; 0 for no rotation).
        up: (fp32 ``[h]`` ``+chscale`` factors ``2^e_c`` on ``x.device``, ``h``) or None.
        opts: launch options (``enable_fp_fusion=False`` on the GPU).
    """
    layout = inner.layout((n_inner,))
    n = x.numel()
    if n == 0:
        payload = layout.allocate(x.device)
        inner._init_payload(payload, layout)
        return payload
    payload = layout.allocate_padding_zeroed(x.device)
    signs, c, hb = had
    cx = constexprs(inner)
    nblocks = -(-n_inner // inner.block)
    grid = (-(-n_inner // TILE),)
    in_bf16 = x.dtype == torch.bfloat16
    flat = x.view(torch.int16) if in_bf16 else x
    ch, h = (up[0], up[1]) if up is not None else (signs, 1)
    common = dict(TILE_=TILE, HB=hb, LOG_HB=hb.bit_length() - 1 if hb else 0, IN_BF16=in_bf16, CH=up is not None)
    # nvfp4's message amax (fp32 bits, zeroed: one small memset per encode); other formats get a cached dummy.
    tmax = torch.zeros(1, dtype=torch.int32, device=x.device) if cx["TSCALE"] else _dummy_int32(str(x.device))
    if cx["TSCALE"]:
        _amax_kernel[grid](flat, ch, signs, tmax, n, n_inner, h, c, B=inner.block, **common, **opts)
    tscale_off = layout.sections["tensor_scale"].offset if cx["TSCALE"] else 0
    cap = _fp32(inner.scale_cap)
    tcap = _fp32(inner.tensor_scale_cap) if cx["TSCALE"] else 0.0
    _encode_kernel[grid](
        flat,
        payload,
        signs,
        ch,
        tmax,
        n,
        n_inner,
        h,
        nblocks,
        layout.sections["scales"].offset,
        tscale_off,
        layout.sections["exps"].offset,
        c,
        cap,
        tcap,
        **cx,
        **common,
        **opts,
    )
    return payload


def decode_sum(
    inner: Fp8Codec | MinifloatCodec,
    payloads: torch.Tensor,
    count: int,
    n: int,
    n_inner: int,
    result: torch.Tensor,
    had: tuple[torch.Tensor, float, int],
    down: tuple[torch.Tensor, int] | None,
    out_code: int,
    opts: dict,
) -> None:
    """Write the decode-sum of ``count`` payloads (``n`` values of ``n_inner``) into flat ``result``."""
    if n == 0:
        return
    layout = inner.layout((n_inner,))
    signs, c, hb = had
    cx = {k: v for k, v in constexprs(inner).items() if k not in ENCODE_ONLY}
    fp32_max = float(torch.finfo(torch.float32).max)
    out_max = float(torch.finfo(result.dtype).max)
    ch, h = (down[0], down[1]) if down is not None else (signs, 1)
    _decode_sum_kernel[(-(-n_inner // TILE),)](
        payloads,
        result,
        signs,
        ch,
        count,
        layout.nbytes,
        n,
        h,
        -(-n_inner // inner.block),
        layout.sections["scales"].offset,
        layout.sections["tensor_scale"].offset if cx["TSCALE"] else 0,
        layout.sections["exps"].offset,
        c,
        fp32_max if down is not None else out_max,
        out_max,
        TILE_=TILE,
        HB=hb,
        LOG_HB=hb.bit_length() - 1 if hb else 0,
        OUT=out_code,
        CH=down is not None,
        **cx,
        **opts,
    )


# The constants the kernels spell out.
assert E4M3_MAX == 448.0 and MIN_TENSOR_SCALE == 2.0**-117
