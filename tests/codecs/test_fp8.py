"""FP8 codec: codes equal torch's own float8 cast, exact bits, grid round trips, backend selection."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.codecs.fp8 import HAVE_TE, Fp8Codec
from megatron_tpcomp.spec import parse_spec

FORMATS = [("fp8", torch.float8_e4m3fn, 448.0), ("fp8-e5m2:b128", torch.float8_e5m2, 57344.0)]


@pytest.mark.parametrize(("spec", "fp8_dtype", "fmax"), FORMATS)
def test_codes_are_torch_float8_of_the_scaled_input(spec: str, fp8_dtype: torch.dtype, fmax: float) -> None:
    codec = make_codec(spec)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 10
    payload = codec.encode(x)
    s = payload[512:528].view(torch.float32)  # 4 fp32 scales after 512 code bytes
    assert torch.allclose(s, x.abs().amax(dim=1) / fmax, rtol=0, atol=0)
    expected = (x * (1 / s).unsqueeze(1)).clamp(-fmax, fmax).to(fp8_dtype).view(torch.uint8).reshape(-1)
    assert torch.equal(payload[:512], expected)


@pytest.mark.parametrize(("spec", "fp8_dtype", "fmax"), FORMATS)
def test_values_on_the_grid_round_trip_exactly(spec: str, fp8_dtype: torch.dtype, fmax: float) -> None:
    # Every finite fp8 value, each block holding +fmax so that the scale is exactly 1.
    all_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype).to(torch.float32)
    grid = all_codes[torch.isfinite(all_codes)]
    pad = (-grid.numel()) % 127
    grid = torch.cat([grid, torch.zeros(pad)]).view(-1, 127)
    x = torch.cat([grid, torch.full((grid.shape[0], 1), fmax)], dim=1)
    codec = make_codec(spec)
    assert torch.equal(codec.decode(codec.encode(x), x.shape, torch.float32), x)


@pytest.mark.parametrize(("spec", "bits"), [("fp8", 8.25), ("fp8-e5m2:b128", 8.25), ("fp8:b32:sfp16", 8.5)])
def test_exact_bits_per_value(spec: str, bits: float) -> None:
    assert make_codec(spec).bits_per_value((1024, 1024)) == bits


def test_backend_selection() -> None:
    cs = parse_spec("fp8")
    assert Fp8Codec(cs, backend="torch").backend == "torch"
    with pytest.raises(CodecError, match="unknown fp8 backend 'cuda'"):
        Fp8Codec(cs, backend="cuda")
    if not HAVE_TE:
        with pytest.raises(CodecError, match="Transformer Engine"):
            Fp8Codec(cs, backend="te")
