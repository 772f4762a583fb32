"""Randomized Hadamard rotation before quantization (``+had``, ``+had:b64``), wrapping any non-row-structured codec.

A rotation spreads a block's energy evenly over its values, so one large value no longer sets the scale of
its whole quantization group alone (measured: int4 g32 +12.4% perplexity on SmolLM2 -> +4.6% with ``+had:b32``;
a larger rotation block spreads a massive outlier over more groups and helps less: +11.3% with ``b128``).

Transform: the input is flattened row-major, converted to fp32 and zero-padded to a multiple of ``block``
(``padded_numel = ceil(numel / block) * block``); each block ``v`` (fp32 ``[block]``) becomes ``R v`` with

    R = H / sqrt(block) @ diag(signs)

``H`` the Sylvester Hadamard matrix (``H_2n = [[H, H], [H, -H]]``) and ``signs`` in {-1, +1} drawn from
``torch.Generator().manual_seed(seed)`` on the CPU, so every rank and device derives the same signs. ``R`` is
orthonormal, so decoding applies ``R^T``, drops the padding and casts to the requested dtype.

Arithmetic (part of the format: every backend computes exactly this, so payloads and decodes are bit-identical
on every device and with the fused CPU library, ``kernels/cpu_codecs.cpp``): ``R v = fwht(v * signs) * c`` and
``R^T w = fwht(w) * c * signs`` with ``c = fp32(1 / sqrt(block))`` and ``fwht`` the fast Walsh-Hadamard butterfly
(stage ``h = 1, 2, 4, ..., block/2`` replaces each pair ``(v[j], v[j+h])`` of every ``2h`` chunk by ``(v[j] + v[j+h],
v[j] - v[j+h])``), every operation an fp32 elementwise op rounded on its own. ``log2(block)`` additions per value
instead of a ``block``-long dot product: no summation order is left to a BLAS (or to TF32).

Range (block codecs inside, ``blocks.py``): a rotation of fp32 values near 3.4e38 overflows (the butterflies
add ``block`` of them) and one of fp32 subnormals rounds away their bits, so the rotation runs on normalized
values: per super-block of the inner codec (``lcm(inner block, 4096)`` values, which the rotation blocks tile),
``j = 0`` while its largest finite ``|x|`` lies in ``[2^-64, 2^64)`` (every real activation), else
``floor(log2 max)``; the codec rotates ``x * 2^-j`` (``scales.pow2_mul``) and the inner codec stores its own
exponent plus ``j``, so ``2^k`` of the payload undoes both.

Sum of N payloads (:meth:`HadamardCodec.decode_sum`, the all-reduce): per super-block ``K = max_r k_r``; the
inner codec's normalized values times ``2^(k_r - K)`` are added in fp32 in payload order, ``R^T`` runs
once on that sum (``R^T`` is linear: one rotation instead of N), then ``x' = pow2_mul(., K)``, clamped to the
output dtype's finite range. Scaling by powers of two commutes with rounding, so for normal numbers this is the
sum of the N decodes rotated back, without overflow in the rotated domain. Because the payloads are added
before rotating back, the clamp applies to the sum: a rotated sum past the dtype's maximum saturates (the
plain codecs clamp each payload and let a true overflow of the sum become Inf).

Wire layout: exactly the inner codec's payload for an fp32 input of shape ``(padded_numel,)`` holding the
rotated (normalized) blocks in order; nothing else. The rotation matrix is not sent: it is a function of
``(block, seed)``, and both are part of the codec's configuration (``block`` is in the spec string, ``seed``
must be equal on every rank, see ``make_codec(hadamard_seed=...)``).

Memory passes (torch reference, per direction): the padded fp32 copy, ``log2(block)`` butterfly stages and the
scaling each make a pass, then the inner codec makes its own. On CPU tensors the fused library does it all in
one pass per direction (``megatron_tpcomp/backends/cpu.py``) for int4/5/6/8 and fp8-e4m3 inner codecs.

Non-finite input: a NaN/Inf anywhere in a rotation block spreads to every rotated value of that block, the inner
codec's rule turns each of its quantization blocks that holds one into NaN, and ``R^T`` spreads those back over
every rotation block they touch. The damage therefore decodes to NaN (never a silent finite value) and stays
within the union of the rotation and quantization blocks around the bad value. Finite inputs of any magnitude
stay finite (the normalization above).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from megatron_tpcomp.codecs.base import (
    Codec,
    CodecError,
    _into,
    check_input,
    check_payload,
    clamp_to,
    from_blocks,
    numel_of,
    to_blocks,
)
from megatron_tpcomp.codecs.blocks import EXPS_BITS, BlockCodec
from megatron_tpcomp.codecs.scales import FP32_TINY_SUB, choose_exponents, pow2_mul
from megatron_tpcomp.spec import CodecSpec, Example, Modifier, register_modifier

_FP32_EPS = 2.0**-24  # unit round-off of fp32


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise CodecError(f"Hadamard block {block!r} is not a power of two >= 2; expected 2, 4, 8, ..., 4096")


@functools.lru_cache(maxsize=32)
def rotation_signs(block: int, seed: int = 0) -> torch.Tensor:
    """fp32 ``[block]`` of +-1: the random signs of the rotation (CPU; cached and shared: do not modify)."""
    _check_block(block)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same signs on every rank and device
    return torch.randint(0, 2, (block,), generator=gen).to(torch.float32) * 2 - 1


@functools.lru_cache(maxsize=32)
def rotation_scale(block: int) -> float:
    """``c = fp32(1 / sqrt(block))``, as a Python float holding the fp32 value (what every backend multiplies by).
    Cached: the backends ask for it on every call, and reading a tensor back into a float there is what the
    no-sync tests forbid on the hot path."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


