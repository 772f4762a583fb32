"""Kernel backends: the torch reference, the INT4 CUDA extension, Transformer Engine FP8.

The reference codecs (``megatron_tpcomp/codecs``) define the wire format and run everywhere. The CUDA extension
``megatron_tpcomp._int4_cuda`` (sources in ``kernels/``) is built by ``setup.py`` only where torch has CUDA and
nvcc exists; it produces byte-identical INT4 payloads (``int4:g<G>``, symmetric, fp16 scales) in one pass.
"""

from __future__ import annotations

import enum
import importlib
from functools import lru_cache

import torch

from megatron_tpcomp.codecs.base import CodecError

INT4_CUDA_GROUPS = (8, 16, 32, 64, 128, 256)


class Backend(enum.Enum):
    """Which implementation encodes/decodes: REFERENCE (torch ops, CPU and GPU), CUDA (our INT4 kernels),
    TE (Transformer Engine's FP8 cast)."""

    REFERENCE = "reference"
    CUDA = "cuda"
    TE = "te"


@lru_cache(maxsize=1)
def _load_int4_cuda() -> tuple[object | None, str]:
    if not torch.cuda.is_available():
        return None, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        return importlib.import_module("megatron_tpcomp._int4_cuda"), ""
    except ImportError as exc:
        return None, (
            f"the extension megatron_tpcomp._int4_cuda is not built ({exc}); reinstall with "
            "`pip install --no-build-isolation -e .` on a machine with a CUDA torch and nvcc"
        )


def cuda_int4_available() -> tuple[bool, str]:
    """(True, "") when the INT4 CUDA kernels can run here, else (False, why not)."""
    module, reason = _load_int4_cuda()
    return module is not None, reason


def _int4_module() -> object:
    module, reason = _load_int4_cuda()
    if module is None:
        raise CodecError(f"INT4 CUDA backend requested but unavailable: {reason}")
    return module


def int4_quantize_cuda(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Fused INT4 quantize + pack on CUDA.

    Args:
        x: CUDA tensor, fp32/fp16/bf16, any shape (read in row-major order).
        group: values per scale, one of ``INT4_CUDA_GROUPS``.

    Returns:
        uint8 1-D payload in the ``int4:g<group>`` wire format (codes section, then fp16 scales at the next
        16-byte offset), byte-identical to ``make_codec(f"int4:g{group}").encode(x)``.
    """
    return _int4_module().int4_quantize(x, group)


def int4_dequantize_sum_cuda(
    payloads: torch.Tensor, shape: tuple[int, ...] | torch.Size, group: int = 32, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Decode N INT4 payloads and sum them in fp32 in row order (the one-shot all-reduce), on CUDA.

    Args:
        payloads: uint8 ``[N, nbytes]`` CUDA tensor, one payload per rank in rank order (N = 1: plain decode).
        shape: shape of the decoded tensor.
        group: the payloads' group size.
        dtype: output dtype (fp32/fp16/bf16); the sum is formed in fp32 and rounded once.

    Returns:
        ``dtype`` tensor of ``shape``, bit-identical to the reference decode + fp32 sum in rank order.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    return _int4_module().int4_dequantize_sum(payloads, numel, group, dtype).view(tuple(shape))
