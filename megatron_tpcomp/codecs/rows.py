"""Outlier token rows in BF16, the rest through another codec (``int4:g32+had+rows:k4``).

Massive activations sit on a few tokens (in SmolLM2-135M the first token and some delimiters carry values up to
~10^4 times the median in every MLP output, measured): in a rotated group of such a row every value carries
that spike's quantization noise, and the first token is the attention sink every later token reads. This
modifier sends, per message, the K token rows with the largest ``max |x|`` in BF16 and everything else through
the inner codec, which sees those rows as zeros.

Rows are the ``[rows, h]`` view of the input (``h = shape[-1]``; a 1-D tensor is one row). The number of rows
sent in BF16 is ``min(K, rows // ROWS_PER_OUTLIER)``: at most one row in 64, so a message under 64 tokens (a
decode step) is the inner codec alone and the overhead stays under ``16 / 64`` bits per value.

Selection: the rows with the largest ``max |x|`` (NaN counts as largest; ties to the lower index), sent in
ascending order with their indices.

Wire layout for ``[rows, h]`` and ``k = min(K, rows // 64)`` rows (sections at 16-byte offsets):

=========  ======================  ==============================================================
section    type, count             content
=========  ======================  ==============================================================
indices    int32, k                the chosen rows, ascending
outliers   bfloat16, k*h           those rows times ``2^-e``, row-major ``[k, h]``
out_exp    int16, 1                ``e`` (2-byte aligned, right after the outliers)
inner      uint8, inner bytes      inner codec payload of the ``[rows, h]`` input with the chosen rows zeroed
=========  ======================  ==============================================================

Range: ``e`` as in ``+outliers`` (``codecs/outliers.py``): 0 while the largest finite magnitude of the chosen
rows lies in ``[2^-64, 2^64)``. Decoding writes the BF16 rows (times ``2^e``, clamped to the output dtype's
finite range; Inf stays Inf) over the inner codec's decode, whose zeroed rows decode to zero.

Corrupt payload (indices out of ``[0, rows)`` or not ascending): the whole message decodes to NaN, decided on the
device; with ``TPCOMP_CHECK_PAYLOADS=1`` the decoder raises CodecError instead (a host sync).
"""

from __future__ import annotations

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
)
from megatron_tpcomp.codecs.blocks import EXPS_BITS
from megatron_tpcomp.codecs.scales import FP32_TINY_SUB, choose_exponents, pow2_mul
from megatron_tpcomp.spec import CodecSpec, Example, Modifier, register_modifier

#: At most one BF16 row per this many rows of a message.
ROWS_PER_OUTLIER = 64
_BF16_MAX = torch.finfo(torch.bfloat16).max


