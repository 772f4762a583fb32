"""Codec spec strings: the grammar, parsing, validation and the factory that builds a codec from a spec.

Grammar (whitespace is not allowed; case-insensitive)::

    SPEC     := "none" | CODEC ("+" MODIFIER)*
    CODEC    := FAMILY (":" OPTION)*
    FAMILY   := "fp8" | "fp8-e4m3" | "fp8-e5m2"          FP8 with a per-block scale
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

Examples: ``fp8``, ``fp8-e5m2:b128``, ``int8:g32``, ``int4:g32:asym``, ``mxfp4``, ``nvfp4``, ``fp5:b32``,
``int4:g32+had``, ``int4:g32+outliers:k9``, ``int4:g64:se4m3+had+chscale``.

Defaults per family (also printed by ``--help`` through :func:`describe_grammar`):

==========  ======  ==========  =========================================
family      block   scale       notes
==========  ======  ==========  =========================================
fp8(-e4m3)  128     fp32        e5m2 variant: ``fp8-e5m2``
intN        32      fp16        N in 2..8; ``asym`` adds an fp16 minimum
mxfp4       32      e8m0        = ``fp4-e2m1:b32:se8m0``
nvfp4       16      e4m3        plus one fp32 per-tensor scale
fpN         32      e8m0        N in 3..6
==========  ======  ==========  =========================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from megatron_tpcomp.codecs.base import CodecError

SCALE_FORMATS = ("fp32", "fp16", "bf16", "e8m0", "e4m3")

# Minifloat element formats: bits -> allowed (exponent, mantissa) pairs; the first is the default.
MINIFLOAT_FORMATS: dict[int, tuple[tuple[int, int], ...]] = {
    3: ((1, 1),),
    4: ((2, 1), (1, 2), (3, 0)),
    5: ((2, 2), (3, 1), (1, 3)),
    6: ((2, 3), (3, 2)),
}

FAMILY_DEFAULTS = {
    "fp8": dict(block=128, scale="fp32"),
    "int": dict(block=32, scale="fp16"),
    "minifloat": dict(block=32, scale="e8m0"),
    "nvfp4": dict(block=16, scale="e4m3"),
}

VALID_FAMILIES = (
    "none, fp8, fp8-e4m3, fp8-e5m2, int2..int8, mxfp4, nvfp4, fp3, fp4, fp5, fp6 (optionally -eXmY, e.g. fp6-e3m2)"
)
VALID_OPTIONS = "b<N>/g<N> (block size), asym (int only), scale format " + "|".join("s" + f for f in SCALE_FORMATS)
VALID_MODIFIERS = (
    "+had[:b<N>] (Hadamard rotation), +outliers[:k<K>] (bf16 outlier channels), +chscale (static per-channel scales)"
)
MAX_BLOCK = 4096
#: Outlier channel indices travel as int16 (codecs/outliers.py), so K cannot exceed this.
MAX_OUTLIERS = 32767


@dataclass(frozen=True)
class CodecSpec:
    """A parsed, validated codec spec.

    Attributes:
        kind: ``none`` | ``fp8`` | ``int`` | ``minifloat``.
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

    @property
    def base(self) -> CodecSpec:
        """This spec without modifiers (the element codec)."""
        return replace(self, hadamard_block=0, outliers=False, outliers_k=0, chscale=False)

    def __str__(self) -> str:
        return canonical(self)


NONE = CodecSpec(kind="none")


#: Longest piece of a spec quoted in an error message (a 100k-character spec must not make a 200 KB message).
QUOTE_LIMIT = 80


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, or for a string longer than ``limit`` its first characters with "..." and the length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit - 20]!r}... ({len(text)} characters)"


def _err(spec: str, problem: str, expected: str) -> CodecError:
    return CodecError(f"invalid codec spec {quote(spec)}: {problem}; expected {expected}")


def _small_int(digits: str) -> int:
    """``int(digits)`` for an ASCII digit string; longer than 9 digits gives 10**9 (out of every range), since
    ``int()`` refuses strings over 4300 digits with a ValueError that is not a CodecError."""
    return int(digits) if len(digits) <= 9 else 10**9


