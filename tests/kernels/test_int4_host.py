"""The INT4 kernel core (kernels/int4_core.h), compiled for the host, matches the torch reference bit for bit.

The CUDA kernels call the same TPC_HD functions, so these tests pin the exact arithmetic the GPU runs
(the GPU tests in tests/gpu/ check the kernels themselves where a GPU is available).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_tpcomp.codecs import make_codec

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot compile the INT4 core for the host")
    lib = tmp_path_factory.mktemp("int4") / "libint4_host.so"
    # -O2 without -ffast-math: IEEE rounding as on the GPU (the kernels build with -fmad=false).
    subprocess.run(
        [
            "g++",
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-I",
            str(KERNELS),
            str(KERNELS / "int4_host.cpp"),
            "-o",
            str(lib),
        ],
        check=True,
    )
    so = ctypes.CDLL(str(lib))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    so.tpc_float_to_half.argtypes = [ptr, ptr, i64]
    so.tpc_half_to_float.argtypes = [ptr, ptr, i64]
    so.tpc_int4_payload_nbytes.argtypes = [i64, ctypes.c_int]
    so.tpc_int4_payload_nbytes.restype = i64
    so.tpc_int4_quantize.argtypes = [ptr, i64, ctypes.c_int, ptr]
    so.tpc_int4_dequantize_sum.argtypes = [ptr, ctypes.c_int, i64, i64, ctypes.c_int, ptr]
    return so


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def host_quantize(core: ctypes.CDLL, x: torch.Tensor, group: int) -> torch.Tensor:
    xf = x.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(core.tpc_int4_payload_nbytes(xf.numel(), group), dtype=torch.uint8)
    core.tpc_int4_quantize(_ptr(xf), xf.numel(), group, _ptr(out))
    return out


def host_dequantize_sum(core: ctypes.CDLL, payloads: list[torch.Tensor], numel: int, group: int) -> torch.Tensor:
    stacked = torch.stack(payloads).contiguous()
    out = torch.empty(numel, dtype=torch.float32)
    core.tpc_int4_dequantize_sum(_ptr(stacked), len(payloads), stacked.shape[1], numel, group, _ptr(out))
    return out


def special_floats() -> torch.Tensor:
    rng = np.random.default_rng(0)
    vals = [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26]
    # Exact halfway points between neighbouring fp16 values (ties to even) in normal and subnormal ranges.
    for h in (1.0, 1.0009765625, 3.14, 2.0**-20, 2.0**-15, 1000.0):
        base = torch.tensor(h, dtype=torch.float16)
        nxt = torch.nextafter(base, torch.tensor(float("inf"), dtype=torch.float16))
        vals.append((float(base) + float(nxt)) / 2)
    vals += list(rng.standard_normal(2000) * 10.0 ** rng.uniform(-9, 5, 2000))
    t = torch.tensor(vals, dtype=torch.float32)
    bits = torch.from_numpy(rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.int32))
    return torch.cat([t, -t, bits.view(torch.float32), torch.tensor([float("inf"), float("-inf"), float("nan")])])


def test_float_to_half_matches_torch_bit_for_bit(core: ctypes.CDLL) -> None:
    x = special_floats()
    out = torch.empty(x.numel(), dtype=torch.int16)
    core.tpc_float_to_half(_ptr(x), _ptr(out), x.numel())
    ref = x.to(torch.float16).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(out[~nan], ref[~nan])
    # NaN payloads: torch gives the canonical quiet NaN 0x7E00 with the input's sign.
    assert torch.equal(out[nan] & 0x7FFF, torch.full_like(out[nan], 0x7E00))


def test_half_to_float_is_exact_for_every_half(core: ctypes.CDLL) -> None:
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = torch.empty(halves.numel(), dtype=torch.float32)
    core.tpc_half_to_float(_ptr(halves), _ptr(out), halves.numel())
    ref = halves.view(torch.float16).to(torch.float32)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32))


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    heavy = torch.randn(64, 576, generator=g)
    heavy[:, [3, 99, 400]] *= 3000.0
    with_nan = torch.randn(5, 100, generator=g)
    with_nan[2, 7] = float("nan")
    with_nan[4, 50] = float("inf")
    tiny = torch.randn(300, generator=g) * 1e-6  # fp16 scales underflow to subnormals and zero
    return {
        "normal": torch.randn(4096, generator=g),
        "heavy_tailed": heavy,
        "all_zero": torch.zeros(3, 64),
        "nan_inf": with_nan,
        "odd_size": torch.randn(7, 37, generator=g),
        "tiny": tiny,
        "huge": torch.randn(256, generator=g) * 1e6,  # scales clamp at 65504: values saturate like the reference
    }


@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(_inputs()))
def test_quantize_payload_is_byte_identical_to_reference(
    core: ctypes.CDLL, case: str, dtype: torch.dtype, group: int
) -> None:
    x = _inputs()[case].to(dtype)
    ref = make_codec(f"int4:g{group}").encode(x)
    got = host_quantize(core, x, group)
    assert got.numel() == ref.numel()
    mismatch = (got != ref).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} bytes differ, first at {mismatch[:5].tolist()}"


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_sum_is_bit_identical_to_reference(core: ctypes.CDLL, ranks: int, group: int) -> None:
    codec = make_codec(f"int4:g{group}")
    g = torch.Generator().manual_seed(ranks)
    shape = (33, 70)
    parts = [torch.randn(shape, generator=g) * (r + 1) for r in range(ranks)]
    parts[0][5, 5] = float("nan")
    payloads = [codec.encode(p) for p in parts]
    ref = codec.decode(payloads[0], shape, torch.float32)
    for p in payloads[1:]:
        ref += codec.decode(p, shape, torch.float32)
    got = host_dequantize_sum(core, payloads, ref.numel(), group).view(shape)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert nan.any()  # the NaN group must reach the output
    assert torch.equal(got[~nan].view(torch.int32), ref[~nan].view(torch.int32))
