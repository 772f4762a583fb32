"""The ``triton`` backend: fused Triton codecs for ``int<N>:g<G>`` (N in 4..8, G in 32/64/128, fp16 or e4m3
scales), with and without ``+had``.

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

import torch
import triton
import triton.language as tl

from megatron_tpcomp.codecs.base import CodecError, numel_of
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


# ------------------------------------------------------------------------------------------- bit-exact helpers


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
def _choose_exponent(amax, NARROW: tl.constexpr, LIM_MANT_BITS: tl.constexpr, LIM_EXP: tl.constexpr):
    """``scales.choose_exponents`` for one finite fp32 ``amax >= 0`` (int32), frexp done on the bits."""
    bits = amax.to(tl.int32, bitcast=True)
    efield = (bits >> 23) & 0xFF
    sub = efield == 0
    # Subnormals: scale by 2^64 (exact) and take 64 off the exponent.
    nbits = tl.where(sub, (amax * 18446744073709551616.0).to(tl.int32, bitcast=True), bits)
    exp = ((nbits >> 23) & 0xFF) - 126 - tl.where(sub, 64, 0)  # frexp: amax = mant * 2^exp, mant in [0.5, 1)
    mant_bits = nbits & 0x7FFFFF
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


# --------------------------------------------------------------------------------------------------- encode


@triton.jit
def _encode_kernel(
    x_ptr,
    payload_ptr,
    signs_ptr,
    n,
    nblocks,
    scales_off,
    exps_off,
    rot_c,
    TILE_: tl.constexpr,
    G: tl.constexpr,
    BITS_: tl.constexpr,
    QMAX: tl.constexpr,
    E4M3: tl.constexpr,
    LIM_MANT_BITS: tl.constexpr,
    LIM_EXP: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    IN_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * TILE_
    offs = tl.arange(0, TILE_)
    raw = tl.load(x_ptr + base + offs, mask=base + offs < n, other=0)
    if IN_BF16:
        # bf16 arrives as its int16 bits: widening is a shift (the interpreter's bf16 cast is wrong for subnormals).
        v = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        v = raw.to(tl.float32)
    j = 0
    if HB > 0:
        # Pre-rotation normalization (hadamard._normalized): wide rule on the largest finite |x|.
        fin = (v == v) & (tl.abs(v) != float("inf"))
        top = tl.max(tl.where(fin, tl.abs(v), 0.0), axis=0)
        j = _choose_exponent(top, False, 0, 0)
        v = _pow2_mul(v, -j)
        signs = tl.load(signs_ptr + tl.arange(0, HB))
        v = tl.reshape(tl.reshape(v, [TILE_ // HB, HB]) * signs[None, :], [TILE_])
        v = _fwht(v, TILE_, HB, LOG_HB) * rot_c
    blocks = tl.reshape(v, [TILE_ // G, G])
    nonfin = ((blocks != blocks) | (tl.abs(blocks) == float("inf"))).to(tl.int32)
    bad = tl.max(nonfin, axis=1) > 0
    blocks = tl.where(bad[:, None], 0.0, blocks)
    k = _choose_exponent(tl.max(tl.max(tl.abs(blocks), axis=1), axis=0), True, LIM_MANT_BITS, LIM_EXP)
    y = _pow2_mul(blocks, -k)
    ideal = tl.math.div_rn(tl.max(tl.abs(y), axis=1), tl.full([TILE_ // G], QMAX, tl.float32))
    if E4M3:
        sbits = _e4m3_bits(tl.minimum(tl.maximum(ideal, -448.0), 448.0))
        s = _e4m3_value(sbits)
        stored = tl.where(bad, 0x7F, sbits).to(tl.uint8)
    else:
        h = tl.minimum(tl.maximum(ideal, -65504.0), 65504.0).to(tl.float16)
        s = h.to(tl.float32)
        stored = tl.where(bad, 0x7E00, h.to(tl.int16, bitcast=True).to(tl.int32)).to(tl.int16)
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
    if E4M3:
        tl.store(payload_ptr + scales_off + gidx, stored, mask=gidx < nblocks)
    else:
        sptr = (payload_ptr + scales_off).to(tl.pointer_type(tl.int16))
        tl.store(sptr + gidx, stored, mask=gidx < nblocks)
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
    E4M3: tl.constexpr,
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
    if E4M3:
        s = _e4m3_value(tl.load(payload_ptr + scales_off + gidx, mask=gidx < nblocks, other=0).to(tl.int32))
    else:
        sptr = (payload_ptr + scales_off).to(tl.pointer_type(tl.float16))
        s = tl.load(sptr + gidx, mask=gidx < nblocks, other=0.0).to(tl.float32)
    k = tl.load((payload_ptr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32)
    return (codes - (QMAX + 1)).to(tl.float32) * s[:, None], k


@triton.jit
def _decode_sum_kernel(
    payload_ptr,
    out_ptr,
    signs_ptr,
    count,
    nbytes,
    n,
    nblocks,
    scales_off,
    exps_off,
    rot_c,
    out_max,
    TILE_: tl.constexpr,
    G: tl.constexpr,
    BITS_: tl.constexpr,
    QMAX: tl.constexpr,
    E4M3: tl.constexpr,
    HB: tl.constexpr,
    LOG_HB: tl.constexpr,
    OUT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, TILE_)
    if HB > 0:
        top = tl.load((payload_ptr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes  # pointer steps: no int32 overflow of r * nbytes
            top = tl.maximum(top, tl.load((pr + exps_off).to(tl.pointer_type(tl.int16)) + pid).to(tl.int32))
        vals, k = _decode_tile(payload_ptr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, E4M3)
        acc = _pow2_mul(vals, k - top)
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes
            vals, k = _decode_tile(pr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, E4M3)
            acc += _pow2_mul(vals, k - top)
        signs = tl.load(signs_ptr + tl.arange(0, HB))
        u = _fwht(tl.reshape(acc, [TILE_]), TILE_, HB, LOG_HB) * rot_c
        u = tl.reshape(tl.reshape(u, [TILE_ // HB, HB]) * signs[None, :], [TILE_])
        x = _pow2_mul(u, top)
        res = tl.where(x > out_max, out_max, tl.where(x < -out_max, -out_max, x))
    else:
        vals, k = _decode_tile(payload_ptr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, E4M3)
        v = _pow2_mul(vals, k)
        acc = tl.where(v > out_max, out_max, tl.where(v < -out_max, -out_max, v))
        pr = payload_ptr
        for _r in range(1, count):
            pr += nbytes
            vals, k = _decode_tile(pr, pid, nblocks, scales_off, exps_off, TILE_, G, BITS_, QMAX, E4M3)
            v = _pow2_mul(vals, k)
            acc += tl.where(v > out_max, out_max, tl.where(v < -out_max, -out_max, v))
        res = tl.reshape(acc, [TILE_])
    idx = pid.to(tl.int64) * TILE_ + offs
    if OUT == 1:
        res = res.to(tl.float16)
        tl.store(out_ptr + idx, res, mask=idx < n)
    elif OUT == 2:
        # fp32 -> bf16 round to nearest even on the bits (the interpreter's bf16 cast does not round so);
        # NaN -> 0x7FC0.
        bits = res.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
        bf = tl.where(res != res, 0x7FC0, rounded).to(tl.int16)
        tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + idx, bf, mask=idx < n)
    else:
        tl.store(out_ptr + idx, res, mask=idx < n)


# ------------------------------------------------------------------------------------------------- host side


def _split(codec: object) -> tuple[IntCodec, HadamardCodec | None] | None:
    """(inner IntCodec, HadamardCodec or None) when the kernels implement ``codec``, else None."""
    had = codec if isinstance(codec, HadamardCodec) else None
    inner = had.inner if had is not None else codec
    if type(inner) is not IntCodec:
        return None
    ok = inner.bits in BITS and inner.group in GROUPS and not inner.asym and inner.scale_fmt in SCALE_FORMATS
    if had is not None and had.block not in HAD_BLOCKS:
        return None
    return (inner, had) if ok else None


def supports(codec: object) -> bool:
    """True when these kernels implement ``codec`` (plain or ``+had`` ``int<N>:g<G>`` with fp16/e4m3 scales)."""
    return _split(codec) is not None


def _parts(codec: object) -> tuple[IntCodec, HadamardCodec | None]:
    parts = _split(codec)
    if parts is None:
        raise CodecError(
            f"no Triton kernel for {getattr(codec, 'spec', codec)!r}; expected int<N>:g<G> with N in {BITS}, "
            f"G in {GROUPS}, symmetric, fp16 or e4m3 scales, optionally +had"
        )
    return parts


def _constexprs(inner: IntCodec, had: HadamardCodec | None) -> dict:
    lim_mant, lim_exp = math.frexp(inner.qmax * NARROW_FORMAT_MAX[inner.scale_fmt])
    # The fp32 mantissa bits of lim_mant (exact in fp32), read without a tensor: this runs on every launch.
    lim_mant_bits = struct.unpack("<I", struct.pack("<f", lim_mant))[0] & 0x7FFFFF
    hb = had.block if had is not None else 0
    return dict(
        TILE_=TILE,
        G=inner.group,
        BITS_=inner.bits,
        QMAX=inner.qmax,
        E4M3=inner.scale_fmt == "e4m3",
        LIM_MANT_BITS=lim_mant_bits,
        LIM_EXP=lim_exp,
        HB=hb,
        LOG_HB=hb.bit_length() - 1 if hb else 0,
    )


@functools.lru_cache(maxsize=64)
def _signs_on(block: int, seed: int, device: str) -> torch.Tensor:
    # Cached per device: no host-to-device copy per call (and none inside a captured CUDA graph).
    return rotation_signs(block, seed).to(device) if block else torch.ones(1, dtype=torch.float32, device=device)


def _signs(had: HadamardCodec | None, device: torch.device) -> tuple[torch.Tensor, float]:
    """(fp32 ``[block]`` rotation signs on ``device``, ``c = fp32(1/sqrt(block))``); a dummy for plain codecs."""
    if had is None:
        return _signs_on(0, 0, str(device)), 1.0
    return _signs_on(had.block, had.seed, str(device)), rotation_scale(had.block)


def _launch_opts(device: torch.device) -> dict:
    # No FMA contraction on the GPU: y * inv + 2^23 or acc + v * f must round each operation as the reference does.
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


def encode(codec: object, x: torch.Tensor) -> torch.Tensor:
    """Payload (uint8, 1-D, the codec's ``payload_nbytes(x.shape)``) of bf16/fp16/fp32 ``x`` (any shape), on
    ``x.device``: byte-identical to ``codec.encode(x)``'s torch reference."""
    inner, had = _parts(codec)
    n = x.numel()
    inner_n = -(-n // had.block) * had.block if had is not None else n
    layout = inner.layout((inner_n,))
    if n == 0:
        return layout.allocate(x.device)
    # The kernel writes every code, scale and exponent byte (one program per super-block = per exponent), so
    # only the alignment padding needs zeroing: no memset pass over the payload.
    payload = layout.allocate_padding_zeroed(x.device)
    nblocks = -(-inner_n // inner.group)
    grid = (-(-inner_n // TILE),)
    signs, c = _signs(had, x.device)
    cx = _constexprs(inner, had)
    cx.pop("TILE_")
    flat = x.contiguous().view(-1)
    _encode_kernel[grid](
        flat.view(torch.int16) if x.dtype == torch.bfloat16 else flat,
        payload,
        signs,
        n,
        nblocks,
        layout.sections["scales"].offset,
        layout.sections["exps"].offset,
        c,
        TILE_=TILE,
        IN_BF16=x.dtype == torch.bfloat16,
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
    inner, had = _parts(codec)
    n = numel_of(shape)
    inner_n = -(-n // had.block) * had.block if had is not None else n
    layout = inner.layout((inner_n,))
    result = torch.empty(n, dtype=dtype, device=payloads.device) if out is None else out.view(-1)
    if n:
        signs, c = _signs(had, payloads.device)
        cx = _constexprs(inner, had)
        for key in ("LIM_MANT_BITS", "LIM_EXP", "TILE_"):
            cx.pop(key)
        _decode_sum_kernel[(-(-inner_n // TILE),)](
            payloads,
            result,
            signs,
            count,
            layout.nbytes,
            n,
            -(-inner_n // inner.group),
            layout.sections["scales"].offset,
            layout.sections["exps"].offset,
            c,
            float(torch.finfo(dtype).max),
            TILE_=TILE,
            OUT=_OUT_CODE[dtype],
            **cx,
            **_launch_opts(payloads.device),
        )
    return result.view(tuple(shape)) if out is None else out.view(tuple(shape))
