"""Search candidates: SPEC@ALGO names, bits per value from the codec."""

from __future__ import annotations

import pytest

from megatron_tpcomp.config import CompressionConfig
from megatron_tpcomp.search import assignment_to_config, split_candidate


def test_candidates_name_their_algorithm_and_take_their_bits_from_the_codec() -> None:
    from megatron_tpcomp.codecs import CodecError, make_codec
    from megatron_tpcomp.search import DEFAULT_CANDIDATES, candidate_bits

    assert split_candidate("int4:g64+had") == ("int4:g64+had", "one-shot")
    assert split_candidate("int4:g64+had@two-shot") == ("int4:g64+had", "two-shot")
    with pytest.raises(ValueError, match="auto"):
        split_candidate("int4:g32@auto")  # the search must know which algorithm it measured
    with pytest.raises(ValueError, match="no spec"):
        split_candidate("@one-shot")
    shape = (512, 576)
    # Exact payloads: 4 bits + one fp16 scale per group (or e4m3) + one int16 exponent per 4096 values
    # (72 super-blocks: 144 bytes, 16/4096 bits per value); the outlier table adds 9 bf16 channels.
    exps = 16 / 4096
    assert candidate_bits("int4:g64+had", shape, 9) == 4.25 + exps
    assert candidate_bits("int4:g128+had@two-shot", shape, 9) == 4.125 + exps
    assert candidate_bits("int4:g64:se4m3+had", shape, 9) == 4.125 + exps
    assert candidate_bits("int8:g32", shape, 9) == 8.5 + exps
    assert candidate_bits("int4:g32+outliers", shape, 9) == pytest.approx(4.68, abs=0.01)
    # Dynamic outliers pick their own K channels per message and send the indices: no table involved.
    dynamic = make_codec("int4:g32+outliers:k4").bits_per_value(shape)
    assert candidate_bits("int4:g32+outliers:k4", shape, 9) == dynamic
    with pytest.raises(CodecError):
        candidate_bits("int4:gq", shape, 9)
    bits = [candidate_bits(c, shape, 9) for c in DEFAULT_CANDIDATES]
    assert sum(b < 4.5 for b in bits) >= 2 and min(bits) <= 4.125 + exps and max(bits) <= 8.5 + exps
    assert all(split_candidate(c)[1] == "one-shot" for c in DEFAULT_CANDIDATES)


def test_channel_scale_candidates_cost_no_bits_and_carry_their_table() -> None:
    from megatron_tpcomp.search import candidate_bits

    shape = (512, 576)
    assert candidate_bits("int4:g64:se4m3+had+chscale", shape, 9) == candidate_bits("int4:g64:se4m3+had", shape, 9)
    exps = [0] * 576
    exps[7] = -6
    data = assignment_to_config(
        {"layer0.mlp": "int5:g64:se4m3+had+chscale@two-shot", "layer0.attention": "int5:g64:se4m3+had"},
        {},
        {"num_layers": 1, "hidden_size": 576, "tp_size": 3},
        {},
        scales={"layer0.mlp": exps, "layer0.attention": [1] * 576},
    )
    assert data["layers"]["0"]["attention"] == "int5:g64:se4m3+had"  # no +chscale: no table written
    site = data["layers"]["0"]["mlp"]
    assert site["channel_scale_exponents"] == exps and site["algo"] == "two-shot"
    cfg = CompressionConfig.from_dict(data)
    assert cfg.codec_for("mlp", 0).exponents == exps and cfg.algo_for("mlp", 0) == "two-shot"
