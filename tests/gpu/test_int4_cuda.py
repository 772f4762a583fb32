"""INT4 CUDA kernels vs the torch reference on a GPU: byte-identical payloads, bit-identical decoded sums."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_tpcomp import kernels
from megatron_tpcomp.codecs import make_codec

pytestmark = pytest.mark.gpu

_available, _reason = kernels.cuda_int4_available()
requires_kernels = pytest.mark.skipif(not _available, reason=f"INT4 CUDA kernels unavailable: {_reason}")


@requires_kernels
@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (512, 576), (7, 37), (4096, 4096)])
def test_quantize_matches_reference_bytes(shape: tuple[int, ...], dtype: torch.dtype, group: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    x.view(-1)[::997] *= 500.0
    if x.numel() > 100:
        x.view(-1)[50] = float("nan")
    ref = make_codec(f"int4:g{group}").encode(x.cpu())
    got = kernels.int4_quantize_cuda(x, group).cpu()
    assert torch.equal(got, ref), f"{int((got != ref).sum())} bytes differ"


@requires_kernels
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_sum_matches_reference_bits(ranks: int, dtype: torch.dtype) -> None:
    codec = make_codec("int4:g32")
    shape = (300, 576)
    parts = [torch.randn(shape) * (r + 1) for r in range(ranks)]
    payloads = [codec.encode(p) for p in parts]
    ref = codec.decode(payloads[0], shape, torch.float32)
    for p in payloads[1:]:
        ref += codec.decode(p, shape, torch.float32)
    ref = ref.to(dtype)
    got = kernels.int4_dequantize_sum_cuda(torch.stack(payloads).cuda(), shape, 32, dtype).cpu()
    assert torch.equal(
        got.view(torch.int16 if dtype != torch.float32 else torch.int32),
        ref.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


@requires_kernels
def test_bad_arguments_name_the_value() -> None:
    x = torch.randn(64, device="cuda")
    with pytest.raises(RuntimeError, match="group sizes .* got 24"):
        kernels.int4_quantize_cuda(x, 24)
    with pytest.raises(RuntimeError, match="need"):
        kernels.int4_dequantize_sum_cuda(torch.zeros(2, 10, dtype=torch.uint8, device="cuda"), (64,), 32)


@requires_kernels
def test_throughput_is_reported() -> None:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        p = kernels.int4_quantize_cuda(x, 32)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        p = kernels.int4_quantize_cuda(x, 32)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 20
    gbps = (x.numel() * 2 + p.numel()) / dt / 1e9
    print(f"int4 quantize 8192x8192 bf16: {dt * 1e3:.3f} ms, {gbps:.0f} GB/s of memory traffic")
    assert gbps > 0
