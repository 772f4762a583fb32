"""Outlier token rows in BF16, the rest through another codec (``int4:g32+had+rows:k4``).

Massive activations sit on a few tokens (in SmolLM2-135M the first token and some delimiters carry values up to
~10^4 times the median in every MLP output, measured): in a rotated group of such a row every value carries
that spike's quantization noise, and the first token is the attention sink every later token reads. This
modifier sends, per message, the K token rows with the largest ``max |x|`` in BF16 and everything else through
the inner codec, which sees those rows as zeros.

Rows are the ``[rows, h]`` view of the input (``h = shape[-1]``; a 1-D tensor is one row). The number of rows
sent in BF16 is ``min(K, rows // ROWS_PER_OUTLIER)``: at most one row in 64, so a message under 64 tokens (a
decode step) is the inner codec alone and the overhead stays under ``16 / 64`` bits per value.

Selection: the rows with the largest ``max |x|`` (rows holding NaN or Inf first; ties to the lower index), sent
in ascending order with their indices.

Wire layout for ``[rows, h]`` and ``k = min(K, rows // 64)`` rows (sections at 16-byte offsets):

=========  ======================  ==============================================================
section    type, count             content
=========  ======================  ==============================================================
indices    int64, k                the chosen rows, ascending
outliers   bfloat16, k*h           those rows, row-major ``[k, h]``
inner      uint8, inner bytes      inner codec payload of the ``[rows, h]`` input with the chosen rows zeroed
=========  ======================  ==============================================================

The rows travel as bf16 (the input's own bytes for a bf16 message; fp32 and fp16 input rounded to nearest, with
fp32 values beyond bf16's largest finite value clamped to it, Inf and NaN kept).

Decode-sum of N payloads (decode is the sum of one): the inner codec's sum formed in fp32 (its decode-sum to
fp32, so one fused pass over the N inner payloads; each payload's values clamped to fp32's range), then each
payload's BF16 rows added at their rows in payload order 0..N-1, then the result clamped to the
output dtype's finite range (except an Inf in a row sent in BF16, which stays Inf as in ``+outliers``) and
rounded to it once (as ``+chscale``). Where the inner codec's blocks lie inside
rows (the block and any rotation block divide ``h``) a zeroed row decodes to zero, so a row sent in BF16 comes
back as its BF16 value.

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
    _into,
    check_input,
    check_payload,
    check_payloads,
    clamp_to,
    numel_of,
    to_bf16_saturating,
)
from megatron_tpcomp.codecs.blocks import EXPS_BITS
from megatron_tpcomp.spec import CodecSpec, Example, Modifier, register_modifier

#: At most one BF16 row per this many rows of a message.
ROWS_PER_OUTLIER = 64
#: bf16's smallest subnormal (2^-133): fp32 values below it round to 0 or to it.
BF16_TINY = 2.0**-133


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
        """Sections for an input of ``shape`` (see the module docstring); memoized per ``(rows, h)``."""
        rows_h = self._rows_h(shape)
        return self.memo("_layouts", rows_h, lambda: self._build_layout(*rows_h))

    def _build_layout(self, rows: int, h: int) -> PayloadLayout:
        k = self.rows_sent(rows)
        return PayloadLayout(
            [
                ("indices", torch.int64, k),
                ("outliers", torch.bfloat16, k * h),
                ("inner", torch.uint8, self.inner.payload_nbytes((rows, h))),
            ]
        )

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _select(self, x2d: torch.Tensor, k: int) -> torch.Tensor:
        """int64 ``[k]`` row indices, ascending: the k rows with the largest ``max |x|`` (rows holding NaN or
        Inf first; ties to the lower row)."""
        if x2d.dtype == torch.float32:
            score = torch.nan_to_num(x2d.abs().amax(dim=1), nan=float("inf"))  # [rows]
        else:  # bf16/fp16: the magnitude bits order like the values (NaN above Inf), and integers max faster
            score = (x2d.view(torch.int16) & 0x7FFF).amax(dim=1)
        return torch.sort(score, descending=True, stable=True).indices[:k].sort().values

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        rows, h = self._rows_h(x.shape)
        payload = layout.allocate_padding_zeroed(x.device)  # every section byte is written below
        if rows == 0 or h == 0:
            return payload
        x2d = x.reshape(rows, h)
        k = self.rows_sent(rows)
        inner = x2d
        if k:
            chosen = self._select(x2d, k)
            layout.view(payload, "indices").copy_(chosen)
            layout.view(payload, "outliers").view(k, h).copy_(to_bf16_saturating(x2d[chosen]))
            inner = x2d.index_fill(0, chosen, 0)
        layout.view(payload, "inner").copy_(self.inner.encode(inner))
        return payload

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
        layout = self.layout(shape)
        nbytes = layout.nbytes
        check_payload(payloads, count * nbytes, self.spec)
        rows, h = self._rows_h(shape)
        if rows == 0 or h == 0:
            return _into(torch.empty(tuple(shape), dtype=dtype, device=payloads.device), out, shape)
        per = payloads.view(count, nbytes)  # [N, P]: payload r in row r

        def section(name: str) -> torch.Tensor:
            sec = layout.sections[name]
            return per[:, sec.offset : sec.offset + sec.nbytes]  # [N, bytes], strided

        inner = section("inner").reshape(-1)  # the N inner payloads end to end (a copy when N > 1)
        acc = self.inner.decode_sum(inner, count, (rows, h), torch.float32).reshape(rows, h)
        k = self.rows_sent(rows)
        if k:
            chosen = section("indices").contiguous().view(torch.int64)  # [N, k]
            valid = (chosen >= 0).all() & (chosen < rows).all()
            if k > 1:
                valid &= (chosen[:, 1:] > chosen[:, :-1]).all()
            if check_payloads() and not bool(valid):
                raise CodecError(
                    f"{self.spec}: payload carries invalid row indices {chosen.tolist()[:4]}; expected {k} "
                    f"ascending rows in [0, {rows}) per payload"
                )
            fallback = torch.arange(k, dtype=torch.int64, device=chosen.device).expand(count, k)
            chosen = torch.where(valid, chosen, fallback)
            values = section("outliers").contiguous().view(torch.bfloat16).view(count, k, h).float()
            for r in range(count):  # payload order; one payload's rows are distinct
                acc.index_add_(0, chosen[r], values[r])
            sent = chosen.reshape(-1)
            kept = acc[sent]  # the rows sent in bf16: an Inf there stays Inf, as in +outliers
            # The clamp to dtype's range, with a NaN bound when the index table is corrupt: the whole message
            # decodes to NaN, in the same pass and without a host sync.
            top = torch.where(valid, torch.finfo(dtype).max, float("nan"))
            result = acc.clamp(-top, top)
            result[sent] = torch.where(torch.isinf(kept) & valid, kept, result[sent])
            return _into(result.to(dtype), out, shape)
        return _into(clamp_to(acc, dtype).to(dtype), out, shape)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Elementwise bound (fp32, shape of ``x``): in the BF16 rows ``|x| * 2^-8`` plus bf16's smallest subnormal
        (``BF16_TINY``: fp32 values below it flush), elsewhere the inner codec's bound on the message with those
        rows zeroed. None when the inner codec states no bound."""
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
        bound = self.inner.max_abs_error_bound(x2d.index_fill(0, chosen, 0))  # what encode gives the inner codec
        if bound is None:
            return None
        bound = bound.reshape(rows, h).clone()
        bound[chosen] = x2d[chosen].float().abs() * 2.0**-8 + BF16_TINY
        return bound.reshape(x.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowOutlierCodec) and other.spec == self.spec and other.inner == self.inner

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec, hash(self.inner)))


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------


def _wrap(inner: Codec, cs: CodecSpec, **_: Any) -> RowOutlierCodec:
    return RowOutlierCodec(inner, k=cs.rows_k)


# Nominal bits on [2^20, 1024]: besides the inner codec, K rows of 1024 in bf16 (K * 16 * 1024 / 2^30 bits per
# value) and K int64 indices (K * 64 / 2^30; a multiple of 16 bytes for even K, so no alignment padding).
register_modifier(
    Modifier(
        "rows",
        _wrap,
        examples=(
            Example("int4:g32+rows:k2", 0.12, 4.5 + EXPS_BITS + 2 * (16 * 1024 + 64) / 2**30),
            Example("int4:g32+had+rows:k4", 0.12, 4.5 + EXPS_BITS + 4 * (16 * 1024 + 64) / 2**30),
        ),
    )
)
