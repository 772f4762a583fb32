"""The ``cpu`` backend (kernels/cpu_codecs.cpp) writes the reference codecs' bytes and decodes their bits.

Every comparison runs the same codec object twice in one process: with ``TPCOMP_BACKEND=reference`` (the torch
reference, which defines the format) and ``=cpu`` (the library; the test fails if it cannot be built). Payloads
must be equal byte for byte and decodes bit for bit (NaN compared as NaN: torch itself writes different NaN
payload bits on different paths).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp import backends
from megatron_tpcomp.backends import BackendUnavailableError, cpu
from megatron_tpcomp.codecs import CodecError, make_codec

NATIVE_SPECS = [
    "int4:g32",
    "int4:g64",
    "int4:g8",
    "int4:g32+had",
    "int4:g64+had",
    "int4:g32+had:b128",
    "int4:g128+had:b16",
    "fp8",
    "fp8:b32",
    "fp8+had",
    "fp8+had:b256",
    "fp8:b4",  # blocks shorter than the 8-code vector decode: the scalar tail
    # int<N>:g<G> with N in 5, 6, 8 and fp16 or e4m3 scales (the searched per-layer configs' formats first)
    "int5:g64:se4m3+had",
    "int4:g32:se4m3+had",
    "int4:g64:se4m3+had",
    "int6:g128+had:b128",
    "int4:g32:se4m3",
    "int5:g32",
    "int5:g8:se4m3",  # a group size that takes the runtime-G vector path
    "int6:g64:se4m3",
    "int6:g16+had:b8",
    "int8:g32",
    "int8:g128:se4m3+had",
    "int8:g4:se4m3",  # fewer than 8 values per group: scalar groups only
]
#: The formats added to the library with int5/6/8 and e4m3 group scales (each must run there, not in the reference).
NEW_INT_SPECS = [s for s in NATIVE_SPECS if s.startswith(("int5", "int6", "int8")) or ":se4m3" in s]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]
#: The old TPCOMP_CPU_KERNELS modes of these tests -> TPCOMP_BACKEND.
MODES = {"off": "reference", "on": "cpu"}


def with_mode(monkeypatch: pytest.MonkeyPatch, mode: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with the library off (``TPCOMP_BACKEND=reference``) or on (``=cpu``)."""
    monkeypatch.setenv(backends.ENV, MODES[mode])
    return fn()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values with NaN == NaN and the sign of zero compared too."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    ia = a.view(torch.int32 if a.dtype == torch.float32 else torch.int16)
    ib = b.view(torch.int32 if b.dtype == torch.float32 else torch.int16)
    return bool(((ia == ib) | both_nan).all())


