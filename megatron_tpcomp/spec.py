"""Codec spec strings: the grammar, parsing, validation, canonical form, and the registry of codec families.

Grammar (whitespace is not allowed; case-insensitive)::

    SPEC     := "none" | CODEC ("+" MODIFIER)*
    CODEC    := FAMILY (":" OPTION)*
    FAMILY   := a token of a registered family (table in ``megatron_tpcomp/codecs/__init__.py``):
                "fp8" | "fp8-e4m3" | "fp8-e5m2"           FP8 with a per-block scale
              | "int2" ... "int8"                         symmetric (or asymmetric) integers per group
              | "mxfp4" | "nvfp4"                          OCP MXFP4 / NVIDIA NVFP4 presets
              | "fp3" | "fp4" | "fp5" | "fp6" ["-eXmY"]    block minifloats (defaults: e1m1, e2m1, e2m2, e2m3)
    OPTION   := "b" N | "g" N        block (group) size N; both letters mean the same
              | "asym"               integers only: min/max (scale + offset) instead of symmetric
              | "s" SCALEFMT         scale format: sfp32 | sfp16 | sbf16 | se8m0 | se4m3
    MODIFIER := "had" [":b" N]        randomized Hadamard rotation over blocks of N values (power of two)
              | "outliers" [":k" K]   K channels (last dim) travel in bf16: a static table given to the codec,
                                      or, with no table, the K largest channels of each message (indices sent)
              | "chscale"             static per-channel power-of-two scales (last dim) applied before the
                                      codec, from calibration (nothing sent; codecs/chscale.py)
              | "rows:k" K            the K token rows (last dim = channels) of largest magnitude of each message
                                      travel in bf16, at most one row in 64 (codecs/rows.py)

Examples: ``fp8``, ``fp8-e5m2:b128``, ``int8:g32``, ``int4:g32:asym``, ``mxfp4``, ``nvfp4``, ``fp5:b32``,
``int4:g32+had``, ``int4:g32+outliers:k9``, ``int4:g64:se4m3+had+chscale``.

Families are registered, not listed here: each family module of ``megatron_tpcomp/codecs/`` calls
:func:`register_family` with its token parser (which applies the family's defaults), the canonical form of its
base spec, its codec class and the examples the contract suite runs; each modifier's module calls
:func:`register_modifier` with its wrapper. Options and modifiers are fixed grammar, parsed here. Registration
happens when ``megatron_tpcomp.codecs`` is imported, which importing any ``megatron_tpcomp`` module does first
(the package ``__init__`` imports it), so ``from megatron_tpcomp.spec import parse_spec`` sees every family.
This module imports nothing from ``codecs/``: it is the bottom layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from megatron_tpcomp.errors import CodecError

SCALE_FORMATS = ("fp32", "fp16", "bf16", "e8m0", "e4m3")

VALID_MODIFIERS = (
    "+had[:b<N>] (Hadamard rotation), +outliers[:k<K>] (bf16 outlier channels), +chscale (static per-channel scales), "
    "+rows:k<K> (bf16 outlier token rows)"
)
#: Modifier names in the order their wrappers are applied (innermost first).
MODIFIERS = ("had", "outliers", "chscale", "rows")
#: Options of the fixed grammar a family may accept (``Family.options``).
OPTION_KINDS = ("block", "scale", "asym")
MAX_BLOCK = 4096
#: Outlier channel indices travel as int16 (codecs/outliers.py), so K cannot exceed this.
MAX_OUTLIERS = 32767


@dataclass(frozen=True)
class CodecSpec:
    """A parsed, validated codec spec.

    Attributes:
        kind: ``none`` or a registered family's kind (``fp8`` | ``int`` | ``minifloat`` for the shipped ones).
        bits: element bits (8 for fp8, 2..8 for int, 3..6 for minifloat, 16 for none).
        exp_bits, man_bits: element exponent/mantissa bits for fp8 and minifloats (0 for int).
        block: values per scale.
        scale: scale storage format, one of ``SCALE_FORMATS``.
        asym: integer codecs only: asymmetric (scale + minimum per block).
        tensor_scale: an extra fp32 per-tensor scale (NVFP4's two-level scaling).
        hadamard_block: 0 for no rotation, else the rotation block size.
        outliers: whether the ``+outliers`` modifier is present.
        outliers_k: number of outlier channels (0 = take the count from the static table).
        chscale: whether the ``+chscale`` modifier is present (static per-channel scales before the codec).
        rows_k: ``+rows:k<K>``: K outlier token rows per message in bf16 (0 = no such modifier).
    """

    kind: str
    bits: int = 16
    exp_bits: int = 0
    man_bits: int = 0
    block: int = 0
    scale: str = "fp32"
    asym: bool = False
    tensor_scale: bool = False
    hadamard_block: int = 0
    outliers: bool = False
    outliers_k: int = 0
    chscale: bool = False
    rows_k: int = 0

    @property
    def base(self) -> CodecSpec:
        """This spec without modifiers (the element codec)."""
        return replace(self, hadamard_block=0, outliers=False, outliers_k=0, chscale=False, rows_k=0)

    @property
    def modifiers(self) -> tuple[str, ...]:
        """Names of the modifiers present, in the order their wrappers apply (a subset of ``MODIFIERS``)."""
        present = {
            "had": bool(self.hadamard_block),
            "outliers": self.outliers,
            "chscale": self.chscale,
            "rows": bool(self.rows_k),
        }
        return tuple(name for name in MODIFIERS if present[name])

    def __str__(self) -> str:
        return canonical(self)


NONE = CodecSpec(kind="none")


# ------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Example:
    """A spec the codec contract suite (``tests/codecs/test_all_codecs.py``) runs, and what it must meet.

    Attributes:
        spec: the spec string.
        rel_error: bound on the relative L2 error of a round trip of N(0,1) data (shape ``[64, 2, 96]``).
        bits: exact nominal bits per value (``Codec.nominal_bits_per_value``: a ``[2^20, 1024]`` message).
        outlier_channels: the static table for ``+outliers`` without ``:k`` (channels < 5: the suite's shapes
            have a last dimension >= 5).
    """

    spec: str
    rel_error: float
    bits: float
    outlier_channels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Family:
    """A codec family, registered by the module that implements it (:func:`register_family`).

    Attributes:
        kind: its ``CodecSpec.kind`` (unique; not ``none``).
        title: what to call its codecs in messages (``"integer"``: "option 'asym' applies to integer codecs").
        names: its tokens for help and errors (``"int2..int8"``).
        parse: ``(token, spec) -> CodecSpec | None``: the base spec, with the family's defaults, of a lower-case
            family token (the text before the first ``:``), None for a token of another family; raises
            :func:`spec_error` for a token of this family that is malformed (``int9``). ``spec`` is the whole
            spec, for the message.
        canonical: base spec -> its canonical text with every option spelled (``int4:g32:sfp16``); parsing it
            gives the spec back.
        factory: base spec (no modifiers) -> codec (a ``megatron_tpcomp.codecs.Codec``).
        options: the options of the fixed grammar it accepts, a subset of ``OPTION_KINDS``.
        examples: specs the contract suite runs (modifiers included where they matter for the family).
    """

    kind: str
    title: str
    names: str
    parse: Callable[[str, str], CodecSpec | None]
    canonical: Callable[[CodecSpec], str]
    factory: Callable[[CodecSpec], Any]
    options: frozenset[str] = frozenset({"block", "scale"})
    examples: tuple[Example, ...] = ()


@dataclass(frozen=True)
class Modifier:
    """The codec side of a modifier of the fixed grammar (:func:`register_modifier`).

    Attributes:
        name: one of ``MODIFIERS``.
        wrap: ``(inner, cs, *, hadamard_seed, outlier_channels, channel_scale_exponents) -> codec``: the codec
            of full spec ``cs`` around ``inner`` (the codec of the modifiers applied before it); takes the
            ``make_codec`` arguments it needs and ignores the others.
        examples: specs the contract suite runs for it.
    """

    name: str
    wrap: Callable[..., Any]
    examples: tuple[Example, ...] = ()


_FAMILIES: dict[str, Family] = {}
_MODIFIERS: dict[str, Modifier] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the grammar and to ``make_codec`` (called by the family's module at import)."""
    if family.kind == "none" or family.kind in _FAMILIES:
        raise ValueError(f"codec family kind {family.kind!r} is taken; expected a new kind")
    bad = set(family.options) - set(OPTION_KINDS)
    if bad:
        raise ValueError(f"family {family.kind!r} names unknown options {sorted(bad)}; expected some of {OPTION_KINDS}")
    _FAMILIES[family.kind] = family
    return family


def unregister_family(kind: str) -> None:
    """Remove the family of ``kind`` (for tests that register one of their own)."""
    if _FAMILIES.pop(kind, None) is None:
        raise ValueError(f"no codec family of kind {kind!r} is registered")


@contextmanager
def registered_family(family: Family) -> Iterator[Family]:
    """``with registered_family(f):`` the family is registered inside the block, and removed after it."""
    register_family(family)
    try:
        yield family
    finally:
        unregister_family(family.kind)


def families() -> tuple[Family, ...]:
    """The registered families, sorted by kind (so help texts do not depend on import order)."""
    return tuple(_FAMILIES[k] for k in sorted(_FAMILIES))


def family(kind: str) -> Family:
    """The registered family of ``kind``; CodecError naming the registered kinds if there is none."""
    try:
        return _FAMILIES[kind]
    except KeyError:
        raise CodecError(
            f"spec kind {kind!r} has no registered codec family; expected one of {', '.join(sorted(_FAMILIES))}"
        ) from None


def register_modifier(modifier: Modifier) -> Modifier:
    """Set the wrapper of a modifier of the fixed grammar (called by the wrapper's module at import)."""
    if modifier.name not in MODIFIERS or modifier.name in _MODIFIERS:
        raise ValueError(f"modifier {modifier.name!r} is unknown or taken; expected a new one of {MODIFIERS}")
    _MODIFIERS[modifier.name] = modifier
    return modifier


def modifier(name: str) -> Modifier:
    """The registered wrapper of modifier ``name``; CodecError if its module registered none."""
    try:
        return _MODIFIERS[name]
    except KeyError:
        raise CodecError(
            f"modifier {name!r} has no registered codec; expected one of {', '.join(_MODIFIERS)}"
        ) from None


def examples() -> tuple[Example, ...]:
    """Every registered example: the families' (sorted by kind), then the modifiers' (in ``MODIFIERS`` order)."""
    fam = [ex for f in families() for ex in f.examples]
    return (*fam, *(ex for name in MODIFIERS if name in _MODIFIERS for ex in _MODIFIERS[name].examples))


def valid_families() -> str:
    """The valid family tokens, for help and errors: ``none, fp8, fp8-e4m3, ..., int2..int8, ...``."""
    return ", ".join(["none", *(f.names for f in families())])


def valid_options() -> str:
    """The valid options, for help and errors."""
    asym = "/".join(f.kind for f in families() if "asym" in f.options) or "no family"
    return f"b<N>/g<N> (block size), asym ({asym} only), scale format " + "|".join("s" + f for f in SCALE_FORMATS)


def __getattr__(name: str) -> str:
    # VALID_FAMILIES / VALID_OPTIONS are computed from the registry when read, so they list every family.
    if name == "VALID_FAMILIES":
        return valid_families()
    if name == "VALID_OPTIONS":
        return valid_options()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------- parsing

#: Longest piece of a spec quoted in an error message (a 100k-character spec must not make a 200 KB message).
QUOTE_LIMIT = 80


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, or for a string longer than ``limit`` its first characters with "..." and the length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit - 20]!r}... ({len(text)} characters)"


