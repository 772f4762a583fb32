"""The error a backend raises when it was asked for explicitly but cannot run here."""

from __future__ import annotations

from megatron_tpcomp.codecs.base import CodecError


class BackendUnavailableError(CodecError):
    """A backend was requested (``TPCOMP_BACKEND``, ``Fp8Codec(backend=...)``, a direct kernel call) but cannot run
    here; the message names the request and says why."""
