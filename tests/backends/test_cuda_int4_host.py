"""The INT4 kernel core (kernels/int4_core.h), compiled for the host, matches the torch reference bit for bit.

The CUDA kernels call the same TPC_HD functions, so these tests pin the exact arithmetic the GPU runs (the GPU
tests in tests/backends/test_cuda_int4.py check the kernels themselves where a GPU is available). The core is built
twice: plainly (-O2) and with FMA contraction allowed (-march=native -ffp-contract=fast), which must not change
a bit because the core rounds every operation on its own.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_tpcomp.codecs import make_codec

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
BUILDS = {"O2": ["-O2"], "native-fma": ["-O3", "-march=native", "-ffp-contract=fast"]}


@pytest.fixture(scope="module", params=list(BUILDS))
def core(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The host shim kernels/int4_host.cpp compiled with g++ (no -ffast-math: the header refuses it)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot compile the INT4 core for the host")
    lib = tmp_path_factory.mktemp("int4") / f"libint4_host_{request.param}.so"
    cmd = ["g++", *BUILDS[request.param], "-std=c++17", "-Wall", "-Werror", "-shared", "-fPIC"]
    cmd += ["-I", str(KERNELS), str(KERNELS / "int4_host.cpp"), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and request.param != "O2":
        pytest.skip(f"g++ cannot build with {BUILDS[request.param]} here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    so = ctypes.CDLL(str(lib))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for name in ("tpc_float_to_half", "tpc_half_to_float", "tpc_float_to_bf16"):
        getattr(so, name).argtypes = [ptr, ptr, i64]
    for name in ("tpc_int4_payload_nbytes", "tpc_int4_scales_offset"):
        getattr(so, name).argtypes = [i64, cint]
        getattr(so, name).restype = i64
    so.tpc_int4_quantize.argtypes = [ptr, i64, cint, ptr]
    so.tpc_int4_dequantize_sum.argtypes = [ptr, cint, i64, i64, cint, ctypes.c_float, ptr]
    return so


# --- wrappers over the C ABI ----------------------------------------------------------------------------------


def host_quantize(core: ctypes.CDLL, x: torch.Tensor, group: int) -> torch.Tensor:
    """Payload of ``x`` (bf16/fp16 widened to fp32 exactly, as the reference and the kernels' loads do)."""
    xf = x.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(core.tpc_int4_payload_nbytes(xf.numel(), group), dtype=torch.uint8)
    assert core.tpc_int4_quantize(xf.data_ptr(), xf.numel(), group, out.data_ptr()) == 0
    return out


def host_decode_sum(
    core: ctypes.CDLL, payloads: list[torch.Tensor], numel: int, group: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """fp32 ``[numel]`` sum of the decodes in list order, each clamped to ``dtype``'s finite range first."""
    stacked = torch.stack(payloads).contiguous()
    out = torch.empty(numel, dtype=torch.float32)
    top = torch.finfo(dtype).max
    rc = core.tpc_int4_dequantize_sum(
        stacked.data_ptr(), len(payloads), stacked.shape[1], numel, group, top, out.data_ptr()
    )
    assert rc == 0
    return out


def host_round(core: ctypes.CDLL, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype with the core's conversions (what the kernels' stores do)."""
    x = x.contiguous()
    if dtype == torch.float32:
        return x.clone()
    out = torch.empty(x.shape, dtype=torch.int16)
    fn = core.tpc_float_to_half if dtype == torch.float16 else core.tpc_float_to_bf16
    fn(x.data_ptr(), out.data_ptr(), x.numel())
    return out.view(dtype)


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal bits everywhere except NaN payload bits (torch itself writes different NaNs on different paths)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[ref.dtype]
    g, r = got[~nan].view(ints), ref[~nan].view(ints)
    diff = (g != r).nonzero().flatten()
    assert diff.numel() == 0, (
        f"{diff.numel()} values differ, e.g. bits {g[diff[:3]].tolist()} vs {r[diff[:3]].tolist()}"
    )


# --- scalar conversions ---------------------------------------------------------------------------------------


def interesting_floats() -> torch.Tensor:
    """Random values over 30 decades, random bit patterns, exact fp16 ties (normal and subnormal), the fp16
    overflow edge, fp32 subnormals, and every exponent with mantissas around each possible rounding point."""
    rng = np.random.default_rng(0)
    vals = [0.0, 1.0, 65504.0, 65519.0, 65519.996, 65520.0, 1e6, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-26, 1e-40]
    vals += list(rng.standard_normal(4000) * 10.0 ** rng.uniform(-12, 12, 4000))
    t = torch.tensor(vals, dtype=torch.float32)
    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).to(torch.float32)
    nxt = torch.nextafter(halves.to(torch.float16), torch.tensor(float("inf"), dtype=torch.float16)).float()
    ties = (halves.double() + nxt.double()) / 2  # exact in fp32: fp16 neighbours differ in < 12 bits
    exps = np.arange(256, dtype=np.uint32) << 23
    lows = np.array([0, 1, 0x7FF, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFFFF], dtype=np.uint32)
    for shift in range(13, 25):  # every subnormal-half rounding position: half - 1, half, half + 1
        lows = np.concatenate([lows, (1 << (shift - 1)) + np.array([-1, 0, 1]), (3 << (shift - 1)) + np.array([0])])
    structured = (exps[:, None] | (lows.astype(np.uint32) & 0x7FFFFF)[None, :]).reshape(-1)
    bits = np.concatenate([structured, rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)])
    raw = torch.from_numpy(bits.view(np.int32)).view(torch.float32)
    pos = torch.cat([t, halves, ties.float(), raw.abs()])
    return torch.cat([pos, -pos, torch.tensor([float("inf"), float("-inf"), float("nan")])])


def test_float_to_half_matches_torch_bit_for_bit(core: ctypes.CDLL) -> None:
    x = interesting_floats()
    got = host_round(core, x, torch.float16)
    ref = x.to(torch.float16)
    assert_same_bits(got, ref)
    nan = torch.isnan(x)
    assert torch.equal(got.view(torch.int16)[nan] & 0x7FFF, torch.full_like(got.view(torch.int16)[nan], 0x7E00))


def test_float_to_bf16_matches_torch_bit_for_bit(core: ctypes.CDLL) -> None:
    x = interesting_floats()
    assert_same_bits(host_round(core, x, torch.bfloat16), x.to(torch.bfloat16))


def test_half_to_float_is_exact_for_every_half(core: ctypes.CDLL) -> None:
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = torch.empty(halves.numel(), dtype=torch.float32)
    core.tpc_half_to_float(halves.data_ptr(), out.data_ptr(), halves.numel())
    assert_same_bits(out, halves.view(torch.float16).to(torch.float32))


# --- payloads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [2, 8, 16, 32, 64, 128, 256, 4096])
def test_layout_matches_reference(core: ctypes.CDLL, group: int) -> None:
    codec = make_codec(f"int4:g{group}")
    for n in [0, 1, 2, 7, 31, 32, 33, 64, 100, 1000, 4096, 4097, 123457]:
        layout = codec.layout((n,))
        assert core.tpc_int4_payload_nbytes(n, group) == layout.nbytes, n
        if n:
            assert core.tpc_int4_scales_offset(n, group) == layout.sections["scales"].offset, n
            # The exponents (one int16 per 4096 values) follow the scales without padding.
            scales = layout.sections["scales"]
            assert layout.sections["exps"].offset == scales.offset + 2 * scales.count
            assert layout.sections["exps"].count == -(-n // 4096)


def test_bad_group_is_refused(core: ctypes.CDLL) -> None:
    x = torch.zeros(64)
    buf = torch.zeros(256, dtype=torch.uint8)
    for g in (0, 3, 6, 8192):  # 6: even, but it does not divide the 4096-value super-block
        assert core.tpc_int4_quantize(x.data_ptr(), 64, g, buf.data_ptr()) == -1


def scale_rounding_groups(group: int) -> torch.Tensor:
    """Groups whose amax makes ``fp16(amax / 7)`` differ from ``fp16(amax * fp32(1/7))`` (about 1 amax in 20000):
    they pin true division, which torch uses on the CPU (torch on CUDA multiplies by the reciprocal)."""
    rng = np.random.default_rng(7)
    amax = (np.abs(rng.standard_normal(400_000)) * 10.0 ** rng.uniform(-4, 4, 400_000)).astype(np.float32)
    div = (amax / np.float32(7)).astype(np.float16)
    mul = (amax * np.float32(1 / 7)).astype(np.float16)
    picked = torch.from_numpy(amax[div != mul][:16])
    assert picked.numel() >= 4
    groups = torch.rand(picked.numel(), group, generator=torch.Generator().manual_seed(3)) * 2 - 1
    groups = groups * picked[:, None]
    groups[:, group // 2] = -picked  # the amax itself, negative to exercise abs
    return groups


@lru_cache(maxsize=1)
def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    heavy = torch.randn(64, 576, generator=g)
    heavy[:, [3, 99, 400]] *= 3000.0
    student = torch.distributions.StudentT(2.0).sample((40, 96)).float()  # heavy-tailed everywhere
    with_nan = torch.randn(5, 100, generator=g)
    with_nan[2, 7] = float("nan")
    with_nan[4, 50] = float("inf")
    with_nan[0, 0] = float("-inf")
    ties = torch.randint(-14, 15, (32, 64), generator=g).float() / 2  # x * inv lands on .5 often: rint ties
    ties[:, 0] = 7.0  # amax 7 -> scale 1
    return {
        "normal": torch.randn(4096, generator=g),
        "heavy_tailed": heavy,
        "student_t": student,
        "all_zero": torch.zeros(3, 64),
        "nan_inf": with_nan,
        "odd_size": torch.randn(7, 37, generator=g),  # 259 values: the last group is zero-padded
        "tiny": torch.randn(300, generator=g) * 1e-6,  # fp16 scales become subnormal or zero
        "subnormal_fp32": torch.randn(128, generator=g) * 1e-40,  # all scales zero: every code is 8
        "huge": torch.randn(256, generator=g) * 1e6,  # beyond 7 * 65504: the super-block exponent scales down
        "fp32_max": torch.tensor([3.4e38, -3.4e38, 1.0, 0.0] * 16),
        "fp16_max": torch.tensor([65504.0, -65504.0, 3.0, 0.0] * 16),  # decodes to 65520 unless clamped
        # Super-blocks of 1e-30 next to super-blocks of 1 and of 1e38, fp32 subnormals in between.
        "mixed_range": torch.cat([torch.randn(4096, generator=g) * s for s in (1e-30, 1.0, 1e38, 1e-44, 1e3)]),
        "ties": ties,
        "one_value": torch.tensor([-2.5]),
        "scale_rounding_g32": scale_rounding_groups(32),
        "scale_rounding_g128": scale_rounding_groups(128),
    }


@cache
def _reference_payload(case: str, dtype: torch.dtype, group: int) -> torch.Tensor:
    """Reference encodes, shared by both host builds (the reference is most of this file's run time)."""
    return make_codec(f"int4:g{group}").encode(_inputs()[case].to(dtype))


@pytest.mark.parametrize("group", [16, 32, 64, 128, 8, 256, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_payload_is_byte_identical_to_reference(core: ctypes.CDLL, dtype: torch.dtype, group: int) -> None:
    for case, x in _inputs().items():
        x = x.to(dtype)
        ref = _reference_payload(case, dtype, group)
        got = host_quantize(core, x, group)
        assert got.numel() == ref.numel(), case
        bad = (got != ref).nonzero().flatten()
        assert bad.numel() == 0, f"{case}: {bad.numel()} bytes differ, first at {bad[:5].tolist()}"


@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bit_identical_to_reference(core: ctypes.CDLL, dtype: torch.dtype, group: int) -> None:
    codec = make_codec(f"int4:g{group}")
    for case, x in _inputs().items():
        payload = codec.encode(x)
        got = host_round(core, host_decode_sum(core, [payload], x.numel(), group, dtype), dtype).view(x.shape)
        try:
            assert_same_bits(got, codec.decode(payload, x.shape, dtype))
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from None


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_sum_is_bit_identical_to_reference(
    core: ctypes.CDLL, ranks: int, group: int, dtype: torch.dtype
) -> None:
    """Clamp each decode to dtype's range, add in fp32, left to right, cast once: ``Codec.decode_sum``."""
    codec = make_codec(f"int4:g{group}")
    g = torch.Generator().manual_seed(ranks)
    shape = (33, 130)  # two super-blocks
    magnitudes = 10.0 ** torch.randint(-3, 4, (ranks,), generator=g).float()
    parts = [torch.randn(shape, generator=g) * m for m in magnitudes]
    parts[0][5, 5] = float("nan")  # one group of rank 0 is NaN in every rank's sum
    parts[-1][20:22] = 0.0  # zero groups (scale 0)
    parts[1][30, :4] = torch.finfo(dtype).max  # decodes past the dtype's maximum: clamped per payload
    payloads = [codec.encode(p.to(dtype)) for p in parts]
    want = codec.decode_sum(torch.cat(payloads), ranks, shape, dtype)
    top = torch.finfo(dtype).max
    ref = codec.decode(payloads[0], shape, torch.float32).clamp(-top, top)
    for p in payloads[1:]:
        ref = ref + codec.decode(p, shape, torch.float32).clamp(-top, top)
    got = host_decode_sum(core, payloads, ref.numel(), group, dtype).view(shape)
    assert torch.isnan(ref).any()
    assert_same_bits(got, ref)
    assert_same_bits(host_round(core, got, dtype), ref.to(dtype))
    assert_same_bits(host_round(core, got, dtype), want)