def spec_error(spec: str, problem: str, expected: str) -> CodecError:
    """The CodecError for a bad ``spec``: one line naming the spec, the problem and what is expected."""
    return CodecError(f"invalid codec spec {quote(spec)}: {problem}; expected {expected}")


def small_int(digits: str) -> int:
    """``int(digits)`` for an ASCII digit string; longer than 9 digits gives 10**9 (out of every range), since
    ``int()`` refuses strings over 4300 digits with a ValueError that is not a CodecError."""
    return int(digits) if len(digits) <= 9 else 10**9


def _parse_family(text: str, spec: str) -> tuple[Family, CodecSpec]:
    if text == "none":
        raise spec_error(spec, "'none' takes no options or modifiers", "'none' alone")
    for fam in families():
        cs = fam.parse(text, spec)
        if cs is not None:
            return fam, cs
    raise spec_error(spec, f"unknown codec {quote(text)}", valid_families())


def _parse_size(value: str, what: str, spec: str) -> int:
    if not value.isdigit():
        raise spec_error(spec, f"{what} {quote(value)} is not a positive integer", f"{what} like 32")
    n = small_int(value)
    if not 1 <= n <= MAX_BLOCK:
        raise spec_error(spec, f"{what} {n} out of range", f"1 <= {what} <= {MAX_BLOCK}")
    return n