def adversarial(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """N(0,1) scaled over six decades per channel, one 300x channel, a zero block, -0, a NaN and an Inf block,
    values near the fp16 scale limit and tiny values whose scales are subnormal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])
    flat = x.view(-1)
    n = flat.numel()
    if n >= 512:
        flat[7 :: shape[-1]] *= 300.0
        flat[64:96] = 0.0
        flat[96:100] = -0.0
        flat[130] = float("nan")
        flat[300] = float("inf")
        flat[400:432] = torch.randn(32, generator=g) * 1e-6
        flat[450:460] = 6e4 if dtype != torch.bfloat16 else 3e5
    return x.to(dtype)


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    ok, why = cpu.available()
    assert ok, f"the CPU codec library must build here (g++ is part of the supported setup): {why}"


@pytest.mark.parametrize("spec", NATIVE_SPECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(200, 576), (3, 37), (5,), (1, 1), (0, 576)])
def test_payload_and_decode_sum_match_the_reference(
    monkeypatch: pytest.MonkeyPatch, spec: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    codec = make_codec(spec)
    assert cpu.native_format(codec) is not None
    inputs = [adversarial(shape, dtype, seed) for seed in range(3)]
    ref = [with_mode(monkeypatch, "off", lambda x=x: codec.encode(x)) for x in inputs]
    got = [with_mode(monkeypatch, "on", lambda x=x: codec.encode(x)) for x in inputs]
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g), f"{spec}: {int((r != g).sum())} of {r.numel()} payload bytes differ"
    for count in (1, 3):
        payloads = torch.cat(ref[:count])
        for out_dtype in DTYPES:
            args = (payloads, count, shape, out_dtype)
            want = with_mode(monkeypatch, "off", lambda args=args: codec.decode_sum(*args))
            have = with_mode(monkeypatch, "on", lambda args=args: codec.decode_sum(*args))
            assert same_bits(want, have), f"{spec} decode_sum({count}) -> {out_dtype}"
    want = with_mode(monkeypatch, "off", lambda: codec.decode(ref[0], shape, dtype))
    have = with_mode(monkeypatch, "on", lambda: codec.decode(ref[0], shape, dtype))
    assert same_bits(want, have)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(NATIVE_SPECS),
    numel=st.integers(1, 3000),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_random_messages_match_the_reference(spec: str, numel: int, log_scale: float, seed: int) -> None:
    codec = make_codec(spec)
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale).bfloat16()
    os.environ[backends.ENV] = "reference"
    try:
        ref = codec.encode(x)
        ref_sum = codec.decode_sum(torch.cat([ref, ref]), 2, x.shape, torch.float32)
        os.environ[backends.ENV] = "cpu"
        got = codec.encode(x)
        got_sum = codec.decode_sum(torch.cat([ref, ref]), 2, x.shape, torch.float32)
    finally:
        os.environ.pop(backends.ENV, None)
    assert torch.equal(ref, got)
    assert same_bits(ref_sum, got_sum)


def range_extremes(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[5, 4096]: one super-block each of N(0,1) scaled to the dtype's largest values, to 1e-30 (fp32; 1e-4 and
    its smallest normals otherwise), to subnormals, to 1 with a 24,000 spike and exact maxima (fp16's 65504
    decodes past its maximum without the clamp), and mixed decades inside one super-block: every super-block gets
    its own exponent, including the two-step powers of two (|k| > 126) for fp32."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    x = torch.randn(5, 4096, generator=g)
    x[0] = (x[0] / 5).clamp(-1, 1) * fi.max
    x[0, :8] = torch.tensor([1.0, -1.0] * 4) * fi.max
    x[1] *= 1e-30 if dtype == torch.float32 else fi.tiny * 64
    sub = float(torch.tensor(1, dtype=torch.int32 if dtype == torch.float32 else torch.int16).view(dtype))
    x[2] = torch.randint(-9, 10, (4096,), generator=g).float() * sub
    x[3, 100] = 24000.0
    x[3, 200:216] = 65504.0
    x[4] *= torch.logspace(-12, 12, 4096) if dtype == torch.float32 else torch.logspace(-3, 3, 4096)
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    x[4, 7] = float("nan")
    return x


@pytest.mark.parametrize("spec", NATIVE_SPECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_range_extremes_match_the_reference(monkeypatch: pytest.MonkeyPatch, spec: str, dtype: torch.dtype) -> None:
    codec = make_codec(spec)
    xs = [range_extremes(dtype, seed) for seed in range(3)]
    xs[1] = xs[1].flip(0)  # the ranks' super-blocks get different exponents: the rotated sum's common one differs
    ref = [with_mode(monkeypatch, "off", lambda x=x: codec.encode(x)) for x in xs]
    got = [with_mode(monkeypatch, "on", lambda x=x: codec.encode(x)) for x in xs]
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g), f"{spec}: {int((r != g).sum())} of {r.numel()} payload bytes differ"
    block = block_codec(codec)
    exps = block.exponents(ref[0], (xs[0].numel(),))
    if block.range_limit is not None or dtype != torch.float16:  # fp32 scales keep k = 0 for all of fp16's range
        assert len(set(exps.tolist())) >= 3, exps  # the super-blocks really do carry different exponents
    for count in (1, 3):
        for out_dtype in DTYPES:
            args = (torch.cat(ref[:count]), count, xs[0].shape, out_dtype)
            want = with_mode(monkeypatch, "off", lambda args=args: codec.decode_sum(*args))
            have = with_mode(monkeypatch, "on", lambda args=args: codec.decode_sum(*args))
            assert same_bits(want, have), f"{spec} decode_sum({count}) -> {out_dtype}"
            if count == 1:
                assert torch.isfinite(want[:4]).all()  # finite in, finite out (row 4 holds the NaN)


def block_codec(codec: object) -> object:
    """The block codec inside ``+had`` / ``+chscale`` wrappers."""
    while hasattr(codec, "inner"):
        codec = codec.inner
    return codec


def test_block_sizes_that_do_not_divide_the_super_block_are_left_to_the_reference() -> None:
    # The library runs one 4096-value super-block per tile; lcm(96, 4096) = 12288 does not fit.
    assert cpu.native_format(make_codec("int4:g96")) is None
    assert cpu.native_format(make_codec("fp8:b96")) is None
    assert cpu.native_format(make_codec("int4:g32")) is not None


def test_non_contiguous_input_is_read_row_major(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)).bfloat16().t()  # a transposed view
    codec = make_codec("int4:g32+had")
    ref = with_mode(monkeypatch, "off", lambda: codec.encode(x))
    assert torch.equal(with_mode(monkeypatch, "on", lambda: codec.encode(x)), ref)


def test_unsupported_formats_are_left_to_the_reference() -> None:
    for spec in (
        "int4:g32:asym",
        "int6:g32:asym",
        "int3:g32",
        "int7:g32",
        "int6:g4",  # 8 codes of 6 bits span two groups: the library packs whole groups of 8
        "int4:g32:sbf16",
        "int5:g32:se8m0",
        "int8:g32:sfp32",
        "fp8-e5m2",
        "fp8:sfp16",
        "nvfp4",
        "int4:g32+outliers:k4",
    ):
        assert cpu.native_format(make_codec(spec)) is None, spec


def test_modes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No compiler: `auto` uses the reference (one warning), `cpu` raises naming the variable and the reason.
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TPCOMP_CACHE", str(tmp_path / "cache"))
    backends.reset()
    try:
        x = torch.randn(256, 64).bfloat16()
        codec = make_codec("int4:g32")
        monkeypatch.setenv(backends.ENV, "auto")
        ok, why = cpu.available()
        assert not ok and "no-such-compiler" in why
        ref = codec.encode(x)  # the reference ran
        assert backends.choose(codec, "encode", "cpu", x.dtype).backend == "reference"
        monkeypatch.setenv(backends.ENV, "cpu")
        with pytest.raises(BackendUnavailableError, match="TPCOMP_BACKEND=cpu cannot run .*no-such-compiler"):
            codec.encode(x)
    finally:
        backends.reset()
    monkeypatch.delenv("CXX")
    monkeypatch.delenv("TPCOMP_CACHE")
    assert torch.equal(codec.encode(x), ref)


def test_concurrent_first_builds_agree(tmp_path: Path) -> None:
    # Three processes (like three ranks) build into an empty cache at once: one compiles under the lock, all
    # load the same library, and no temporary file is left behind.
    code = "from megatron_tpcomp.backends import cpu; print(cpu.build())"
    env = {**os.environ, "TPCOMP_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    files = sorted(f.name for f in (tmp_path / "native").iterdir() if f.name != ".lock")
    assert files == [Path(paths.pop()).name]


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("spec", ["int4:g32+had", "fp8", "int8:g32"])
def test_decode_sum_writes_into_out(monkeypatch: pytest.MonkeyPatch, mode: str, spec: str) -> None:
    monkeypatch.setenv(backends.ENV, MODES[mode])
    codec = make_codec(spec)
    x = adversarial((40, 576), torch.bfloat16, seed=5)
    payloads = torch.cat([codec.encode(x), codec.encode(x * 2)])
    want = codec.decode_sum(payloads, 2, x.shape, torch.bfloat16)
    buf = torch.full((2 * x.numel(),), 7.0, dtype=torch.bfloat16)
    got = codec.decode_sum(payloads, 2, x.shape, torch.bfloat16, out=buf[x.numel() :])
    assert got.shape == x.shape and got.data_ptr() == buf[x.numel() :].data_ptr()
    assert same_bits(got, want)
    assert bool((buf[: x.numel()] == 7.0).all())  # nothing outside `out` is touched
    for bad in (torch.empty(x.numel(), dtype=torch.float32), torch.empty(x.numel() + 1, dtype=torch.bfloat16)):
        with pytest.raises(CodecError, match="out must be a contiguous torch.bfloat16 tensor of 23040 elements"):
            codec.decode_sum(payloads, 2, x.shape, torch.bfloat16, out=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("spec", ["int4:g32", "int4:g32+had", "fp8"])
def test_outputs_of_a_mebibyte_and_more_match_the_reference(
    monkeypatch: pytest.MonkeyPatch, spec: str, dtype: torch.dtype
) -> None:
    # Outputs larger than the pipelined collectives' chunks, written into `out` at aligned and unaligned offsets:
    # the same bits as the reference and nothing outside `out` touched.
    codec = make_codec(spec)
    x = adversarial((1000, 576), dtype, seed=11)  # 576,000 values: 1.1 MB of output
    payloads = torch.cat([codec.encode(x), codec.encode(x * 0.5)])
    monkeypatch.setenv(backends.ENV, MODES["off"])
    want = codec.decode_sum(payloads, 2, x.shape, dtype)
    monkeypatch.setenv(backends.ENV, MODES["on"])
    for offset in (0, 16, 1):  # 0 and 16: 32-byte aligned; 1: not
        buf = torch.full((x.numel() + 32,), 7.0, dtype=dtype)
        got = codec.decode_sum(payloads, 2, x.shape, dtype, out=buf[offset : offset + x.numel()])
        assert same_bits(got, want), f"{spec} {dtype} offset {offset}"
        assert bool((buf[:offset] == 7.0).all()) and bool((buf[offset + x.numel() :] == 7.0).all())


def test_the_fp8_scale_cap_is_rounded_to_float32_as_torch_does() -> None:
    # native_format passes the fp8 scale cap to the library as the float32 that torch's clamp compares with;
    # it is rounded without a tensor (per-call cost): it must equal torch's rounding, ties and subnormals included.
    from megatron_tpcomp.backends.cpu import _as_float32

    gen = torch.Generator().manual_seed(0)
    values = [3.4028234663852886e38 / (2 * 448.0), 3.4028234663852886e38 / (2 * 57344.0), 1 / 3, 0.1, 1e-45, 2.0**-149]
    values += (torch.randn(2000, generator=gen, dtype=torch.float64) * 1e30).tolist()
    values += (torch.rand(2000, generator=gen, dtype=torch.float64) * 1e-38).tolist()
    values += [1.0 + 2.0**-24, 1.0 + 3 * 2.0**-24]  # halfway cases: ties to even
    for v in values:
        assert _as_float32(v) == float(torch.tensor(v, dtype=torch.float32)), v


@pytest.mark.parametrize("spec", NEW_INT_SPECS)
def test_new_formats_run_in_the_library(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    # Not a silent fallback: the dispatcher picks the library for both directions, and with the codec's own
    # (reference) methods made to fail, encode, decode and decode_sum still run and match the reference.
    codec = make_codec(spec)
    x = adversarial((16, 576), torch.bfloat16, seed=2)
    ref = with_mode(monkeypatch, "off", lambda: codec.encode(x))
    want = with_mode(monkeypatch, "off", lambda: codec.decode_sum(torch.cat([ref, ref]), 2, x.shape, torch.float32))
    monkeypatch.setenv(backends.ENV, "cpu")
    for op in ("encode", "decode"):
        assert backends.choose(codec, op, "cpu", torch.bfloat16).backend == "cpu", (spec, op)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{spec}: the reference ran instead of the CPU library")

    for name in ("_encode", "_decode", "_decode_sum"):
        monkeypatch.setattr(codec, name, refuse)
    assert torch.equal(codec.encode(x), ref)
    assert same_bits(codec.decode_sum(torch.cat([ref, ref]), 2, x.shape, torch.float32), want)
    codec.decode(ref, x.shape, torch.bfloat16)


def test_int_kernel_dispatch_covers_every_width_and_scale_format() -> None:
    # native_format passes the width and the scale format through (a codec that maps to the wrong kernel would
    # still round-trip but write other bytes: the comparisons above catch that, this names the mapping).
    for bits in cpu.INT_BITS:
        for scale, code in cpu.INT_SCALES.items():
            fmt = cpu.native_format(make_codec(f"int{bits}:g32:s{scale}"))
            assert fmt is not None and (fmt.format, fmt.bits, fmt.scale_fmt) == (cpu.FORMAT_INT, bits, code)


def test_e4m3_group_scales_round_ties_to_even_as_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Group maxima qmax * m for every midpoint m between neighbouring E4M3 values (subnormal, normal, and the
    # step to 448) and their neighbours one fp32 ulp away: the e4m3 rounding of the ideal scale amax / qmax is
    # tested at its ties. One group at qmax * 448 keeps the super-block exponent at 0 (the maxima stay exact).
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    mids = (values[:-1] + values[1:]) / 2
    ulp = torch.nextafter(mids, torch.full_like(mids, float("inf"))) - mids
    for bits in (4, 5, 6, 8):
        codec = make_codec(f"int{bits}:g32:se4m3")
        qmax = (1 << (bits - 1)) - 1
        maxima = torch.cat([mids, mids + ulp, mids - ulp]) * qmax  # 378 = 3 * 126 groups
        # Super-blocks of 128 groups: the top group first, then 127 of the tie groups (the last one padded).
        maxima = torch.nn.functional.pad(maxima, (0, (-maxima.numel()) % 127), value=1.0).view(-1, 127)
        maxima = torch.cat([torch.full((maxima.shape[0], 1), 448.0 * qmax), maxima], dim=1).reshape(-1)
        groups = torch.randn(maxima.numel(), 32, generator=torch.Generator().manual_seed(bits)).clamp(-1, 1)
        groups[:, 0] = 1.0
        x = (groups * maxima.unsqueeze(1)).reshape(-1)
        ref = with_mode(monkeypatch, "off", lambda x=x, codec=codec: codec.encode(x))
        got = with_mode(monkeypatch, "on", lambda x=x, codec=codec: codec.encode(x))
        assert block_codec(codec).exponents(ref, x.shape).eq(0).all()
        assert torch.equal(ref, got), f"int{bits}: {int((ref != got).sum())} bytes differ"


@pytest.mark.parametrize("spec", ["int5:g32:se4m3", "int8:g64:se4m3", "fp8:b32"])
def test_every_e4m3_byte_decodes_as_the_reference(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    # The vectorized E4M3 decode (bit operations, no table) against torch's float8_e4m3fn cast for all 256 byte
    # values, NaN codes and -0 included: as the FP8 codes of a payload, or as the e4m3 group scales of int<N>.
    codec = make_codec(spec)
    block = block_codec(codec)
    x = torch.randn(256 * block.block, generator=torch.Generator().manual_seed(0))
    payload = with_mode(monkeypatch, "off", lambda: codec.encode(x))
    layout = block.layout(x.shape)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if spec.startswith("fp8"):
        layout.view(payload, "codes").copy_(every.repeat(block.block))
        layout.view(payload, "scales").copy_(torch.logspace(-40, 30, 256))  # fp32 scales, subnormal to large
    else:
        layout.view(payload, "scales").copy_(every)
    for count in (1, 2):
        for dtype in DTYPES:
            args = (payload.repeat(count), count, x.shape, dtype)
            want = with_mode(monkeypatch, "off", lambda args=args: codec.decode_sum(*args))
            have = with_mode(monkeypatch, "on", lambda args=args: codec.decode_sum(*args))
            assert same_bits(want, have), f"{spec} decode_sum({count}) -> {dtype}"


# --- +chscale: the channel scales folded into the library's passes -------------------------------------------

CHSCALE_SPECS = [
    "int4:g32+chscale",
    "int4:g32+had+chscale",
    "int4:g64:se4m3+had+chscale",
    "int5:g64:se4m3+had+chscale",
    "int6:g128+had:b128+chscale",
    "int8:g32:se4m3+chscale",
    "fp8+chscale",
    "fp8+had+chscale",
]


def channel_exponents(h: int, seed: int) -> list[int]:
    """``h`` exponents in [-16, 16], the extremes and 0 included."""
    e = torch.randint(-16, 17, (h,), generator=torch.Generator().manual_seed(seed))
    e[:3] = torch.tensor([16, -16, 0])
    return e.tolist()


def chscale_cases(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Per case, three inputs (ranks) of one shape: the adversarial ones with 576 channels (rows of 576 split over
    super-blocks, a few rows, none), and the range extremes as 40 rows of 512 channels (dtype maxima times 2^16
    overflow to Inf: the reference makes their blocks NaN, and so must the library)."""
    cases = [[adversarial(shape, dtype, seed) for seed in range(3)] for shape in ((200, 576), (3, 576), (0, 576))]
    extremes = [range_extremes(dtype, seed).view(40, 512) for seed in range(3)]
    extremes[1] = extremes[1].flip(0)
    return [*cases, extremes]


def check_against_reference(monkeypatch: pytest.MonkeyPatch, codec: object, xs: list[torch.Tensor]) -> None:
    """Library payloads of ``xs`` (one shape) equal the reference's byte for byte; decode_sum of 1 and 3 of them
    to every dtype, and decode, equal bit for bit."""
    shape = xs[0].shape
    ref = [with_mode(monkeypatch, "off", lambda x=x: codec.encode(x)) for x in xs]
    got = [with_mode(monkeypatch, "on", lambda x=x: codec.encode(x)) for x in xs]
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g), f"{codec.spec} {tuple(shape)}: {int((r != g).sum())} of {r.numel()} bytes differ"
    for count in (1, 3):
        for out_dtype in DTYPES:
            args = (torch.cat(ref[:count]), count, shape, out_dtype)
            want = with_mode(monkeypatch, "off", lambda args=args: codec.decode_sum(*args))
            have = with_mode(monkeypatch, "on", lambda args=args: codec.decode_sum(*args))
            assert same_bits(want, have), f"{codec.spec} {tuple(shape)} decode_sum({count}) -> {out_dtype}"
    want = with_mode(monkeypatch, "off", lambda: codec.decode(ref[0], shape, xs[0].dtype))
    have = with_mode(monkeypatch, "on", lambda: codec.decode(ref[0], shape, xs[0].dtype))
    assert same_bits(want, have)


