"""Outlier channels: static tables are validated, dynamic selection finds the outliers, BF16 fidelity."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError, make_codec
from tests.conftest import heavy_tailed


def test_static_table_channels_travel_in_bf16() -> None:
    x = heavy_tailed((64, 576), seed=1, dtype=torch.float32)
    channels = [1, 192, 574]
    codec = make_codec("int4:g32+outliers", outlier_channels=channels)
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.equal(y[:, channels], x[:, channels].to(torch.bfloat16).float())
    # 3 bf16 channels of 576 on top of int4 g32 over the remaining 573: ~4.5 + 3*16/576 bits.
    assert abs(codec.bits_per_value((4096, 576)) - (4.5 * 573 / 576 + 3 * 16 / 576)) < 0.01


def test_outliers_cut_the_error_of_the_other_channels() -> None:
    x = heavy_tailed((256, 576), seed=2, dtype=torch.float32)
    plain = make_codec("int4:g32")
    with_outliers = make_codec("int4:g32+outliers:k3")
    rest = torch.ones(576, dtype=torch.bool)
    rest[[1, 192, 574]] = False
    err = {}
    for name, codec in (("plain", plain), ("outliers", with_outliers)):
        y = codec.decode(codec.encode(x), x.shape, torch.float32)
        err[name] = float((y - x)[:, rest].norm() / x[:, rest].norm())
    assert err["outliers"] < 0.5 * err["plain"], err


def test_dynamic_selection_finds_the_injected_channels() -> None:
    x = heavy_tailed((32, 576), seed=3, dtype=torch.float32)
    codec = make_codec("int4:g32+outliers:k3")
    payload = codec.encode(x)
    assert payload[:6].view(torch.int16).tolist() == [1, 192, 574]


def test_dynamic_ties_go_to_the_lower_channel() -> None:
    x = torch.ones(4, 64)
    payload = make_codec("int8:g32+outliers:k2").encode(x)
    assert payload[:4].view(torch.int16).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("channels", "k", "message"),
    [
        ([3, 3], 0, "channel 3 appears twice"),
        ([-1, 4], 0, "channel -1 is negative"),
        ([1, 2], 3, "k=3 .* table has 2"),
        ([], 0, "empty"),
        ([1.5], 0, "1.5 is not an integer"),
    ],
)
def test_bad_static_tables(channels: list, k: int, message: str) -> None:
    spec = "int4:g32+outliers" + (f":k{k}" if k else "")
    with pytest.raises(CodecError, match=message):
        make_codec(spec, outlier_channels=channels)


def test_out_of_range_channel_is_reported_at_encode_time() -> None:
    codec = make_codec("int4:g32+outliers", outlier_channels=[5, 600])
    with pytest.raises(CodecError, match="channel 600 is out of range for hidden size 576"):
        codec.encode(torch.zeros(2, 576))


def test_missing_table_and_misuse() -> None:
    with pytest.raises(CodecError, match="static channel table"):
        make_codec("int4:g32+outliers")
    with pytest.raises(CodecError, match="no '\\+outliers' modifier"):
        make_codec("int4:g32", outlier_channels=[1])


def test_nan_in_an_outlier_channel_stays_there() -> None:
    x = heavy_tailed((8, 576), seed=4, dtype=torch.float32)
    x[2, 1] = float("nan")
    codec = make_codec("int4:g32+outliers", outlier_channels=[1, 192, 574])
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert torch.isnan(y[2, 1]) and int(torch.isnan(y).sum()) == 1