def _option_kind(opt: str) -> str | None:
    """``block`` | ``scale`` | ``asym`` for a well-formed option, None for an unknown one."""
    if opt and opt[0] in "bg" and opt[1:].isdigit() or opt in ("b", "g"):
        return "block"
    if opt == "asym":
        return "asym"
    if opt.startswith("s") and opt[1:] in SCALE_FORMATS:
        return "scale"
    return None


def _apply_option(cs: CodecSpec, fam: Family, opt: str, spec: str) -> CodecSpec:
    kind = _option_kind(opt)
    if kind is None:
        raise spec_error(spec, f"unknown option {quote(opt)}", valid_options())
    if kind not in fam.options:
        takers = [f for f in families() if kind in f.options]
        titles = ", ".join(f.title for f in takers) or "no"
        names = " or ".join(f.names for f in takers) or "a family that takes it"
        raise spec_error(spec, f"option {quote(opt)} applies to {titles} codecs only", f"{names} with {opt}")
    if kind == "block":
        return replace(cs, block=_parse_size(opt[1:], "block size", spec))
    if kind == "asym":
        return replace(cs, asym=True)
    return replace(cs, scale=opt[1:])


def _check_repeats(name: str, opts: list[str], spec: str) -> None:
    """Refuse a modifier option given twice (``+had:b32:b64``): a typo, never "the last one wins"."""
    seen: dict[str, str] = {}
    for opt in opts:
        key = opt[:1]  # every modifier option is one letter and a value (b32, k9)
        if key and key in seen:
            raise spec_error(
                spec,
                f"option {quote(key)} of modifier {quote(name)} given twice ({quote(seen[key])} and {quote(opt)})",
                "each option at most once",
            )
        seen[key] = opt


