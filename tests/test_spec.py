"""Spec grammar: presets, defaults, canonical round trip, and clear errors for bad specs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.spec import CodecSpec, canonical, describe_grammar, parse_spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fp8", dict(kind="fp8", exp_bits=4, man_bits=3, block=128, scale="fp32")),
        ("FP8-E5M2:b64", dict(kind="fp8", exp_bits=5, man_bits=2, block=64)),
        ("int4", dict(kind="int", bits=4, block=32, scale="fp16", asym=False)),
        ("int8:g32", dict(kind="int", bits=8, block=32)),
        ("int3:g64:asym:sbf16", dict(kind="int", bits=3, block=64, asym=True, scale="bf16")),
        ("mxfp4", dict(kind="minifloat", bits=4, exp_bits=2, man_bits=1, block=32, scale="e8m0")),
        ("nvfp4", dict(kind="minifloat", bits=4, block=16, scale="e4m3", tensor_scale=True)),
        ("fp5:b32", dict(kind="minifloat", bits=5, exp_bits=2, man_bits=2, block=32, scale="e8m0")),
        ("fp6", dict(bits=6, exp_bits=2, man_bits=3)),
        ("fp6-e3m2", dict(bits=6, exp_bits=3, man_bits=2)),
        ("int4:g32+had", dict(hadamard_block=32)),
        ("int4:g32+had:b128", dict(hadamard_block=128)),
        ("int4:g32+outliers", dict(outliers=True, outliers_k=0)),
        ("int4:g32+outliers:k9", dict(outliers=True, outliers_k=9)),
        ("none", dict(kind="none")),
    ],
)
def test_presets_and_defaults(spec: str, expected: dict) -> None:
    cs = parse_spec(spec)
    for key, value in expected.items():
        assert getattr(cs, key) == value, (spec, key)
    assert parse_spec(canonical(cs)) == cs


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("int9", "int2 .. int8"),
        ("int1", "int2 .. int8"),
        ("fp7", "fp3, fp4, fp5, fp6"),
        ("fp6-e4m1", "fp6-e2m3"),
        ("fp8-e3m4", "fp8-e5m2"),
        ("zfp", "unknown codec 'zfp'"),
        ("int4:g0", "block size 0 out of range"),
        ("int4:g5000", "block size 5000 out of range"),
        ("int4:gx", "unknown option 'gx'"),
        ("int3:g12", "not a whole number of bytes"),
        ("fp8:asym", "integer codecs only"),
        ("int4:sfp64", "unknown option 'sfp64'"),
        ("int4+rot", "unknown modifier 'rot'"),
        ("int4+had:b48", "not a power of two"),
        ("int4+outliers:k0", "outliers option 'k0'"),
        ("int4+had+had", "given twice"),
        ("int4+outliers+outliers", "given twice"),
        ("int4 :g32", "whitespace"),
        ("", "empty spec"),
        ("int4+", "empty modifier"),
        ("int4:g32:asym:se8m0", "offset"),
    ],
)
def test_bad_specs_name_the_problem_and_the_choices(spec: str, fragment: str) -> None:
    with pytest.raises(CodecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert fragment in message
    assert repr(spec) in message and "expected" in message


def test_non_string_spec_is_rejected() -> None:
    with pytest.raises(CodecError, match="must be a string"):
        parse_spec(4)  # type: ignore[arg-type]


def test_grammar_description_lists_the_families() -> None:
    text = describe_grammar()
    for word in ("fp8-e5m2", "int2..int8", "mxfp4", "nvfp4", "+had", "+outliers", "sfp16"):
        assert word in text


valid_specs = st.builds(
    lambda fam, block, scale, had, out: fam + block + scale + had + out,
    st.sampled_from(["int2", "int4", "int8", "fp8", "fp8-e5m2", "fp4", "fp5", "fp6-e3m2", "mxfp4", "nvfp4"]),
    st.sampled_from(["", ":b16", ":g32", ":b64", ":b128"]),
    st.sampled_from(["", ":sfp16", ":sbf16", ":sfp32", ":se8m0"]),
    st.sampled_from(["", "+had", "+had:b64"]),
    st.sampled_from(["", "+outliers", "+outliers:k7"]),
)


@settings(max_examples=200, deadline=None)
@given(valid_specs)
def test_canonical_round_trip(spec: str) -> None:
    cs = parse_spec(spec)
    assert isinstance(cs, CodecSpec)
    assert parse_spec(canonical(cs)) == cs
    assert parse_spec(spec.upper()) == cs


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="intfpmxvoulershad0123456789:+-bgks e", max_size=30))
def test_fuzz_parser_returns_a_spec_or_raises_codec_error(text: str) -> None:
    try:
        cs = parse_spec(text)
    except CodecError:
        return
    assert isinstance(cs, CodecSpec)
    assert parse_spec(canonical(cs)) == cs