@functools.lru_cache(maxsize=64)
def _constants_on(block: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device so a GPU encode does not copy the signs from the host on every call.
    signs = rotation_signs(block, seed).to(device)
    return signs, torch.tensor(rotation_scale(block), dtype=torch.float32, device=device)


def fwht(blocks: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform of each row: fp32 ``[nb, block]`` -> new fp32 ``[nb, block]``.

    Stage ``h`` (1, 2, 4, ...) maps each pair ``(a, b) = (v[j], v[j+h])`` of every ``2h`` chunk to ``(a + b, a - b)``;
    ``kernels/cpu_codecs.cpp`` runs the same stages in the same order, so the bits agree.
    """
    nb, block = blocks.shape
    v, h = blocks, 1
    while h < block:
        pairs = v.view(nb, block // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        v = torch.stack((a + b, a - b), dim=2).view(nb, block)
        h *= 2
    return v


def rotate(blocks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``R v`` for each row of fp32 ``[nb, block]``: ``fwht(v * signs) * c`` (see the module docstring)."""
    signs, c = _constants_on(blocks.shape[1], seed, str(blocks.device))
    return fwht(blocks * signs) * c


def unrotate(blocks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``R^T w`` for each row of fp32 ``[nb, block]``: ``fwht(w) * c * signs``."""
    signs, c = _constants_on(blocks.shape[1], seed, str(blocks.device))
    return fwht(blocks) * c * signs


def rotation_matrix(block: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal rotation ``R = H_block / sqrt(block) @ diag(signs)`` as a matrix (for tests and analysis;
    the codec applies it with :func:`rotate`, which agrees with ``R @ v`` up to fp32 rounding).

    Returns:
        fp32 ``[block, block]``; a rotated block is ``R @ v`` (for row-stacked blocks ``V @ R.T``).
    """
    _check_block(block)
    h = torch.ones(1, 1)
    while h.shape[0] < block:  # Sylvester construction: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return ((h / math.sqrt(block)) * rotation_signs(block, seed)).to(device)


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
        block: rotation block size, a power of two >= 2.
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
        rotation_signs(block, seed)  # validates block (and warms the cache)
        self.inner = inner
        self.block_local = inner.block_local  # rotation blocks tile the inner codec's blocks (chunk_alignment)
        self.chunk_values = math.lcm(inner.chunk_values, block)
        self.block = block
        self.seed = seed
        self.spec = f"{inner.spec}+had:b{block}"
        self.cs = None if inner.cs is None else replace(inner.cs, hadamard_block=block)

    @property
    def chunk_alignment(self) -> int:
        """Whole rotation blocks and whole inner chunks: ``lcm(inner.chunk_alignment, block)``."""
        return math.lcm(self.inner.chunk_alignment, self.block)

    def _padded(self, shape: Sequence[int]) -> tuple[int]:
        return (-(-numel_of(shape) // self.block) * self.block,)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.inner.payload_nbytes(self._padded(shape))

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``[padded_numel / block, block]``: the zero-padded blocks of ``x``, each rotated (``R v``)."""
        return rotate(to_blocks(x, self.block), self.seed)

    def _super(self) -> int:
        return int(self.inner.super_values) if isinstance(self.inner, BlockCodec) else 0

    def _by_super(self, flat: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001 - a tensor -> tensor function
        """Apply ``fn`` to fp32 ``flat`` viewed as ``[nsuper, S]`` (zero-padded) and return it flat again."""
        size = self._super()
        n = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, (-n) % size))
        return fn(padded.view(-1, size)).reshape(-1)[:n]

    def _normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 ``[padded_numel / block, block]`` blocks of ``x`` times ``2^-j``, int32 ``j`` ``[nsuper]``): the
        pre-rotation normalization of the module docstring (``j`` from the largest finite ``|x|``)."""
        flat = to_blocks(x, self.block).reshape(-1)
        size = self._super()
        padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % size)).view(-1, size)
        top = torch.where(torch.isfinite(padded), padded.abs(), torch.zeros_like(padded)).amax(dim=1)
        j = choose_exponents(top, None)
        y = self._by_super(flat, lambda v: pow2_mul(v, -j.unsqueeze(1)))
        return y.view(-1, self.block), j

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        if not isinstance(self.inner, BlockCodec):
            return self.inner.encode(self._rotate(x).reshape(-1))
        if x.numel() == 0:
            return self.inner.encode(torch.empty(self._padded(x.shape), device=x.device))
        y, j = self._normalized(x)
        return self.inner.encode_prescaled(rotate(y, self.seed).reshape(-1), j)

    def _decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self._decode_sum(payload, 1, shape, dtype)

    def _decode_sum(
        self,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_payload(payloads, count * self.payload_nbytes(shape), self.spec)
        inner_shape = self._padded(shape)
        if not isinstance(self.inner, BlockCodec):
            flat = self.inner.decode_sum(payloads, count, inner_shape, torch.float32)  # [padded_numel] fp32
            result = from_blocks(unrotate(flat.view(-1, self.block), self.seed), shape, dtype)  # padding dropped
            return _into(result, out, shape)
        n = inner_shape[0]
        if n == 0:
            return _into(torch.empty(tuple(shape), dtype=dtype, device=payloads.device), out, shape)
        nbytes = self.inner.payload_nbytes(inner_shape)
        parts = [payloads[r * nbytes : (r + 1) * nbytes] for r in range(count)]
        ks = torch.stack([self.inner.exponents(p, inner_shape) for p in parts])  # [count, nsuper]
        top = ks.amax(dim=0)
        acc = self.inner.shifted_values(parts[0], inner_shape, ks[0] - top)
        for r in range(1, count):
            acc += self.inner.shifted_values(parts[r], inner_shape, ks[r] - top)
        u = unrotate(acc[:n].view(-1, self.block), self.seed).reshape(-1)
        x = self._by_super(u, lambda v: pow2_mul(v, top.unsqueeze(1)))
        return _into(from_blocks(clamp_to(x, dtype), shape, dtype), out, shape)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Elementwise bound on ``|decode(encode(x), fp32) - x|`` (fp32, shape of ``x``), constant per rotation block.

        Let ``b`` be the inner codec's elementwise bound on the rotated block ``r = fl(R v)``, so the inner
        error ``e`` has ``|e_j| <= b_j``. Exactly, ``R^T (r + e) - v = R^T e``, and every row of ``R^T`` has unit
        L2 norm, so by Cauchy-Schwarz ``|(R^T e)_i| <= |e|_2 <= |b|_2``: the rotation cannot concentrate the
        error. Round-off of the two fp32 rotations adds at most ``gamma * |v|_1`` each, ``gamma = 1.1 * block * 2^-24``
        (the classic dot-product bound ``n u / (1 - n u)`` for any summation order, with headroom: the butterflies
        add along a tree of depth ``log2(block)`` and the scaling by ``c`` rounds once more), plus ``2^-23 |v|_1``
        for ``1/sqrt(block)`` not being exact in fp32 and ``gamma |b|_2`` for the rounding of the error itself.
        Per block:

            bound = (1 + gamma + 2^-23) |b|_2 + (2 gamma + 3 * 2^-24) |v|_1

        Returns None when the inner codec states no bound.
        """
        check_input(x)
        if isinstance(self.inner, BlockCodec):
            blocks, j = self._normalized(x)  # bit-identical to what encode rotates
        else:
            blocks, j = to_blocks(x, self.block), None
        inner = self.inner.max_abs_error_bound(rotate(blocks, self.seed).reshape(-1))
        if inner is None:
            return None
        u = _FP32_EPS
        gamma = 1.1 * self.block * u
        l2_inner = _scaled_l2(inner.view(-1, self.block))  # [nb, 1]
        l1_input = blocks.abs().sum(dim=1, keepdim=True)  # [nb, 1]
        per_block = ((1 + gamma + 2 * u) * l2_inner + (2 * gamma + 3 * u) * l1_input).expand_as(blocks)
        if j is not None:  # back from the normalized domain: exact but for fp32 subnormal results
            per_block = self._by_super(per_block.reshape(-1), lambda v: pow2_mul(v, j.unsqueeze(1)))
            per_block = per_block.view(-1, self.block) + 2 * FP32_TINY_SUB
        return from_blocks(per_block, x.shape, torch.float32)

    def __eq__(self, other: object) -> bool:
        # The seed changes the payload but is not in the spec string: codecs with different seeds differ.
        return isinstance(other, HadamardCodec) and other.spec == self.spec and other.seed == self.seed

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec, self.seed))


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------


def _wrap(inner: Codec, cs: CodecSpec, *, hadamard_seed: int = 0, **_: Any) -> HadamardCodec:
    return HadamardCodec(inner, block=cs.hadamard_block, seed=hadamard_seed)


# Contract-suite bounds: an orthonormal rotation of Gaussian data is Gaussian, so those of the inner codec.
register_modifier(
    Modifier(
        "had",
        _wrap,
        examples=(
            Example("int4:g32+had", 0.12, 4.5 + EXPS_BITS),
            Example("int4:g32+had:b128", 0.12, 4.5 + EXPS_BITS),  # rotation block larger than the group
            Example("fp8+had:b64", 0.032, 8.25 + EXPS_BITS),  # rotation block smaller than the scale block
            Example("nvfp4+had:b16", 0.12, 4.5 + EXPS_BITS),
        ),
    )
)