def _count_option(name: str, opts: list[str], spec: str, expected: str) -> int:
    """The K of a modifier's only option ``k<K>`` (1 <= K <= ``MAX_OUTLIERS``), 0 when it is not given."""
    k = 0
    for opt in opts:
        if opt.startswith("k") and opt[1:].isdigit() and 1 <= small_int(opt[1:]) <= MAX_OUTLIERS:
            k = small_int(opt[1:])
        else:
            raise spec_error(spec, f"unknown {name} option {quote(opt)}", expected)
    return k


def _apply_modifier(cs: CodecSpec, mod: str, spec: str) -> CodecSpec:
    name, *opts = mod.split(":")
    _check_repeats(name, opts, spec)
    if name == "had":
        if cs.hadamard_block:
            raise spec_error(spec, "modifier 'had' given twice", VALID_MODIFIERS)
        block = 32
        for opt in opts:
            if opt.startswith("b"):
                block = _parse_size(opt[1:], "Hadamard block", spec)
            else:
                raise spec_error(spec, f"unknown Hadamard option {quote(opt)}", "+had or +had:b<N>")
        if block & (block - 1) or block < 2:
            raise spec_error(spec, f"Hadamard block {block} is not a power of two >= 2", "2, 4, ..., 4096")
        return replace(cs, hadamard_block=block)
    if name == "outliers":
        if cs.outliers:
            raise spec_error(spec, "modifier 'outliers' given twice", VALID_MODIFIERS)
        k = _count_option(name, opts, spec, f"+outliers or +outliers:k<K> with 1 <= K <= {MAX_OUTLIERS}")
        return replace(cs, outliers=True, outliers_k=k)
    if name == "chscale":
        if cs.chscale:
            raise spec_error(spec, "modifier 'chscale' given twice", VALID_MODIFIERS)
        if opts:
            raise spec_error(spec, f"'chscale' takes no options, got {quote(':'.join(opts))}", "+chscale")
        return replace(cs, chscale=True)
    if name == "rows":
        if cs.rows_k:
            raise spec_error(spec, "modifier 'rows' given twice", VALID_MODIFIERS)
        k = _count_option(name, opts, spec, f"+rows:k<K> with 1 <= K <= {MAX_OUTLIERS}")
        if not k:
            raise spec_error(spec, "'rows' needs the number of rows", "+rows:k<K>, e.g. +rows:k4")
        return replace(cs, rows_k=k)
    raise spec_error(spec, f"unknown modifier {quote(name)}", VALID_MODIFIERS)


