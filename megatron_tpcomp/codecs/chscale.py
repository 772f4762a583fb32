"""Static per-channel power-of-two scales before another codec (``int4:g64:se4m3+had+chscale``).

Why: a block codec (with or without a Hadamard rotation) spreads its quantization noise evenly over the values of
a block, at a level set by the block's largest values (or, rotated, by the block's energy). A few channels of
the last dimension (hidden) carry most of that energy at many sites of SmolLM2-135M (massive activations: up to
~24,000 against a median of ~1), so the noise they cause swamps the small channels of the same block. Dividing
each channel by a calibrated factor before encoding and multiplying back after decoding evens the channels out:
with per-channel RMS ``r_c`` and scales ``w_c`` the noise of a rotated block is proportional to ``sum w^2 r^2``
and lands on channel c divided by ``w_c^2``, so for channels that matter alike the total error
``sum_c (sum_j w_j^2 r_j^2) / w_c^2`` is smallest at ``w_c ~ r_c^(-1/2)`` (Cauchy-Schwarz). Unlike ``+outliers``
it costs no bits: the scales are static (from calibration) and known to every rank, nothing about them is sent.

Scales are powers of two, ``w_c = 2^e_c`` with integer exponents ``e_c`` in
``[-MAX_EXPONENT, MAX_EXPONENT]``: multiplying and dividing by them is exact in fp32 (no extra rounding, and a
decoded sum divided by ``w`` is the sum of the divided decodes bit for bit), and the table is a short list of
small integers in the config file. :func:`exponents_from_rms` computes them from calibrated per-channel RMS.

Wire format: exactly the inner codec's payload for the scaled input ``x * w`` (fp32), viewed as ``[rows, h]`` with
``h = len(exponents)`` = the last dimension, or flat with ``numel`` a multiple of ``h`` (the pipelined all-reduce
cuts messages on multiples of ``h``: :attr:`ChannelScaleCodec.chunk_alignment`). Decoding multiplies
by ``2^-e_c`` in fp32, clamps to the output dtype's finite range and rounds to it once (the sum of the payloads
is clamped, as for ``+had``: the scaling comes after the inner codec's sum).

Non-finite values travel as the inner codec handles them (scaling keeps NaN and Inf). Range: the inner codec
handles any finite scaled value (``scales.py``, "Second level"), but ``x * 2^e`` itself must be finite: values
with ``|x| * 2^e`` above fp32's maximum (``|x| > 2^112`` for ``e = 16``: fp32 or bf16 inputs only, never an fp16
one) become Inf and their block decodes to NaN, visibly (the collectives' ``check_finite`` reports it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from megatron_tpcomp.codecs.base import Codec, CodecError, _into, check_input, clamp_to, numel_of
from megatron_tpcomp.spec import CodecSpec, Modifier, register_modifier

#: Largest |exponent| of a channel scale (2^16: more evens out nothing a real activation has).
MAX_EXPONENT = 16


def exponents_from_rms(rms: Sequence[float] | torch.Tensor, power: float = 0.5) -> list[int]:
    """Channel-scale exponents ``e_c = round(-power * log2(r_c / median r))`` clamped to +-MAX_EXPONENT.

    Args:
        rms: per-channel RMS of the communicated tensor (calibration), ``[h]``; zero or non-finite channels get 0.
        power: 0.5 minimises the noise summed over channels (see the module docstring); 0 disables.
    """
    r = torch.as_tensor(rms, dtype=torch.float64).flatten()
    if r.numel() == 0:
        raise CodecError("channel RMS table is empty; expected one value per channel")
    ok = torch.isfinite(r) & (r > 0)
    if not bool(ok.any()):
        return [0] * r.numel()
    med = r[ok].median()
    e = torch.where(ok, torch.round(-power * torch.log2(torch.where(ok, r, med) / med)), torch.zeros_like(r))
    return [int(v) for v in e.clamp(-MAX_EXPONENT, MAX_EXPONENT).tolist()]


def _validate_exponents(exponents: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(exponents, torch.Tensor):
        if exponents.dtype.is_floating_point or exponents.dtype == torch.bool or exponents.dim() != 1:
            raise CodecError(
                f"channel scale exponents must be a 1-D integer tensor, got {exponents.dtype} {tuple(exponents.shape)}"
            )
        values = [int(v) for v in exponents.tolist()]
    elif isinstance(exponents, (str, bytes)):
        raise CodecError(f"channel scale exponents must be a sequence of integers, got {exponents!r}")
    else:
        values = []
        for v in exponents:
            if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
                raise CodecError(f"channel scale exponent {v!r} is not an integer; expected powers of two as exponents")
            values.append(int(v))
    if not values:
        raise CodecError("the channel scale table is empty; expected one exponent per channel (or drop '+chscale')")
    bad = [v for v in values if abs(v) > MAX_EXPONENT]
    if bad:
        raise CodecError(f"channel scale exponent {bad[0]} is out of range; expected -{MAX_EXPONENT}..{MAX_EXPONENT}")
    return torch.tensor(values, dtype=torch.int32)


class ChannelScaleCodec(Codec):
    """Scale the channels of the last dimension by static powers of two, encode with ``inner``, scale back.

    Args:
        inner: the codec of the scaled tensor (any codec that is not row-structured).
        exponents: ``[h]`` integer exponents (channel c is multiplied by ``2^e_c`` before encoding).
    """

    row_structured = True

    def __init__(self, inner: Codec, exponents: Sequence[int] | torch.Tensor):
        if not isinstance(inner, Codec):
            raise CodecError(f"ChannelScaleCodec wraps a Codec, got {type(inner).__name__}")
        if inner.row_structured:
            raise CodecError(f"'+chscale' cannot wrap the row-structured codec {inner.spec!r}")
        self.inner = inner
        self._exponents = _validate_exponents(exponents)
        self.h = int(self._exponents.numel())
        self.spec = f"{inner.spec}+chscale"
        self.cs = None if inner.cs is None else replace(inner.cs, chscale=True)
        self.block_local = inner.block_local  # blocks of the scaled tensor are the inner codec's blocks
        self.chunk_values = inner.chunk_values
        self._scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def chunk_alignment(self) -> int:
        """Whole rows and whole inner chunks: ``lcm(inner.chunk_alignment, h)``, so every value keeps its channel."""
        return math.lcm(self.inner.chunk_alignment, self.h)

    @property
    def exponents(self) -> list[int]:
        return [int(v) for v in self._exponents.tolist()]

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(2^e, 2^-e) as fp32 ``[h]`` on ``device``, cached."""
        key = str(device)
        if key not in self._scales:
            e = self._exponents.to(torch.float32)
            self._scales[key] = (torch.exp2(e).to(device), torch.exp2(-e).to(device))
        return self._scales[key]

    def _rows(self, shape: Sequence[int]) -> int:
        n = numel_of(shape)
        if len(shape) > 1 and int(shape[-1]) != self.h:
            raise CodecError(
                f"tensor of shape {tuple(shape)} has {shape[-1]} channels; the '+chscale' table has {self.h}"
            )
        if n % self.h:
            raise CodecError(
                f"tensor of shape {tuple(shape)} ({n} values) is not a whole number of rows of the {self.h} "
                f"channels of the '+chscale' table; expected a last dimension of {self.h}"
            )
        return n // self.h

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        self._rows(shape)
        return self.inner.payload_nbytes(shape)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        rows = self._rows(x.shape)
        up, _ = self._factors(x.device)
        scaled = x.reshape(rows, self.h).float() * up  # exact: powers of two
        return self.inner.encode(scaled.reshape(x.shape))

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
        rows = self._rows(shape)
        _, down = self._factors(payloads.device)
        acc = self.inner.decode_sum(payloads, count, shape, torch.float32).reshape(rows, self.h)
        acc *= down  # exact; the one rounding to dtype follows
        # The inner sum is formed before the per-channel scaling, so (as for +had) the clamp to the dtype's finite
        # range applies to the sum: a finite fp16 65504 whose decode rounds past it stays finite.
        return _into(clamp_to(acc, dtype).to(dtype), out, shape)

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """The inner codec's bound on ``x * w``, divided by ``w`` per channel (None if the inner has none)."""
        check_input(x)
        rows = self._rows(x.shape)
        up, down = self._factors(x.device)
        inner = self.inner.max_abs_error_bound((x.reshape(rows, self.h).float() * up).reshape(x.shape))
        if inner is None:
            return None
        return (inner.reshape(rows, self.h) * down).reshape(x.shape)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ChannelScaleCodec)
            and other.spec == self.spec
            and other.inner == self.inner
            and torch.equal(other._exponents, self._exponents)
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec, hash(self.inner), tuple(self._exponents.tolist())))


# --- registration (megatron_tpcomp/spec.py) --------------------------------------------------------------------


def _wrap(
    inner: Codec, cs: CodecSpec, *, channel_scale_exponents: Sequence[int] | torch.Tensor | None = None, **_: Any
) -> ChannelScaleCodec:
    # make_codec refuses a '+chscale' spec without exponents before building anything
    return ChannelScaleCodec(inner, channel_scale_exponents)


# No contract-suite examples: the codec needs a table of one exponent per channel of the message's last dimension,
# which the suite's many shapes do not share (tests/codecs/test_chscale.py covers it).
register_modifier(Modifier("chscale", _wrap))
