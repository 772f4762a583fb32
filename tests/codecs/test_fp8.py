"""FP8 codec (``fp8``, ``fp8-e5m2``, any block size and scale format): hand-worked bytes, codes equal to torch's own
float8 cast, round to nearest even against a brute-force grid search, exact on-grid round trips, the payload
layout, the wire form of zero and non-finite blocks, the stated error bound and backend selection. The generic
checks every codec must pass (strides, dtypes, empty tensors, malformed payloads, exact bits...) are in the
contract suite (``test_all_codecs.py``), which runs the examples fp8.py registers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp import backends
from megatron_tpcomp.backends import te
from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.codecs.base import align_up
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.codecs.scales import decode_scales
from megatron_tpcomp.spec import parse_spec
from tests.conftest import heavy_tailed

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}
# Specs covering both element formats, several block sizes and every scale format.
SPECS = ["fp8", "fp8-e5m2", "fp8:b32:sfp16", "fp8-e4m3:b64:sbf16", "fp8:b16:se8m0", "fp8-e5m2:b32:se4m3"]


def fp8_dtype_of(spec: str) -> torch.dtype:
    return E4M3 if parse_spec(spec).man_bits == 3 else E5M2


def roundtrip(codec: Fp8Codec, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return codec.decode(codec.encode(x), x.shape, dtype)


def fp8_grid(fp8_dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the format (fp32, 1-D, sorted, +0 once; -0 dropped)."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype).to(torch.float32)
    return vals[torch.isfinite(vals)].unique().sort().values


def brute_force_rne(v: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Nearest finite fp8 value to each fp32 ``v`` (|v| <= fmax), ties to the even code, by exhaustive search."""
    pos = fp8_grid(fp8_dtype)
    pos = pos[pos >= 0]  # index i holds the value of code i: the positive codes count up from 0
    dist = (v.abs().unsqueeze(1) - pos.unsqueeze(0)).abs()
    nearest = dist == dist.amin(dim=1, keepdim=True)
    even = (torch.arange(pos.numel()) % 2 == 0).unsqueeze(0)
    pick = (nearest.int() * 2 + (nearest & even).int()).argmax(dim=1)  # nearest, and among a tie the even one
    return pos[pick] * torch.where(v < 0, -1.0, 1.0)


# --- factory and hand-worked bytes ------------------------------------------------------------------------------


def test_factory_builds_fp8_codecs() -> None:
    codec = make_codec("fp8")
    assert isinstance(codec, Fp8Codec) and codec.spec == "fp8-e4m3:b128:sfp32" and codec.backend == "auto"
    assert make_codec("fp8-e4m3") == codec
    e5 = make_codec("FP8-E5M2:b64:sbf16")
    assert isinstance(e5, Fp8Codec) and e5.spec == "fp8-e5m2:b64:sbf16" and e5.fp8_dtype == E5M2
    assert (e5.block, e5.scale_fmt, e5.fmax) == (64, "bf16", 57344.0)


def test_hand_computed_e4m3_payload() -> None:
    # fp8:b4, one block [448, -1, 0.5, 3.3]: amax 448 -> scale 448/448 = 1.0 (fp32 bytes 00 00 80 3F).
    # E4M3 (bias 7): 448 = 1.75 * 2^8 -> 0 1111 110 = 0x7E; -1 -> 1 0111 000 = 0xB8; 0.5 -> 0 0110 000 = 0x30;
    # 3.3 = 1.65 * 2^1, mantissa 0.65 * 8 = 5.2 -> 5 -> 0 1000 101 = 0x45 (= 3.25).
    # Layout: 4 code bytes at 0, the fp32 scale at 16, total 32.
    codec = make_codec("fp8:b4")
    payload = codec.encode(torch.tensor([448.0, -1.0, 0.5, 3.3]))
    expected = torch.zeros(32, dtype=torch.uint8)
    expected[:4] = torch.tensor([0x7E, 0xB8, 0x30, 0x45], dtype=torch.uint8)
    expected[16:20] = torch.tensor([0x00, 0x00, 0x80, 0x3F], dtype=torch.uint8)
    assert torch.equal(payload, expected)
    assert codec.decode(payload, (4,), torch.float32).tolist() == [448.0, -1.0, 0.5, 3.25]


