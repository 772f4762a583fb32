"""The ``cuda`` backend: the INT4 CUDA extension for ``int4:g<G>`` (symmetric, fp16 scales) on CUDA tensors.

The reference codecs (``megatron_tpcomp/codecs``) define the wire format and run everywhere (CPU and GPU). The
CUDA extension ``megatron_tpcomp._int4_cuda`` (sources in ``kernels/``) is built by ``setup.py`` only where
torch has CUDA and nvcc exists; it writes the ``int4:g<G>`` payload (symmetric, fp16 scales) in one pass over
memory, byte-identical to the reference encode on the CPU, and decodes / decode-sums bit-identically.

Wire layout of an ``int4:g<G>`` payload for ``n`` values (``ng = ceil(n / G)`` groups, the last zero-padded),
as ``IntCodec.layout((n,))``: codes ``uint8[ng*G/2]`` (two per byte, even index in the low nibble, code = q + 8),
then fp16 scales ``[ng]`` at the next 16-byte offset, then the int16 super-block exponents (2-byte aligned),
total size rounded up to 16 bytes, padding zero (``kernels/int4_core.h``; tests/backends/test_cuda_int4_host.py
pins its bytes against the reference on the host, tests/backends/test_cuda_int4.py on a GPU).

Usage::

    ok, why = cuda_int4_available()
    payload = int4_quantize_cuda(x, group=32)              # == make_codec("int4:g32").encode(x.cpu())
    y = int4_dequantize_sum_cuda(torch.stack(gathered), x.shape, 32, x.dtype)   # one-shot all-reduce sum
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from functools import lru_cache
from types import ModuleType

import torch

from megatron_tpcomp.backends.errors import BackendUnavailableError
from megatron_tpcomp.codecs.base import Codec, numel_of
from megatron_tpcomp.codecs.intx import IntCodec

#: Module name of the compiled extension (setup.py builds it from kernels/).
INT4_CUDA_MODULE = "megatron_tpcomp._int4_cuda"
#: Group sizes the CUDA kernels support (G/8 threads share a group and must tile a 32-lane warp).
INT4_CUDA_GROUPS = (8, 16, 32, 64, 128, 256)


@lru_cache(maxsize=1)
def _load_int4_cuda() -> tuple[ModuleType | None, str]:
    """Import the extension once. Returns (module, "") or (None, why not)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build (the extension needs a CUDA torch)"
    try:
        module = importlib.import_module(INT4_CUDA_MODULE)
    except ImportError as exc:
        return None, (
            f"the extension {INT4_CUDA_MODULE} is not built ({exc}); build it with "
            "`pip install --no-build-isolation -e .` where torch has CUDA and nvcc is found"
        )
    if not torch.cuda.is_available():
        return None, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return module, ""


def cuda_int4_available() -> tuple[bool, str]:
    """``(True, "")`` when the INT4 CUDA kernels can run here, else ``(False, reason)``."""
    module, reason = _load_int4_cuda()
    return module is not None, reason


def _int4_module() -> ModuleType:
    module, reason = _load_int4_cuda()
    if module is None:
        raise BackendUnavailableError(f"kernel backend 'cuda' requested but unavailable: {reason}")
    return module


def _check_group(group: int) -> None:
    if group not in INT4_CUDA_GROUPS:
        raise ValueError(f"INT4 CUDA kernels support group sizes {INT4_CUDA_GROUPS}; got {group}")


