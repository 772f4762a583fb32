"""Randomized Hadamard rotation before quantization (``+had``, ``+had:b64``), wrapping any non-row-structured codec.

A rotation spreads a block's energy evenly over its values, so one large value no longer sets the scale of
its whole quantization group alone (FACTS.md: int4 g32 +12.4% perplexity on SmolLM2 -> +4.6% with ``+had:b32``;
a larger rotation block spreads a massive outlier over more groups and helps less: +11.3% with ``b128``).

Transform: the input is flattened row-major, converted to fp32 and zero-padded to a multiple of ``block``
(``padded_numel = ceil(numel / block) * block``); each block ``v`` (fp32 ``[block]``) becomes ``R v`` with

    R = H / sqrt(block) @ diag(signs)

``H`` the Sylvester Hadamard matrix (``H_2n = [[H, H], [H, -H]]``) and ``signs`` in {-1, +1} drawn from
``torch.Generator().manual_seed(seed)`` on the CPU, so every rank and device derives the same fp32 ``R``. ``R``
is orthonormal, so decoding applies ``R^T``, drops the padding and casts to the requested dtype.

Wire layout: exactly the inner codec's payload for an fp32 input of shape ``(padded_numel,)`` holding the
rotated blocks in order; nothing else. The rotation matrix is not sent: it is a function of ``(block, seed)``,
and both are part of the codec's configuration (``block`` is in the spec string, ``seed`` must be equal on
every rank, see ``make_codec(hadamard_seed=...)``).

Memory passes (reference path, per direction): encode reads the input once into a padded fp32 copy (two passes
when padding is needed), the matmul reads that and writes the rotated copy, then the inner codec makes its
own passes. Decode: the inner codec writes fp32, the matmul writes the unrotated copy, the final slice + cast
writes the output. A matmul with ``block <= 256`` does ``2 * block`` flops per value and stays memory-bound on a
GPU; a fused kernel would rotate in registers and save the two extra fp32 round trips.

Non-finite input: a NaN/Inf anywhere in a rotation block spreads to every rotated value of that block, the inner
codec's rule turns each of its quantization blocks that holds one into NaN, and ``R^T`` spreads those back over
every rotation block they touch. The damage therefore decodes to NaN (never a silent finite value) and stays
within the union of the rotation and quantization blocks around the bad value. Finite inputs whose block L2
norm exceeds the fp32 maximum (|x| above about ``3.4e38 / sqrt(block)``) overflow in the rotation and decode to
NaN as well.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs.base import (
    Codec,
    CodecError,
    check_input,
    check_payload,
    from_blocks,
    numel_of,
    to_blocks,
)

_FP32_EPS = 2.0**-24  # unit round-off of fp32
_TF32_EPS = 2.0**-11  # unit round-off of the inputs of a TF32 matmul (10 stored mantissa bits)


@functools.lru_cache(maxsize=32)
def _rotation_cpu(block: int, seed: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < block:  # Sylvester construction: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same signs on every rank and device
    signs = torch.randint(0, 2, (block,), generator=gen).to(torch.float32) * 2 - 1
    return (h / math.sqrt(block)) * signs  # H/sqrt(n) @ diag(signs): scales column j by signs[j]


@functools.lru_cache(maxsize=64)
def _rotation_on(block: int, seed: int, device: str) -> torch.Tensor:
    # Cached per device so a GPU encode does not copy R from the host on every call.
    return _rotation_cpu(block, seed).to(device)


def rotation_matrix(block: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal rotation ``R = H_block / sqrt(block) @ diag(signs)``.

    Args:
        block: rotation block size, a power of two >= 2.
        seed: seed of the random signs.
        device: where the (cached, shared: do not modify it) copy lives.

    Returns:
        fp32 ``[block, block]``; a rotated block is ``R @ v`` (for row-stacked blocks ``V @ R.T``).
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise CodecError(f"Hadamard block {block!r} is not a power of two >= 2; expected 2, 4, 8, ..., 4096")
    return _rotation_on(block, seed, str(torch.device(device)))


def _matmul_input_eps(device: torch.device) -> float:
    """Relative rounding of the matmul inputs: 0 for true fp32, 2^-11 where CUDA may use TF32."""
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return _TF32_EPS
    return 0.0


def _scaled_l2(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of fp32 ``[nb, n]`` as ``[nb, 1]``, scaled by the row max so that squares of tiny (or
    huge) values neither underflow to 0 (an unsafe bound) nor overflow; rounded up by ``n * 2^-23`` relative (the
    round-off of a sum of n squares, halved by the square root, with headroom)."""
    top = rows.abs().amax(dim=1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return top * (rows / safe).norm(dim=1, keepdim=True) * (1 + rows.shape[1] * 2.0**-23)


class HadamardCodec(Codec):
    """Rotate blocks of ``block`` flattened values with ``R`` (see the module docstring), then encode with ``inner``.

    Args:
        inner: the codec that encodes the rotated fp32 values; must not be row-structured (put ``+outliers``
            outside the rotation: ``int4:g32+had+outliers:k4``).
        block: rotation block size, a power of two >= 2 (a matmul: cheap for <= 256).
        seed: seed of the random signs; equal on every rank (it is not sent).
    """

    row_structured = False

    def __init__(self, inner: Codec, block: int = 32, seed: int = 0):
        if not isinstance(inner, Codec):
            raise CodecError(f"HadamardCodec wraps a Codec, got {type(inner).__name__}")
        if inner.row_structured:
            raise CodecError(
                f"a Hadamard rotation cannot wrap the row-structured codec {inner.spec!r}; put '+outliers' "
                "outside the rotation, e.g. int4:g32+had+outliers:k4"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise CodecError(f"Hadamard seed {seed!r} is not an integer; expected an int equal on every rank")
        rotation_matrix(block, seed)  # validates block (and warms the CPU cache)
        self.inner = inner
        self.block = block
        self.seed = seed
        self.spec = f"{inner.spec}+had:b{block}"

    def _padded(self, shape: Sequence[int]) -> tuple[int]:
        return (-(-numel_of(shape) // self.block) * self.block,)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.inner.payload_nbytes(self._padded(shape))

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``[padded_numel / block, block]``: the zero-padded blocks of ``x`` times ``R^T`` (row-wise ``R v``)."""
        blocks = to_blocks(x, self.block)  # [nb, block] fp32, zero padded
        return blocks @ rotation_matrix(self.block, self.seed, x.device).T

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        return self.inner.encode(self._rotate(x).reshape(-1))

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        check_payload(payload, self.payload_nbytes(shape), self.spec)
        flat = self.inner.decode(payload, self._padded(shape), torch.float32)  # [padded_numel] fp32
        rot = rotation_matrix(self.block, self.seed, payload.device)
        return from_blocks(flat.view(-1, self.block) @ rot, shape, dtype)  # row-wise R^T w, padding dropped

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Elementwise bound on ``|decode(encode(x), fp32) - x|`` (fp32, shape of ``x``), constant per rotation block.

        Let ``b`` be the inner codec's elementwise bound on the rotated block ``r = fl(R v)``, so the inner
        error ``e`` has ``|e_j| <= b_j``. Exactly, ``R^T (r + e) - v = R^T e``, and every row of ``R^T`` has unit
        L2 norm, so by Cauchy-Schwarz ``|(R^T e)_i| <= |e|_2 <= |b|_2``: the rotation cannot concentrate the
        error. Round-off of the two fp32 matmuls (any summation order, FMA or not) adds at most
        ``gamma * |v|_1`` each, ``gamma = 1.1 * block * 2^-24`` (the classic dot-product bound ``n u / (1 - n u)``
        with headroom), plus ``2^-23 |v|_1`` for ``1/sqrt(block)`` not being exact in fp32 and ``gamma |b|_2`` for
        the rounding of the error itself. Where CUDA may run the matmul in TF32, the inputs are rounded to
        ``2^-11`` first, which adds ``2.1 * 2^-11`` to ``gamma``. Per block:

            bound = (1 + gamma + 2^-23) |b|_2 + (2 gamma + 3 * 2^-24) |v|_1

        Returns None when the inner codec states no bound.
        """
        check_input(x)
        rotated = self._rotate(x)  # bit-identical to what encode hands the inner codec
        inner = self.inner.max_abs_error_bound(rotated.reshape(-1))
        if inner is None:
            return None
        u = _FP32_EPS
        gamma = 1.1 * self.block * u + 2.1 * _matmul_input_eps(x.device)
        blocks = to_blocks(x, self.block)
        l2_inner = _scaled_l2(inner.view(-1, self.block))  # [nb, 1]
        l1_input = blocks.abs().sum(dim=1, keepdim=True)  # [nb, 1]
        per_block = (1 + gamma + 2 * u) * l2_inner + (2 * gamma + 3 * u) * l1_input
        return from_blocks(per_block.expand_as(blocks), x.shape, torch.float32)

    def __eq__(self, other: object) -> bool:
        # The seed changes the payload but is not in the spec string: codecs with different seeds differ.
        return isinstance(other, HadamardCodec) and other.spec == self.spec and other.seed == self.seed

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec, self.seed))
