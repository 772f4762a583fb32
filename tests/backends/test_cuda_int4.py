"""INT4 CUDA kernels vs the torch reference on a GPU: byte-identical payloads, bit-identical decodes and sums.

The reference is the torch codec; it divides by a tensor (``codecs.base.divide``) because torch on CUDA computes
``tensor / 7`` as ``tensor * (1/7)``; test_cuda_reference_matches_cpu_reference pins that the torch codec gives
the same bytes on both devices.
Needs a CUDA device and the built extension (``pip install --no-build-isolation -e .`` with a CUDA torch).
"""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp import backends
from megatron_tpcomp.backends import cuda_int4 as kernels
from megatron_tpcomp.codecs import make_codec

_available, _reason = kernels.cuda_int4_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _available, reason=f"INT4 CUDA kernels unavailable: {_reason}"),
]

GROUPS = (8, 16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """CPU tensor with heavy-tailed channels, a NaN, an inf, a zero run and tiny values (where they fit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[::997] *= 500.0
    n = flat.numel()
    if n > 600:
        flat[50] = float("nan")
        flat[300] = float("-inf")
        flat[400:528] = 0.0
        flat[528:600] *= 1e-7
    return x.to(dtype)


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal bits except NaN payloads (torch writes different NaN bits on different paths)."""
    got = got.cpu()
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    g, r = got[~nan].view(INT_VIEW[ref.dtype]), ref[~nan].view(INT_VIEW[ref.dtype])
    diff = (g != r).nonzero().flatten()
    assert diff.numel() == 0, f"{diff.numel()} of {r.numel()} values differ, first at {diff[:5].tolist()}"


def assert_same_bytes(got: torch.Tensor, ref: torch.Tensor) -> None:
    got = got.cpu()
    assert got.dtype == torch.uint8 and got.shape == ref.shape, (got.dtype, got.shape, ref.shape)
    diff = (got != ref).nonzero().flatten()
    assert diff.numel() == 0, f"{diff.numel()} of {ref.numel()} bytes differ, first at {diff[:8].tolist()}"


# --- quantize -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (512, 576), (7, 37), (3, 5, 333), (1,), (8,)])
def test_quantize_matches_reference_bytes(shape: tuple[int, ...], dtype: torch.dtype, group: int) -> None:
    x = make_input(shape, dtype)
    ref = make_codec(f"int4:g{group}").encode(x)
    got = kernels.int4_quantize_cuda(x.cuda(), group)
    assert got.device.type == "cuda"
    assert_same_bytes(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_large_tensor(dtype: torch.dtype) -> None:
    x = make_input((4096, 4096), dtype, seed=1)
    assert_same_bytes(kernels.int4_quantize_cuda(x.cuda(), 32), make_codec("int4:g32").encode(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_strided_and_unaligned_views(dtype: torch.dtype) -> None:
    """Transposed input (copied first) and views starting off a 16-byte boundary (scalar loads)."""
    base = make_input((130, 96), dtype, seed=2)
    codec = make_codec("int4:g32")
    xt = base.t()
    assert_same_bytes(kernels.int4_quantize_cuda(base.cuda().t(), 32), codec.encode(xt))
    for offset in (1, 3, 8):
        view = base.view(-1)[offset : offset + 9000]
        on_gpu = base.cuda().view(-1)[offset : offset + 9000]
        assert_same_bytes(kernels.int4_quantize_cuda(on_gpu, 32), codec.encode(view))


def test_quantize_empty_tensor() -> None:
    got = kernels.int4_quantize_cuda(torch.empty(0, 16, device="cuda"), 32)
    assert got.numel() == 0 and got.dtype == torch.uint8


def test_quantize_is_deterministic() -> None:
    x = make_input((256, 1000), torch.bfloat16).cuda()
    assert torch.equal(kernels.int4_quantize_cuda(x, 32), kernels.int4_quantize_cuda(x, 32))


def test_cuda_reference_matches_cpu_reference() -> None:
    """The torch codec on CUDA writes the same bytes as on the CPU and as the kernels (it divides by a tensor:
    ``tensor / 7`` on CUDA is ``tensor * (1/7)`` and used to put ~1 in 20000 fp16 scales one ulp off)."""
    x = make_input((2048, 4096), torch.float32, seed=3)
    codec = make_codec("int4:g32")
    with backends.forced("reference"):  # the torch codec on both devices, not the CPU library or these kernels
        cpu_ref = codec.encode(x)
        assert_same_bytes(codec.encode(x.cuda()).cpu(), cpu_ref)
    assert_same_bytes(kernels.int4_quantize_cuda(x.cuda(), 32), cpu_ref)


def test_dispatch_auto_runs_the_extension_with_the_reference_bytes() -> None:
    """``TPCOMP_BACKEND=auto`` on CUDA tensors picks this extension for plain int4:g<G> (fp16 scales): the codec's
    public calls give the reference's payload and decode_sum bits."""
    codec = make_codec("int4:g64")
    x = make_input((64, 576), torch.bfloat16, seed=5).cuda()
    with backends.forced("auto"):
        assert backends.choose(codec, "encode", x.device, x.dtype).backend == "cuda"
        assert backends.choose(codec, "decode", x.device, x.dtype).backend == "cuda"
        payload = codec.encode(x)
        summed = codec.decode_sum(torch.cat([payload, payload]), 2, x.shape, x.dtype)
    with backends.forced("reference"):
        assert_same_bytes(payload, codec.encode(x).cpu())
        want = codec.decode_sum(torch.cat([payload, payload]), 2, x.shape, x.dtype)
    assert_same_bits(summed, want.cpu())


# --- dequantize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [8, 32, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(512, 576), (7, 37), (5,)])
def test_dequantize_matches_reference_bits(shape: tuple[int, ...], dtype: torch.dtype, group: int) -> None:
    codec = make_codec(f"int4:g{group}")
    payload = codec.encode(make_input(shape, torch.float32))
    got = kernels.int4_dequantize_cuda(payload.cuda(), shape, group, dtype)
    assert got.shape == shape and got.dtype == dtype
    assert_same_bits(got, codec.decode(payload, shape, dtype))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_sum_matches_reference_bits(ranks: int, dtype: torch.dtype, group: int) -> None:
    """decode(p0) + ... + decode(p_{N-1}) in fp32 left to right, each clamped to dtype's finite range, cast once
    (Codec.decode_sum)."""
    codec = make_codec(f"int4:g{group}")
    shape = (301, 577)  # numel not a multiple of 8 or of the group: tail lanes and a padded group
    parts = [make_input(shape, torch.float32, seed=10 + r) * (r + 1) for r in range(ranks)]
    payloads = [codec.encode(p) for p in parts]
    top = torch.finfo(dtype).max
    ref = codec.decode(payloads[0], shape, torch.float32).clamp(-top, top)
    for p in payloads[1:]:
        ref = ref + codec.decode(p, shape, torch.float32).clamp(-top, top)
    got = kernels.int4_dequantize_sum_cuda(torch.stack(payloads).cuda(), shape, group, dtype)
    assert_same_bits(got, ref.to(dtype))
    assert_same_bits(got, codec.decode_sum(torch.cat(payloads), ranks, shape, dtype))


def range_extremes(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[5, 4096] (five super-blocks, one thread block each): the dtype's largest values, 1e-30 (fp32) or
    small normals, subnormals, a 24,000 spike with fp16's 65504, and twelve decades inside one super-block."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    x = torch.randn(5, 4096, generator=g)
    x[0] = (x[0] / 5).clamp(-1, 1) * fi.max
    x[1] *= 1e-30 if dtype == torch.float32 else fi.tiny * 64
    sub = float(torch.tensor(1, dtype=torch.int32 if dtype == torch.float32 else torch.int16).view(dtype))
    x[2] = torch.randint(-9, 10, (4096,), generator=g).float() * sub
    x[3, 100] = 24000.0
    x[3, 200:216] = 65504.0
    x[4] *= torch.logspace(-6, 6, 4096)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
def test_range_extremes_match_reference(dtype: torch.dtype, group: int) -> None:
    """Super-block exponents (block-wide max through shared memory), the two-step powers of two and the
    per-payload clamp, byte for byte and bit for bit."""
    codec = make_codec(f"int4:g{group}")
    parts = [range_extremes(dtype, seed) for seed in range(3)]
    ref = [codec.encode(p) for p in parts]
    for p, r in zip(parts, ref, strict=True):
        assert_same_bytes(kernels.int4_quantize_cuda(p.cuda(), group), r)
    for ranks in (1, 3):
        got = kernels.int4_dequantize_sum_cuda(torch.stack(ref[:ranks]).cuda(), parts[0].shape, group, dtype)
        want = codec.decode_sum(torch.cat(ref[:ranks]), ranks, parts[0].shape, dtype)
        assert_same_bits(got, want)
        if ranks == 1:
            assert torch.isfinite(got).all()


def test_dequantize_sum_of_payload_views_inside_one_buffer() -> None:
    """Payloads gathered into a larger receive buffer: a row-aligned slice of it decodes the same."""
    codec = make_codec("int4:g32")
    shape = (64, 96)
    payloads = torch.stack([codec.encode(make_input(shape, torch.float32, seed=r)) for r in range(4)])
    buf = torch.zeros(6, payloads.shape[1], dtype=torch.uint8)
    buf[1:5] = payloads
    got = kernels.int4_dequantize_sum_cuda(buf.cuda()[1:5], shape, 32, torch.float32)
    want = kernels.int4_dequantize_sum_cuda(payloads.cuda(), shape, 32, torch.float32)
    assert torch.equal(got, want)


# --- argument checks ------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_value() -> None:
    from megatron_tpcomp import _int4_cuda as ext  # the binding's own checks, under the Python wrappers

    x = torch.randn(64, device="cuda")
    with pytest.raises(ValueError, match="got 24"):
        kernels.int4_quantize_cuda(x, 24)
    with pytest.raises(RuntimeError, match="group must be one of .* got 24"):
        ext.int4_quantize(x, 24)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor, got device cpu"):
        ext.int4_quantize(x.cpu(), 32)
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16, got Int"):
        ext.int4_quantize(x.int(), 32)
    with pytest.raises(RuntimeError, match="10 bytes .* need 48"):
        kernels.int4_dequantize_sum_cuda(torch.zeros(2, 10, dtype=torch.uint8, device="cuda"), (64,), 32)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ext.int4_dequantize_sum(torch.zeros(48, dtype=torch.uint8, device="cuda"), 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="must be uint8, got Float"):
        ext.int4_dequantize(torch.zeros(12, device="cuda"), 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="4-byte aligned"):
        ext.int4_dequantize(torch.zeros(49, dtype=torch.uint8, device="cuda")[1:], 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16, got Double"):
        ext.int4_dequantize(torch.zeros(48, dtype=torch.uint8, device="cuda"), 64, 32, torch.float64)


# --- throughput (printed; run with -s to see it) ------------------------------------------------------------


def _time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def test_throughput_is_reported() -> None:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    nbytes_in = x.numel() * x.element_size()
    payload = kernels.int4_quantize_cuda(x, 32)
    ms = _time_ms(lambda: kernels.int4_quantize_cuda(x, 32))
    traffic = nbytes_in + payload.numel()
    print(f"\nint4 quantize  [8192, 8192] bf16 g32: {ms:.3f} ms, {traffic / ms / 1e6:.0f} GB/s of memory traffic")
    for ranks in (1, 8):
        stacked = payload.repeat(ranks, 1)
        ms = _time_ms(lambda s=stacked: kernels.int4_dequantize_sum_cuda(s, x.shape, 32, torch.bfloat16))
        traffic = stacked.numel() + nbytes_in
        print(f"int4 dequantize_sum N={ranks} -> bf16: {ms:.3f} ms, {traffic / ms / 1e6:.0f} GB/s of memory traffic")
    clone_ms = _time_ms(lambda: x.clone())
    print(f"torch clone of the same bf16 tensor: {clone_ms:.3f} ms, {2 * nbytes_in / clone_ms / 1e6:.0f} GB/s")
    assert ms > 0
