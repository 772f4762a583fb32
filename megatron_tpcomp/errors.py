"""Errors of the bottom layer (spec grammar and codecs), defined here so that ``spec.py`` raises them without
importing ``codecs/``. ``megatron_tpcomp.codecs`` re-exports :class:`CodecError`."""

from __future__ import annotations


class CodecError(ValueError):
    """Bad codec spec, bad input tensor or a malformed payload. The message names the bad value."""
