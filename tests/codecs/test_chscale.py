"""Static per-channel scales (``+chscale``): the spec and the table, exactness of the power-of-two scaling, the
noise it removes next to a massive channel, and the collectives (pipelined and two-shot cuts keep every value in
its channel) over real gloo process groups."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_tpcomp import collectives
from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.codecs.chscale import MAX_EXPONENT, ChannelScaleCodec, exponents_from_rms
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.launch import run_distributed
from megatron_tpcomp.spec import canonical, parse_spec

H = 576
SPEC = "int4:g64:se4m3+had+chscale"


def activation(rows: int, seed: int = 0) -> torch.Tensor:
    """``[rows, H]`` fp32: N(0, 1) with two massive channels (x2000, x300) and a quiet block (x0.05)."""
    x = torch.randn(rows, H, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 2000.0
    x[:, 300] *= 300.0
    x[:, 64:128] *= 0.05
    return x


def exponents_for(x: torch.Tensor) -> list[int]:
    return exponents_from_rms(x.float().pow(2).mean(dim=0).sqrt())


def test_spec_grammar_and_factory_errors() -> None:
    cs = parse_spec(SPEC)
    assert cs.chscale and canonical(cs) == "int4:g64:se4m3+had:b32+chscale"
    assert parse_spec(canonical(cs)) == cs and not cs.base.chscale
    for bad, message in [
        ("int4+chscale+chscale", "given twice"),
        ("int4+chscale:b4", "takes no options"),
        ("int4+outliers+chscale", "cannot be combined"),
    ]:
        with pytest.raises(CodecError, match=message):
            parse_spec(bad)
    with pytest.raises(CodecError, match="needs the static per-channel scale exponents"):
        make_codec(SPEC)
    with pytest.raises(CodecError, match="has no '\\+chscale' modifier"):
        make_codec("int4:g32", channel_scale_exponents=[0] * H)
    with pytest.raises(CodecError, match="exponent 17 is out of range"):
        make_codec(SPEC, channel_scale_exponents=[17] + [0] * (H - 1))
    with pytest.raises(CodecError, match="is not an integer"):
        make_codec(SPEC, channel_scale_exponents=[0.5] + [0] * (H - 1))
    codec = make_codec(SPEC, channel_scale_exponents=[0] * H)
    with pytest.raises(CodecError, match="has 100 channels; the '\\+chscale' table has 576"):
        codec.encode(torch.zeros(4, 100))
    with pytest.raises(CodecError, match="not a whole number of rows"):
        codec.encode(torch.zeros(H + 1))


def test_codec_carries_its_spec_and_cuts_on_whole_rows() -> None:
    codec = make_codec(SPEC, channel_scale_exponents=[0] * H)
    assert codec.cs == parse_spec(SPEC) and canonical(codec.cs) == codec.spec
    assert codec.chunk_alignment == math.lcm(64, 32, H)  # quantization group, rotation block, row
    assert collectives.chunk_alignment(codec) == codec.chunk_alignment


def test_exponents_from_rms() -> None:
    rms = torch.ones(8)
    rms[1], rms[2], rms[3], rms[4] = 4.0, 16.0, 0.25, 0.0
    rms[5] = float("nan")
    rms[6] = 1e30
    e = exponents_from_rms(rms)
    # r / median = 4 -> 2^-1, 16 -> 2^-2, 1/4 -> 2^+1: w ~ r^(-1/2); zero and NaN channels are left alone.
    assert e[:6] == [0, -1, -2, 1, 0, 0] and e[6] == -MAX_EXPONENT and e[7] == 0
    assert exponents_from_rms(torch.zeros(4)) == [0, 0, 0, 0]
    assert exponents_from_rms(rms, power=0.0) == [0] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaling_is_exact_around_the_inner_codec(dtype: torch.dtype) -> None:
    x = activation(48).clamp(-60000, 60000).to(dtype)
    e = exponents_for(x)
    codec = make_codec(SPEC, channel_scale_exponents=e)
    inner = make_codec("int4:g64:se4m3+had")
    w = torch.exp2(torch.tensor(e, dtype=torch.float32))
    payload = codec.encode(x)
    # The wire format is the inner codec's payload of x * 2^e (fp32), nothing else.
    assert torch.equal(payload, inner.encode(x.float() * w))
    assert codec.payload_nbytes(x.shape) == inner.payload_nbytes(x.shape)
    ref = (inner.decode(payload, x.shape, torch.float32) / w).to(dtype)
    assert torch.equal(codec.decode(payload, x.shape, dtype), ref)
    # decode_sum: the inner codec's fp32 sum (rotated back once), divided exactly, rounded once; flat chunks too.
    y = activation(48, seed=1).to(dtype)
    both = torch.cat([payload, codec.encode(y)])
    acc = inner.decode_sum(both, 2, x.shape, torch.float32)
    assert torch.equal(codec.decode_sum(both, 2, x.shape, dtype), (acc / w).to(dtype))
    flat = codec.decode_sum(both, 2, (48 * H,), dtype)
    assert torch.equal(flat.view(48, H), codec.decode_sum(both, 2, x.shape, dtype))
    # All-zero exponents: the same bits as the inner codec.
    plain = make_codec(SPEC, channel_scale_exponents=[0] * H)
    assert torch.equal(plain.encode(x), inner.encode(x.float()))


def test_scales_remove_the_noise_a_massive_channel_spreads() -> None:
    x = activation(256)
    scaled = make_codec(SPEC, channel_scale_exponents=exponents_for(x))
    plain = make_codec("int4:g64:se4m3+had")
    quiet = [c for c in range(H) if c not in (7, 300)]

    def mse(codec: ChannelScaleCodec | object) -> float:
        y = codec.decode(codec.encode(x), x.shape, torch.float32)
        return float((y - x)[:, quiet].pow(2).mean())

    # The rotation spreads channel 7's energy (2000^2) over its 32-value block; scaled down by 2^-5 first, it
    # leaves the other 31 channels of that block (and 300's) ~5-30x less noise. Measured ~13x; 4x leaves margin
    # for the random signs and the group scales.
    assert mse(plain) > 4 * mse(scaled)
    bound = scaled.max_abs_error_bound(x)
    assert bound is None or bool((scaled.decode(scaled.encode(x), x.shape, torch.float32) - x).abs().le(bound).all())


def _collectives(rank: int, world_size: int) -> dict:
    x = activation(1000, seed=10 + rank).to(torch.bfloat16)  # 1.1 MiB of bf16: pipelined with 64 KiB chunks
    exps = exponents_for(activation(1000, seed=99))  # one table for every rank, as from calibration
    codec = make_codec(SPEC, channel_scale_exponents=exps)
    out = {}
    saved = chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES
    try:
        chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = 1 << 16, 1 << 16
        out["chunks"] = chunking.tensor_pipeline_chunks(x, codec)
        out["pipelined"] = collectives.all_reduce(x, codec, algo="one-shot")
        chunking.PIPELINE_MIN_BYTES = 1 << 62
        out["whole"] = collectives.all_reduce(x, codec, algo="one-shot")
    finally:
        chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = saved
    out["two_shot"] = collectives.all_reduce(x, codec, algo="two-shot")
    out["gather"] = collectives.all_gather(x[:6], codec, dim=0)
    out["scatter"] = collectives.reduce_scatter(x[: 6 * world_size], codec, dim=0)
    out["plain_two_shot"] = collectives.all_reduce(x, "int4:g64:se4m3+had", algo="two-shot")
    return out


def test_collectives_keep_every_value_in_its_channel() -> None:
    n = 3
    results = run_distributed(_collectives, n, timeout_s=300)
    xs = [activation(1000, seed=10 + r).to(torch.bfloat16) for r in range(n)]
    codec = make_codec(SPEC, channel_scale_exponents=exponents_for(activation(1000, seed=99)))
    total = sum(x.float() for x in xs)
    payloads = torch.cat([codec.encode(x) for x in xs])
    expected = codec.decode_sum(payloads, n, xs[0].shape, torch.bfloat16)
    quiet = [c for c in range(H) if c not in (7, 300)]
    for res in results:
        # One-shot: exactly the decoded sum of every rank's payload, cut into chunks or not (chunks end on rows).
        assert res["chunks"] > 1
        assert torch.equal(res["whole"], expected) and torch.equal(res["pipelined"], expected)
        # Two-shot requantizes the reduced chunk: close to the true sum, and closer than without the scales.
        err = (res["two_shot"].float() - total)[:, quiet].pow(2).mean()
        plain_err = (res["plain_two_shot"].float() - total)[:, quiet].pow(2).mean()
        assert err < plain_err / 4  # the same ~13x as one codec call (test above), with margin
        gathered = torch.cat([codec.decode(codec.encode(x[:6]), (6, H), torch.bfloat16) for x in xs])
        assert torch.equal(res["gather"], gathered)
    for rank, res in enumerate(results):
        part = total[: 6 * n][rank * 6 : (rank + 1) * 6]
        assert res["scatter"].shape == (6, H)
        assert float((res["scatter"].float() - part)[:, quiet].abs().max()) < 0.1 * float(part.abs().max())