def _parse_family(text: str, spec: str) -> CodecSpec:
    if text == "none":
        raise _err(spec, "'none' takes no options or modifiers", "'none' alone")
    if text in ("fp8", "fp8-e4m3"):
        return CodecSpec(kind="fp8", bits=8, exp_bits=4, man_bits=3, **FAMILY_DEFAULTS["fp8"])
    if text == "fp8-e5m2":
        return CodecSpec(kind="fp8", bits=8, exp_bits=5, man_bits=2, **FAMILY_DEFAULTS["fp8"])
    if text == "mxfp4":
        return CodecSpec(kind="minifloat", bits=4, exp_bits=2, man_bits=1, block=32, scale="e8m0")
    if text == "nvfp4":
        return CodecSpec(
            kind="minifloat", bits=4, exp_bits=2, man_bits=1, tensor_scale=True, **FAMILY_DEFAULTS["nvfp4"]
        )
    m = re.fullmatch(r"int(\d+)", text)
    if m:
        bits = _small_int(m.group(1))
        if not 2 <= bits <= 8:
            raise _err(spec, f"integer width {bits} out of range", "int2 .. int8")
        return CodecSpec(kind="int", bits=bits, **FAMILY_DEFAULTS["int"])
    m = re.fullmatch(r"fp(\d+)(?:-e(\d+)m(\d+))?", text)
    if m:
        bits = _small_int(m.group(1))
        if bits == 8:
            raise _err(spec, f"unknown fp8 variant {quote(text)}", "fp8, fp8-e4m3 or fp8-e5m2")
        if bits not in MINIFLOAT_FORMATS:
            raise _err(spec, f"minifloat width {bits} out of range", "fp3, fp4, fp5, fp6 or fp8")
        allowed = MINIFLOAT_FORMATS[bits]
        if m.group(2) is None:
            e, mm = allowed[0]
        else:
            e, mm = _small_int(m.group(2)), _small_int(m.group(3))
            if (e, mm) not in allowed:
                names = ", ".join(f"fp{bits}-e{a}m{b}" for a, b in allowed)
                raise _err(spec, f"fp{bits} has no element format e{e}m{mm}", names)
        return CodecSpec(kind="minifloat", bits=bits, exp_bits=e, man_bits=mm, **FAMILY_DEFAULTS["minifloat"])
    raise _err(spec, f"unknown codec {quote(text)}", VALID_FAMILIES)


def _parse_size(value: str, what: str, spec: str) -> int:
    if not value.isdigit():
        raise _err(spec, f"{what} {quote(value)} is not a positive integer", f"{what} like 32")
    n = _small_int(value)
    if not 1 <= n <= MAX_BLOCK:
        raise _err(spec, f"{what} {n} out of range", f"1 <= {what} <= {MAX_BLOCK}")
    return n


def _apply_option(cs: CodecSpec, opt: str, spec: str) -> CodecSpec:
    if opt and opt[0] in "bg" and opt[1:].isdigit() or opt in ("b", "g"):
        return replace(cs, block=_parse_size(opt[1:], "block size", spec))
    if opt == "asym":
        if cs.kind != "int":
            raise _err(spec, "option 'asym' applies to integer codecs only", "int2..int8 with asym")
        return replace(cs, asym=True)
    if opt.startswith("s") and opt[1:] in SCALE_FORMATS:
        return replace(cs, scale=opt[1:])
    raise _err(spec, f"unknown option {quote(opt)}", VALID_OPTIONS)


def _check_repeats(name: str, opts: list[str], spec: str) -> None:
    """Refuse a modifier option given twice (``+had:b32:b64``): a typo, never "the last one wins"."""
    seen: dict[str, str] = {}
    for opt in opts:
        key = opt[:1]  # every modifier option is one letter and a value (b32, k9)
        if key and key in seen:
            raise _err(
                spec,
                f"option {quote(key)} of modifier {quote(name)} given twice ({quote(seen[key])} and {quote(opt)})",
                "each option at most once",
            )
        seen[key] = opt


def _apply_modifier(cs: CodecSpec, mod: str, spec: str) -> CodecSpec:
    name, *opts = mod.split(":")
    _check_repeats(name, opts, spec)
    if name == "had":
        if cs.hadamard_block:
            raise _err(spec, "modifier 'had' given twice", VALID_MODIFIERS)
        block = 32
        for opt in opts:
            if opt.startswith("b"):
                block = _parse_size(opt[1:], "Hadamard block", spec)
            else:
                raise _err(spec, f"unknown Hadamard option {quote(opt)}", "+had or +had:b<N>")
        if block & (block - 1) or block < 2:
            raise _err(spec, f"Hadamard block {block} is not a power of two >= 2", "2, 4, ..., 4096")
        return replace(cs, hadamard_block=block)
    if name == "outliers":
        if cs.outliers:
            raise _err(spec, "modifier 'outliers' given twice", VALID_MODIFIERS)
        k = 0
        for opt in opts:
            if opt.startswith("k") and opt[1:].isdigit() and 1 <= _small_int(opt[1:]) <= MAX_OUTLIERS:
                k = _small_int(opt[1:])
            else:
                raise _err(
                    spec,
                    f"unknown outliers option {quote(opt)}",
                    f"+outliers or +outliers:k<K> with 1 <= K <= {MAX_OUTLIERS}",
                )
        return replace(cs, outliers=True, outliers_k=k)
    if name == "chscale":
        if cs.chscale:
            raise _err(spec, "modifier 'chscale' given twice", VALID_MODIFIERS)
        if opts:
            raise _err(spec, f"'chscale' takes no options, got {quote(':'.join(opts))}", "+chscale")
        return replace(cs, chscale=True)
    raise _err(spec, f"unknown modifier {quote(name)}", VALID_MODIFIERS)


