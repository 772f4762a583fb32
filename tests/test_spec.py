"""Spec grammar: every family and preset, defaults, canonical round trip, clear errors for bad specs, and the
registry the codec modules fill (families, modifiers)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp import spec as registry
from megatron_tpcomp.codecs import CodecError
from megatron_tpcomp.codecs.microscaling import MINIFLOAT_FORMATS
from megatron_tpcomp.spec import (
    MAX_BLOCK,
    NONE,
    SCALE_FORMATS,
    VALID_FAMILIES,
    VALID_MODIFIERS,
    VALID_OPTIONS,
    CodecSpec,
    canonical,
    describe_grammar,
    parse_spec,
)

# --- every family, preset and default -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # fp8: e4m3, block 128, fp32 scale.
        ("fp8", CodecSpec("fp8", bits=8, exp_bits=4, man_bits=3, block=128, scale="fp32")),
        ("fp8-e4m3", CodecSpec("fp8", bits=8, exp_bits=4, man_bits=3, block=128, scale="fp32")),
        ("fp8-e5m2", CodecSpec("fp8", bits=8, exp_bits=5, man_bits=2, block=128, scale="fp32")),
        ("fp8-e5m2:b64:sfp16", CodecSpec("fp8", bits=8, exp_bits=5, man_bits=2, block=64, scale="fp16")),
        # intN: group 32, fp16 scale, symmetric.
        ("int4", CodecSpec("int", bits=4, block=32, scale="fp16")),
        ("int8:g32", CodecSpec("int", bits=8, block=32, scale="fp16")),
        ("int3:g64:asym", CodecSpec("int", bits=3, block=64, scale="fp16", asym=True)),
        ("int2:b16:sbf16", CodecSpec("int", bits=2, block=16, scale="bf16")),
        ("int5:g32:se8m0", CodecSpec("int", bits=5, block=32, scale="e8m0")),
        ("int6:g8:se4m3", CodecSpec("int", bits=6, block=8, scale="e4m3")),
        ("int7:g128:sfp32", CodecSpec("int", bits=7, block=128, scale="fp32")),
        # Presets: MXFP4 = fp4-e2m1:b32:se8m0; NVFP4 = e2m1, block 16, e4m3 scales plus a tensor scale.
        ("mxfp4", CodecSpec("minifloat", bits=4, exp_bits=2, man_bits=1, block=32, scale="e8m0")),
        (
            "nvfp4",
            CodecSpec("minifloat", bits=4, exp_bits=2, man_bits=1, block=16, scale="e4m3", tensor_scale=True),
        ),
        # fpN: block 32, e8m0 scale; default element formats e1m1, e2m1, e2m2, e2m3.
        ("fp3", CodecSpec("minifloat", bits=3, exp_bits=1, man_bits=1, block=32, scale="e8m0")),
        ("fp4", CodecSpec("minifloat", bits=4, exp_bits=2, man_bits=1, block=32, scale="e8m0")),
        ("fp4-e1m2", CodecSpec("minifloat", bits=4, exp_bits=1, man_bits=2, block=32, scale="e8m0")),
        ("fp4-e3m0:b16:sfp16", CodecSpec("minifloat", bits=4, exp_bits=3, man_bits=0, block=16, scale="fp16")),
        ("fp5:b32", CodecSpec("minifloat", bits=5, exp_bits=2, man_bits=2, block=32, scale="e8m0")),
        ("fp5-e3m1", CodecSpec("minifloat", bits=5, exp_bits=3, man_bits=1, block=32, scale="e8m0")),
        ("fp5-e1m3", CodecSpec("minifloat", bits=5, exp_bits=1, man_bits=3, block=32, scale="e8m0")),
        ("fp6", CodecSpec("minifloat", bits=6, exp_bits=2, man_bits=3, block=32, scale="e8m0")),
        ("fp6-e3m2:b32", CodecSpec("minifloat", bits=6, exp_bits=3, man_bits=2, block=32, scale="e8m0")),
        # Modifiers: +had defaults to 32-value rotation blocks; +outliers without k takes a static table.
        ("int4:g32+had", CodecSpec("int", bits=4, block=32, scale="fp16", hadamard_block=32)),
        ("int4:g32+had:b128", CodecSpec("int", bits=4, block=32, scale="fp16", hadamard_block=128)),
        ("int4:g32+outliers", CodecSpec("int", bits=4, block=32, scale="fp16", outliers=True)),
        ("int4:g32+outliers:k9", CodecSpec("int", bits=4, block=32, scale="fp16", outliers=True, outliers_k=9)),
        (
            "int4:g32+had+outliers:k4",
            CodecSpec("int", bits=4, block=32, scale="fp16", hadamard_block=32, outliers=True, outliers_k=4),
        ),
        ("none", NONE),
    ],
)
def test_every_family_preset_and_default(spec: str, expected: CodecSpec) -> None:
    cs = parse_spec(spec)
    assert cs == expected
    assert parse_spec(canonical(cs)) == cs
    assert parse_spec(spec.upper()) == cs  # the grammar is case-insensitive
    assert parse_spec(cs) is cs  # an already parsed spec passes through


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_integer_width_parses(bits: int) -> None:
    cs = parse_spec(f"int{bits}")
    assert (cs.kind, cs.bits, cs.block, cs.scale) == ("int", bits, 32, "fp16")


@pytest.mark.parametrize(("bits", "em"), [(b, em) for b, ems in MINIFLOAT_FORMATS.items() for em in ems])
def test_every_minifloat_element_format_parses(bits: int, em: tuple[int, int]) -> None:
    cs = parse_spec(f"fp{bits}-e{em[0]}m{em[1]}")
    assert (cs.kind, cs.bits, cs.exp_bits, cs.man_bits) == ("minifloat", bits, *em)
    assert 1 + cs.exp_bits + cs.man_bits == bits  # sign + exponent + mantissa fill the element


def test_modifiers_leave_the_base_spec_alone() -> None:
    cs = parse_spec("int4:g32+had:b64+outliers:k9")
    assert cs.base == parse_spec("int4:g32")
    assert str(cs) == canonical(cs) == "int4:g32:sfp16+had:b64+outliers:k9"


def test_canonical_strings_spell_every_option() -> None:
    assert canonical(parse_spec("fp8")) == "fp8-e4m3:b128:sfp32"
    assert canonical(parse_spec("int4")) == "int4:g32:sfp16"
    assert canonical(parse_spec("INT3:B64:ASYM")) == "int3:g64:asym:sfp16"
    assert canonical(parse_spec("mxfp4")) == "fp4-e2m1:b32:se8m0"
    assert canonical(parse_spec("nvfp4")) == "nvfp4:b16:se4m3"
    assert canonical(parse_spec("fp5")) == "fp5-e2m2:b32:se8m0"
    assert canonical(NONE) == "none"


# --- bad specs: CodecError naming the bad token and listing the valid choices ------------------------------------


@pytest.mark.parametrize(
    ("spec", "bad", "choices"),
    [
        ("zfp", "unknown codec 'zfp'", VALID_FAMILIES),
        ("int9", "integer width 9", "int2 .. int8"),
        ("int1", "integer width 1", "int2 .. int8"),
        ("int0", "integer width 0", "int2 .. int8"),
        ("fp7", "minifloat width 7", "fp3, fp4, fp5, fp6"),
        ("fp2", "minifloat width 2", "fp3, fp4, fp5, fp6"),
        ("fp6-e4m1", "no element format e4m1", "fp6-e2m3, fp6-e3m2"),
        ("fp4-e2m2", "no element format e2m2", "fp4-e2m1, fp4-e1m2, fp4-e3m0"),
        ("fp8-e3m4", "unknown fp8 variant 'fp8-e3m4'", "fp8, fp8-e4m3 or fp8-e5m2"),
        ("int4:g0", "block size 0 out of range", f"1 <= block size <= {MAX_BLOCK}"),
        ("int4:g5000", "block size 5000 out of range", f"1 <= block size <= {MAX_BLOCK}"),
        ("int4:g", "block size '' is not a positive integer", "block size like 32"),
        ("int4:gx", "unknown option 'gx'", VALID_OPTIONS),
        ("int4:g-4", "unknown option 'g-4'", VALID_OPTIONS),
        # 12 values * 3 bits = 36 bits: not whole bytes. 3 bits need a multiple of 8, 6 bits of 4, 4 bits of 2.
        ("int3:g12", "block size 12 times 3 bits", "a multiple of 8"),
        ("int6:g6", "block size 6 times 6 bits", "a multiple of 4"),
        ("fp6:b6", "block size 6 times 6 bits", "a multiple of 4"),
        ("int4:g7", "block size 7 times 4 bits", "a multiple of 2"),
        ("fp5:b12", "block size 12 times 5 bits", "a multiple of 8"),
        ("fp8:asym", "option 'asym' applies to integer codecs only", "int2..int8 with asym"),
        ("mxfp4:asym", "option 'asym' applies to integer codecs only", "int2..int8 with asym"),
        ("int4:sfp64", "unknown option 'sfp64'", VALID_OPTIONS),
        ("int4:fast", "unknown option 'fast'", VALID_OPTIONS),
        ("int4::g32", "unknown option ''", VALID_OPTIONS),
        ("int4:g32:asym:se8m0", "not se8m0", "sfp16, sbf16 or sfp32"),
        ("int4+rot", "unknown modifier 'rot'", VALID_MODIFIERS),
        ("int4+had:b48", "Hadamard block 48 is not a power of two", "2, 4, ..., 4096"),
        ("int4+had:b1", "Hadamard block 1 is not a power of two", "2, 4, ..., 4096"),
        ("int4+had:b8192", "Hadamard block 8192 out of range", f"1 <= Hadamard block <= {MAX_BLOCK}"),
        ("int4+had:k4", "unknown Hadamard option 'k4'", "+had or +had:b<N>"),
        ("int4+outliers:k0", "unknown outliers option 'k0'", "1 <= K <= 32767"),
        ("int4+outliers:b4", "unknown outliers option 'b4'", "+outliers:k<K>"),
        ("int4+outliers:k40000", "unknown outliers option 'k40000'", "K <= 32767"),
        ("int4+had+had", "modifier 'had' given twice", VALID_MODIFIERS),
        ("int4+outliers:k2+outliers:k3", "modifier 'outliers' given twice", VALID_MODIFIERS),
        ("int4+", "empty modifier after '+'", VALID_MODIFIERS),
        ("int4 :g32", "whitespace", "no spaces"),
        ("int4:g32\t+had", "whitespace", "no spaces"),
        ("", "empty spec", VALID_FAMILIES),
        ("   ", "empty spec", VALID_FAMILIES),
        ("none+had", "'none' takes no options or modifiers", "'none' alone"),
        ("none:g32", "'none' takes no options or modifiers", "'none' alone"),
        ("int\u0664", "non-ASCII character", "ASCII letters"),  # ARABIC-INDIC DIGIT FOUR would match \d
        ("int4:g\u00b2", "non-ASCII character", "ASCII letters"),  # superscript two: isdigit() but not int()
        ("int4+outliers:\u212a3", "non-ASCII character", "ASCII letters"),  # KELVIN SIGN lower()s to 'k'
    ],
)
def test_bad_specs_name_the_bad_token_and_the_choices(spec: str, bad: str, choices: str) -> None:
    with pytest.raises(CodecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert repr(spec) in message  # the whole spec as given, so the user can find it in a config
    assert bad in message
    assert "expected" in message and choices in message


@pytest.mark.parametrize("digits", [10, 5000])
@pytest.mark.parametrize("template", ["int{}", "fp{}", "fp6-e{}m2", "int4:g{}", "int4+had:b{}", "int4+outliers:k{}"])
def test_huge_numbers_are_a_codec_error(template: str, digits: int) -> None:
    # int() refuses strings of more than 4300 digits with a plain ValueError; the parser must not leak it.
    with pytest.raises(CodecError, match="out of range|no element format|unknown outliers option"):
        parse_spec(template.format("9" * digits))


def test_non_string_spec_is_rejected() -> None:
    with pytest.raises(CodecError, match="must be a string, got int"):
        parse_spec(4)  # type: ignore[arg-type]


def test_grammar_description_lists_families_options_and_modifiers() -> None:
    text = describe_grammar()
    for word in ("none", "fp8-e5m2", "int2..int8", "mxfp4", "nvfp4", "fp6", "asym", "+had", "+outliers"):
        assert word in text
    for fmt in SCALE_FORMATS:
        assert "s" + fmt in text


# --- canonical round trip over generated valid specs ------------------------------------------------------------


def _block_for(bits: int) -> st.SearchStrategy[int]:
    """Block sizes that make ``block * bits`` whole bytes (the grammar's only cross-option constraint)."""
    step = 8 // math.gcd(bits, 8)
    return st.integers(1, MAX_BLOCK // step).map(lambda n: n * step)


@st.composite
def codec_specs(draw: st.DrawFn) -> CodecSpec:
    """Any valid CodecSpec, built from its fields rather than from strings (so the parser is not the oracle)."""
    kind = draw(st.sampled_from(["int", "fp8", "minifloat"]))
    asym = tensor_scale = False
    if kind == "int":
        bits, e, m = draw(st.integers(2, 8)), 0, 0
        asym = draw(st.booleans())
        scale = draw(st.sampled_from(("fp32", "fp16", "bf16") if asym else SCALE_FORMATS))
    elif kind == "fp8":
        bits, (e, m) = 8, draw(st.sampled_from([(4, 3), (5, 2)]))
        scale = draw(st.sampled_from(SCALE_FORMATS))
    else:
        bits = draw(st.sampled_from(sorted(MINIFLOAT_FORMATS)))
        e, m = draw(st.sampled_from(MINIFLOAT_FORMATS[bits]))
        tensor_scale = (bits, e, m) == (4, 2, 1) and draw(st.booleans())  # nvfp4 is e2m1 only
        scale = draw(st.sampled_from(SCALE_FORMATS))
    had = draw(st.sampled_from([0] + [2**i for i in range(1, 13)]))
    outliers = draw(st.booleans())
    k = draw(st.integers(0, 32767)) if outliers else 0
    return CodecSpec(
        kind=kind,
        bits=bits,
        exp_bits=e,
        man_bits=m,
        block=draw(_block_for(bits)),
        scale=scale,
        asym=asym,
        tensor_scale=tensor_scale,
        hadamard_block=had,
        outliers=outliers,
        outliers_k=k,
    )


@settings(max_examples=300, deadline=None)
@given(codec_specs(), st.randoms(use_true_random=False))
def test_canonical_round_trip_of_generated_specs(cs: CodecSpec, rnd) -> None:
    text = canonical(cs)
    assert parse_spec(text) == cs
    mixed = "".join(c.upper() if rnd.random() < 0.5 else c for c in text)
    assert parse_spec(mixed) == cs  # case-insensitive
    assert canonical(parse_spec(text)) == text  # canonical is a fixed point


# Spec strings as users write them: short forms, presets and defaults left out.
written_specs = st.builds(
    lambda fam, block, scale, had, out: fam + block + scale + had + out,
    st.sampled_from(["int2", "int4", "int8", "fp8", "fp8-e5m2", "fp4", "fp5", "fp6-e3m2", "mxfp4", "nvfp4", "fp3"]),
    st.sampled_from(["", ":b16", ":g32", ":b64", ":b128", ":g256"]),
    st.sampled_from(["", ":sfp16", ":sbf16", ":sfp32", ":se8m0", ":se4m3"]),
    st.sampled_from(["", "+had", "+had:b64", "+had:b2"]),
    st.sampled_from(["", "+outliers", "+outliers:k7"]),
)


@settings(max_examples=200, deadline=None)
@given(written_specs)
def test_round_trip_of_written_specs(spec: str) -> None:
    cs = parse_spec(spec)
    assert isinstance(cs, CodecSpec)
    assert parse_spec(canonical(cs)) == cs
    assert parse_spec(spec.upper()) == cs


# --- fuzz: any text gives a CodecSpec or a CodecError, nothing else ---------------------------------------------


def _parse_or_codec_error(text: str) -> None:
    try:
        cs = parse_spec(text)
    except CodecError as exc:
        assert "expected" in str(exc)
        return
    assert isinstance(cs, CodecSpec)
    assert parse_spec(canonical(cs)) == cs


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="intfpmxvoulershad0123456789:+-bgks e", max_size=30))
def test_fuzz_grammar_alphabet(text: str) -> None:
    _parse_or_codec_error(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_arbitrary_unicode(text: str) -> None:
    _parse_or_codec_error(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["int", "fp", "nv", "mx", "4", "8", "3", "0", "99", "-e", "m", ":", "+", "g", "b", "k", "s", "asym", "had"]
            + ["outliers", "fp16", "e8m0", "none", "\u00b2", "\u0664"]
        ),
        max_size=12,
    ).map("".join)
)
def test_fuzz_token_soup(text: str) -> None:
    # Joined grammar tokens reach deeper than random characters (options, modifiers, validation).
    _parse_or_codec_error(text)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("int4:g32:g64", "block size given twice ('g32' and 'g64')"),
        ("fp8:b64:g128", "block size given twice ('b64' and 'g128')"),
        ("int4:sfp16:sbf16", "scale format given twice"),
        ("int4:asym:asym", "asym given twice"),
    ],
)
def test_repeated_options_are_rejected(spec: str, fragment: str) -> None:
    with pytest.raises(CodecError, match=re.escape(fragment)):
        parse_spec(spec)