def test_hand_computed_e5m2_payload() -> None:
    # fp8-e5m2:b4:sfp16, [57344, -2, 0.75, 0]: the super-block exponent is the smallest k with
    # 57344 <= 57344 * 65504 * 2^k, k = -15, so y = x * 2^15 and the scale is fp16(57344 * 2^15 / 57344) = 32768
    # (7800, the top binade of fp16); y / 32768 = x. E5M2 (bias 15): 57344 = 1.75 * 2^15 -> 0 11110 11 = 0x7B;
    # -2 -> 1 10000 00 = 0xC0; 0.75 = 1.5 * 2^-1 -> 0 01110 10 = 0x3A; 0 -> 0x00. int16 -15 at offset 18.
    codec = make_codec("fp8-e5m2:b4:sfp16")
    payload = codec.encode(torch.tensor([57344.0, -2.0, 0.75, 0.0]))
    expected = torch.zeros(32, dtype=torch.uint8)
    expected[:4] = torch.tensor([0x7B, 0xC0, 0x3A, 0x00], dtype=torch.uint8)
    expected[16:20] = torch.tensor([0x00, 0x78, 0xF1, 0xFF], dtype=torch.uint8)
    assert torch.equal(payload, expected)


# --- the codes are torch's float8 cast, which is round to nearest even --------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_equal_torch_float8_cast_of_x_times_inverse_scale(spec: str, dtype: torch.dtype) -> None:
    codec = make_codec(spec)
    fp8_dtype, fmax = fp8_dtype_of(spec), FMAX[fp8_dtype_of(spec)]
    # Rows of very different magnitudes (2^-8 .. 2^12, inside fp16's range), normalized by the super-block's
    # power of two (one super-block here) before the scales are formed.
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    x = (x * torch.ldexp(torch.ones(6, 1), torch.arange(6).unsqueeze(1) * 4 - 8)).to(dtype)
    assert torch.isfinite(x).all()
    payload = codec.encode(x)
    layout = codec.layout(x.shape)
    (k,) = codec.exponents(payload, x.shape).tolist()
    if codec.scale_fmt == "fp32":
        assert k == 0  # wide formats keep the input as it is for 2^-64 <= amax < 2^64
    blocks = torch.ldexp(x.float(), torch.tensor(-k)).reshape(-1, codec.block)  # exact: no underflow here
    stored = layout.view(payload, "scales")
    s = decode_scales(stored, codec.scale_fmt)
    if codec.scale_fmt == "fp32":  # stored exactly as the ideal scale
        assert torch.equal(s, blocks.abs().amax(dim=1) / fmax)
    inv = torch.where(s == 0, 0.0, 1.0 / s).unsqueeze(1)  # a zero scale (underflow) sends zeros
    expected = (blocks * inv).clamp(-fmax, fmax).to(fp8_dtype).view(torch.uint8).reshape(-1)
    assert torch.equal(layout.view(payload, "codes"), expected)


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
def test_rounding_is_nearest_even_by_brute_force(fp8_dtype: torch.dtype) -> None:
    # Scale exactly 1 (every block holds +fmax), so the codec rounds x itself: midpoints between neighbours (the
    # ties), their fp32 neighbours, the subnormal range and random values, against an exhaustive grid search.
    fmax = FMAX[fp8_dtype]
    spec = "fp8:b128" if fp8_dtype == E4M3 else "fp8-e5m2:b128"
    codec = make_codec(spec)
    pos = fp8_grid(fp8_dtype)
    pos = pos[pos >= 0]
    mids = (pos[1:] + pos[:-1]) / 2
    gen = torch.Generator().manual_seed(1)
    v = torch.cat(
        [
            mids,
            mids.nextafter(torch.tensor(0.0)),
            mids.nextafter(torch.tensor(1e9)),
            torch.rand(4000, generator=gen) * fmax,
            torch.rand(4000, generator=gen) * float(pos[8]),  # subnormals and the smallest normals
        ]
    )
    v = torch.cat([v, -v])
    pad = (-v.numel()) % 127
    v = torch.cat([v, torch.zeros(pad)]).view(-1, 127)
    x = torch.cat([v, torch.full((v.shape[0], 1), fmax)], dim=1)
    assert torch.equal(roundtrip(codec, x), brute_force_rne(x.reshape(-1), fp8_dtype).view(x.shape))


