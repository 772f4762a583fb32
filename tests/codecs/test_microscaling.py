"""Block minifloats: element grids, OCP/NVIDIA presets, rounding ties, exact bits per value."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.codecs.microscaling import element_values


def test_e2m1_values_are_the_ocp_fp4_grid() -> None:
    assert element_values(2, 1) == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@pytest.mark.parametrize(("e", "m", "top"), [(2, 2, 7.0), (3, 1, 24.0), (2, 3, 7.5), (3, 2, 28.0), (1, 1, 3.0)])
def test_element_maxima(e: int, m: int, top: float) -> None:
    values = element_values(e, m)
    assert values[-1] == top and len(values) == 2 ** (e + m)
    assert list(values) == sorted(set(values))  # strictly increasing: codes order like values


@pytest.mark.parametrize("spec", ["mxfp4", "fp5:b32", "fp6:b32", "fp6-e3m2:b32", "fp3"])
def test_values_on_the_grid_round_trip_exactly(spec: str) -> None:
    codec = make_codec(spec)
    values = torch.tensor(element_values(codec.exp_bits, codec.man_bits))
    # Blocks hold +-grid values and the grid maximum: with a power-of-two e8m0 scale of 1 they are exact.
    block = torch.cat([values, -values]).repeat(4)[:31]
    x = torch.cat([block, values[-1:]]).repeat(3) * 2.0**-3  # scale 2^-3, still exact
    assert torch.equal(codec.decode(codec.encode(x), x.shape, torch.float32), x)


def test_rounding_ties_go_to_even_mantissa() -> None:
    codec = make_codec("mxfp4")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert y[:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


@pytest.mark.parametrize(
    ("spec", "bits"), [("mxfp4", 4.25), ("fp5:b32", 5.25), ("fp6:b32", 6.25), ("fp4:b16:sfp16", 5.0)]
)
def test_exact_bits_per_value(spec: str, bits: float) -> None:
    assert make_codec(spec).bits_per_value((1024, 1024)) == bits


def test_nvfp4_two_level_scaling() -> None:
    codec = make_codec("nvfp4")
    shape = (1024, 1024)
    # 4 bits + one e4m3 byte per 16 values + one fp32 tensor scale (16 bytes with alignment).
    assert codec.payload_nbytes(shape) == 1024 * 1024 // 2 + 1024 * 1024 // 16 + 16
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 1e4  # block scales beyond e4m3's 448
    y = codec.decode(codec.encode(x), x.shape, torch.float32)
    assert float((y - x).norm() / x.norm()) < 0.13  # the tensor scale keeps e4m3 block scales in range
    zeros = torch.zeros(3, 16)
    assert torch.equal(codec.decode(codec.encode(zeros), zeros.shape, torch.float32), zeros)


def test_e8m0_scales_cost_accuracy_against_fp16_scales() -> None:
    # FACTS.md: E8M0 power-of-two scales are worse than 16-bit ones at the same element format.
    x = torch.randn(256, 576, generator=torch.Generator().manual_seed(1))
    err = {}
    for spec in ("fp4:b32:se8m0", "fp4:b32:sfp16"):
        codec = make_codec(spec)
        err[spec] = float((codec.decode(codec.encode(x), x.shape, torch.float32) - x).norm() / x.norm())
    assert err["fp4:b32:sfp16"] < 0.9 * err["fp4:b32:se8m0"], err
