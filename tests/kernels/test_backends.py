"""Backend selection in megatron_tpcomp.kernels: availability with a reason, a clear error when a backend that
cannot run is requested. On a machine with the built extension and a GPU the CUDA branch is covered by
tests/gpu/test_int4_cuda.py."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp import kernels
from megatron_tpcomp.kernels import Backend, KernelUnavailableError


def test_reference_backend_is_always_available() -> None:
    assert kernels.backend_available(Backend.REFERENCE) == (True, "")
    assert kernels.require_backend("reference") is Backend.REFERENCE


@pytest.mark.parametrize("backend", [Backend.CUDA, Backend.TE])
def test_unavailable_backend_says_why(backend: Backend) -> None:
    ok, reason = kernels.backend_available(backend)
    if ok:
        pytest.skip(f"{backend.value} is available here")
    assert reason, "an unavailable backend must come with a reason"
    with pytest.raises(KernelUnavailableError, match=f"'{backend.value}' requested but unavailable: .+"):
        kernels.require_backend(backend.value)


def test_cuda_wrappers_raise_when_the_extension_is_missing() -> None:
    ok, reason = kernels.cuda_int4_available()
    if ok:
        pytest.skip("the INT4 CUDA extension is available here")
    if torch.version.cuda is None:
        assert "CPU build" in reason
    with pytest.raises(KernelUnavailableError, match="unavailable"):
        kernels.int4_quantize_cuda(torch.zeros(64), 32)
    with pytest.raises(KernelUnavailableError, match="unavailable"):
        kernels.int4_dequantize_sum_cuda(torch.zeros(1, 48, dtype=torch.uint8), (64,), 32)


def test_unsupported_group_is_refused_before_the_extension() -> None:
    with pytest.raises(ValueError, match="got 24"):
        kernels.int4_quantize_cuda(torch.zeros(64), 24)


def test_unknown_backend_name() -> None:
    with pytest.raises(ValueError, match="not a valid Backend"):
        kernels.require_backend("triton")
