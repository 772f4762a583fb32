"""Outlier channels in BF16, the rest through another codec (``int4:g32+outliers``, ``int4:g32+outliers:k9``).

Dong et al.: the features TP ranks exchange have consistent outlier channels; sending the top ~hidden/64 of
them in BF16 and the rest in INT4 keeps ~98-99.5% of task quality at ~4.2 bits per value. In SmolLM2-135M the
down_proj partials carry channels up to ~59,000x the median (measured); in a group of 32 such a value sets
the scale and the other 31 values round to zero.

Channels are indices into the LAST dimension (hidden). The input is viewed as ``[rows, h]`` with
``h = shape[-1]`` and ``rows = numel / h``; a 1-D tensor is one row, a 0-d tensor one row of one value. Modes:

- static: a calibrated channel table is given to the codec (``make_codec(spec, outlier_channels=...)``); it is
  stored sorted ascending and nothing about it is sent, so every rank must use the same table;
- dynamic: ``+outliers:k<K>`` without a table picks, per message, the K channels with the largest ``max |x|``
  over all rows (ties to the lower index; NaN counts as largest) and sends their indices.

Wire layout for ``[rows, h]`` and K outlier channels (sections at 16-byte offsets, zero padding between):

=========  ======================  ==============================================================
section    type, count             content
=========  ======================  ==============================================================
indices    int16, K                dynamic mode only: the chosen channels, ascending (so h <= 32768)
outliers   bfloat16, rows*K        the outlier channels times ``2^-e``, row-major ``[rows, K]``,
                                   channels ascending
out_exp    int16, 1                ``e`` (2-byte aligned, right after the outliers)
inner      uint8, inner bytes      inner codec payload for the other channels, an input of shape
                                   ``(rows, h - K)`` with the channels in ascending order
=========  ======================  ==============================================================

Range: ``e = 0`` while the largest finite outlier magnitude lies in ``[2^-64, 2^64)`` (the bf16 bytes are the
values themselves), else ``floor(log2 max)`` (``scales.choose_exponents``' window rule), so fp32 values beyond
bf16's range (above 3.39e38, or fp32 subnormals below bf16's 9.2e-41) keep bf16's 8 significant bits.
Decoding multiplies by ``2^e`` and clamps to the output dtype's finite range (bf16 rounds a finite fp16
65504 to 65536, which is Inf in fp16).

Exact bits per value: ``(16 * rows * K + 16 + 8 * inner_bytes (+ 16 * K dynamic) + alignment) / numel``; for a
large ``[rows, 1024]`` int4:g32 message with K = 9, ``(9 * 16 + 1015 * 4.504) / 1024 = 4.60``.

Non-finite input: NaN/+-Inf in an outlier channel travels as is in BF16 (it stays alone: NaN stays NaN, Inf
keeps its sign); elsewhere the inner codec's rule applies (its block decodes to NaN). Dynamic selection ranks
NaN/Inf channels first, so a non-finite value only reaches the inner codec when more than K channels hold one.

Corrupt payload (dynamic mode: indices out of ``[0, h)``, repeated or not ascending): the whole message decodes
to NaN, decided on the device so that decoding never waits for the GPU (CUDA graphs); with
``TPCOMP_CHECK_PAYLOADS=1`` the decoder raises CodecError naming the indices instead (a host sync per decode).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from megatron_tpcomp.codecs.base import (
    Codec,
    CodecError,
    PayloadLayout,
    check_input,
    check_payload,
    check_payloads,
    clamp_to,
    numel_of,
    to_bf16_saturating,
)
from megatron_tpcomp.codecs.blocks import EXPS_BITS
from megatron_tpcomp.codecs.scales import FP32_TINY_SUB, choose_exponents, pow2_mul
from megatron_tpcomp.spec import CodecSpec, Example, Modifier, register_modifier

#: Indices travel as int16: dynamic mode needs every channel index to fit.
MAX_DYNAMIC_HIDDEN = 32768


def _validate_channels(channels: Sequence[int] | torch.Tensor, k: int) -> torch.Tensor:
    """Check a static table (integers, non-negative, unique, K matches) and return it sorted, int64 CPU ``[K]``."""
    if isinstance(channels, torch.Tensor):
        if channels.dtype.is_floating_point or channels.dtype.is_complex or channels.dtype == torch.bool:
            raise CodecError(f"outlier channels must be integers, got a tensor of dtype {channels.dtype}")
        if channels.dim() != 1:
            raise CodecError(
                f"outlier channels must be a 1-D tensor of channel indices, got shape {tuple(channels.shape)}"
            )
        values = [int(c) for c in channels.tolist()]
    elif isinstance(channels, (str, bytes)):
        raise CodecError(f"outlier channels must be a sequence of integers, got {channels!r}")
    else:
        values = []
        for c in channels:
            try:
                if isinstance(c, bool):
                    raise TypeError
                values.append(operator.index(c))  # int, numpy integers, 0-d integer tensors
            except TypeError:
                raise CodecError(f"outlier channel {c!r} is not an integer; expected channel indices") from None
    if not values:
        raise CodecError("the outlier channel table is empty; expected at least one channel (or drop '+outliers')")
    for c in values:
        if c < 0:
            raise CodecError(f"outlier channel {c} is negative; expected indices in [0, hidden size)")
    seen: set[int] = set()
    for c in values:
        if c in seen:
            raise CodecError(f"outlier channel {c} appears twice in the table; expected unique channels")
        seen.add(c)
    if k and k != len(values):
        raise CodecError(
            f"spec asks for k={k} outlier channels but the table has {len(values)}; expected equal counts "
            "(or '+outliers' without ':k' to take the count from the table)"
        )
    return torch.tensor(sorted(values), dtype=torch.int64)


def _complement(h: int, chosen: torch.Tensor) -> torch.Tensor:
    """The ``h - K`` channels not in ``chosen``, ascending (int64, on ``chosen.device``).

    A stable sort of the keep-mask instead of ``nonzero()``: the count is known, so no host sync on a GPU.
    """
    keep = torch.ones(h, dtype=torch.uint8, device=chosen.device)
    keep[chosen] = 0
    return torch.sort(keep, descending=True, stable=True).indices[: h - chosen.numel()]


class OutlierCodec(Codec):
    """Send K channels of the last dimension in BF16 and the remaining ones with ``inner``.

    Args:
        inner: codec for the non-outlier channels (it sees a ``[rows, h - K]`` tensor); not row-structured.
        channels: static table of channel indices (any order; stored ascending), or None for dynamic mode.
        k: 0 to take K from the table; otherwise K (must equal ``len(channels)`` with a table).
    """

    row_structured = True

    def __init__(self, inner: Codec, channels: Sequence[int] | torch.Tensor | None = None, k: int = 0):
        if not isinstance(inner, Codec):
            raise CodecError(f"OutlierCodec wraps a Codec, got {type(inner).__name__}")
        if inner.row_structured:
            raise CodecError(f"'+outliers' cannot wrap the row-structured codec {inner.spec!r} (given twice?)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise CodecError(f"outlier count k={k!r} is invalid; expected an integer >= 0")
        if channels is None and k == 0:
            raise CodecError(
                "'+outliers' needs a static channel table (make_codec(..., outlier_channels=[...]), from "
                "calibration) or +outliers:k<K> to pick the K largest channels of each message, e.g. '+outliers:k9'"
            )
        self.inner = inner
        self.static = channels is not None
        self._channels = _validate_channels(channels, k) if channels is not None else None
        self.k = int(self._channels.numel()) if self._channels is not None else k
        # The largest static channel as a Python int: the shape check reads it on every call without touching
        # a tensor.
        self._max_channel = int(self._channels[-1]) if self._channels is not None else -1
        self.spec = f"{inner.spec}+outliers" + ("" if self.static else f":k{self.k}")
        k_spec = 0 if self.static else self.k
        self.cs = None if inner.cs is None else replace(inner.cs, outliers=True, outliers_k=k_spec)
        self._index_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def chunk_alignment(self) -> int:
        """The inner codec's (collectives split this row-structured codec's messages on rows)."""
        return self.inner.chunk_alignment

    @property
    def channels(self) -> torch.Tensor | None:
        """The static channel table (int64 CPU ``[K]``, ascending; a copy), or None in dynamic mode."""
        return None if self._channels is None else self._channels.clone()

    def _rows_h(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(rows, h)`` of the ``[rows, h]`` view; validates ``h`` against K and the static table."""
        n = numel_of(shape)
        h = int(shape[-1]) if len(shape) else 1
        if n == 0:
            return 0, h
        if h < self.k:
            raise CodecError(
                f"tensor of shape {tuple(shape)} has {h} channels in its last dimension; '+outliers' with "
                f"{self.k} outlier channels expects at least {self.k}"
            )
        if self._max_channel >= h:
            raise CodecError(
                f"outlier channel {self._max_channel} is out of range for hidden size {h} "
                f"(tensor of shape {tuple(shape)}); expected channels in [0, {h})"
            )
        if not self.static and h > MAX_DYNAMIC_HIDDEN:
            raise CodecError(
                f"hidden size {h} (tensor of shape {tuple(shape)}) is too large for '+outliers:k{self.k}': its "
                f"indices travel as int16; expected at most {MAX_DYNAMIC_HIDDEN} (or use a static table)"
            )
        return n // h, h

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        """Sections for an input of ``shape`` (see the module docstring)."""
        rows, h = self._rows_h(shape)
        sections: list[tuple[str, torch.dtype, int]] = []
        if not self.static:
            sections.append(("indices", torch.int16, self.k))
        sections.append(("outliers", torch.bfloat16, rows * self.k))
        sections.append(("out_exp", torch.int16, 1, 2))
        sections.append(("inner", torch.uint8, self.inner.payload_nbytes((rows, max(h - self.k, 0)))))
        return PayloadLayout(sections)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _static_indices(self, h: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rest) for the static table on ``device``, cached: no host-to-device copy per message."""
        key = (str(device), h)
        if key not in self._index_cache:
            chosen = self._channels.to(device)
            self._index_cache[key] = (chosen, _complement(h, chosen))
        return self._index_cache[key]

    def _select(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rest) int64 channel indices, both ascending: the static table or the top-K by ``max |x|``."""
        h = x2d.shape[1]
        if self._channels is not None:
            return self._static_indices(h, x2d.device)
        # max |x| per channel; NaN propagates through the max. (linalg.vector_norm(ord=inf) avoids the |x|
        # temporary but ran 8x slower on CPU, measured on bf16 [512, 576].)
        score = x2d.abs().amax(dim=0).float()  # [h]
        # Stable descending sorts keep ascending channel order among equals (ties to the lower index); the
        # second one, on "is NaN", moves NaN channels ahead of everything (even +Inf) keeping that order.
        order = torch.sort(torch.nan_to_num(score, nan=0.0), descending=True, stable=True).indices
        order = order[torch.sort(torch.isnan(score[order]).to(torch.uint8), descending=True, stable=True).indices]
        chosen = order[: self.k].sort().values
        return chosen, _complement(h, chosen)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        rows, h = self._rows_h(x.shape)
        payload = layout.allocate(x.device)
        if rows == 0:
            return payload
        x2d = x.reshape(rows, h)  # a view when x is contiguous
        chosen, rest = self._select(x2d)
        if not self.static:
            layout.view(payload, "indices").copy_(chosen.to(torch.int16))
        outl = x2d[:, chosen].float()  # [rows, K] gather
        top = torch.where(torch.isfinite(outl), outl.abs(), torch.zeros_like(outl)).amax().reshape(1)
        e = choose_exponents(top, None)  # 0 unless the outliers leave [2^-64, 2^64): see the module docstring
        scaled = pow2_mul(outl, -e)
        # Guard: a normalized finite value never reaches bf16's maximum, but never let one round to Inf.
        layout.view(payload, "outliers").copy_(to_bf16_saturating(scaled).reshape(-1))
        layout.view(payload, "out_exp").copy_(e.to(torch.int16))
        layout.view(payload, "inner").copy_(self.inner.encode(x2d[:, rest]))  # [rows, h - K] gather
        return payload

    def _decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        rows, h = self._rows_h(shape)
        out = torch.empty((rows, h), dtype=dtype, device=payload.device)
        if rows == 0:
            return out.reshape(tuple(shape))
        valid = None
        if self.static:
            chosen, rest = self._static_indices(h, payload.device)
        else:
            chosen, valid = self._sent_indices(layout.view(payload, "indices"), h)
            rest = _complement(h, chosen)
        e = layout.view(payload, "out_exp").to(torch.int32)
        stored = layout.view(payload, "outliers").view(rows, self.k).float()
        outl = pow2_mul(stored, e)
        # A sent Inf stays Inf; a finite value that rounding pushed past the dtype's maximum is clamped.
        out[:, chosen] = torch.where(torch.isinf(stored), stored, clamp_to(outl, dtype)).to(dtype)
        out[:, rest] = self.inner.decode(layout.view(payload, "inner"), (rows, h - self.k), dtype)
        if valid is not None:  # a corrupt index table poisons the whole message (device-side: no host sync)
            out.masked_fill_(~valid, float("nan"))
        return out.reshape(tuple(shape))

    def _sent_indices(self, sent: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 ``[K]`` channels to scatter into, bool 0-d ``valid``) from a payload's int16 ``indices``.

        Valid indices are K ascending (hence unique) channels in ``[0, h)``. The check runs on the device: an
        invalid table is replaced by channels ``0..K-1`` (so nothing scatters out of bounds) and ``valid`` is
        False, which makes the decode all NaN. With ``TPCOMP_CHECK_PAYLOADS=1``
        (:func:`~megatron_tpcomp.codecs.base.check_payloads`) it raises CodecError naming the indices instead,
        which reads the flag back to the host (a sync: not for CUDA graphs).
        """
        chosen = sent.to(torch.int64)
        valid = (chosen >= 0).all() & (chosen < h).all()
        if self.k > 1:
            valid &= (chosen[1:] > chosen[:-1]).all()  # ascending, hence unique
        if check_payloads() and not bool(valid):
            raise CodecError(
                f"{self.spec}: payload carries invalid outlier indices {chosen.tolist()[:8]}; expected "
                f"{self.k} ascending channels in [0, {h})"
            )
        fallback = torch.arange(self.k, dtype=torch.int64, device=chosen.device)
        return torch.where(valid, chosen, fallback), valid

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Elementwise bound (fp32, shape of ``x``): ``|x| * 2^-8`` plus two fp32 subnormal steps in the outlier
        channels (BF16 round to nearest keeps 8 significant bits of the normalized value; scaling back rounds
        only in fp32's subnormal range), the inner codec's bound on the ``[rows, h - K]`` rest elsewhere. None
        when the inner codec states no bound."""
        check_input(x)
        rows, h = self._rows_h(x.shape)
        bound = torch.zeros((rows, h), dtype=torch.float32, device=x.device)
        if rows == 0:
            return bound.reshape(x.shape)
        x2d = x.reshape(rows, h)
        chosen, rest = self._select(x2d)  # same selection as encode (on the input dtype)
        inner = self.inner.max_abs_error_bound(x2d[:, rest])
        if inner is None:
            return None
        bound[:, chosen] = x2d[:, chosen].float().abs() * 2.0**-8 + 2 * FP32_TINY_SUB
        bound[:, rest] = inner
        return bound.reshape(x.shape)

    def __eq__(self, other: object) -> bool:
        # The static table is not in the spec string; neither is a Hadamard seed inside ``inner``.
        if not isinstance(other, OutlierCodec) or other.spec != self.spec or other.inner != self.inner:
            return False
        if self._channels is None or other._channels is None:
            return self._channels is None and other._channels is None
        return torch.equal(self._channels, other._channels)

    def __hash__(self) -> int:
        table = None if self._channels is None else tuple(self._channels.tolist())
        return hash((type(self).__name__, self.spec, hash(self.inner), table))


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------


