"""The ``triton`` backend: fused Triton codecs for ``int<N>:g<G>`` (N in 4..8, G in 32/64/128, fp16 or e4m3
scales), ``fp8`` (e4m3/e5m2), ``nvfp4``, ``mxfp4`` and ``fp3``-``fp6`` (blocks of 16..256, any scale format), each
plain, with ``+had`` and/or with ``+chscale``.

This module holds the public entry points (:func:`supports`, :func:`encode`, :func:`decode_sum`, which split a codec
into ``+chscale`` / ``+had`` / inner block codec) and the integer kernels; the float formats' kernels are in
``triton_float.py`` and the bit-exact helpers both use in ``triton_common.py``. ``+chscale`` is folded into the
kernels: the encode multiplies each loaded value by ``2^e_c`` of its channel (``flat index % h``) before anything
else, the decode-sum clamps each payload to fp32's range (the inner decode-sum's ``float32`` output), multiplies
the fp32 sum by ``2^-e_c`` and clamps to the output dtype (``chscale.py``); both exact powers of two.

One program handles one super-block of 4096 values (``scales.py``, "Second level"; ``lcm(G, 4096) = 4096`` for
the supported groups), so the super-block exponent is chosen, applied and stored without a second pass.

- encode: load (bf16/fp16/fp32 -> fp32), for ``+had`` the pre-rotation exponent ``j`` and the rotation
  ``fwht(v * signs) * c`` (same butterfly stages, same order as ``hadamard.fwht``), non-finite groups zeroed and
  marked, super-block exponent ``k``, ``y = pow2_mul(v, -k)``, group scale ``amax / qmax`` (IEEE ``div_rn``),
  scale rounding (fp16: the hardware cast, round to nearest even; e4m3: integer bit operations, because
  Triton's interpreter rounds float8 casts wrongly), ``q = rint(y * (1 / s))`` clamped, codes packed 8 at a
  time into ``N`` bytes (``bitpack.py``'s bit order), scales, NaN marks and ``k (+ j)`` stored at the
  reference layout's offsets.
- decode-sum: per payload in rank order unpack, ``(code - zero) * s``, ``pow2_mul`` by the exponent, and for the
  plain codec clamp to the output dtype and add in fp32; for ``+had`` shift by ``k_r - K`` (``K = max_r k_r``),
  add, rotate back once, ``pow2_mul`` by ``K``, clamp. Cast once to the output dtype.

Bit-exactness rules (what the interpreter tests pin): every division is ``tl.math.div_rn``; rounding to an integer
is ``(t + 2^23) - 2^23`` on ``|t| < 2^22`` (round half to even in fp32); powers of two are built from their bits;
kernels are launched with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA on the GPU.
Inputs in bf16 arrive as their int16 bits and are widened by a shift, and bf16 outputs are rounded on the bits:
Triton's interpreter converts bf16 subnormals wrongly and does not round fp32 -> bf16 to nearest even (on the GPU
the shift and the integer rounding are as cheap as the casts). NaN outputs are NaN (bf16 0x7FC0; their bits are
not part of the contract).
Kernels are created in interpreter mode when ``TRITON_INTERPRET=1`` is set before this module is imported
(:data:`INTERPRETED`); then they run on CPU tensors only. tests/backends/test_gpu_check.py compiles them for sm_80
and sm_90 (no GPU needed) and checks the PTX for FMA and approximate division. Imported on first use by
``backends/dispatch.py`` (triton is optional), which routes calls here.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_tpcomp.backends import triton_float
from megatron_tpcomp.backends.triton_common import (
    SCALE_CODES,
    _choose_exponent,
    _clamp,
    _finish_out,
    _load_input,
    _load_scales,
    _postrotate,
    _pow2_mul,
    _prerotate,
    _quantize_scale,
    _rint,
    _store_scales,
)
from megatron_tpcomp.codecs.base import CodecError, numel_of
from megatron_tpcomp.codecs.chscale import ChannelScaleCodec
from megatron_tpcomp.codecs.hadamard import HadamardCodec, rotation_scale, rotation_signs
from megatron_tpcomp.codecs.intx import IntCodec
from megatron_tpcomp.codecs.scales import NARROW_FORMAT_MAX

#: True when the kernels were created by Triton's interpreter (``TRITON_INTERPRET=1`` at import): CPU tensors.
INTERPRETED = bool(triton.knobs.runtime.interpret)
#: Values per program: one super-block.
TILE = 4096
BITS = (4, 5, 6, 8)
GROUPS = (32, 64, 128)
SCALE_FORMATS = ("fp16", "e4m3")
HAD_BLOCKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_OUT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --------------------------------------------------------------------------------------------------- encode


@triton.jit
def _encode_kernel(
    x_ptr,
    payload_ptr,
    signs_ptr,
    up_ptr,
    n,
    h,
    nblocks,
    scales_off,
    exps_off,
    rot_c,
    TILE_: tl.constexpr,
    G: tl.constexpr,
    BITS_: tl.constexpr,
    QMAX: tl.constexpr,
    SFMT: tl.constexpr,
    LIM_MANT_BITS: tl.constexpr,
    LIM_EXP: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    IN_BF16: tl.constexpr,
    CH: tl.constexpr,
):
    pid = tl.program_id(0)
    v = _load_input(x_ptr, up_ptr, pid, n, h, TILE_, IN_BF16, CH)
    j = 0
    if HB > 0:
        v, j = _prerotate(v, signs_ptr, rot_c, TILE_, HB, LOG_HB)
    blocks = tl.reshape(v, [TILE_ // G, G])
    nonfin = ((blocks != blocks) | (tl.abs(blocks) == float("inf"))).to(tl.int32)
    bad = tl.max(nonfin, axis=1) > 0
    blocks = tl.where(bad[:, None], 0.0, blocks)
    k = _choose_exponent(tl.max(tl.max(tl.abs(blocks), axis=1), axis=0), True, LIM_MANT_BITS, LIM_EXP)
    y = _pow2_mul(blocks, -k)
    ideal = tl.math.div_rn(tl.max(tl.abs(y), axis=1), tl.full([TILE_ // G], QMAX, tl.float32))
    stored, s = _quantize_scale(ideal, bad, SFMT)
    # 1 / s only where s != 0 (the interpreter would warn about the division it then discards).
    inv = tl.where(s == 0, 0.0, tl.math.div_rn(tl.full([TILE_ // G], 1.0, tl.float32), tl.where(s == 0, 1.0, s)))
    q = _rint(tl.minimum(tl.maximum(y * inv[:, None], -QMAX), QMAX))
    codes = (q.to(tl.int32) + (QMAX + 1)).to(tl.int64)
    # Pack 8 codes into BITS_ bytes: code i of a unit at bits [i*b, (i+1)*b) of a little-endian word.
    units = tl.reshape(codes, [TILE_ // 8, 8])
    shifts = (tl.arange(0, 8) * BITS_).to(tl.int64)
    word = tl.sum(units << shifts[None, :], axis=1)
    unit_idx = tl.arange(0, TILE_ // 8)
    unit_ok = (pid.to(tl.int64) * (TILE_ // 8) + unit_idx) < nblocks * (G // 8)
    code_base = payload_ptr + pid.to(tl.int64) * (TILE_ // 8 * BITS_) + unit_idx * BITS_
    for i in tl.static_range(BITS_):
        tl.store(code_base + i, ((word >> (8 * i)) & 0xFF).to(tl.uint8), mask=unit_ok)
    gidx = pid.to(tl.int64) * (TILE_ // G) + tl.arange(0, TILE_ // G)
    _store_scales(payload_ptr, scales_off, gidx, stored, gidx < nblocks, SFMT)
    eptr = (payload_ptr + exps_off).to(tl.pointer_type(tl.int16))
    tl.store(eptr + pid, (k + j).to(tl.int16))


# ---------------------------------------------------------------------------------------------- decode-sum


@triton.jit
def _decode_tile(
    payload_ptr,
    pid,
    nblocks,
    scales_off,
    exps_off,
    TILE_: tl.constexpr,
    G: tl.constexpr,
    BITS_: tl.constexpr,
    QMAX: tl.constexpr,
    SFMT: tl.constexpr,
):
    """(fp32 ``[TILE_ // G, G]`` normalized values, int32 ``k``) of super-block ``pid`` of one payload; groups past
    ``nblocks`` (not in the payload) read as zero scales and feed only values that are dropped."""
    unit_idx = tl.arange(0, TILE_ // 8)
    unit_ok = (pid.to(tl.int64) * (TILE_ // 8) + unit_idx) < nblocks * (G // 8)
    code_base = payload_ptr + pid.to(tl.int64) * (TILE_ // 8 * BITS_) + unit_idx * BITS_
    word = tl.zeros([TILE_ // 8], tl.int64)
    for i in tl.static_range(BITS_):
        word = word | (tl.load(code_base + i, mask=unit_ok, other=0).to(tl.int64) << (8 * i))
    shifts = (tl.arange(0, 8) * BITS_).to(tl.int64)
    codes = ((word[:, None] >> shifts[None, :]) & ((1 << BITS_) - 1)).to(tl.int32)
    codes = tl.reshape(codes, [TILE_ // G, G])
    gidx = pid.to(tl.int64) * (TILE_ // G) + tl.arange(0, TILE_ // G)
    s = _load_scales(payload_ptr, scales_off, gidx, gidx < nblocks, SFMT)
    k = tl.load((payload_ptr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32)
    return (codes - (QMAX + 1)).to(tl.float32) * s[:, None], k


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
    exps_off,
    rot_c,
    clamp_max,
    out_max,
    TILE_: tl.constexpr,
    G: tl.constexpr,
    BITS_: tl.constexpr,
    QMAX: tl.constexpr,
    SFMT: tl.constexpr,
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
        vals, k = _decode_tile(payload_ptr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, SFMT)
        acc = _pow2_mul(vals, k - top)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes
            vals, k = _decode_tile(pr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, SFMT)
            acc += _pow2_mul(vals, k - top)
        u = _postrotate(tl.reshape(acc, [TILE_]), signs_ptr, rot_c, TILE_, HB, LOG_HB)
        res = _clamp(_pow2_mul(u, top), clamp_max)
    else:
        vals, k = _decode_tile(payload_ptr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, SFMT)
        acc = _clamp(_pow2_mul(vals, k), clamp_max)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes
            vals, k = _decode_tile(pr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, SFMT)
            acc += _clamp(_pow2_mul(vals, k), clamp_max)
        res = tl.reshape(acc, [TILE_])
    _finish_out(out_ptr, down_ptr, res, pid, n, h, out_max, TILE_, OUT, CH)


# ------------------------------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class Plan:
    """How the kernels run a codec: the ``+chscale`` wrapper (or None), the ``+had`` wrapper (or None) and the
    innermost block codec (IntCodec: the kernels above; Fp8Codec/MinifloatCodec: ``triton_float.py``)."""

    chscale: ChannelScaleCodec | None
    had: HadamardCodec | None
    inner: object


def _int_ok(inner: object) -> bool:
    return (
        type(inner) is IntCodec
        and inner.bits in BITS
        and inner.group in GROUPS
        and not inner.asym
        and inner.scale_fmt in SCALE_FORMATS
    )


def _split(codec: object) -> Plan | None:
    """The :class:`Plan` of ``codec`` when the kernels implement it, else None."""
    ch = codec if type(codec) is ChannelScaleCodec else None
    rest = ch.inner if ch is not None else codec
    had = rest if type(rest) is HadamardCodec else None
    inner = had.inner if had is not None else rest
    if had is not None and had.block not in HAD_BLOCKS:
        return None
    if not (_int_ok(inner) or triton_float.supports_inner(inner)):
        return None
    return Plan(ch, had, inner)


def supports(codec: object) -> bool:
    """True when these kernels implement ``codec`` (:data:`SUPPORTED`, plain, ``+had`` and/or ``+chscale``)."""
    return _split(codec) is not None


#: What the kernels implement, in words (the CodecError and the dispatch's reason quote it).
SUPPORTED = (
    f"int<N>:g<G> (N in {'/'.join(map(str, BITS))}, G in {'/'.join(map(str, GROUPS))}, symmetric, fp16 or e4m3 "
    f"scales), fp8-e4m3/fp8-e5m2 and the minifloats (nvfp4, mxfp4, fp3-fp6) with blocks of "
    f"{'/'.join(map(str, triton_float.BLOCKS))} and any scale format; each optionally +had:b<H> (H <= 4096) "
    "and +chscale"
)


def _plan(codec: object) -> Plan:
    plan = _split(codec)
    if plan is None:
        raise CodecError(f"no Triton kernel for {getattr(codec, 'spec', codec)!r}; expected {SUPPORTED}")
    return plan


def _constexprs(inner: IntCodec, had: HadamardCodec | None) -> dict:
    """The integer kernels' constexprs (a fresh dict: the callers pop what their kernel does not take)."""
    return dict(_int_constexprs(inner, had))


@functools.lru_cache(maxsize=64)
def _int_constexprs(inner: IntCodec, had: HadamardCodec | None) -> dict:
    # Cached: the limit's mantissa bits come from a tensor, not to be created on every codec call.
    lim_mant, lim_exp = math.frexp(inner.qmax * NARROW_FORMAT_MAX[inner.scale_fmt])
    # The fp32 mantissa bits of lim_mant (exact in fp32), read without a tensor: this runs on every launch.
    lim_mant_bits = struct.unpack("<I", struct.pack("<f", lim_mant))[0] & 0x7FFFFF
    hb = had.block if had is not None else 0
    return dict(
        TILE_=TILE,
        G=inner.group,
        BITS_=inner.bits,
        QMAX=inner.qmax,
        SFMT=SCALE_CODES[inner.scale_fmt],
        LIM_MANT_BITS=lim_mant_bits,
        LIM_EXP=lim_exp,
        HB=hb,
        LOG_HB=hb.bit_length() - 1 if hb else 0,
    )


@functools.lru_cache(maxsize=64)
def _signs_on(block: int, seed: int, device: str) -> torch.Tensor:
    # Cached per device: no host-to-device copy per call (and none inside a captured CUDA graph).
    return rotation_signs(block, seed).to(device) if block else torch.ones(1, dtype=torch.float32, device=device)


#: ``hadamard.rotation_scale`` cached: it rounds through a tensor, not to be created on every codec call.
_rotation_scale = functools.lru_cache(maxsize=16)(rotation_scale)


def _signs(had: HadamardCodec | None, device: torch.device) -> tuple[torch.Tensor, float, int]:
    """(fp32 ``[block]`` rotation signs on ``device``, ``c = fp32(1/sqrt(block))``, block); a dummy for plain
    codecs (block 0)."""
    if had is None:
        return _signs_on(0, 0, str(device)), 1.0, 0
    return _signs_on(had.block, had.seed, str(device)), _rotation_scale(had.block), had.block


def _channel_factors(
    ch: ChannelScaleCodec | None, shape: Sequence[int], device: torch.device, down: bool
) -> tuple[torch.Tensor, int] | None:
    """(fp32 ``[h]`` ``2^e_c`` (``down``: ``2^-e_c``) on ``device``, ``h``) of ``+chscale`` (the codec's own cached
    factors), or None; checks ``shape`` against the table as the reference does (one-line CodecError)."""
    if ch is None:
        return None
    ch._rows(shape)
    return ch._factors(device)[1 if down else 0], ch.h


def _launch_opts(device: torch.device) -> dict:
    # No FMA contraction on the GPU: y * inv + 2^23 or acc + v * f must round each operation as the reference does.
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


def encode(codec: object, x: torch.Tensor) -> torch.Tensor:
    """Payload (uint8, 1-D, the codec's ``payload_nbytes(x.shape)``) of bf16/fp16/fp32 ``x`` (any shape), on
    ``x.device``: byte-identical to ``codec.encode(x)``'s torch reference."""
    plan = _plan(codec)
    inner, had = plan.inner, plan.had
    up = _channel_factors(plan.chscale, x.shape, x.device, down=False)
    n = x.numel()
    inner_n = -(-n // had.block) * had.block if had is not None else n
    flat = x.contiguous().view(-1)
    if type(inner) is not IntCodec:
        return triton_float.encode(inner, flat, inner_n, _signs(had, x.device), up, _launch_opts(x.device))
    layout = inner.layout((inner_n,))
    if n == 0:
        return layout.allocate(x.device)
    # The kernel writes every code, scale and exponent byte (one program per super-block = per exponent), so
    # only the alignment padding needs zeroing: no memset pass over the payload.
    payload = layout.allocate_padding_zeroed(x.device)
    nblocks = -(-inner_n // inner.group)
    grid = (-(-inner_n // TILE),)
    signs, c, _ = _signs(had, x.device)
    cx = _constexprs(inner, had)
    cx.pop("TILE_")
    ch, h = up if up is not None else (signs, 1)
    _encode_kernel[grid](
        flat.view(torch.int16) if x.dtype == torch.bfloat16 else flat,
        payload,
        signs,
        ch,
        n,
        h,
        nblocks,
        layout.sections["scales"].offset,
        layout.sections["exps"].offset,
        c,
        TILE_=TILE,
        IN_BF16=x.dtype == torch.bfloat16,
        CH=up is not None,
        **cx,
        **_launch_opts(x.device),
    )
    return payload


def decode_sum(
    codec: object,
    payloads: torch.Tensor,
    count: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the decodes of ``count`` payloads (uint8 ``[count * nbytes]``, checked by the caller) as a contiguous
    ``dtype`` tensor of ``shape`` (or written into ``out``): bit-identical to the torch reference's decode_sum."""
    plan = _plan(codec)
    inner, had = plan.inner, plan.had
    down = _channel_factors(plan.chscale, shape, payloads.device, down=True)
    n = numel_of(shape)
    inner_n = -(-n // had.block) * had.block if had is not None else n
    result = torch.empty(n, dtype=dtype, device=payloads.device) if out is None else out.view(-1)
    opts = _launch_opts(payloads.device)
    if type(inner) is not IntCodec:
        triton_float.decode_sum(
            inner, payloads, count, n, inner_n, result, _signs(had, payloads.device), down, _OUT_CODE[dtype], opts
        )
    elif n:
        layout = inner.layout((inner_n,))
        signs, c, _ = _signs(had, payloads.device)
        cx = _constexprs(inner, had)
        for key in ("LIM_MANT_BITS", "LIM_EXP", "TILE_"):
            cx.pop(key)
        out_max = float(torch.finfo(dtype).max)
        ch, h = down if down is not None else (signs, 1)
        _decode_sum_kernel[(-(-inner_n // TILE),)](
            payloads,
            result,
            signs,
            ch,
            count,
            layout.nbytes,
            n,
            h,
            -(-inner_n // inner.group),
            layout.sections["scales"].offset,
            layout.sections["exps"].offset,
            c,
            # +chscale: the inner decode-sum clamps to fp32's range, the dtype's after the channel scaling
            float(torch.finfo(torch.float32).max) if down is not None else out_max,
            out_max,
            TILE_=TILE,
            OUT=_OUT_CODE[dtype],
            CH=down is not None,
            **cx,
            **opts,
        )
    return result.view(tuple(shape)) if out is None else out.view(tuple(shape))
