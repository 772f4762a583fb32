"""The one kernel dispatch: which backend runs a codec call (encode, decode, decode_sum).

Backends (every one writes the reference's payload bytes and decodes its bits):

=========  ==========================  ==========================================================================
name       module                      runs
=========  ==========================  ==========================================================================
reference  the codec (``codecs/``)     every format, every device: the torch code that defines the wire format
cpu        ``backends/cpu.py``         CPU tensors: int4/5/6/8:g<G> (fp16 or e4m3 scales), fp8-e4m3 (fp32
                                       scales), their +had, any of these +chscale
triton     ``backends/triton.py``      CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``): int4/5/6/8:g32/64/128
                                       with fp16 or e4m3 scales; fp8 (e4m3/e5m2), nvfp4, mxfp4 and fp3-fp6 with
                                       blocks of 16..256 and any scale format; each plain, +had and/or +chscale
cuda       ``backends/cuda_int4.py``   CUDA tensors: int4:g<G> (fp16 scales, G in 8..256), the built extension
te         ``backends/te.py``          CUDA tensors: the fp8 codecs' encode, plain or +had (TE's FP8 cast)
=========  ==========================  ==========================================================================

``TPCOMP_BACKEND`` (read on every call) chooses:

- ``auto`` (default): CUDA tensors try cuda, triton, te; CPU tensors try cpu; the first that can run here and
  implements the call runs it, else the reference. A fused kernel that raises on its first call (a Triton kernel
  that does not compile for this GPU, say) hands that call to the reference for good, with one warning.
- ``reference``, ``cpu``, ``triton``, ``cuda``, ``te``: that backend. When it cannot run the call here (not built
  or not importable, no device, another device type, Triton built for the other of GPU and interpreter) the call
  raises :class:`BackendUnavailableError` (a CodecError) naming the variable and the reason. Calls it does not
  implement (a format outside its list above, te's decode) run the reference, and the logged line says why.

``Fp8Codec(backend="torch" | "te")`` chooses the backend of that codec whatever ``TPCOMP_BACKEND`` says.
The replaced variables ``TPCOMP_CPU_KERNELS`` and ``TPCOMP_GPU_KERNELS`` raise when set, saying what to set instead.

The choice depends only on the codec (type, spec, rotation seed), the call (encode or decode), the device type,
the dtype and the setting, never on data: it is remembered per such key and logged once (INFO, logger
``megatron_tpcomp.backends.dispatch``: codec, call, device, backend and why). Wrapper codecs (+had, +outliers,
+chscale) that no backend implements run their reference, which calls the inner codec's public methods: the
inner codec still gets its fused kernel.

Installed into ``codecs/base.py`` (:func:`megatron_tpcomp.codecs.base.install_dispatcher`) when
``megatron_tpcomp.backends`` is imported, which ``megatron_tpcomp/__init__.py`` does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

from megatron_tpcomp.backends import cpu, cuda_int4, te
from megatron_tpcomp.backends.errors import BackendUnavailableError
from megatron_tpcomp.codecs.base import SUPPORTED_DTYPES, Codec, CodecError, check_out, check_payload, numel_of

ENV = "TPCOMP_BACKEND"
#: The values of ``TPCOMP_BACKEND``.
NAMES = ("auto", "reference", "cpu", "triton", "cuda", "te")
#: ``auto``'s order per device type (then the reference).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "te"), "cpu": ("cpu",)}
#: The variables ``TPCOMP_BACKEND`` replaced, with the value mapping.
REPLACED = {
    "TPCOMP_CPU_KERNELS": "auto -> auto, on -> cpu, off -> reference",
    "TPCOMP_GPU_KERNELS": "auto -> auto, triton -> triton, reference -> reference",
}
#: ``Fp8Codec(backend=...)`` values -> backend (None: ``TPCOMP_BACKEND`` decides).
CODEC_BACKENDS: dict[str, str | None] = {"auto": None, "torch": "reference", "te": "te"}

_log = logging.getLogger(__name__)


class Backend(Protocol):
    """What a backend module provides (``cpu``, ``cuda_int4``, ``te``, and the Triton adapter below)."""

    def unsupported(self, codec: Codec, op: str) -> str | None: ...

    def unavailable(self, device_type: str) -> str | None: ...

    def encode(self, codec: Codec, x: torch.Tensor) -> torch.Tensor: ...

    def decode_sum(
        self,
        codec: Codec,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None,
    ) -> torch.Tensor: ...


class _Triton:
    """The ``triton`` backend, imported on first use: triton is optional, and the import fixes whether the kernels
    are built for the GPU or for Triton's interpreter (``TRITON_INTERPRET=1`` at that moment)."""

    def __init__(self) -> None:
        self.module: ModuleType | None = None
        self.error: str | None = None

    def load(self) -> ModuleType | None:
        """``megatron_tpcomp.backends.triton``, or None when it does not import (the reason in ``error``)."""
        if self.module is None and self.error is None:
            try:
                from megatron_tpcomp.backends import triton as kernels
            except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton kernels here"
                self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            else:
                self.module = kernels
        return self.module

    def unsupported(self, codec: Codec, op: str) -> str | None:
        kernels = self.load()
        if kernels is None or kernels.supports(codec):
            return None  # not importable: unavailable() says so
        return f"no Triton kernel for this format (expected {kernels.SUPPORTED})"

    def unavailable(self, device_type: str) -> str | None:
        kernels = self.load()
        if kernels is None:
            return f"triton does not import ({self.error}); install triton"
        if device_type not in ("cuda", "cpu"):
            return f"the Triton kernels run on CUDA tensors (CPU tensors under TRITON_INTERPRET=1), not {device_type}"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        if kernels.INTERPRETED and device_type == "cuda":
            return "the Triton kernels were built for the interpreter (TRITON_INTERPRET=1): unset TRITON_INTERPRET "
            "before importing megatron_tpcomp"
        if not kernels.INTERPRETED and device_type == "cpu":
            return "the Triton kernels were built for the GPU: set TRITON_INTERPRET=1 before importing "
            "megatron_tpcomp to run them on CPU tensors"
        return None

    def encode(self, codec: Codec, x: torch.Tensor) -> torch.Tensor:
        return self.load().encode(codec, x)

    def decode_sum(
        self,
        codec: Codec,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.load().decode_sum(codec, payloads, count, shape, dtype, out)


_triton = _Triton()
BACKENDS: dict[str, Backend] = {"cpu": cpu, "triton": _triton, "cuda": cuda_int4, "te": te}


def triton_module() -> ModuleType | None:
    """``megatron_tpcomp.backends.triton`` (imported on first call), or None when triton does not import."""
    return _triton.load()


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot be imported, or None when they can."""
    _triton.load()
    return _triton.error


def available(name: str) -> tuple[bool, str]:
    """``(True, "")`` when backend ``name`` (one of :data:`NAMES` but ``auto``) can run on some device here, else
    ``(False, reason)``: the reference always; cpu on CPU tensors; triton, cuda and te on CUDA tensors (triton on
    CPU tensors when built for the interpreter)."""
    if name == "reference":
        return True, ""
    if name not in BACKENDS:
        raise CodecError(f"unknown backend {name!r}; expected one of {', '.join(NAMES[1:])}")
    if name == "triton" and _triton.load() is not None and _triton.module.INTERPRETED:
        why = _triton.unavailable("cpu")
    else:
        why = BACKENDS[name].unavailable("cpu" if name == "cpu" else "cuda")
    return why is None, why or ""


def setting() -> str:
    """``$TPCOMP_BACKEND`` (default ``auto``). Raises CodecError for any other value, and when one of the replaced
    variables is set (it would otherwise be ignored silently)."""
    for old, mapping in REPLACED.items():
        if old in os.environ:
            raise CodecError(
                f"{old}={os.environ[old]!r} is no longer read: {ENV} replaced it ({old} {mapping}); unset {old}"
            )
    return _parse(os.environ.get(ENV, "auto"))


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Within the block, ``TPCOMP_BACKEND=name`` (the benchmarks time the reference this way); restored after."""
    _parse(name)
    old = os.environ.get(ENV)
    os.environ[ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


@functools.lru_cache(maxsize=16)
def _parse(raw: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in NAMES:
        raise CodecError(f"{ENV}={raw!r} is not valid; expected one of {', '.join(NAMES)}")
    return value


@dataclass(frozen=True)
class Choice:
    """The backend that runs a kind of call, why, and who forced it (None: ``auto``)."""

    backend: str
    reason: str
    forced_by: str | None = None


_choices: dict[tuple, Choice] = {}
_verified: set[tuple] = set()  # keys whose fused kernel has run once without error


def _codec_key(codec: Codec) -> tuple:
    return type(codec).__name__, getattr(codec, "spec", "?"), getattr(codec, "seed", None)


def _requested(codec: Codec) -> tuple[str, str | None]:
    """(the backend asked for, who asked: ``TPCOMP_BACKEND=...``, ``Fp8Codec(backend=...)`` or None for auto)."""
    preferred = getattr(codec, "backend", "auto")
    wanted = CODEC_BACKENDS.get(preferred) if isinstance(preferred, str) else None
    if wanted is not None:
        return wanted, f"{type(codec).__name__}(backend={preferred!r})"
    env = setting()
    return env, None if env == "auto" else f"{ENV}={env}"


def _lookup(codec: Codec, op: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, Choice]:
    wanted, forced_by = _requested(codec)
    key = (*_codec_key(codec), op, device.type, dtype, wanted)
    choice = _choices.get(key)
    if choice is None:
        choice = _decide(codec, op, device.type, wanted, forced_by)
        _choices[key] = choice
        _log.info(
            "megatron-tpcomp: %s %s on %s %s: backend %s (%s)",
            key[1],
            op,
            device.type,
            str(dtype).removeprefix("torch."),
            choice.backend,
            choice.reason,
        )
    return key, choice


def choose(codec: Codec, op: str, device: torch.device | str, dtype: torch.dtype) -> Choice:
    """The backend that runs ``op`` (``"encode"`` or ``"decode"``; decode covers decode_sum) of ``codec`` for
    ``dtype`` tensors (the input of encode, the output of decode) on ``device``'s type. Raises
    BackendUnavailableError where a forced backend cannot run it."""
    if op not in ("encode", "decode"):
        raise CodecError(f"op {op!r}; expected 'encode' or 'decode'")
    return _lookup(codec, op, torch.device(device), dtype)[1]


def _decide(codec: Codec, op: str, device_type: str, wanted: str, forced_by: str | None) -> Choice:
    if wanted == "reference":
        return Choice("reference", f"{forced_by}", forced_by)
    if forced_by is not None:
        backend = BACKENDS[wanted]
        why = backend.unsupported(codec, op)
        if why is not None:
            return Choice("reference", f"{forced_by} does not implement this call: {why}", forced_by)
        why = backend.unavailable(device_type)
        if why is not None:
            raise BackendUnavailableError(f"{forced_by} cannot run {codec.spec} {op} on {device_type} tensors: {why}")
        return Choice(wanted, f"{forced_by}", forced_by)
    reasons = []
    for name in AUTO_ORDER.get(device_type, ()):
        backend = BACKENDS[name]
        why = backend.unsupported(codec, op)
        if why is None:
            why = backend.unavailable(device_type)
            if why is None:
                return Choice(name, f"{ENV}=auto: {name} implements this call and runs here")
            if name == "cpu":
                _warn_reference_on_cpu(why)
        reasons.append(f"{name}: {why}")
    return Choice("reference", f"{ENV}=auto: " + ("; ".join(reasons) or f"no fused backend for {device_type} tensors"))


@functools.lru_cache(maxsize=4)
def _warn_reference_on_cpu(reason: str) -> None:
    """One warning per process (per reason): the CPU reference codecs are ~100x slower than the fused library."""
    _log.warning(
        "megatron-tpcomp: the torch reference codecs run instead of the fused CPU codec library (much slower; "
        "set %s=reference to choose that, =cpu to make it an error): %s",
        ENV,
        reason,
    )


def _run(
    key: tuple, choice: Choice, codec: Codec, fused: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor]
):  # noqa: ANN202
    """``fused()``; under ``auto`` the first call per key that raises (anything but a CodecError: a Triton compile
    error on an unsupported GPU, say) hands the key to the reference for good, with one warning."""
    if choice.forced_by is not None or key in _verified:
        return fused()
    try:
        result = fused()
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference still gives the right bytes
        _choices[key] = Choice("reference", f"the {choice.backend} kernel failed on its first call ({exc})")
        _log.warning(
            "megatron-tpcomp: %s %s on %s: the %s kernel failed (%s); using the torch reference",
            codec.spec,
            key[3],
            key[4],
            choice.backend,
            exc,
        )
        return reference()
    _verified.add(key)
    return result


class BackendDispatcher:
    """The dispatcher ``codecs/base.py`` calls for every public codec call (see the module docstring)."""

    def encode(self, codec: Codec, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
            return codec._encode(x)  # the reference raises the CodecError naming the bad input
        key, choice = _lookup(codec, "encode", x.device, x.dtype)
        if choice.backend == "reference":
            return codec._encode(x)
        return _run(key, choice, codec, lambda: BACKENDS[choice.backend].encode(codec, x), lambda: codec._encode(x))

    def decode(self, codec: Codec, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(payload, torch.Tensor) or dtype not in SUPPORTED_DTYPES:
            return codec._decode(payload, shape, dtype)
        key, choice = _lookup(codec, "decode", payload.device, dtype)
        if choice.backend == "reference":
            return codec._decode(payload, shape, dtype)
        check_payload(payload, codec.payload_nbytes(shape), codec.spec)
        backend = BACKENDS[choice.backend]
        fused = lambda: backend.decode_sum(codec, payload, 1, shape, dtype, None)  # noqa: E731
        return _run(key, choice, codec, fused, lambda: codec._decode(payload, shape, dtype))

    def decode_sum(
        self,
        codec: Codec,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        if not isinstance(payloads, torch.Tensor) or dtype not in SUPPORTED_DTYPES:
            return codec._decode_sum(payloads, count, shape, dtype, out)
        key, choice = _lookup(codec, "decode", payloads.device, dtype)
        if choice.backend == "reference":
            return codec._decode_sum(payloads, count, shape, dtype, out)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise CodecError(f"{codec.spec}: count={count!r}; expected an int >= 1")
        check_payload(payloads, count * codec.payload_nbytes(shape), codec.spec)
        if out is not None:
            check_out(out, dtype, numel_of(shape))
            if out.device != payloads.device:
                raise CodecError(f"out is on {out.device}; expected the payloads' device {payloads.device}")
        backend = BACKENDS[choice.backend]
        fused = lambda: backend.decode_sum(codec, payloads, count, shape, dtype, out)  # noqa: E731
        return _run(key, choice, codec, fused, lambda: codec._decode_sum(payloads, count, shape, dtype, out))


def reset() -> None:
    """Forget every remembered choice and cached availability (tests that change the machine's state use it)."""
    _choices.clear()
    _verified.clear()
    _warn_reference_on_cpu.cache_clear()
    cpu._load.cache_clear()
