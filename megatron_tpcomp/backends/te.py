"""The ``te`` backend: Transformer Engine's FP8 cast kernel for the ``fp8`` codecs' encode on CUDA tensors.

Transformer Engine casts with one fp32 factor per *tensor*; the codec's scales are per block, so the codec's
reference computes the blocks, scales and clamp (and the rotation of ``fp8...+had``), and only the cast to FP8
codes runs in Transformer Engine (:meth:`Fp8Codec.with_cast`). Its cast rounds to nearest even and saturates,
like torch's on clamped input, so the bytes are expected to equal the reference's (checked on a GPU by
tests/backends/test_te.py). Decoding is the reference's (this backend implements encode only). Transformer Engine
is optional and GPU-only: it is imported on first use and any import failure means "not usable here".
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from types import ModuleType

import torch

from megatron_tpcomp.backends.errors import BackendUnavailableError
from megatron_tpcomp.codecs.base import Codec
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.codecs.hadamard import HadamardCodec

INSTALL_HINT = "pip install transformer-engine[pytorch], GPU only"


@functools.lru_cache(maxsize=1)
def _import_te() -> tuple[ModuleType | None, str]:
    """``(transformer_engine_torch, "")``, or ``(None, why not)``: imported once."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        import transformer_engine_torch as tex
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not usable here"
        return None, f"{type(exc).__name__}: {exc}"
    return tex, ""


def import_error() -> str:
    """``""`` when Transformer Engine imports here (a CUDA device is another matter), else why not."""
    return _import_te()[1]


def available() -> tuple[bool, str]:
    """``(True, "")`` when Transformer Engine's FP8 cast can run here, else ``(False, reason)``."""
    tex, error = _import_te()
    if tex is None:
        return (
            False,
            f"NVIDIA Transformer Engine (package transformer_engine) does not import ({INSTALL_HINT}): {error}",
        )
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, ""


def unsupported(codec: Codec, op: str) -> str | None:
    """None when this backend runs ``op`` for ``codec`` (the encode of a plain fp8 codec or of its ``+had``),
    else why not."""
    inner = codec.inner if type(codec) is HadamardCodec else codec
    if type(inner) is not Fp8Codec:
        return "Transformer Engine casts the fp8 codecs only (plain or +had)"
    if op != "encode":
        return "Transformer Engine only encodes (the cast); decoding is the reference's"
    return None


def unavailable(device_type: str) -> str | None:
    """None when Transformer Engine can cast tensors of ``device_type`` here, else why not."""
    if device_type != "cuda":
        return f"Transformer Engine casts CUDA tensors only, not {device_type}"
    ok, reason = available()
    return None if ok else reason


def encode(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """``codec.encode(x)`` with the FP8 cast by Transformer Engine (``x``: a CUDA tensor; ``codec``: an Fp8Codec
    or a HadamardCodec around one)."""
    if type(codec) is HadamardCodec:
        twin = copy.copy(codec)
        twin.inner = _casting(codec.inner)
        return twin._encode(x)
    return _casting(codec)._encode(x)


def _casting(codec: Fp8Codec) -> Fp8Codec:
    return codec.with_cast(functools.partial(cast, fp8_dtype=codec.fp8_dtype))


def decode_sum(
    codec: Codec,
    payloads: torch.Tensor,
    count: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Not implemented by this backend (the dispatcher never asks: :func:`unsupported` says so)."""
    raise BackendUnavailableError(f"{codec.spec}: {unsupported(codec, 'decode')}")


def cast(scaled: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover - CUDA + TE only
    """FP8 codes of already-scaled, already-clamped fp32 values through Transformer Engine's cast kernel.

    The per-block factor was applied by the codec (the same fp32 multiply as the reference), so Transformer
    Engine casts with factor 1.

    Args:
        scaled: fp32 CUDA ``[nb, B]`` with ``|values| <= fmax``.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.

    Returns:
        uint8 ``[nb, B]``: the FP8 bit patterns.
    """
    tex, error = _import_te()
    if tex is None:
        raise BackendUnavailableError(f"Transformer Engine does not import here ({error})")
    # The class lives in this module since TE 2.0; newer versions also export it from transformer_engine.pytorch.
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    te_dtype = tex.DType.kFloat8E4M3 if fp8_dtype == torch.float8_e4m3fn else tex.DType.kFloat8E5M2
    dev = scaled.device
    quantizer = Float8Quantizer(
        scale=torch.ones(1, dtype=torch.float32, device=dev),
        amax=torch.zeros(1, dtype=torch.float32, device=dev),
        fp8_dtype=te_dtype,
        rowwise=True,
        columnwise=False,  # no transposed copy: we only need the row-major bytes
    )
    with torch.no_grad():
        fp8_tensor = quantizer(scaled.contiguous())
    return fp8_tensor._data.view(torch.uint8).view(scaled.shape)
