"""Kernel backends and the one dispatch that picks them for every codec call.

Importing this package installs its dispatcher into ``codecs/base.py`` (``megatron_tpcomp/__init__.py`` imports
it, so every import of the package does): from then on ``codec.encode`` / ``decode`` / ``decode_sum`` run the
backend that ``TPCOMP_BACKEND`` and the codec's format select (``dispatch.py`` says how). The codecs import
nothing from here; the backends read the codecs' attributes (bits, group, scale format, rotation block, signs).

- ``dispatch.py``   the choice (``TPCOMP_BACKEND``), its log line, the dispatcher
- ``cpu.py``        the fused CPU library (``kernels/cpu_codecs.cpp``): build, load, formats
- ``triton.py``     the Triton kernels (imported on first use; triton is optional): entry points, integer kernels
- ``triton_float.py``  its fp8 / minifloat (nvfp4, mxfp4, fp3-fp6) kernels; ``triton_common.py`` their shared
  bit-exact helpers
- ``cuda_int4.py``  the INT4 CUDA extension (``kernels/int4_*``, built by setup.py where nvcc exists)
- ``te.py``         Transformer Engine's FP8 cast
- ``errors.py``     BackendUnavailableError
"""

from __future__ import annotations

from megatron_tpcomp.backends.dispatch import (
    AUTO_ORDER,
    ENV,
    NAMES,
    BackendDispatcher,
    Choice,
    available,
    choose,
    forced,
    reset,
    setting,
)
from megatron_tpcomp.backends.errors import BackendUnavailableError
from megatron_tpcomp.codecs.base import install_dispatcher

__all__ = [
    "AUTO_ORDER",
    "ENV",
    "NAMES",
    "BackendDispatcher",
    "BackendUnavailableError",
    "Choice",
    "available",
    "choose",
    "forced",
    "reset",
    "setting",
]

install_dispatcher(BackendDispatcher())