@pytest.mark.parametrize("spec", CHSCALE_SPECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_chscale_payload_and_decode_sum_match_the_reference(
    monkeypatch: pytest.MonkeyPatch, spec: str, dtype: torch.dtype
) -> None:
    for xs in chscale_cases(dtype):
        shape = xs[0].shape
        codec = make_codec(spec, channel_scale_exponents=channel_exponents(shape[-1], seed=len(shape) + shape[0]))
        assert cpu.native_format(codec) is not None
        check_against_reference(monkeypatch, codec, xs)


@pytest.mark.parametrize("spec", CHSCALE_SPECS)
def test_chscale_runs_in_the_library(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    # The wrapper itself goes to the library (not its reference, which would call the inner codec: two more
    # passes over memory); with the reference methods of the wrapper and of its inner codecs made to fail, every
    # call still runs and matches.
    codec = make_codec(spec, channel_scale_exponents=channel_exponents(576, seed=3))
    x = adversarial((16, 576), torch.float16, seed=4)
    ref = with_mode(monkeypatch, "off", lambda: codec.encode(x))
    want = with_mode(monkeypatch, "off", lambda: codec.decode_sum(torch.cat([ref, ref]), 2, x.shape, torch.bfloat16))
    monkeypatch.setenv(backends.ENV, "cpu")
    for op in ("encode", "decode"):
        assert backends.choose(codec, op, "cpu", torch.float16).backend == "cpu", (spec, op)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{spec}: a reference codec ran instead of the CPU library")

    part = codec
    while part is not None:
        for name in ("_encode", "_decode", "_decode_sum"):
            monkeypatch.setattr(part, name, refuse)
        part = getattr(part, "inner", None)
    assert torch.equal(codec.encode(x), ref)
    assert same_bits(codec.decode_sum(torch.cat([ref, ref]), 2, x.shape, torch.bfloat16), want)


def test_chscale_shape_errors_are_the_codecs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The library path checks the shape as the reference does: whole rows of the table's channels.
    codec = make_codec("int5:g64:se4m3+had+chscale", channel_scale_exponents=channel_exponents(576, seed=0))
    monkeypatch.setenv(backends.ENV, "cpu")
    with pytest.raises(CodecError, match="has 575 channels; the '\\+chscale' table has 576"):
        codec.encode(torch.randn(4, 575))
    with pytest.raises(CodecError, match="not a whole number of rows"):
        codec.encode(torch.randn(1000))


def test_the_searched_configs_run_entirely_in_the_library() -> None:
    # Every compressed site of the shipped searched config and of every example config (its +chscale variant
    # included) maps to the library (the reason these formats were added): none falls back to the torch reference.
    from megatron_tpcomp.codecs.rows import RowOutlierCodec
    from megatron_tpcomp.config import CompressionConfig

    root = Path(__file__).resolve().parents[2]
    paths = sorted((root / "megatron_tpcomp" / "configs").glob("*.json"))
    paths += sorted((root / "examples" / "configs").glob("*.json"))
    assert len(paths) >= 4, paths
    for path in paths:
        config = CompressionConfig.load(path)
        settings = [config.default, config.embedding, config.logits]
        settings += [s for blocks in config.layers.values() for s in blocks.values()]
        codecs = [s.codec() for s in settings if s.spec != "none"]
        assert len(codecs) > 10, path
        # +rows selects and copies its few bf16 rows in torch; the whole message goes through its inner codec.
        codecs = [c.inner if isinstance(c, RowOutlierCodec) else c for c in codecs]
        missing = sorted({c.spec for c in codecs if cpu.native_format(c) is None})
        assert not missing, f"{path.name}: {missing} would run the torch reference on CPU"
