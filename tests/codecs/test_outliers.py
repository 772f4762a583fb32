"""Outlier channels (``+outliers``): table validation, per-message selection, wire layout, BF16 fidelity, error.

The contract suite (``test_all_codecs.py``) runs a few ``+outliers`` specs through the generic checks; this file
tests what is specific to outlier channels. Codecs are built through ``make_codec`` so the factory is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.codecs.base import align_up
from megatron_tpcomp.codecs.outliers import OutlierCodec
from tests.conftest import heavy_tailed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INJECTED = [1, 192, 574]  # heavy_tailed((..., 576)): channels 1 (x3000), 576 // 3 (x300), 574 (x100)
# spec -> static table (None = dynamic) for the property test. Two inner families, both modes, a rotation inside.
CODECS: dict[str, list[int] | None] = {
    "int4:g32+outliers": [3, 17],
    "int4:g32+outliers:k4": None,
    "fp8+outliers:k2": None,
    "fp8+outliers": [0, 5, 9],
    "int4:g32+had+outliers:k4": None,
}


def roundtrip(codec: Codec, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.numel() == codec.payload_nbytes(x.shape)
    return codec.decode(payload, x.shape, dtype)


def rel_err(y: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> float:
    return float((y - x)[:, cols].norm() / x[:, cols].norm())


def others(h: int, channels: list[int]) -> torch.Tensor:
    mask = torch.ones(h, dtype=torch.bool)
    mask[channels] = False
    return mask


# --- construction, spec, validation -------------------------------------------------------------------------


def test_spec_strings_flags_and_channels() -> None:
    static = make_codec("int4:g32+outliers", outlier_channels=[17, 3])
    assert isinstance(static, OutlierCodec) and static.row_structured
    assert static.spec == "int4:g32:sfp16+outliers" and static.k == 2
    assert static.channels.tolist() == [3, 17]  # stored ascending (the wire order)
    static.channels[0] = 99  # a copy: the codec's table cannot be changed from outside
    assert static.channels.tolist() == [3, 17]
    dynamic = make_codec("int4:g32+outliers:k9")
    assert dynamic.spec == "int4:g32:sfp16+outliers:k9" and dynamic.channels is None and dynamic.k == 9
    # k given with a table of that size: same codec as without k, the spec keeps the table's form.
    assert make_codec("int4:g32+outliers:k2", outlier_channels=[3, 17]) == static
    assert make_codec("fp8+had:b64+outliers:k2").spec == "fp8-e4m3:b128:sfp32+had:b64+outliers:k2"


def test_equality_covers_the_table_and_the_inner_seed() -> None:
    a = make_codec("int4:g32+outliers", outlier_channels=[3, 17])
    assert a == make_codec("int4:g32+outliers", outlier_channels=torch.tensor([17, 3]))
    assert hash(a) == hash(make_codec("int4:g32+outliers", outlier_channels=[17, 3]))
    assert a != make_codec("int4:g32+outliers", outlier_channels=[3, 18])  # same spec string, other table
    assert a != make_codec("int4:g32+outliers:k2")
    assert make_codec("int4:g32+had+outliers:k2", hadamard_seed=1) != make_codec("int4:g32+had+outliers:k2")


def test_accepted_table_types() -> None:
    expected = make_codec("int4:g32+outliers", outlier_channels=[3, 17])
    for table in ([np.int64(17), np.int32(3)], np.array([3, 17]), torch.tensor([3, 17], dtype=torch.int16), (17, 3)):
        assert make_codec("int4:g32+outliers", outlier_channels=table) == expected


@pytest.mark.parametrize(
    ("channels", "k", "message"),
    [
        ([3, 3], 0, "channel 3 appears twice in the table; expected unique"),
        ([5, 9, 5], 3, "channel 5 appears twice"),
        ([-1, 4], 0, "channel -1 is negative; expected indices in \\[0, hidden size\\)"),
        ([1, 2], 3, "k=3 outlier channels but the table has 2; expected equal counts"),
        ([], 0, "table is empty; expected at least one channel"),
        ([1.5], 0, "channel 1.5 is not an integer"),
        ([True, 2], 0, "channel True is not an integer"),
        (["4"], 0, "channel '4' is not an integer"),
        ("12", 0, "must be a sequence of integers, got '12'"),
        (torch.tensor([1.0, 2.0]), 0, "must be integers, got a tensor of dtype torch.float32"),
        (torch.tensor([[1, 2]]), 0, "1-D tensor of channel indices, got shape \\(1, 2\\)"),
    ],
)
def test_bad_static_tables(channels: object, k: int, message: str) -> None:
    spec = "int4:g32+outliers" + (f":k{k}" if k else "")
    with pytest.raises(CodecError, match=message):
        make_codec(spec, outlier_channels=channels)  # type: ignore[arg-type]


def test_missing_table_and_misuse() -> None:
    with pytest.raises(CodecError, match="needs a static channel table .* or \\+outliers:k<K>"):
        make_codec("int4:g32+outliers")
    with pytest.raises(CodecError, match="needs a static channel table"):
        OutlierCodec(make_codec("int4:g32"), channels=None, k=0)
    with pytest.raises(CodecError, match="k=-2 is invalid"):
        OutlierCodec(make_codec("int4:g32"), channels=None, k=-2)
    with pytest.raises(CodecError, match="no '\\+outliers' modifier"):
        make_codec("int4:g32", outlier_channels=[1])
    with pytest.raises(CodecError, match="row-structured codec 'int4:g32:sfp16\\+outliers:k2'"):
        OutlierCodec(make_codec("int4:g32+outliers:k2"), channels=[1])


def test_out_of_range_channel_is_reported_against_the_hidden_size() -> None:
    codec = make_codec("int4:g32+outliers", outlier_channels=[5, 600])
    with pytest.raises(CodecError, match="channel 600 is out of range for hidden size 576.*expected channels in"):
        codec.encode(torch.zeros(2, 576))
    with pytest.raises(CodecError, match="channel 600 is out of range for hidden size 600"):
        codec.payload_nbytes((2, 600))
    with pytest.raises(CodecError, match="channel 600 is out of range for hidden size 576"):
        codec.decode(torch.zeros(64, dtype=torch.uint8), (2, 576), torch.float32)
    assert codec.encode(torch.zeros(2, 601)).numel() == codec.payload_nbytes((2, 601))  # 601 is wide enough


def test_dynamic_mode_limits_on_the_hidden_size() -> None:
    with pytest.raises(CodecError, match="has 3 channels in its last dimension; .* expects at least 4"):
        make_codec("int4:g32+outliers:k4").encode(torch.ones(5, 3))
    with pytest.raises(CodecError, match="hidden size 40000 .* int16; expected at most 32768"):
        make_codec("int4:g32+outliers:k4").payload_nbytes((2, 40000))
    # 32768 channels fit: the largest index, 32767, is the int16 maximum.
    x = torch.zeros(1, 32768)
    x[0, 32767] = 100.0
    codec = make_codec("int8:g32+outliers:k1")
    assert codec.encode(x)[:2].view(torch.int16).item() == 32767
    assert torch.equal(roundtrip(codec, x), x)


# --- wire layout and sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
def test_wire_layout(dynamic: bool) -> None:
    x = heavy_tailed((6, 576), seed=5, dtype=torch.bfloat16)
    codec = make_codec("int4:g32+outliers" + (":k3" if dynamic else ""), outlier_channels=None if dynamic else INJECTED)
    inner = make_codec("int4:g32")
    payload = codec.encode(x)
    rest = others(576, INJECTED)
    offset = 0
    if dynamic:  # "indices": int16 [3] ascending, padded to 16 bytes
        assert payload[:6].view(torch.int16).tolist() == INJECTED
        assert not payload[6:16].any()
        offset = 16
    n_out = 6 * 3 * 2  # "outliers": bf16 [rows, K] row-major (times 2^0: their max is within [2^-64, 2^64))
    assert torch.equal(payload[offset : offset + n_out].view(torch.bfloat16).view(6, 3), x[:, INJECTED])
    assert payload[offset + n_out : offset + n_out + 2].view(torch.int16).tolist() == [0]  # "out_exp", int16
    offset = align_up(offset + n_out + 2)
    # "inner": the inner payload of the other channels as a [rows, h - K] tensor, ascending channel order.
    inner_payload = inner.encode(x[:, rest])
    assert torch.equal(payload[offset : offset + inner_payload.numel()], inner_payload)
    assert payload.numel() == align_up(offset + inner_payload.numel())


def test_exact_bits_per_value() -> None:
    shape = (4096, 576)
    static = make_codec("int4:g32+outliers", outlier_channels=INJECTED)
    dynamic = make_codec("int4:g32+outliers:k9")
    # [4096, 576]: the outlier sections are multiples of 16 bytes here, so the sizes are exact sums.
    inner_static = make_codec("int4:g32").payload_nbytes((4096, 573))
    inner_dynamic = make_codec("int4:g32").payload_nbytes((4096, 567))
    # The outliers' int16 exponent follows them at 2-byte alignment and costs 16 bytes with the padding.
    assert static.payload_nbytes(shape) == 4096 * 3 * 2 + 16 + inner_static
    assert static.bits_per_value(shape) == 8 * (4096 * 3 * 2 + 16 + inner_static) / (4096 * 576)
    assert dynamic.payload_nbytes(shape) == 32 + 4096 * 9 * 2 + 16 + inner_dynamic
    assert dynamic.bits_per_value(shape) == 8 * (32 + 4096 * 9 * 2 + 16 + inner_dynamic) / (4096 * 576)
    int4_bits = 4.5 + 16 / 4096  # codes, fp16 scales and one int16 exponent per 4096 values
    assert abs(dynamic.nominal_bits_per_value() - (9 * 16 + 1015 * int4_bits) / 1024) < 1e-6
    x = torch.randn(7, 45)  # unaligned: bits_per_value is still exactly the payload
    assert dynamic.bits_per_value(x.shape) == 8 * dynamic.encode(torch.randn(7, 45)).numel() / x.numel()


# --- fidelity and error ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_channels_travel_in_bf16(dtype: torch.dtype) -> None:
    x = heavy_tailed((64, 576), seed=1, dtype=torch.float32)
    if dtype == torch.float16:
        x = x / 64  # channel 1 (~3000 * 4.5) stays inside fp16's 65504
    x = x.to(dtype)
    for codec in (make_codec("int4:g32+outliers", outlier_channels=INJECTED), make_codec("int4:g32+outliers:k3")):
        y = roundtrip(codec, x, dtype)
        # Exactly the BF16 rounding of the input (bf16 input: bit-identical).
        assert torch.equal(y[:, INJECTED], x[:, INJECTED].to(torch.bfloat16).to(dtype))


def test_outliers_cut_the_error_of_the_other_channels() -> None:
    # heavy_tailed: channels at 3000, 300 and 100 sigma. Plain int4:g32 flattens their groups' other 31 values
    # to 0 (3 of 18 groups per row: relative error ~sqrt(3/18) ~ 0.41 measured 0.42); with those channels in
    # bf16 the rest is N(0,1) int4 noise (~0.1). Margin: 0.5x against a measured ~0.24x.
    x = heavy_tailed((256, 576), seed=2, dtype=torch.float32)
    rest = others(576, INJECTED)
    plain = rel_err(roundtrip(make_codec("int4:g32"), x), x, rest)
    for codec in (make_codec("int4:g32+outliers", outlier_channels=INJECTED), make_codec("int4:g32+outliers:k3")):
        err = rel_err(roundtrip(codec, x), x, rest)
        assert err < 0.5 * plain, (err, plain)
        assert err < 0.12  # and at the level of int4:g32 on Gaussian data (0.097 theory, contract suite 0.12)


def test_dynamic_selection_finds_the_injected_channels() -> None:
    for dtype in DTYPES[:2]:
        x = heavy_tailed((32, 576), seed=3, dtype=dtype)
        assert make_codec("int4:g32+outliers:k3").encode(x)[:6].view(torch.int16).tolist() == INJECTED
    # Per message: a message whose outlier sits elsewhere sends that channel instead.
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    x[3, 400] = -50.0
    assert make_codec("int4:g32+outliers:k1").encode(x)[:2].view(torch.int16).item() == 400


def test_dynamic_ties_go_to_the_lower_channel() -> None:
    x = torch.ones(4, 64)
    x[2, 40] = -1.0  # |x| ties too
    assert make_codec("int8:g32+outliers:k2").encode(x)[:4].view(torch.int16).tolist() == [0, 1]
    x[:, 50] = 2.0
    assert make_codec("int8:g32+outliers:k2").encode(x)[:4].view(torch.int16).tolist() == [0, 50]


def test_dynamic_nan_counts_as_largest() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[1, 10] = float("inf")
    x[2, 20] = 1e30
    x[3, 30] = float("nan")
    pick = {k: make_codec(f"fp8+outliers:k{k}").encode(x)[: 2 * k].view(torch.int16).tolist() for k in (1, 2, 3)}
    assert pick == {1: [30], 2: [10, 30], 3: [10, 20, 30]}


def test_bound_is_exact_bf16_rounding_in_the_outlier_channels() -> None:
    # BF16 keeps 8 significant bits: round to nearest is off by at most half an ulp, 2^-8 of the binade's
    # start, so |x| * 2^-8 holds and is tight just above a power of two: the values 1024 + j/64 (ulp 8) get
    # within 1% of it at 1024 + 4 (a bound twice too large, or 2^-7, would fail the second assertion).
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    x[:, 7] = 1024 + torch.arange(512) / 64
    codec = make_codec("int4:g32+outliers", outlier_channels=[7])
    err = (roundtrip(codec, x) - x).abs()[:, 7]
    bound = codec.max_abs_error_bound(x)[:, 7]
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.99


def test_fp32_beyond_the_bf16_range_stays_finite_and_accurate() -> None:
    x = torch.zeros(2, 40)
    x[0, 3] = torch.finfo(torch.float32).max  # rounds to +inf as a plain bf16 cast
    x[1, 3] = -3.3960e38
    x[1, 17] = float("inf")  # a real Inf stays Inf
    codec = make_codec("int4:g32+outliers", outlier_channels=[3, 17])
    y = roundtrip(codec, x)
    assert torch.isfinite(y[:, 3]).all() and y[1, 17] == float("inf")
    assert bool(((y - x).abs()[:, 3] <= codec.max_abs_error_bound(x)[:, 3]).all())
    # Normalized by 2^-127 before the bf16 cast: 8 significant bits (it used to clamp at bf16's maximum).
    assert abs(float(y[1, 3]) / -3.3960e38 - 1) < 2.0**-8


def test_fp32_subnormal_outliers_keep_their_bits() -> None:
    x = torch.zeros(2, 40)
    x[:, 3] = torch.tensor([3e-44, -1e-42])  # below bf16's smallest subnormal (9.2e-41): it used to send 0
    codec = make_codec("int4:g32+outliers", outlier_channels=[3, 17])
    y = roundtrip(codec, x)
    assert torch.equal(y[:, 3], x[:, 3].bfloat16().float()) or bool((y[:, 3] != 0).all())
    assert bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())


def test_fp16_maximum_in_an_outlier_channel_stays_finite() -> None:
    # bf16 rounds 65504 to 65536, which is Inf in fp16: decoding clamps to the dtype's largest finite value.
    x = torch.zeros(2, 40, dtype=torch.float16)
    x[:, 3] = torch.tensor([65504.0, -65504.0])
    codec = make_codec("int4:g32+outliers", outlier_channels=[3, 17])
    y = codec.decode(codec.encode(x), x.shape, torch.float16)
    assert torch.equal(y[:, 3], x[:, 3])


@settings(max_examples=50, deadline=None)
@given(
    spec=st.sampled_from(list(CODECS) + ["int3:g64:asym+outliers:k1", "nvfp4+outliers:k3"]),
    rows=st.integers(1, 9),
    cols=st.integers(18, 130),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 50.0, 3e3]),
    spikes=st.lists(st.tuples(st.integers(0, 17), st.sampled_from([20.0, 3000.0])), max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_error_within_bound(
    spec: str, rows: int, cols: int, scale: float, spikes: list, dtype: torch.dtype, seed: int
) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    for ch, mult in spikes:  # outliers in any channel, in or out of the static tables
        x[:, ch] *= mult
    x = (x * scale).to(dtype)
    if not torch.isfinite(x).all():  # fp16 cannot hold 3000 * 3000 sigma
        return
    codec = make_codec(spec, outlier_channels=CODECS.get(spec))
    y = roundtrip(codec, x)
    assert torch.isfinite(y).all()
    assert bool(((y - x.float()).abs() <= codec.max_abs_error_bound(x)).all())


# --- shapes, non-finite values, malformed payloads ------------------------------------------------------


def test_one_and_zero_dimensional_inputs() -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    x[42] = 500.0
    codec = make_codec("int4:g32+outliers:k1")  # a 1-D tensor is one row of 100 channels
    assert codec.encode(x)[:2].view(torch.int16).item() == 42
    y = roundtrip(codec, x)
    assert y[42] == 500.0 and bool(((y - x).abs() <= codec.max_abs_error_bound(x)).all())
    scalar = torch.tensor(3.14159)  # 0-d: one row of one channel, which is the outlier channel
    for codec in (make_codec("int4:g32+outliers:k1"), make_codec("int4:g32+outliers", outlier_channels=[0])):
        y = roundtrip(codec, scalar)
        assert y.shape == () and y == scalar.to(torch.bfloat16).float()
    with pytest.raises(CodecError, match="has 1 channels"):
        make_codec("int4:g32+outliers:k2").encode(scalar)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_in_an_outlier_channel_stays_alone(bad: float) -> None:
    x = heavy_tailed((8, 576), seed=4, dtype=torch.float32)
    x[2, 1] = bad
    for codec in (make_codec("int4:g32+outliers", outlier_channels=INJECTED), make_codec("int4:g32+outliers:k3")):
        y = roundtrip(codec, x)
        assert int((~torch.isfinite(y)).sum()) == 1
        assert torch.isnan(y[2, 1]) if bad != bad else y[2, 1] == bad  # NaN stays NaN, Inf keeps its sign


def test_non_finite_elsewhere_follows_the_inner_rule() -> None:
    # Channel 5 is not in the table: the inner codec sees the [8, 573] rest, where only channel 1 was removed
    # below 5, so x[2, 5] is value 2 * 573 + 4 = 1150 of its flat input, in group 1150 // 32 = 35: those 32
    # values (spanning rows 1 and 2 of the rest) decode to NaN, nothing else.
    x = heavy_tailed((8, 576), seed=4, dtype=torch.float32)
    x[2, 5] = float("inf")
    codec = make_codec("int4:g32+outliers", outlier_channels=INJECTED)
    y = roundtrip(codec, x)
    rest = others(576, INJECTED)
    flat_bad = torch.zeros(8 * 573, dtype=torch.bool)
    flat_bad[35 * 32 : 36 * 32] = True
    expected = torch.zeros(8, 576, dtype=torch.bool)
    expected[:, rest] = flat_bad.view(8, 573)
    assert torch.equal(~torch.isfinite(y), expected)
    assert torch.isnan(y[expected]).all()


CORRUPT_INDICES = ([1, 192, 576], [-1, 1, 192], [192, 1, 574], [1, 1, 574])


def _corrupted(codec, x: torch.Tensor, bad: list[int]) -> torch.Tensor:
    payload = codec.encode(x).clone()
    payload[:6].view(torch.int16).copy_(torch.tensor(bad, dtype=torch.int16))
    return payload


def test_corrupt_dynamic_indices_are_rejected_when_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TPCOMP_CHECK_PAYLOADS=1``: a corrupt index table (out of range, not ascending, repeated) is a clear error."""
    monkeypatch.setenv("TPCOMP_CHECK_PAYLOADS", "1")
    codec = make_codec("int4:g32+outliers:k3")
    x = heavy_tailed((4, 576), seed=0, dtype=torch.float32)
    for bad in CORRUPT_INDICES:
        payload = _corrupted(codec, x, bad)
        with pytest.raises(CodecError, match="invalid outlier indices .*expected 3 ascending channels in \\[0, 576\\)"):
            codec.decode(payload, x.shape, torch.float32)