def _validate(cs: CodecSpec, spec: str) -> None:
    if cs.kind == "none":
        return
    if (cs.block * cs.bits) % 8:
        multiple = 8 // math.gcd(cs.bits, 8)
        raise _err(
            spec,
            f"block size {cs.block} times {cs.bits} bits is not a whole number of bytes",
            f"a block size that is a multiple of {multiple}",
        )
    if cs.kind == "int" and cs.scale in ("e8m0", "e4m3") and cs.asym:
        raise _err(spec, f"asymmetric integers need an fp16/bf16/fp32 offset, not s{cs.scale}", "sfp16, sbf16 or sfp32")
    if cs.hadamard_block and cs.kind == "none":
        raise _err(spec, "a Hadamard rotation needs a codec", "for example int4:g32+had")
    if cs.chscale and cs.outliers:
        raise _err(spec, "'chscale' and 'outliers' cannot be combined", "one of +chscale or +outliers")


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
        raise _err(spec, "non-ASCII character", "ASCII letters, digits, ':', '+' and '-'")
    text = text.lower()
    if not text:
        raise _err(spec, "empty spec", VALID_FAMILIES)
    if re.search(r"\s", text):
        raise _err(spec, "spec contains whitespace", "no spaces, e.g. int4:g32+had")
    if text == "none":
        return NONE
    head, *mods = text.split("+")
    family, *opts = head.split(":")
    cs = _parse_family(family, spec)
    seen: dict[str, str] = {}
    for opt in opts:
        # One setting per kind: "int4:g32:g64" is a typo, not "g64" (same rule as doubled modifiers).
        kind = "block size" if opt[:1] in ("b", "g") else "scale format" if opt[:1] == "s" else opt
        if kind in seen:
            what = kind if len(kind) <= QUOTE_LIMIT else quote(kind)
            raise _err(spec, f"{what} given twice ({quote(seen[kind])} and {quote(opt)})", "each option at most once")
        seen[kind] = opt
        cs = _apply_option(cs, opt, spec)
    for mod in mods:
        if not mod:
            raise _err(spec, "empty modifier after '+'", VALID_MODIFIERS)
        cs = _apply_modifier(cs, mod, spec)
    _validate(cs, spec)
    return cs


def canonical(cs: CodecSpec) -> str:
    """Canonical spec string: all options explicit, so ``parse_spec(canonical(cs)) == cs``."""
    if cs.kind == "none":
        return "none"
    if cs.kind == "fp8":
        head = f"fp8-e{cs.exp_bits}m{cs.man_bits}:b{cs.block}:s{cs.scale}"
    elif cs.kind == "int":
        head = f"int{cs.bits}:g{cs.block}" + (":asym" if cs.asym else "") + f":s{cs.scale}"
    elif cs.tensor_scale:  # nvfp4 is the only preset with a tensor scale
        head = f"nvfp4:b{cs.block}:s{cs.scale}"
    else:
        head = f"fp{cs.bits}-e{cs.exp_bits}m{cs.man_bits}:b{cs.block}:s{cs.scale}"
    if cs.hadamard_block:
        head += f"+had:b{cs.hadamard_block}"
    if cs.outliers:
        head += "+outliers" + (f":k{cs.outliers_k}" if cs.outliers_k else "")
    if cs.chscale:
        head += "+chscale"
    return head


def describe_grammar() -> str:
    """One paragraph for ``--help`` and error messages: the valid families, options and modifiers."""
    return (
        f"codec spec: 'none' or FAMILY[:OPTION...][+MODIFIER...]; families: {VALID_FAMILIES}; "
        f"options: {VALID_OPTIONS}; modifiers: {VALID_MODIFIERS}. "
        "Examples: fp8, fp8-e5m2:b128, int8:g32, int4:g32, mxfp4, nvfp4, fp5:b32, int4:g32+had, "
        "int4:g32+outliers:k9, int4:g64:se4m3+had+chscale (scales from calibration)."
    )
