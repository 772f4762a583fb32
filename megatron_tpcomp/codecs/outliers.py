"""Outlier channels in BF16, the rest through a low-bit codec (``int4:g32+outliers``, ``+outliers:k9``).

Dong et al.: the features TP ranks exchange have consistent outlier channels; sending the top ~hidden/64 of
them in BF16 and the rest in INT4 keeps ~98-99.5% of task quality at ~4.2 bits per value.

Channels are indices into the LAST dimension. The input is viewed as ``[rows, h]`` (``rows = numel / h``; a
1-D tensor is one row). Two modes:

- static: a calibrated channel table (sorted, unique) is given to the codec; nothing about it is sent;
- dynamic: ``+outliers:k<K>`` without a table picks, per message, the K channels with the largest ``max |x|``
  over rows (ties to the lower index; NaN counts as largest) and sends their indices.

Wire layout (sections at 16-byte offsets):

=========  ======================  ==============================================================
section    type, count             content
=========  ======================  ==============================================================
indices    int16, K                dynamic mode only: the chosen channels, ascending
outliers   bfloat16, rows*K        the outlier channels, row-major ``[rows, K]``
inner      uint8, inner bytes      inner codec payload of the other channels ``[rows, h-K]``,
                                   channels in ascending order
=========  ======================  ==============================================================

NaN/Inf in an outlier channel travels as-is in BF16; elsewhere the inner codec's rule applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs.base import Codec, CodecError, PayloadLayout, check_input, check_payload, numel_of


def _validate_channels(channels: Sequence[int] | torch.Tensor, k: int) -> torch.Tensor:
    if isinstance(channels, torch.Tensor):
        if channels.dtype.is_floating_point or channels.dtype == torch.bool or channels.dim() > 1:
            raise CodecError(
                f"outlier channels must be a 1-D integer tensor, got {channels.dtype} {tuple(channels.shape)}"
            )
        values = [int(c) for c in channels.tolist()]
    else:
        values = []
        for c in channels:
            if isinstance(c, bool) or not isinstance(c, int):
                raise CodecError(f"outlier channel {c!r} is not an integer")
            values.append(int(c))
    if not values:
        raise CodecError("the outlier channel table is empty; give at least one channel or drop '+outliers'")
    negative = [c for c in values if c < 0]
    if negative:
        raise CodecError(f"outlier channel {negative[0]} is negative; expected indices in [0, hidden)")
    seen: set[int] = set()
    for c in values:
        if c in seen:
            raise CodecError(f"outlier channel {c} appears twice in the table")
        seen.add(c)
    if k and k != len(values):
        raise CodecError(f"spec asks for k={k} outlier channels but the table has {len(values)}")
    return torch.tensor(sorted(values), dtype=torch.int64)


class OutlierCodec(Codec):
    """Send ``channels`` (static) or the top-``k`` channels (dynamic) in BF16 and the rest with ``inner``."""

    row_structured = True

    def __init__(self, inner: Codec, channels: Sequence[int] | torch.Tensor | None = None, k: int = 0):
        if inner.row_structured:
            raise CodecError("'+outliers' cannot be applied twice")
        if channels is None and k <= 0:
            raise CodecError(
                "'+outliers' needs a static channel table (outlier_channels=..., from calibration) "
                "or a count for per-message selection, e.g. '+outliers:k9'"
            )
        self.inner = inner
        self.static = channels is not None
        self._channels = _validate_channels(channels, k) if channels is not None else None
        self.k = int(self._channels.numel()) if self._channels is not None else int(k)
        self.spec = f"{inner.spec}+outliers" + ("" if self.static else f":k{self.k}")

    @property
    def channels(self) -> torch.Tensor | None:
        """The static channel table (int64, ascending), or None in dynamic mode."""
        return self._channels

    def _rows_h(self, shape: Sequence[int]) -> tuple[int, int]:
        n = numel_of(shape)
        h = int(shape[-1]) if len(shape) else 1
        if n == 0:
            return 0, h
        if h <= self.k:
            raise CodecError(
                f"tensor of shape {tuple(shape)} has {h} channels in its last dimension; '+outliers' with "
                f"{self.k} outlier channels needs more than {self.k}"
            )
        if self._channels is not None and int(self._channels[-1]) >= h:
            raise CodecError(
                f"outlier channel {int(self._channels[-1])} is out of range for hidden size {h} "
                f"(tensor of shape {tuple(shape)})"
            )
        return (n // h if h else 0), h

    def layout(self, shape: Sequence[int]) -> PayloadLayout:
        rows, h = self._rows_h(shape)
        sections: list[tuple[str, torch.dtype, int]] = []
        if not self.static:
            sections.append(("indices", torch.int16, self.k))
        sections.append(("outliers", torch.bfloat16, rows * self.k))
        sections.append(("inner", torch.uint8, self.inner.payload_nbytes((rows, max(h - self.k, 0)))))
        return PayloadLayout(sections)

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.layout(shape).nbytes

    def _select(self, x2d: torch.Tensor) -> torch.Tensor:
        """Channels to send in BF16 for this message: the static table or the top-k by max |x|."""
        if self._channels is not None:
            return self._channels.to(x2d.device)
        score = x2d.abs().amax(dim=0) if x2d.shape[0] else x2d.new_zeros(x2d.shape[1])
        score = torch.nan_to_num(score.float(), nan=float("inf"))
        # Stable descending sort: equal scores keep ascending channel order (ties to the lower index).
        order = torch.sort(score, descending=True, stable=True).indices[: self.k]
        return order.sort().values

    @staticmethod
    def _complement(h: int, chosen: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(h, dtype=torch.bool, device=chosen.device)
        keep[chosen] = False
        return keep.nonzero().squeeze(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        layout = self.layout(x.shape)
        rows, h = self._rows_h(x.shape)
        payload = layout.allocate(x.device)
        if rows == 0:
            return payload
        x2d = x.reshape(rows, h)
        chosen = self._select(x2d)
        rest = self._complement(h, chosen)
        if not self.static:
            layout.view(payload, "indices").copy_(chosen.to(torch.int16))
        layout.view(payload, "outliers").copy_(x2d[:, chosen].to(torch.bfloat16).reshape(-1))
        layout.view(payload, "inner").copy_(self.inner.encode(x2d[:, rest]))
        return payload

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        layout = self.layout(shape)
        check_payload(payload, layout.nbytes, self.spec)
        rows, h = self._rows_h(shape)
        out = torch.empty((rows, h), dtype=dtype, device=payload.device)
        if rows == 0:
            return out.reshape(tuple(shape))
        if self.static:
            chosen = self._channels.to(payload.device)
        else:
            chosen = layout.view(payload, "indices").to(torch.int64)
            if bool((chosen < 0).any()) or bool((chosen >= h).any()) or chosen.unique().numel() != self.k:
                raise CodecError(f"{self.spec}: payload carries invalid outlier indices {chosen.tolist()[:8]}")
        rest = self._complement(h, chosen)
        out[:, chosen] = layout.view(payload, "outliers").view(rows, self.k).to(dtype)
        out[:, rest] = self.inner.decode(layout.view(payload, "inner"), (rows, h - self.k), dtype)
        return out.reshape(tuple(shape))

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Outlier channels: BF16 rounding, ``|x| * 2**-8``; other channels: the inner codec's bound."""
        rows, h = self._rows_h(x.shape)
        x2d = x.reshape(rows, h).to(torch.float32)
        chosen = self._select(x2d)
        rest = self._complement(h, chosen)
        inner = self.inner.max_abs_error_bound(x2d[:, rest])
        if inner is None:
            return None
        bound = torch.empty_like(x2d)
        bound[:, chosen] = x2d[:, chosen].abs() * 2.0**-8
        bound[:, rest] = inner
        return bound.reshape(x.shape)