def _validate(cs: CodecSpec, spec: str) -> None:
    if cs.kind == "none":
        return
    if (cs.block * cs.bits) % 8:
        multiple = 8 // math.gcd(cs.bits, 8)
        raise spec_error(
            spec,
            f"block size {cs.block} times {cs.bits} bits is not a whole number of bytes",
            f"a block size that is a multiple of {multiple}",
        )
    if cs.asym and cs.scale in ("e8m0", "e4m3"):
        raise spec_error(
            spec, f"asymmetric integers need an fp16/bf16/fp32 offset, not s{cs.scale}", "sfp16, sbf16 or sfp32"
        )
    if cs.rows_k and cs.kind == "none":
        raise spec_error(spec, "outlier rows need a codec for the other rows", "for example int4:g32+had+rows:k4")
    if cs.hadamard_block and cs.kind == "none":
        raise spec_error(spec, "a Hadamard rotation needs a codec", "for example int4:g32+had")
    if cs.chscale and cs.outliers:
        raise spec_error(spec, "'chscale' and 'outliers' cannot be combined", "one of +chscale or +outliers")


def parse_spec(spec: str | CodecSpec) -> CodecSpec:
    """Parse and validate a codec spec string (see the module docstring for the grammar).

    Raises:
        CodecError: naming the bad part and listing what is valid.
    """
    if isinstance(spec, CodecSpec):
        return spec
    if not isinstance(spec, str):
        raise CodecError(f"codec spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text.isascii():  # before lower(): it maps e.g. the Kelvin sign to 'k'; \d also matches non-ASCII digits
        raise spec_error(spec, "non-ASCII character", "ASCII letters, digits, ':', '+' and '-'")
    text = text.lower()
    if not text:
        raise spec_error(spec, "empty spec", valid_families())
    if re.search(r"\s", text):
        raise spec_error(spec, "spec contains whitespace", "no spaces, e.g. int4:g32+had")
    if text == "none":
        return NONE
    head, *mods = text.split("+")
    token, *opts = head.split(":")
    fam, cs = _parse_family(token, spec)
    seen: dict[str, str] = {}
    for opt in opts:
        # One setting per kind: "int4:g32:g64" is a typo, not "g64" (same rule as doubled modifiers).
        kind = "block size" if opt[:1] in ("b", "g") else "scale format" if opt[:1] == "s" else opt
        if kind in seen:
            what = kind if len(kind) <= QUOTE_LIMIT else quote(kind)
            raise spec_error(
                spec, f"{what} given twice ({quote(seen[kind])} and {quote(opt)})", "each option at most once"
            )
        seen[kind] = opt
        cs = _apply_option(cs, fam, opt, spec)
    for mod in mods:
        if not mod:
            raise spec_error(spec, "empty modifier after '+'", VALID_MODIFIERS)
        cs = _apply_modifier(cs, mod, spec)
    _validate(cs, spec)
    return cs


def canonical(cs: CodecSpec) -> str:
    """Canonical spec string: all options explicit, so ``parse_spec(canonical(cs)) == cs``."""
    if cs.kind == "none":
        return "none"
    head = family(cs.kind).canonical(cs)
    if cs.hadamard_block:
        head += f"+had:b{cs.hadamard_block}"
    if cs.outliers:
        head += "+outliers" + (f":k{cs.outliers_k}" if cs.outliers_k else "")
    if cs.chscale:
        head += "+chscale"
    if cs.rows_k:
        head += f"+rows:k{cs.rows_k}"
    return head


def describe_grammar() -> str:
    """One paragraph for ``--help`` and error messages: the valid families, options and modifiers."""
    return (
        f"codec spec: 'none' or FAMILY[:OPTION...][+MODIFIER...]; families: {valid_families()}; "
        f"options: {valid_options()}; modifiers: {VALID_MODIFIERS}. "
        "Examples: fp8, fp8-e5m2:b128, int8:g32, int4:g32, mxfp4, nvfp4, fp5:b32, int4:g32+had, "
        "int4:g32+outliers:k9, int4:g64:se4m3+had+chscale (scales from calibration)."
    )