class RowOutlierCodec(Codec):
    """Send the K token rows with the largest magnitude in BF16 and the whole message, those rows zeroed, with
    ``inner``.

    Args:
        inner: codec of the ``[rows, h]`` message with the chosen rows zeroed.
        k: rows per message (at most ``rows // ROWS_PER_OUTLIER`` of them are sent).
    """

    row_structured = True

    def __init__(self, inner: Codec, k: int):
        if not isinstance(inner, Codec):
            raise CodecError(f"RowOutlierCodec wraps a Codec, got {type(inner).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise CodecError(f"outlier row count k={k!r} is invalid; expected an integer >= 1, e.g. '+rows:k4'")
        self.inner = inner
        self.k = k
        self.spec = f"{inner.spec}+rows:k{k}"
        self.cs = None if inner.cs is None else replace(inner.cs, rows_k=k)

    @property
    def chunk_alignment(self) -> int:
        """The inner codec's (collectives split this row-structured codec's messages on rows)."""
        return self.inner.chunk_alignment

    def rows_sent(self, rows: int) -> int:
        """BF16 rows of a message of ``rows`` rows: ``min(K, rows // ROWS_PER_OUTLIER)``."""
        return min(self.k, rows // ROWS_PER_OUTLIER)

    @staticmethod
    def _rows_h(shape: Sequence[int]) -> tuple[int, int]:
        n = numel_of(shape)
        h = int(shape[-1]) if len(shape) else 1
        return (n // h if h else 0), h

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        """Sections for an input of ``shape`` (see the module docstring)."""
        rows, h = self._rows_h(shape)
        k = self.rows_sent(rows)
        return PayloadLayout(
            [
                ("indices", torch.int32, k),
                ("outliers", torch.bfloat16, k * h),
                ("out_exp", torch.int16, 1, 2),
                ("inner", torch.uint8, self.inner.payload_nbytes((rows, h))),
            ]
        )

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _select(self, x2d: torch.Tensor, k: int) -> torch.Tensor:
        """int64 ``[k]`` row indices, ascending: the k rows with the largest ``max |x|`` (NaN first, ties low)."""
        score = torch.linalg.vector_norm(x2d, ord=float("inf"), dim=1).float()  # [rows]
        order = torch.sort(torch.nan_to_num(score, nan=0.0), descending=True, stable=True).indices
        order = order[torch.sort(torch.isnan(score[order]).to(torch.uint8), descending=True, stable=True).indices]
        return order[:k].sort().values

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        rows, h = self._rows_h(x.shape)
        payload = layout.allocate(x.device)
        if rows == 0 or h == 0:
            return payload
        x2d = x.reshape(rows, h)
        k = self.rows_sent(rows)
        if k == 0:
            layout.view(payload, "inner").copy_(self.inner.encode(x2d))
            return payload
        chosen = self._select(x2d, k)
        layout.view(payload, "indices").copy_(chosen.to(torch.int32))
        outl = x2d[chosen].float()  # [k, h]
        top = torch.where(torch.isfinite(outl), outl.abs(), torch.zeros_like(outl)).amax().reshape(1)
        e = choose_exponents(top, None)
        scaled = pow2_mul(outl, -e)
        scaled = torch.where(torch.isinf(scaled), scaled, scaled.clamp(-_BF16_MAX, _BF16_MAX))
        layout.view(payload, "outliers").copy_(scaled.to(torch.bfloat16).reshape(-1))
        layout.view(payload, "out_exp").copy_(e.to(torch.int16))
        rest = x2d.clone()
        rest[chosen] = 0
        layout.view(payload, "inner").copy_(self.inner.encode(rest))
        return payload

    def _decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        rows, h = self._rows_h(shape)
        if rows == 0 or h == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        out = self.inner.decode(layout.view(payload, "inner"), (rows, h), dtype).reshape(rows, h)
        k = self.rows_sent(rows)
        if k == 0:
            return out.reshape(tuple(shape))
        chosen = layout.view(payload, "indices").to(torch.int64)
        valid = (chosen >= 0).all() & (chosen < rows).all()
        if k > 1:
            valid &= (chosen[1:] > chosen[:-1]).all()
        if check_payloads() and not bool(valid):
            raise CodecError(
                f"{self.spec}: payload carries invalid row indices {chosen.tolist()[:8]}; expected {k} ascending "
                f"rows in [0, {rows})"
            )
        chosen = torch.where(valid, chosen, torch.arange(k, dtype=torch.int64, device=chosen.device))
        e = layout.view(payload, "out_exp").to(torch.int32)
        stored = layout.view(payload, "outliers").view(k, h).float()
        values = torch.where(torch.isinf(stored), stored, clamp_to(pow2_mul(stored, e), dtype))
        out[chosen] = values.to(dtype)
        out.masked_fill_(~valid, float("nan"))
        return out.reshape(tuple(shape))

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Elementwise bound (fp32, shape of ``x``): in the BF16 rows ``|x| * 2^-8`` plus two fp32 subnormal steps
        (as ``+outliers``), elsewhere the inner codec's bound on the message with those rows zeroed. None when
        the inner codec states no bound."""
        check_input(x)
        rows, h = self._rows_h(x.shape)
        if rows == 0 or h == 0:
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        x2d = x.reshape(rows, h)
        k = self.rows_sent(rows)
        if k == 0:
            inner = self.inner.max_abs_error_bound(x2d)
            return None if inner is None else inner.reshape(x.shape)
        chosen = self._select(x2d, k)  # same selection as encode
        rest = x2d.clone()
        rest[chosen] = 0
        bound = self.inner.max_abs_error_bound(rest)
        if bound is None:
            return None
        bound = bound.reshape(rows, h).clone()
        bound[chosen] = x2d[chosen].float().abs() * 2.0**-8 + 2 * FP32_TINY_SUB
        return bound.reshape(x.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowOutlierCodec) and other.spec == self.spec and other.inner == self.inner

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec, hash(self.inner)))


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------


def _wrap(inner: Codec, cs: CodecSpec, **_: Any) -> RowOutlierCodec:
    return RowOutlierCodec(inner, k=cs.rows_k)


# Nominal bits on [2^20, 1024]: K rows of 1024 in bf16 besides the inner codec (K * 16 * 1024 / 2^30 bits per
# value, < 1e-3), indices and alignment (< 1e-6).
register_modifier(
    Modifier(
        "rows",
        _wrap,
        examples=(
            Example("int4:g32+rows:k2", 0.12, 4.5 + EXPS_BITS + 2 * 16 * 1024 / 2**30 + 16 * 8 / 2**30),
            Example("int4:g32+had+rows:k4", 0.12, 4.5 + EXPS_BITS + 4 * 16 * 1024 / 2**30 + 16 * 8 / 2**30),
        ),
    )
)
