"""The payload moves every algorithm shares: flat uint8 collectives, encoding pieces into one send buffer, and
the rank-ordered decode-and-sum of received payloads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec

# Flat collectives under their 2.13 names (the *_tensor names emit a FutureWarning there), older names before.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_float8(dtype: torch.dtype) -> bool:
    """True for the 1-byte float dtypes (float8 and friends), from the dtype alone: no tensor per call."""
    return dtype.is_floating_point and dtype.itemsize == 1


def decode_sum(
    codec: Codec, payloads: torch.Tensor, nbytes: int, shape: Sequence[int], count: int, dtype: torch.dtype
) -> torch.Tensor:
    """Sum in fp32, in rank order, of ``count`` payloads of ``nbytes`` each laid end to end in ``payloads``,
    rounded once to ``dtype`` (:meth:`Codec.decode_sum`: one fused pass on CPU where the library has the codec).

    Returns:
        ``dtype`` tensor of ``shape``.
    """
    return codec.decode_sum(payloads[: count * nbytes], count, shape, dtype)


def encode_into(codec: Codec, parts: Sequence[torch.Tensor], nbytes: int, device: torch.device) -> torch.Tensor:
    """Encode each part into consecutive ``nbytes`` slots of one flat uint8 send buffer ``[len(parts) * nbytes]``."""
    buf = torch.empty(len(parts) * nbytes, dtype=torch.uint8, device=device)
    for r, part in enumerate(parts):
        buf[r * nbytes : (r + 1) * nbytes] = codec.encode(part)
    return buf
