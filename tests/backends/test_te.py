"""FP8 through Transformer Engine (CUDA + TE only): TE-encoded payloads use the reference wire layout and decode
exactly like the reference's; whether the bytes are identical too is reported (``-s`` prints it, and it is
recorded as a junit property). Also: the torch reference on CUDA gives the CPU reference's bytes.

Skipped with a reason where there is no CUDA device or Transformer Engine does not import.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from megatron_tpcomp import backends
from megatron_tpcomp.backends import te
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.spec import parse_spec

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_te = pytest.mark.skipif(
    bool(te.import_error()),
    reason=f"needs NVIDIA Transformer Engine (transformer_engine[pytorch]); import failed: {te.import_error()}",
)
pytestmark = [pytest.mark.gpu, needs_cuda]

SPECS = ["fp8", "fp8-e5m2:b128", "fp8:b32:sfp16", "fp8:b16:se8m0", "fp8-e5m2:b64:sbf16"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def awkward_input(dtype: torch.dtype) -> torch.Tensor:
    """CUDA ``[37, 579]`` (not a multiple of any block): N(0,1) * 5 with an outlier channel, an all-zero row, a NaN,
    an Inf, and rows whose values mostly fall in the fp8 subnormal range of their block's scale."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 579, generator=gen) * 5
    x[:, 3] *= 300.0
    x[4] = 0.0
    x[7, 11] = float("nan")
    x[9, 100] = float("inf")
    x[11:14] *= 1e-4  # next to a 1e4 value in the same block, these land in the subnormals
    x[11:14, ::64] = 1e4
    return x.to(dtype).cuda()


@needs_te
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_te_payload_decodes_like_the_reference(
    spec: str, dtype: torch.dtype, record_property: Callable[[str, object], None]
) -> None:
    cs = parse_spec(spec)
    x = awkward_input(dtype)
    te_codec, ref = Fp8Codec(cs, backend="te"), Fp8Codec(cs, backend="torch")
    assert backends.choose(te_codec, "encode", x.device, x.dtype).backend == "te"
    assert backends.choose(ref, "encode", x.device, x.dtype).backend == "reference"
    te_payload, ref_payload = te_codec.encode(x), ref.encode(x)
    assert te_payload.shape == ref_payload.shape and te_payload.device == x.device
    y_te = ref.decode(te_payload, x.shape, torch.float32)
    y_ref = ref.decode(ref_payload, x.shape, torch.float32)
    assert torch.equal(torch.isnan(y_te), torch.isnan(y_ref))
    ok = ~torch.isnan(y_ref)
    assert torch.equal(y_te[ok], y_ref[ok]), "TE codes decode to other values than the reference's"
    identical = bool(torch.equal(te_payload, ref_payload))
    n_diff = int((te_payload != ref_payload).sum())
    record_property("te_bytes_identical", identical)
    print(f"{spec} {dtype}: TE payload bytes identical to the reference: {identical} ({n_diff} bytes differ)")


@needs_te
def test_auto_backend_uses_te_for_cuda_tensors_only() -> None:
    codec = make_codec("fp8")
    assert isinstance(codec, Fp8Codec) and codec.backend == "auto"
    x = torch.randn(4, 256, device="cuda")
    with backends.forced("auto"):
        assert backends.choose(codec, "encode", x.device, x.dtype).backend == "te"
        assert backends.choose(codec, "encode", "cpu", x.dtype).backend != "te"
        assert backends.choose(make_codec("fp8+had"), "encode", x.device, x.dtype).backend == "te"
    # Every backend's payload decodes with the same decode on any device.
    y_cpu = codec.decode(codec.encode(x).cpu(), x.shape, torch.float32)
    y_cuda = codec.decode(codec.encode(x), x.shape, torch.float32).cpu()
    assert torch.equal(y_cpu, y_cuda)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_reference_on_cuda_equals_cpu_bytes(spec: str, dtype: torch.dtype) -> None:
    # The reference on a CUDA tensor (torch's CUDA float8 cast) must give the CPU reference's bytes exactly.
    codec = Fp8Codec(parse_spec(spec), backend="torch")
    x = awkward_input(dtype)
    assert torch.equal(codec.encode(x).cpu(), codec.encode(x.cpu()))