def _wrap(
    inner: Codec, cs: CodecSpec, *, outlier_channels: Sequence[int] | torch.Tensor | None = None, **_: Any
) -> OutlierCodec:
    return OutlierCodec(inner, channels=outlier_channels, k=cs.outliers_k)


def _bits(k: int, inner_bits: float, h: int = 1024) -> float:
    """Nominal bits of ``+outliers`` with K channels on ``[2^20, h]``: K bf16 channels, the inner codec on the
    other ``h - K`` (indices and alignment amortize to < 1e-6 bits)."""
    return (k * 16 + (h - k) * inner_bits) / h


# Contract-suite bounds: the outlier channels are nearly exact (bf16), so at most the inner codec's error.
register_modifier(
    Modifier(
        "outliers",
        _wrap,
        examples=(
            Example("int4:g32+outliers:k4", 0.12, _bits(4, 4.5 + EXPS_BITS)),
            Example("int4:g32+outliers", 0.12, _bits(2, 4.5 + EXPS_BITS), outlier_channels=(0, 3)),
            Example("fp8+outliers:k2", 0.032, _bits(2, 8.25 + EXPS_BITS)),
            Example("mxfp4+outliers:k1", 0.145, _bits(1, 4.25 + EXPS_BITS)),
            Example("int4:g32+had+outliers:k4", 0.12, _bits(4, 4.5 + EXPS_BITS)),
        ),
    )
)