def test_corrupt_dynamic_indices_decode_to_nan_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the index check runs on the device (no host sync): a corrupt table makes the whole decode NaN
    (never a finite value, never an out-of-bounds scatter); decode_sum with a good payload is NaN too; a good
    payload decodes exactly as with the check on."""
    monkeypatch.delenv("TPCOMP_CHECK_PAYLOADS", raising=False)
    codec = make_codec("int4:g32+outliers:k3")
    x = heavy_tailed((4, 576), seed=0, dtype=torch.float32)
    good = codec.encode(x)
    for bad in CORRUPT_INDICES:
        payload = _corrupted(codec, x, bad)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.isnan(codec.decode(payload, x.shape, dtype)).all(), (bad, dtype)
        assert torch.isnan(codec.decode_sum(torch.cat([good, payload]), 2, x.shape, torch.float32)).all()
    plain = codec.decode(good, x.shape, torch.float32)
    monkeypatch.setenv("TPCOMP_CHECK_PAYLOADS", "1")
    assert torch.equal(codec.decode(good, x.shape, torch.float32), plain)


@pytest.mark.parametrize("value", ["yes", "2", "on"])
def test_check_payloads_rejects_other_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TPCOMP_CHECK_PAYLOADS", value)
    codec = make_codec("int4:g32+outliers:k3")
    x = heavy_tailed((4, 576), seed=0, dtype=torch.float32)
    with pytest.raises(
        CodecError, match=f"TPCOMP_CHECK_PAYLOADS='{value}' is not valid; expected 0 \\(default\\) or 1"
    ):
        codec.decode(codec.encode(x), x.shape, torch.float32)


def test_wrong_payload_size_names_the_codec() -> None:
    codec = make_codec("int4:g32+outliers:k3")
    payload = codec.encode(torch.randn(4, 576))
    with pytest.raises(CodecError, match=r"int4:g32:sfp16\+outliers:k3: payload has shape"):
        codec.decode(payload[:-16], (4, 576), torch.float32)
