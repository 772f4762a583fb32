"""Randomized Hadamard rotation before quantization (``+had``, ``+had:b64``).

A rotation spreads a block's energy evenly over its values, so one large value no longer sets the scale of
its whole quantization group (FACTS.md: int4 g32 +12.4% perplexity on SmolLM2 -> +4.6% with ``+had:b32``).

Transform: the input is flattened row-major, converted to fp32 and zero-padded to a multiple of ``block``;
each block ``v`` becomes ``R v`` with ``R = H / sqrt(block) @ diag(signs)``, ``H`` the Sylvester Hadamard
matrix and ``signs`` in {-1, +1} drawn from ``torch.Generator().manual_seed(seed)`` on the CPU (so every
rank and device derives the same ``R``; it is never sent). ``R`` is orthonormal: decoding applies ``R^T``.

Wire layout: exactly the inner codec's payload for an fp32 input of shape ``(padded_numel,)``.

Non-finite input: a NaN/Inf spreads over its rotation block, which decodes to NaN (never a finite value).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs.base import Codec, CodecError, check_input, from_blocks, numel_of, to_blocks


@functools.lru_cache(maxsize=32)
def _rotation_cpu(block: int, seed: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < block:  # Sylvester construction: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (block,), generator=gen).to(torch.float32) * 2 - 1
    return (h / math.sqrt(block)) * signs  # H/sqrt(n) @ diag(signs): scales column j by signs[j]


def rotation_matrix(block: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal fp32 ``[block, block]`` matrix ``R`` (block a power of two)."""
    if block < 2 or block & (block - 1):
        raise CodecError(f"Hadamard block {block} is not a power of two >= 2")
    return _rotation_on(block, seed, str(device))


@functools.lru_cache(maxsize=64)
def _rotation_on(block: int, seed: int, device: str) -> torch.Tensor:
    return _rotation_cpu(block, seed).to(device)


class HadamardCodec(Codec):
    """Rotate blocks of ``block`` values with ``R``, then encode with ``inner``."""

    row_structured = False

    def __init__(self, inner: Codec, block: int = 32, seed: int = 0):
        if inner.row_structured:
            raise CodecError("a Hadamard rotation cannot wrap a row-structured codec; put '+outliers' outside")
        rotation_matrix(block, seed)  # validates block
        self.inner = inner
        self.block = block
        self.seed = seed
        self.spec = f"{inner.spec}+had:b{block}"

    def _padded(self, shape: Sequence[int]) -> tuple[int]:
        return (-(-numel_of(shape) // self.block) * self.block,)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.inner.payload_nbytes(self._padded(shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        blocks = to_blocks(x, self.block)  # [nb, block] fp32, zero padded
        rot = rotation_matrix(self.block, self.seed, x.device)
        return self.inner.encode((blocks @ rot.T).reshape(-1))

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        padded = self._padded(shape)
        flat = self.inner.decode(payload, padded, torch.float32)
        rot = rotation_matrix(self.block, self.seed, payload.device)
        return from_blocks(flat.view(-1, self.block) @ rot, shape, dtype)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per rotation block, the L2 norm of the inner codec's elementwise bound in the rotated domain: since
        R is orthonormal, ``|R^T e|_inf <= |R^T e|_2 = |e|_2``. Plus fp32 round-off of the two matmuls."""
        blocks = to_blocks(x, self.block)
        rot = rotation_matrix(self.block, self.seed, x.device)
        rotated = (blocks @ rot.T).reshape(-1)
        inner = self.inner.max_abs_error_bound(rotated)
        if inner is None:
            return None
        per_block = inner.view(-1, self.block).norm(dim=1, keepdim=True)
        roundoff = 1e-6 * self.block * blocks.abs().amax(dim=1, keepdim=True)
        return from_blocks((per_block + roundoff).expand_as(blocks), x.shape, torch.float32)