@pytest.mark.parametrize("spec", ["fp8-e5m2:b4:sfp16", "fp8:b4:sfp16"])
def test_scale_rounded_down_clips_to_fmax_never_inf_or_nan(spec: str) -> None:
    # fp16(amax / fmax) can round below amax / fmax, putting amax * (1/s) above fmax. Torch's E5M2 cast turns
    # that into Inf (code 0x7C) and older torch turned E4M3 overflow into NaN: the codec clamps to fmax first.
    fp8_dtype = fp8_dtype_of(spec)
    fmax = FMAX[fp8_dtype]
    codec = make_codec(spec)
    amax = torch.linspace(1.0, 2.0, 4001)
    ideal = amax / fmax
    down = ideal.to(torch.float16).float() < ideal
    amax = amax[down][:64]
    assert amax.numel() == 64  # plenty of scales round down
    x = torch.stack([amax, -amax, amax / 3, torch.zeros_like(amax)], dim=1)
    codes = codec.layout(x.shape).view(codec.encode(x), "codes").view(-1, 4)
    top = torch.tensor(fmax).to(fp8_dtype).view(torch.uint8)
    assert torch.equal(codes[:, 0], top.expand(64)) and torch.equal(codes[:, 1], (top | 0x80).expand(64))
    y = roundtrip(codec, x)
    assert torch.isfinite(y).all()
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


# --- exact round trips of values on the grid --------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_on_the_grid_round_trip_exactly(spec: str, dtype: torch.dtype) -> None:
    # Every finite fp8 value, both signs, times a power-of-two block scale, each block holding +-fmax * scale so
    # that the ideal scale is exactly that power of two in every scale format: decoding must return x exactly.
    codec = make_codec(spec)
    fp8_dtype = fp8_dtype_of(spec)
    fmax, block = FMAX[fp8_dtype], codec.block
    grid = fp8_grid(fp8_dtype)
    values = torch.cat([grid, -grid])
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(2))]
    pad = (-values.numel()) % (block - 1)
    body = torch.cat([values, torch.zeros(pad)]).view(-1, block - 1)
    sign = torch.where(torch.arange(body.shape[0]) % 2 == 0, 1.0, -1.0).unsqueeze(1)
    blocks = torch.cat([body, sign * fmax], dim=1)
    # Power-of-two scales 2^k that the input dtype holds exactly with every grid value (fp16: 2^-24 .. 65504)
    # and that the scale format stores exactly (e4m3: 2^-9 .. 2^8; fp16: 2^-24 .. 2^15).
    if dtype == torch.float16:
        exps = [-3, 0, 2] if fp8_dtype == E4M3 else [-2, 0]
    else:
        exps = [-12, -3, 0, 5, 12]
    lo, hi = {"e4m3": (-9, 8), "fp16": (-24, 15)}.get(codec.scale_fmt, (-126, 126))
    k = torch.tensor(exps)[torch.arange(blocks.shape[0]) % len(exps)].clamp(lo, hi)
    x = torch.ldexp(blocks, k.unsqueeze(1)).to(dtype)
    assert torch.equal(x.float(), torch.ldexp(blocks, k.unsqueeze(1)))  # the test input itself is exact
    assert torch.equal(roundtrip(codec, x), x.float())