# --- the registry of families and modifiers ---------------------------------------------------------------------


def test_registry_lists_the_shipped_families_and_modifiers() -> None:
    assert [f.kind for f in registry.families()] == ["fp8", "int", "minifloat"]
    assert all(registry.modifier(name).name == name for name in registry.MODIFIERS)
    assert registry.family("int").factory.__name__ == "IntCodec"
    with pytest.raises(CodecError, match="spec kind 'zfp' has no registered codec family; expected one of fp8, int"):
        registry.family("zfp")


def test_registry_refuses_bad_registrations() -> None:
    toy = registry.Family("toy", "toy", "toy8", lambda token, s: None, lambda cs: "toy8", object, frozenset({"fast"}))
    with pytest.raises(ValueError, match="unknown options \\['fast'\\]"):
        registry.register_family(toy)
    with pytest.raises(ValueError, match="'int' is taken"):
        registry.register_family(registry.family("int"))
    with pytest.raises(ValueError, match="no codec family of kind 'toy'"):
        registry.unregister_family("toy")
    with pytest.raises(ValueError, match="modifier 'had' is unknown or taken"):
        registry.register_modifier(registry.modifier("had"))
    with pytest.raises(ValueError, match="modifier 'rot' is unknown or taken"):
        registry.register_modifier(registry.Modifier("rot", lambda inner, cs, **_: inner))


def test_registered_family_is_removed_even_when_the_block_fails() -> None:
    toy = registry.Family(
        "toy",
        "toy",
        "toy8",
        lambda token, s: CodecSpec("toy", 8, block=1) if token == "toy8" else None,
        lambda cs: "toy8",
        object,
        frozenset(),
    )
    with pytest.raises(RuntimeError), registry.registered_family(toy):
        assert parse_spec("toy8").kind == "toy" and "toy8" in registry.VALID_FAMILIES
        raise RuntimeError
    assert "toy8" not in registry.VALID_FAMILIES and registry.VALID_FAMILIES == VALID_FAMILIES
