"""FP8 with a per-block scale (``fp8`` = ``fp8-e4m3:b128:sfp32``, ``fp8-e5m2:b128``).

Wire layout for ``n`` values, block size ``B``, ``nb = ceil(n / B)`` blocks (input flattened row-major and
zero-padded to ``nb * B`` values; sections at 16-byte offsets):

=========  ===================  ===============================================================
section    type, count          content
=========  ===================  ===============================================================
codes      uint8, nb*B          FP8 bit patterns: E4M3 "fn" (no inf, max 448) or E5M2 (max 57344)
scales     scale fmt, nb        per-block scale ``s`` (default fp32)
=========  ===================  ===============================================================

Encode: ideal ``s = amax / fmax``, stored per ``scales.py``; ``code = fp8(clamp(x * (1/s), -fmax, fmax))``
with round to nearest even (the clamp matters: torch turns out-of-range values into NaN when casting to
E4M3). Decode: ``x' = float(code) * s``. A block holding NaN/Inf gets a NaN scale and zero codes.
Bits per value: ``8 + scale_bits / B`` (8.25 for the default).

Backends produce the same layout: ``torch`` (this reference; CPU and GPU) and ``te`` (Transformer Engine's
FP8 cast on CUDA, where installed). ``auto`` uses TE for CUDA tensors when it imports, torch otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs.base import (
    Codec,
    CodecError,
    PayloadLayout,
    check_input,
    check_payload,
    from_blocks,
    nonfinite_blocks,
    numel_of,
    to_blocks,
)
from megatron_tpcomp.codecs.scales import decode_scales, quantize_scales, safe_reciprocal, storage_dtype
from megatron_tpcomp.spec import CodecSpec, canonical

try:  # Transformer Engine is optional and GPU-only.
    import transformer_engine.pytorch as _te  # noqa: F401
    import transformer_engine_torch as _tex

    HAVE_TE = True
except ImportError:  # pragma: no cover - TE is not installable on CPU machines
    _tex = None
    HAVE_TE = False

FP8_FORMATS = {
    (4, 3): (torch.float8_e4m3fn, 448.0),
    (5, 2): (torch.float8_e5m2, 57344.0),
}
BACKENDS = ("auto", "torch", "te")


class Fp8Codec(Codec):
    """FP8 E4M3/E5M2 with one scale per block of ``cs.block`` values."""

    def __init__(self, cs: CodecSpec, backend: str = "auto"):
        if cs.kind != "fp8" or cs.hadamard_block or cs.outliers:
            raise ValueError(f"Fp8Codec needs a plain fp8 spec, got {canonical(cs)!r}")
        if backend not in BACKENDS:
            raise CodecError(f"unknown fp8 backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if backend == "te" and not HAVE_TE:
            raise CodecError(
                "fp8 backend 'te' needs Transformer Engine (pip install transformer-engine[pytorch], GPU only); "
                "use backend 'torch' or 'auto'"
            )
        self.cs = cs
        self.block = cs.block
        self.scale_fmt = cs.scale
        self.backend = backend
        self.fp8_dtype, self.fmax = FP8_FORMATS[(cs.exp_bits, cs.man_bits)]
        self.spec = canonical(cs)

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        nblocks = -(-numel_of(shape) // self.block)
        return PayloadLayout(
            [("codes", torch.uint8, nblocks * self.block), ("scales", storage_dtype(self.scale_fmt), nblocks)]
        )

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _use_te(self, x: torch.Tensor) -> bool:
        return self.backend == "te" or (self.backend == "auto" and HAVE_TE and x.is_cuda)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        payload = layout.allocate(x.device)
        if x.numel() == 0:
            return payload
        blocks = to_blocks(x, self.block)  # [nb, B] fp32
        bad = nonfinite_blocks(blocks)
        blocks = torch.where(bad.unsqueeze(1), torch.zeros_like(blocks), blocks)
        stored, s = quantize_scales(blocks.abs().amax(dim=1) / self.fmax, self.scale_fmt, bad)
        inv = safe_reciprocal(torch.nan_to_num(s, nan=0.0)).unsqueeze(1)
        if self._use_te(x):
            codes = _te_cast(blocks, inv, self.fp8_dtype)
        else:
            codes = (blocks * inv).clamp(-self.fmax, self.fmax).to(self.fp8_dtype).view(torch.uint8)
        layout.view(payload, "codes").copy_(codes.reshape(-1))
        layout.view(payload, "scales").copy_(stored)
        return payload

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        if numel_of(shape) == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        codes = layout.view(payload, "codes").view(self.fp8_dtype).to(torch.float32).view(-1, self.block)
        s = decode_scales(layout.view(payload, "scales"), self.scale_fmt).unsqueeze(1)
        return from_blocks(codes * s, shape, dtype)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per element: half an FP8 step at |x|/s (relative 2**-(m+1) for normals, absolute half the smallest
        subnormal step below), times s, plus clipping where scale rounding made amax/s exceed fmax."""
        blocks = to_blocks(x, self.block)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        _, s = quantize_scales(amax.squeeze(1) / self.fmax, self.scale_fmt)
        s = s.unsqueeze(1)
        man = 3 if self.fp8_dtype == torch.float8_e4m3fn else 2
        min_normal = torch.finfo(self.fp8_dtype).smallest_normal
        subnormal_step = min_normal * 2.0**-man
        rel = blocks.abs() * 2.0 ** -(man + 1)
        bound = torch.maximum(rel, torch.full_like(rel, 0.5 * subnormal_step) * s) + 0.5 * subnormal_step * s
        clip = (amax - self.fmax * s).clamp(min=0)
        bound = bound + clip + 1e-7 * amax
        return from_blocks(bound, x.shape, torch.float32)


def _te_cast(blocks: torch.Tensor, inv: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
    """FP8 codes through Transformer Engine's cast kernel (CUDA only), same scaling as the reference.

    TE quantizers apply one fp32 factor per tensor; the per-block factors are applied first (one multiply), then
    TE performs the saturating round-to-nearest cast with factor 1. Uses ``Float8Quantizer`` (TE 2.x).
    Returns uint8 ``[nb, B]``. Verified only where a GPU with TE is available (tests/gpu/test_fp8_te.py).
    """
    if _tex is None:
        raise CodecError("Transformer Engine is not importable")
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    te_dtype = _tex.DType.kFloat8E4M3 if fp8_dtype == torch.float8_e4m3fn else _tex.DType.kFloat8E5M2
    dev = blocks.device
    quantizer = Float8Quantizer(
        scale=torch.ones(1, dtype=torch.float32, device=dev),
        amax=torch.zeros(1, dtype=torch.float32, device=dev),
        fp8_dtype=te_dtype,
    )
    fp8_tensor = quantizer((blocks * inv).contiguous())
    return fp8_tensor._data.view(torch.uint8)
