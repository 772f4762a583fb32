"""Issue 14, spec-grammar findings: a repeated modifier option was silently resolved to its last value
(``int4+had:b32:b64`` built a 64-value rotation while ``int4:g32:g64`` was rejected), and a 100k-character spec
produced a 200 KB error message (the spec was quoted whole, twice). Both tests failed on that code.
"""

from __future__ import annotations

import pytest

from megatron_tpcomp.cli import main
from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.config import CompressionConfig
from megatron_tpcomp.spec import parse_spec

#: At most this many characters of the bad input are quoted (plus "..." and its length).
QUOTE_LIMIT = 80


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("int4+had:b32:b64", "option 'b' of modifier 'had' given twice ('b32' and 'b64')"),
        ("int4:g32+had:b64:b64", "option 'b' of modifier 'had' given twice ('b64' and 'b64')"),
        ("int4:g32+outliers:k4:k5", "option 'k' of modifier 'outliers' given twice ('k4' and 'k5')"),
        ("fp8+had:b16:b32+outliers:k2", "option 'b' of modifier 'had' given twice"),
    ],
)
def test_repeated_modifier_option_is_rejected_naming_it(spec: str, fragment: str) -> None:
    with pytest.raises(CodecError) as info:
        parse_spec(spec)
    assert fragment in str(info.value)
    with pytest.raises(CodecError, match="given twice"):
        make_codec(spec)


def test_each_modifier_option_once_is_still_accepted() -> None:
    assert parse_spec("int4+had:b64").hadamard_block == 64
    assert parse_spec("int4:g32+had:b64+outliers:k4").outliers_k == 4


# A spec far longer than any real one, in each place the parser quotes from: the family, an option, a
# modifier name, a modifier option, and digits.
LONG = 100_000
LONG_SPECS = {
    "family": "x" * LONG,
    "option": "int4:" + "z" * LONG,
    "modifier": "int4:g32+" + "had" * (LONG // 3),
    "modifier option": "int4:g32+had:" + "q" * LONG,
    "digits": "int4:g" + "9" * LONG,
    "whitespace": "int4 " + "a" * LONG,
}


@pytest.mark.parametrize("where", list(LONG_SPECS))
def test_long_spec_error_quotes_at_most_80_characters(where: str) -> None:
    spec = LONG_SPECS[where]
    with pytest.raises(CodecError) as info:
        parse_spec(spec)
    message = str(info.value)
    # Two quotes of at most QUOTE_LIMIT characters each (with "..." and the length), plus the fixed text: the
    # longest fixed text is the list of valid families or options (~170 characters).
    assert len(message) < 2 * QUOTE_LIMIT + 400, f"{len(message)} characters: {message[:200]}"
    assert f"({len(spec)} characters)" in message and "..." in message


def test_long_spec_through_the_cli_and_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    spec = "int4:g32+" + "had" * (LONG // 3)
    assert main(["specs", spec]) == 2
    err = capsys.readouterr().err
    assert len(err) < 600 and "characters)" in err
    with pytest.raises(ValueError) as info:
        CompressionConfig.from_spec(spec)
    assert len(str(info.value)) < 600


def test_short_specs_are_still_quoted_whole() -> None:
    with pytest.raises(CodecError, match=r"invalid codec spec 'int4:g33x': unknown option 'g33x'"):
        parse_spec("int4:g33x")