# --- sizes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 37), (129,), (2, 3, 65), (1000,)])
def test_payload_size_of_unaligned_shapes(spec: str, shape: tuple[int, ...]) -> None:
    codec = make_codec(spec)
    n = torch.Size(shape).numel()
    nb = -(-n // codec.block)
    nsuper = -(-nb // (codec.super_values // codec.block))
    scales_end = align_up(nb * codec.block) + nb * SCALE_BITS[codec.scale_fmt] // 8
    expected = align_up(align_up(scales_end, 2) + 2 * nsuper)  # int16 exponents right after the scales
    assert codec.payload_nbytes(shape) == expected
    assert codec.bits_per_value(shape) == 8 * expected / n


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 37), (129,), (2, 3, 65)])
def test_sizes_not_divisible_by_the_block_unpad_exactly(spec: str, shape: tuple[int, ...]) -> None:
    codec = make_codec(spec)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 4
    n, block = x.numel(), codec.block
    padded = torch.cat([x.reshape(-1), torch.zeros((-n) % block)])
    y = roundtrip(codec, x)
    assert y.shape == x.shape
    # The padding is zeros inside the last block: the padded tensor encodes to the same bytes and decodes to
    # the same values followed by zeros.
    assert torch.equal(codec.encode(padded), codec.encode(x))
    y_padded = roundtrip(codec, padded)
    assert torch.equal(y.reshape(-1), y_padded[:n]) and not y_padded[n:].any()


# --- zeros, NaN and Inf -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_blocks_decode_to_zeros(spec: str, dtype: torch.dtype) -> None:
    codec = make_codec(spec)
    x = torch.randn(4, codec.block, generator=torch.Generator().manual_seed(4))
    x[1] = 0.0
    x[3] = 0.0
    x = x.to(dtype)
    payload = codec.encode(x)
    s = decode_scales(codec.layout(x.shape).view(payload, "scales"), codec.scale_fmt)
    if codec.scale_fmt != "e8m0":  # e8m0 has no zero: the smallest power of two stands in, codes are 0
        assert s[1] == 0 and s[3] == 0
    for out_dtype in DTYPES:
        y = codec.decode(payload, x.shape, out_dtype)
        assert not torch.isnan(y).any()
        assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(y[3], torch.zeros_like(y[3]))
    assert torch.equal(roundtrip(codec, torch.zeros(3, 37, dtype=dtype)), torch.zeros(3, 37))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_poisoned_block_travels_as_a_nan_scale_and_zero_codes(spec: str, bad: float) -> None:
    # Which values decode to NaN is the contract suite's; this is the wire form of a poisoned block.
    codec = make_codec(spec)
    block = codec.block
    x = torch.randn(4 * block + 5, generator=torch.Generator().manual_seed(5))
    x[block + 3] = bad  # block 1
    x[4 * block + 1] = bad  # the last, partial block
    payload = codec.encode(x)
    layout = codec.layout(x.shape)
    assert torch.isnan(decode_scales(layout.view(payload, "scales"), codec.scale_fmt)[[1, 4]]).all()
    codes = layout.view(payload, "codes").view(-1, block)
    assert not codes[1].any() and not codes[4].any()


# --- malformed payloads ----------------------------------------------------------------------------------------


def test_a_shape_with_the_same_block_count_decodes_but_another_count_does_not() -> None:
    # Payload size depends on the number of blocks only: the check catches every change of that count.
    codec = make_codec("fp8")
    payload = codec.encode(torch.randn(300))
    assert codec.decode(payload, (3, 100), torch.float32).shape == (3, 100)  # 3 blocks either way
    with pytest.raises(CodecError):
        codec.decode(payload, (385,), torch.float32)  # 4 blocks


# --- the stated error bound ---------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    spec=st.sampled_from(SPECS + ["fp8:b8:se4m3", "fp8-e5m2:b256:sfp16"]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 300),
    log_scale=st.integers(-30, 30),
    heavy=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_error_within_stated_bound(
    spec: str, rows: int, cols: int, log_scale: int, heavy: bool, dtype: torch.dtype, seed: int
) -> None:
    codec = make_codec(spec)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    if heavy:  # Student-t like tails: a few values 100-10000x the rest
        x = x / torch.rand(rows, cols, generator=gen).clamp(min=1e-4)
    x = (x * 2.0**log_scale).to(dtype)
    if dtype != torch.float32:  # keep the test input finite in the narrow dtypes
        x = torch.nan_to_num(x, posinf=0.0, neginf=0.0)
    y = roundtrip(codec, x)
    bound = codec.max_abs_error_bound(x)
    assert bound.shape == x.shape and bound.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert bool(((y - x.float()).abs() <= bound).all())