def int4_quantize_cuda(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Fused INT4 quantize + pack on CUDA (one pass: load a group, amax and scale in registers, codes out).

    Args:
        x: CUDA tensor, fp32/fp16/bf16, any shape and strides (read in row-major order; a strided view is
            copied first).
        group: values per fp16 scale, one of ``INT4_CUDA_GROUPS``.

    Returns:
        uint8 1-D payload of ``make_codec(f"int4:g{group}").payload_nbytes(x.shape)`` bytes on ``x.device``,
        byte-identical to ``make_codec(f"int4:g{group}").encode(x.cpu())`` (see the module docstring).
    """
    _check_group(group)
    return _int4_module().int4_quantize(x, group)


def int4_dequantize_cuda(
    payload: torch.Tensor, shape: Sequence[int], group: int = 32, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Unpack + dequantize one INT4 payload on CUDA.

    Args:
        payload: uint8 1-D contiguous CUDA tensor written by :func:`int4_quantize_cuda` (or the reference
            encoder) for a tensor of ``shape`` with the same ``group``.
        shape: shape of the decoded tensor.
        group: the payload's group size.
        dtype: output dtype, fp32/fp16/bf16 (values are formed in fp32 and rounded once).

    Returns:
        contiguous ``dtype`` tensor of ``shape``, bit-identical to ``codec.decode(payload, shape, dtype)``.
    """
    _check_group(group)
    out = _int4_module().int4_dequantize(payload, math.prod(int(s) for s in shape), group, dtype)
    return out.view(tuple(shape))


def int4_dequantize_sum_cuda(
    payloads: torch.Tensor, shape: Sequence[int], group: int = 32, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Decode N INT4 payloads and add them in fp32 in rank order 0..N-1 (the one-shot all-reduce), on CUDA.

    Every rank that calls this on the same gathered payloads gets the same bits.

    Args:
        payloads: uint8 ``[N, nbytes]`` contiguous CUDA tensor, one payload per rank in rank order (N = 1 is a
            plain decode); ``nbytes = make_codec(f"int4:g{group}").payload_nbytes(shape)``.
        shape: shape of each decoded tensor (and of the result).
        group: the payloads' group size.
        dtype: output dtype, fp32/fp16/bf16; the sum is formed in fp32 and rounded once.

    Returns:
        contiguous ``dtype`` tensor of ``shape``, bit-identical to ``decode(p_0, fp32) + ... + decode(p_{N-1},
        fp32)`` (added left to right) cast to ``dtype``, which is what ``collectives._decode_sum`` computes.
    """
    _check_group(group)
    out = _int4_module().int4_dequantize_sum(payloads, math.prod(int(s) for s in shape), group, dtype)
    return out.view(tuple(shape))


# --- the backend interface (backends/dispatch.py) -------------------------------------------------------------


def unsupported(codec: Codec, op: str) -> str | None:
    """None when the extension implements ``codec`` (``int4:g<G>``, symmetric, fp16 scales, G in
    ``INT4_CUDA_GROUPS``; encode and decode), else why not."""
    if type(codec) is not IntCodec or codec.bits != 4 or codec.asym or codec.scale_fmt != "fp16":
        return "the INT4 CUDA kernels implement plain int4:g<G> with fp16 scales only"
    if codec.group not in INT4_CUDA_GROUPS:
        return f"the INT4 CUDA kernels support groups {INT4_CUDA_GROUPS}, not {codec.group}"
    return None


def unavailable(device_type: str) -> str | None:
    """None when the extension can run on tensors of ``device_type`` here, else why not."""
    if device_type != "cuda":
        return f"the INT4 CUDA kernels run on CUDA tensors only, not {device_type}"
    ok, reason = cuda_int4_available()
    return None if ok else reason


def encode(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """``codec.encode(x)`` by the extension (``x``: a CUDA fp32/fp16/bf16 tensor)."""
    return int4_quantize_cuda(x, codec.group)


def decode_sum(
    codec: Codec,
    payloads: torch.Tensor,
    count: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``codec.decode_sum`` by the extension (arguments checked by the dispatcher; ``out`` on the payloads' device)."""
    if numel_of(shape) == 0:
        result = torch.empty(tuple(shape), dtype=dtype, device=payloads.device)
    else:
        result = int4_dequantize_sum_cuda(payloads.view(count, -1), shape, codec.group, dtype)
    if out is None:
        return result
    out.view(-1).copy_(result.view(-1))
    return out.view(tuple(shape))
