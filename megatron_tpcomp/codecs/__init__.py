"""Codecs: bf16/fp16/fp32 tensor <-> one contiguous uint8 payload.

Start here to find a format:

=====================  ==============================  ==========================================================
spec family            module                          class (defaults)
=====================  ==============================  ==========================================================
fp8, fp8-e5m2          codecs/fp8.py                   Fp8Codec (e4m3, block 128, fp32 scales)
int2 .. int8           codecs/intx.py                  IntCodec (group 32, fp16 scales; ``asym`` adds an offset)
mxfp4, nvfp4, fp3-fp6  codecs/microscaling.py          MinifloatCodec (block 32, e8m0 scales; nvfp4: block 16,
                                                       e4m3 scales and an fp32 tensor scale; fpN: e1m1, e2m1,
                                                       e2m2, e2m3)
+had                   codecs/hadamard.py              HadamardCodec (wraps another codec; block 32)
+outliers              codecs/outliers.py              OutlierCodec (wraps another codec)
+chscale               codecs/chscale.py               ChannelScaleCodec (wraps another codec)
none                   codecs/base.py                  IdentityCodec
=====================  ==============================  ==========================================================

``make_codec("int4:g32+had")`` builds one from a spec string (grammar: ``megatron_tpcomp/spec.py``).

Adding a family takes one module: write the codec class (a :class:`~megatron_tpcomp.codecs.blocks.BlockCodec`
subclass for block formats), and at the bottom of its module call :func:`megatron_tpcomp.spec.register_family`
with its kind, its token parser (defaults included), its canonical form, the class, and a few
:class:`~megatron_tpcomp.spec.Example` specs; then import the module below. The parser, the canonical form,
``make_codec``, the error messages and the contract suite (``tests/codecs/test_all_codecs.py``) take it from the
registry. Modifier wrappers register the same way (:func:`megatron_tpcomp.spec.register_modifier`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The family and modifier modules register themselves with megatron_tpcomp.spec when imported.
from megatron_tpcomp.codecs import chscale, fp8, hadamard, intx, microscaling, outliers, rows  # noqa: F401
from megatron_tpcomp.codecs.base import Codec, CodecError, IdentityCodec
from megatron_tpcomp.spec import CodecSpec, canonical, family, modifier, parse_spec

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
    codec: Codec = family(cs.kind).factory(cs.base)
    for name in cs.modifiers:  # innermost first: +had, then +outliers, then +chscale, then +rows
        codec = modifier(name).wrap(
            codec,
            cs,
            hadamard_seed=hadamard_seed,
            outlier_channels=outlier_channels,
            channel_scale_exponents=channel_scale_exponents,
        )
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