@pytest.mark.parametrize(("spec", "man_bits"), [("fp8", 3), ("fp8-e5m2", 2)])
def test_bound_is_tight_half_an_ulp(spec: str, man_bits: int) -> None:
    # With exact fp32 scales the bound is essentially half an ULP: at most 2^-(m+1) relative for normals (plus
    # the subnormal half-step and fp32 slack), and the measured error reaches over 90% of it somewhere. A
    # bound twice too loose, or an encoder that lost a mantissa bit, fails.
    codec = make_codec(spec)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(9))
    bound = codec.max_abs_error_bound(x)
    amax = x.view(-1, codec.block).abs().amax(dim=1, keepdim=True)
    fmax = codec.fmax
    s = amax / fmax
    subnormal_half = s * 2.0 ** (codec.min_exp - man_bits - 1)
    limit = torch.maximum(x.view(-1, codec.block).abs() * 2.0 ** -(man_bits + 1), subnormal_half)
    assert bool((bound.view(-1, codec.block) <= limit + 2.0**-19 * amax).all())
    err = (roundtrip(codec, x) - x).abs()
    assert float((err / bound).max()) > 0.9


def test_heavy_tailed_activations_keep_precision_outside_the_outlier_blocks() -> None:
    # Massive-activation channels (100x-3000x): per-block scales confine the damage: blocks without an outlier
    # keep E4M3's precision on N(0,1) data (relative RMS error 0.0257 measured on 10^6 values; limit +25%), while
    # the outliers themselves lose at most half an ULP (2^-4).
    x = heavy_tailed((64, 576), seed=3)
    codec = make_codec("fp8")
    xb = x.float().view(-1, codec.block)
    yb = roundtrip(codec, x).view(-1, codec.block)
    calm = xb.abs().amax(dim=1) < 8
    assert 50 < int(calm.sum()) < xb.shape[0]  # both kinds of block are present
    rel = float((yb[calm] - xb[calm]).norm() / xb[calm].norm())
    assert rel < 0.032, rel
    big = xb.abs() > 50
    assert bool(((yb[big] - xb[big]).abs() <= xb[big].abs() * 2.0**-4).all())


@pytest.mark.parametrize("spec", SPECS)
def test_huge_values_decode_finite(spec: str) -> None:
    # Near fp32's maximum (and bf16's), code * scale must not overflow to Inf: the ideal scale is capped.
    codec = make_codec(spec)
    big = torch.finfo(torch.float32).max
    x = torch.tensor([big, -big * 0.99, big * 0.6, 1.0] * (codec.block // 4))
    y = roundtrip(codec, x)
    assert torch.isfinite(y).all()
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())
    xb = torch.full((codec.block,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert torch.isfinite(roundtrip(codec, xb)).all()


# --- backends -----------------------------------------------------------------------------------------------------


def test_backend_selection() -> None:
    cs = parse_spec("fp8")
    x = torch.randn(300, generator=torch.Generator().manual_seed(10))
    torch_codec = Fp8Codec(cs, backend="torch")
    auto = Fp8Codec(cs)
    for codec in (torch_codec, auto):  # CPU tensors never go through TE
        assert backends.choose(codec, "encode", x.device, x.dtype).backend != "te"
    assert torch.equal(auto.encode(x), torch_codec.encode(x))
    assert auto == torch_codec  # the backend is not part of the wire format
    with pytest.raises(CodecError, match="unknown fp8 backend 'cuda'"):
        Fp8Codec(cs, backend="cuda")
    with pytest.raises(CodecError, match="plain fp8 spec"):
        Fp8Codec(parse_spec("int8"))


@pytest.mark.skipif(not te.import_error(), reason="Transformer Engine is installed here")
def test_te_backend_without_transformer_engine_names_the_package() -> None:
    # The kernel dispatch decides per call (the codec is built anywhere); where TE cannot run, a call raises.
    codec = Fp8Codec(parse_spec("fp8"), backend="te")
    assert "transformer_engine" in backends.available("te")[1]
    with pytest.raises(CodecError, match=r"Fp8Codec\(backend='te'\) cannot run"):
        codec.encode(torch.ones(128))


def test_te_backend_refuses_cpu_tensors() -> None:
    with pytest.raises(CodecError, match="CUDA"):
        Fp8Codec(parse_spec("fp8"), backend="te").encode(torch.ones(128))
