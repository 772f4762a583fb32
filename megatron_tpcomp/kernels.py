"""Kernel backends: the torch reference codecs, the INT4 CUDA extension, Transformer Engine FP8.

The reference codecs (``megatron_tpcomp/codecs``) define the wire format and run everywhere (CPU and GPU). The
CUDA extension ``megatron_tpcomp._int4_cuda`` (sources in ``kernels/``) is built by ``setup.py`` only where
torch has CUDA and nvcc exists; it writes the ``int4:g<G>`` payload (symmetric, fp16 scales) in one pass over
memory, byte-identical to the reference encode on the CPU, and decodes / decode-sums bit-identically.

Wire layout of an ``int4:g<G>`` payload for ``n`` values (``ng = ceil(n / G)`` groups, the last zero-padded),
as ``IntCodec.layout((n,))``: codes ``uint8[ng*G/2]`` (two per byte, even index in the low nibble, code = q + 8),
then fp16 scales ``[ng]`` at the next 16-byte offset, total size rounded up to 16 bytes, padding zero.

Usage::

    ok, why = cuda_int4_available()
    payload = int4_quantize_cuda(x, group=32)              # == make_codec("int4:g32").encode(x.cpu())
    y = int4_dequantize_sum_cuda(torch.stack(gathered), x.shape, 32, x.dtype)   # one-shot all-reduce sum
"""

from __future__ import annotations

import enum
import importlib
import math
from collections.abc import Sequence
from functools import lru_cache
from types import ModuleType

import torch

#: Module name of the compiled extension (setup.py builds it from kernels/).
INT4_CUDA_MODULE = "megatron_tpcomp._int4_cuda"
#: Group sizes the CUDA kernels support (G/8 threads share a group and must tile a 32-lane warp).
INT4_CUDA_GROUPS = (8, 16, 32, 64, 128, 256)
#: Output / input dtypes of the kernels.
INT4_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend(enum.Enum):
    """Which implementation encodes and decodes.

    REFERENCE: the torch codecs (any device; defines the wire format).
    CUDA: this package's INT4 kernels (``int4:g<G>`` only, CUDA tensors, needs the built extension).
    TE: Transformer Engine's FP8 cast (fp8 codecs, CUDA tensors, needs transformer_engine).
    """

    REFERENCE = "reference"
    CUDA = "cuda"
    TE = "te"


class KernelUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why."""


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


def te_fp8_available() -> tuple[bool, str]:
    """``(True, "")`` when Transformer Engine's FP8 cast can run here, else ``(False, reason)``."""
    from megatron_tpcomp.codecs import fp8  # the fp8 codec owns the guarded TE import

    if not fp8.HAVE_TE:
        return False, "Transformer Engine is not installed (pip install transformer-engine[pytorch], GPU only)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, ""


def backend_available(backend: Backend | str) -> tuple[bool, str]:
    """``(available, reason)`` for ``backend`` (an enum member or its value: "reference", "cuda", "te")."""
    backend = Backend(backend)
    if backend is Backend.CUDA:
        return cuda_int4_available()
    if backend is Backend.TE:
        return te_fp8_available()
    return True, ""


def require_backend(backend: Backend | str) -> Backend:
    """Return ``backend`` as an enum member; raise KernelUnavailableError (with the reason) if it cannot run."""
    backend = Backend(backend)
    ok, reason = backend_available(backend)
    if not ok:
        raise KernelUnavailableError(f"kernel backend {backend.value!r} requested but unavailable: {reason}")
    return backend


def _int4_module() -> ModuleType:
    module, reason = _load_int4_cuda()
    if module is None:
        raise KernelUnavailableError(f"kernel backend 'cuda' requested but unavailable: {reason}")
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
