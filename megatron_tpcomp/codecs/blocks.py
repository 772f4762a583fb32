"""What every block codec (integers, fp8, minifloats) shares: blocks, super-block exponents, the ``exps`` section.

A block codec cuts the flattened, row-major input into blocks of ``block`` values (the last one zero-padded),
normalizes each super-block of ``lcm(block, 4096)`` values by ``2^-k`` (``scales.py``, "Second level"), and
hands the normalized fp32 blocks to its own quantizer (:meth:`BlockCodec._quantize`). Its payload is the
quantizer's sections followed by

=========  ===================  ==================================================================
section    type, count          content
=========  ===================  ==================================================================
exps       int16, nsuper        the super-block exponents ``k``, ``nsuper = ceil(nblocks / bps)``
                                with ``bps = lcm(block, 4096) / block`` blocks per super-block; at
                                2-byte alignment right after the previous section
=========  ===================  ==================================================================

Decoding forms each block's values in the normalized domain (fp32, as the quantizer defined them), multiplies
them by ``2^k`` of their super-block (``scales.pow2_mul``: exact, or Inf where the true value is past fp32's
range; scaling the values rather than the scales keeps a code 0 at 0 even when ``s * 2^k`` would overflow) and
clamps them to the output dtype's finite range.
:class:`~megatron_tpcomp.codecs.hadamard.HadamardCodec` uses the two halves separately
(:meth:`BlockCodec.encode_prescaled`, :meth:`BlockCodec.shifted_values`) so that it can rotate in the normalized domain.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs.base import (
    Codec,
    PayloadLayout,
    check_input,
    check_payload,
    clamp_to,
    finite_blocks,
    from_blocks,
    numel_of,
    to_blocks,
)
from megatron_tpcomp.codecs.scales import (
    FP32_TINY_SUB,
    SUPER_VALUES,
    choose_exponents,
    expand_super,
    pow2_mul,
    range_limit,
    super_amax,
    super_values,
)

#: Wire type of the super-block exponents.
EXPS_DTYPE = torch.int16
#: Bits per value the exponents add to a large message (one per super-block): 16 / 4096.
EXPS_BITS = 8 * EXPS_DTYPE.itemsize / SUPER_VALUES


class BlockCodec(Codec):
    """Base of the block codecs: layout with the ``exps`` section, normalization, decode with the clamp.

    Subclasses set ``block``, ``scale_fmt`` and ``spec``, call :meth:`_init_range` and implement
    :meth:`_sections`, :meth:`_quantize`, :meth:`_dequantize` and :meth:`_bound_normalized`.
    """

    block: int
    scale_fmt: str
    #: Largest element magnitude of the format (int: qmax, asymmetric int: 1, fp8/minifloat: the largest value).
    element_max: float

    @property
    def chunk_alignment(self) -> int:
        """Whole blocks: ``block``."""
        return self.block

    def _init_range(self, element_max: float, tensor_scale: bool = False) -> None:
        self.element_max = float(element_max)
        self.super_values = super_values(self.block)
        self.blocks_per_super = self.super_values // self.block
        self.range_limit = range_limit(self.scale_fmt, element_max, tensor_scale)
        self.chunk_values = self.super_values

    # --- what a subclass provides ------------------------------------------------------------------------------

    @abstractmethod
    def _sections(self, nblocks: int) -> list[tuple[str, torch.dtype, int]]:
        """The codec's own sections (codes, scales, ...) for ``nblocks`` blocks, in wire order."""

    @abstractmethod
    def _quantize(self, y: torch.Tensor, bad: torch.Tensor, payload: torch.Tensor, layout: PayloadLayout) -> None:
        """Write the codec's sections for normalized fp32 blocks ``y`` ``[nb, block]`` (non-finite blocks zeroed,
        marked in bool ``bad`` ``[nb]``) into ``payload``."""

    @abstractmethod
    def _dequantize(self, payload: torch.Tensor, layout: PayloadLayout, nblocks: int) -> torch.Tensor:
        """fp32 ``[nblocks, block]`` decoded values in the normalized domain (before the ``2^k`` scaling)."""

    @abstractmethod
    def _bound_normalized(self, y: torch.Tensor) -> torch.Tensor:
        """Elementwise bound (fp32 ``[nb, block]``) on the quantization error of normalized finite blocks ``y``."""

    def _init_payload(self, payload: torch.Tensor, layout: PayloadLayout) -> None:
        """Fill sections whose value for an empty or all-zero input is not zero (nvfp4's tensor scale)."""

    # --- sizes ---------------------------------------------------------------------------------------------------

    def _counts(self, numel: int) -> tuple[int, int]:
        nblocks = -(-numel // self.block)
        return nblocks, -(-nblocks // self.blocks_per_super)

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        # Per element count: every codec call asks (encode, the payload check, decode). Layouts are never modified.
        numel = numel_of(shape)
        return self.memo("_layouts", numel, lambda: self._build_layout(numel))

    def _build_layout(self, numel: int) -> PayloadLayout:
        nblocks, nsuper = self._counts(numel)
        return PayloadLayout([*self._sections(nblocks), ("exps", EXPS_DTYPE, nsuper, EXPS_DTYPE.itemsize)])

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    # --- encode --------------------------------------------------------------------------------------------------

    def _exponents_of(self, blocks: torch.Tensor) -> torch.Tensor:
        """int32 ``[nsuper]`` exponents of finite fp32 blocks ``[nb, block]`` (non-finite blocks zeroed)."""
        return choose_exponents(super_amax(blocks.abs().amax(dim=1), self.blocks_per_super), self.range_limit)

    def _encode_blocks(
        self,
        blocks: torch.Tensor,
        bad: torch.Tensor,
        payload: torch.Tensor,
        layout: PayloadLayout,
        pre: torch.Tensor | None = None,
    ) -> None:
        k = self._exponents_of(blocks)
        y = pow2_mul(blocks, -expand_super(k, self.blocks_per_super, blocks.shape[0]).unsqueeze(1))
        self._quantize(y, bad, payload, layout)
        exps = k if pre is None else k + pre.to(torch.int32)
        layout.view(payload, "exps").copy_(exps.to(EXPS_DTYPE))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        payload = layout.allocate(x.device)
        self._init_payload(payload, layout)
        if x.numel() == 0:
            return payload
        blocks, bad = finite_blocks(x, self.block)  # fp32 [nblocks, block], NaN/Inf blocks zeroed
        self._encode_blocks(blocks, bad, payload, layout)
        return payload

    def encode_prescaled(self, flat: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Encode fp32 ``flat`` ``[n]`` that the caller already multiplied by ``2^-pre`` per super-block (int32
        ``[nsuper]``): the payload stores ``k + pre``, so it decodes to the values before that scaling."""
        layout = self.layout(flat.shape)
        payload = layout.allocate(flat.device)
        self._init_payload(payload, layout)
        if flat.numel():
            blocks, bad = finite_blocks(flat, self.block)
            self._encode_blocks(blocks, bad, payload, layout, pre)
        return payload

    # --- decode --------------------------------------------------------------------------------------------------

    def exponents(self, payload: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """int32 ``[nsuper]``: the super-block exponents stored in ``payload`` (a payload for ``shape``)."""
        return self.layout(shape).view(payload, "exps").to(torch.int32)

    def shifted_values(self, payload: torch.Tensor, shape: Sequence[int], shift: torch.Tensor) -> torch.Tensor:
        """fp32 ``[nblocks * block]`` (padding included, not clamped): the payload's normalized values times
        ``2^shift`` of their super-block (int32 ``[nsuper]``) instead of ``2^k``."""
        layout = self.layout(shape)
        nblocks, _ = self._counts(numel_of(shape))
        per_block = expand_super(shift.to(torch.int32), self.blocks_per_super, nblocks).unsqueeze(1)
        return pow2_mul(self._dequantize(payload, layout, nblocks), per_block).reshape(-1)

    def _decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        n = numel_of(shape)
        if n == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        nblocks, _ = self._counts(n)
        k = expand_super(layout.view(payload, "exps").to(torch.int32), self.blocks_per_super, nblocks).unsqueeze(1)
        values = pow2_mul(self._dequantize(payload, layout, nblocks), k)
        return from_blocks(clamp_to(values, dtype), shape, dtype)

    # --- error bound ---------------------------------------------------------------------------------------------

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on ``|decode(encode(x), fp32) - x|`` for finite ``x`` (fp32, shape of ``x``).

        The subclass bounds the error of the normalized blocks ``y = x * 2^-k`` (:meth:`_bound_normalized`);
        scaling back by ``2^k`` is exact except in fp32's subnormal range, which adds at most: ``2^(k-150)`` for
        ``y`` underflowing at encode, ``2^-150`` for a decoded value rounding into a subnormal, and ``2^-149``
        for rounding the scaled bound itself. The decode clamp only moves values toward ``x``.
        """
        if x.numel() == 0:  # nothing to bound (nvfp4's tensor scale has no maximum to take)
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        blocks = to_blocks(x, self.block)
        k = expand_super(self._exponents_of(blocks), self.blocks_per_super, blocks.shape[0]).unsqueeze(1)
        y = pow2_mul(blocks, -k)
        bound = pow2_mul(self._bound_normalized(y), k)
        tiny = torch.full_like(bound, FP32_TINY_SUB)
        bound = bound + pow2_mul(tiny, k) + 2 * FP32_TINY_SUB
        return from_blocks(bound, x.shape, torch.float32)
