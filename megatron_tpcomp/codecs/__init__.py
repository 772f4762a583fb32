"""Codecs: bf16/fp16/fp32 tensor <-> one contiguous uint8 payload.

Start here to find a format:

=====================  ==============================  ==========================================
spec family            module                          class
=====================  ==============================  ==========================================
fp8, fp8-e5m2          codecs/fp8.py                   Fp8Codec
int2 .. int8           codecs/intx.py                  IntCodec
mxfp4, nvfp4, fp3-fp6  codecs/microscaling.py          MinifloatCodec
+had                   codecs/hadamard.py              HadamardCodec (wraps another codec)
+outliers              codecs/outliers.py              OutlierCodec (wraps another codec)
+chscale               codecs/chscale.py               ChannelScaleCodec (wraps another codec)
none                   codecs/base.py                  IdentityCodec
=====================  ==============================  ==========================================

``make_codec("int4:g32+had")`` builds one from a spec string (grammar: ``megatron_tpcomp/spec.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_tpcomp.codecs.base import Codec, CodecError, IdentityCodec
from megatron_tpcomp.spec import CodecSpec, canonical, parse_spec

__all__ = ["Codec", "CodecError", "IdentityCodec", "make_codec", "sizing_codec"]


def make_codec(
    spec: str | CodecSpec,
    outlier_channels: Sequence[int] | torch.Tensor | None = None,
    *,
    channel_scale_exponents: Sequence[int] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    hadamard_seed: int = 0,
) -> Codec:
    """Build a codec from a spec string.

    Args:
        spec: a codec spec such as ``"int4:g32+outliers:k9"`` (see ``megatron_tpcomp.spec``).
        outlier_channels: static outlier channel indices (last dimension) for ``+outliers``; without them,
            ``+outliers:k<K>`` selects the K largest channels of each message and sends their indices.
        channel_scale_exponents: for ``+chscale``: the static per-channel exponents ``[h]`` (from calibration).
        dtype: for ``none`` only: the dtype whose raw bytes travel.
        hadamard_seed: seed of the random signs of ``+had`` (must be equal on every rank).
    """
    cs = parse_spec(spec)
    if cs.kind == "none":
        if outlier_channels is not None:
            raise CodecError("outlier channels were given for codec 'none'; they need a '+outliers' spec")
        if channel_scale_exponents is not None:
            raise CodecError("channel scales were given for codec 'none'; they need a '+chscale' spec")
        return IdentityCodec(dtype)
    if channel_scale_exponents is not None and not cs.chscale:
        raise CodecError(
            f"channel scales were given but spec {canonical(cs)!r} has no '+chscale' modifier; "
            f"use {canonical(cs)}+chscale"
        )
    if cs.chscale and channel_scale_exponents is None:
        raise CodecError(
            "'+chscale' needs the static per-channel scale exponents from calibration "
            "(make_codec(..., channel_scale_exponents=[...]), 'channel_scale_exponents' in a config file)"
        )
    if outlier_channels is not None and not cs.outliers:
        raise CodecError(
            f"outlier channels were given but spec {canonical(cs)!r} has no '+outliers' modifier; "
            f"use {canonical(cs.base)}+outliers"
        )
    codec: Codec
    if cs.kind == "int":
        from megatron_tpcomp.codecs.intx import IntCodec

        codec = IntCodec(cs.base)
    elif cs.kind == "fp8":
        from megatron_tpcomp.codecs.fp8 import Fp8Codec

        codec = Fp8Codec(cs.base)
    elif cs.kind == "minifloat":
        from megatron_tpcomp.codecs.microscaling import MinifloatCodec

        codec = MinifloatCodec(cs.base)
    else:
        raise CodecError(f"spec kind {cs.kind!r} has no codec")
    if cs.hadamard_block:
        from megatron_tpcomp.codecs.hadamard import HadamardCodec

        codec = HadamardCodec(codec, block=cs.hadamard_block, seed=hadamard_seed)
    if cs.outliers:
        from megatron_tpcomp.codecs.outliers import OutlierCodec

        codec = OutlierCodec(codec, channels=outlier_channels, k=cs.outliers_k)
    if cs.chscale:
        from megatron_tpcomp.codecs.chscale import ChannelScaleCodec

        codec = ChannelScaleCodec(codec, channel_scale_exponents)
    return codec


def sizing_codec(spec: str | CodecSpec, hidden: int, outlier_k: int | None = None) -> Codec:
    """A codec of ``spec`` for sizing payloads without a calibration: the static tables of ``+outliers``
    (``outlier_k`` channels, default hidden/64 as calibration picks) and ``+chscale`` (``hidden`` exponents) are
    stand-ins of the calibrated sizes. Payload sizes depend on nothing else; never send with it."""
    cs = parse_spec(spec)
    k = max(hidden // 64, 1) if outlier_k is None else outlier_k
    channels = list(range(k)) if cs.outliers and not cs.outliers_k else None  # ':k<K>' picks per message
    exponents = [0] * hidden if cs.chscale else None
    return make_codec(cs, outlier_channels=channels, channel_scale_exponents=exponents)
