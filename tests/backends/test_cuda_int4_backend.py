"""The ``cuda`` backend's interface to the dispatch (megatron_tpcomp/backends/cuda_int4.py): which formats it
claims, availability with a reason, a clear error when it is forced but cannot run. On a machine with the built
extension and a GPU the kernels themselves are covered by tests/backends/test_cuda_int4.py."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp import backends
from megatron_tpcomp.backends import BackendUnavailableError, cuda_int4
from megatron_tpcomp.codecs import CodecError, make_codec


def test_reference_backend_is_always_available() -> None:
    assert backends.available("reference") == (True, "")


@pytest.mark.parametrize("backend", ["cuda", "te"])
def test_unavailable_backend_says_why(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ok, reason = backends.available(backend)
    if ok:
        pytest.skip(f"{backend} is available here")
    assert reason, "an unavailable backend must come with a reason"
    monkeypatch.setenv(backends.ENV, backend)
    backends.reset()
    spec = "int4:g32" if backend == "cuda" else "fp8"
    with pytest.raises(BackendUnavailableError, match=f"TPCOMP_BACKEND={backend} cannot run .+ on cuda tensors: .+"):
        backends.choose(make_codec(spec), "encode", "cuda", torch.bfloat16)


@pytest.mark.parametrize(
    ("spec", "claimed"),
    [
        ("int4:g32", True),
        ("int4:g8", True),
        ("int4:g256", True),
        ("int4:g24", False),  # not a supported group
        ("int4:g32:se4m3", False),  # not fp16 scales
        ("int4:g32:asym", False),
        ("int5:g32", False),
        ("int4:g32+had", False),  # the rotation is the Triton kernels' (or the CPU library's)
        ("fp8", False),
    ],
)
def test_formats_the_extension_implements(spec: str, claimed: bool) -> None:
    for op in ("encode", "decode"):
        assert (cuda_int4.unsupported(make_codec(spec), op) is None) is claimed, (spec, op)


def test_cuda_wrappers_raise_when_the_extension_is_missing() -> None:
    ok, reason = cuda_int4.cuda_int4_available()
    if ok:
        pytest.skip("the INT4 CUDA extension is available here")
    if torch.version.cuda is None:
        assert "CPU build" in reason
    with pytest.raises(BackendUnavailableError, match="unavailable"):
        cuda_int4.int4_quantize_cuda(torch.zeros(64), 32)
    with pytest.raises(BackendUnavailableError, match="unavailable"):
        cuda_int4.int4_dequantize_sum_cuda(torch.zeros(1, 48, dtype=torch.uint8), (64,), 32)


def test_unsupported_group_is_refused_before_the_extension() -> None:
    with pytest.raises(ValueError, match="got 24"):
        cuda_int4.int4_quantize_cuda(torch.zeros(64), 24)


def test_unknown_backend_name() -> None:
    with pytest.raises(CodecError, match="unknown backend 'fast'"):
        backends.available("fast")
