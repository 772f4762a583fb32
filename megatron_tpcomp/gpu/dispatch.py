"""The one place that decides whether a codec call runs a fused GPU kernel or the torch reference.

The codecs (``codecs/intx.py``, ``codecs/hadamard.py``) call :func:`encode` / :func:`decode_sum` first; ``None``
means "not handled here", and the codec runs its torch reference (or the fused CPU library) as before.

Control: ``TPCOMP_GPU_KERNELS``

- ``auto`` (default): Triton kernels (``triton_codecs.py``) for CUDA tensors when triton imports, compiles for the
  device (not in interpreter mode) and implements the format; the reference otherwise.
- ``triton``: the Triton kernels for every tensor whose format they implement; CPU tensors need
  ``TRITON_INTERPRET=1`` set before the kernels are imported (Triton's interpreter: how the tests drive this
  exact product path on CPU). Triton missing, or a device the kernels were not built for, raises.
- ``reference``: always the torch reference.

The choice depends only on the codec, the device type and the mode (never on data), is remembered per
``(codec, device type, mode)`` and logged once. In ``auto`` mode a kernel that fails on its first call (it does
not compile for this GPU, say) turns that pair over to the reference, with one warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from megatron_tpcomp.codecs.base import CodecError, check_input, check_out, check_payload, numel_of

ENV = "TPCOMP_GPU_KERNELS"
MODES = ("auto", "triton", "reference")

_log = logging.getLogger(__name__)
_choices: dict[tuple, bool] = {}
_verified: set[tuple] = set()  # (codec, device type, mode) whose Triton kernel has run once without error
_triton: ModuleType | None = None
_triton_error: str | None = None


def mode() -> str:
    """``$TPCOMP_GPU_KERNELS`` (default ``auto``); anything else raises CodecError naming the value."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise CodecError(f"{ENV}={os.environ.get(ENV)!r} is not valid; expected one of {', '.join(MODES)}")
    return value


def triton_module() -> ModuleType | None:
    """``megatron_tpcomp.gpu.triton_codecs``, or None when triton does not import (the reason in
    :func:`triton_unavailable_reason`)."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            from megatron_tpcomp.gpu import triton_codecs
        except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton kernels here"
            _triton_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            _triton = triton_codecs
    return _triton


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot be imported, or None when they can."""
    triton_module()
    return _triton_error


def _use_triton(codec: object, device: torch.device) -> bool:
    """True when the call on ``device`` goes to the Triton kernels (decided once per codec, device type, mode)."""
    m = mode()
    if m == "reference" or device.type not in ("cuda", "cpu") or (m == "auto" and device.type != "cuda"):
        return False
    key = (type(codec).__name__, getattr(codec, "spec", "?"), getattr(codec, "seed", None), device.type, m)
    choice = _choices.get(key)
    if choice is not None:
        return choice
    tc = triton_module()
    if tc is None:
        if m == "triton":
            raise CodecError(
                f"{ENV}=triton but triton does not import ({_triton_error}); install triton or unset {ENV}"
            )
        choice, why = False, f"triton does not import ({_triton_error})"
    elif not tc.supports(codec):
        choice, why = False, "no Triton kernel for this format"
    elif tc.INTERPRETED != (device.type == "cpu"):
        if m == "triton":
            raise CodecError(
                f"{ENV}=triton on a {device.type} tensor, but the Triton kernels were built "
                f"{'for the interpreter (TRITON_INTERPRET=1)' if tc.INTERPRETED else 'for the GPU'}; "
                f"{'unset' if tc.INTERPRETED else 'set'} TRITON_INTERPRET before importing megatron_tpcomp"
            )
        choice, why = False, "Triton runs in interpreter mode (TRITON_INTERPRET=1)"
    else:
        choice, why = True, "Triton kernel" + (" (interpreter)" if tc.INTERPRETED else "")
    _choices[key] = choice
    _log.info("%s on %s: %s (%s=%s)", key[1], device.type, "triton" if choice else f"reference: {why}", ENV, m)
    return choice


def _first_call(codec: object, device: torch.device, fn):  # noqa: ANN001, ANN202 - returns fn()'s result or None
    """``fn()``; in ``auto`` mode the first call per codec and device type that raises (a Triton compile error on an
    unsupported GPU, say) switches that pair to the reference for good, logged once, and returns None."""
    key = (type(codec).__name__, getattr(codec, "spec", "?"), getattr(codec, "seed", None), device.type, mode())
    if key[-1] != "auto" or key in _verified:
        return fn()
    try:
        result = fn()
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference still gives the right bytes
        _choices[key] = False
        _log.warning("%s on %s: Triton kernel failed (%s); using the torch reference", key[1], device.type, exc)
        return None
    _verified.add(key)
    return result


def encode(codec: object, x: torch.Tensor) -> torch.Tensor | None:
    """The payload of ``x`` from the Triton kernel, or None when the reference should run (same contract as
    ``codec.encode``: uint8, 1-D, ``codec.payload_nbytes(x.shape)`` bytes, on ``x.device``)."""
    if not isinstance(x, torch.Tensor) or not _use_triton(codec, x.device):
        return None
    check_input(x)
    return _first_call(codec, x.device, lambda: triton_module().encode(codec, x))


def decode_sum(
    codec: object,
    payloads: torch.Tensor,
    count: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``codec.decode_sum`` by the Triton kernel, or None when the reference should run."""
    if not isinstance(payloads, torch.Tensor) or not _use_triton(codec, payloads.device):
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CodecError(f"{getattr(codec, 'spec', '?')}: count={count!r}; expected an int >= 1")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CodecError(f"{getattr(codec, 'spec', '?')}: output dtype {dtype}; expected float32, float16 or bfloat16")
    check_payload(payloads, count * codec.payload_nbytes(shape), codec.spec)
    if out is not None:
        check_out(out, dtype, numel_of(shape))
        if out.device != payloads.device:
            raise CodecError(f"out is on {out.device}; expected the payloads' device {payloads.device}")
    return _first_call(
        codec, payloads.device, lambda: triton_module().decode_sum(codec, payloads, count, shape, dtype, out)
    )
