"""The codec interface and the helpers every block codec shares.

A codec turns a bf16/fp16/fp32 tensor into ONE contiguous ``uint8`` payload (data, scales and anything else,
so one collective moves it) and back. Payload sizes depend only on the tensor's shape, so every rank can
allocate receive buffers without a size exchange.

Payload layout conventions shared by all codecs (each codec module documents its own sections):

- A payload is a sequence of *sections* (for example "codes" then "scales"), each starting at a byte offset
  that is a multiple of ``SECTION_ALIGN`` (16) so that it can be viewed as a typed tensor and loaded with
  vector instructions. Padding bytes between sections are zero. The one exception is the small ``exps``
  section of block codecs (one int16 per 4096 values), which follows the scales at 2-byte alignment so that
  short messages do not grow by 16 bytes. The payload size is a multiple of 16.
- Multi-byte values are little-endian (the byte order of every platform torch supports).
- Block codecs group the *flattened, row-major* input into consecutive blocks of ``block`` values; the last
  block is zero-padded. Decoding drops the padding exactly.

Non-finite input: a block containing NaN or +-Inf decodes entirely to NaN (its scale is stored as NaN). The
damage is visible, never a silent finite value. ``check_finite=True`` on the collectives raises instead.

Range (every block codec, see ``scales.py`` "Second level"): the input is normalized by a power of two per
super-block of 4096 values before its block scales are formed, so no finite input value clips at a scale
format's maximum or flushes because of its minimum; only blocks far below their super-block's largest (2^40
for fp16 scales, 2^17.8 for e4m3) may flush, with an error below the largest block's own quantization step.
Finite in, finite out: decoded values are clamped to the finite range of the output dtype (a finite fp16 65504
whose int4 scale rounds up would otherwise decode to 65520 = Inf). ``decode_sum`` clamps each payload's decoded
values before adding them, so a sum of ranks that truly overflows still overflows as the stock all-reduce
would; ``+had`` adds the rotated payloads and rotates back once (``+chscale`` scales the inner sum per channel),
so there the clamp applies to the sum.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_tpcomp.errors import CodecError
from megatron_tpcomp.spec import NONE, CodecSpec

SECTION_ALIGN = 16
#: :attr:`Codec.chunk_alignment` of a codec that does not say (one not built from a spec): whole 256-value pieces.
CHUNK_ALIGN = 256

#: Input dtypes every codec accepts.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Environment variable: ``1`` makes decoders raise CodecError on payload contents that only a host read-back can
#: judge (a dynamic ``+outliers`` index table that is out of range or not ascending). Unset or ``0`` (default):
#: such a payload decodes to NaN, decided on the device, so the decode never waits for the GPU (CUDA graphs).
#: Sizes, dtypes and shapes are checked either way (they are known on the host).
CHECK_PAYLOADS_ENV = "TPCOMP_CHECK_PAYLOADS"


def check_payloads() -> bool:
    """Whether ``TPCOMP_CHECK_PAYLOADS`` asks decoders to validate payload contents on the host (a sync per
    decode; see :data:`CHECK_PAYLOADS_ENV`). Raises CodecError for a value other than ``0`` or ``1``."""
    value = os.environ.get(CHECK_PAYLOADS_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise CodecError(f"{CHECK_PAYLOADS_ENV}={value!r} is not valid; expected 0 (default) or 1")
    return value == "1"


def align_up(n: int, alignment: int = SECTION_ALIGN) -> int:
    """Smallest multiple of ``alignment`` that is >= ``n``."""
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Section:
    """One typed region of a payload: ``count`` elements of ``dtype`` starting at ``offset`` bytes."""

    name: str
    dtype: torch.dtype
    count: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.count * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class PayloadLayout:
    """Offsets of the sections of one payload, each aligned to ``SECTION_ALIGN`` bytes.

    Args:
        sections: ``(name, dtype, count)`` triples in wire order, or ``(name, dtype, count, alignment)`` for a
            section aligned to fewer than ``SECTION_ALIGN`` bytes (a multiple of the dtype's size).
    """

    def __init__(self, sections: Sequence[tuple[str, torch.dtype, int] | tuple[str, torch.dtype, int, int]]):
        offset = 0
        self.sections: dict[str, Section] = {}
        for name, dtype, count, *align in sections:
            offset = align_up(offset, align[0] if align else SECTION_ALIGN)
            sec = Section(name, dtype, int(count), offset)
            self.sections[name] = sec
            offset += sec.nbytes
        self.nbytes = align_up(offset) if offset else 0
        # The alignment padding (start, end) byte ranges, non-empty ones only: allocate_padding_zeroed zeroes them.
        gaps, end = [], 0
        for sec in sorted(self.sections.values(), key=lambda s: s.offset):
            gaps.append((end, sec.offset))
            end = sec.offset + sec.nbytes
        gaps.append((end, self.nbytes))
        self._gaps = tuple((a, b) for a, b in gaps if b > a)

    def view(self, payload: torch.Tensor, name: str) -> torch.Tensor:
        """Typed 1-D view of section ``name`` inside ``payload`` (uint8, 1-D, contiguous)."""
        sec = self.sections[name]
        return payload[sec.offset : sec.offset + sec.nbytes].view(sec.dtype)

    def allocate(self, device: torch.device | str) -> torch.Tensor:
        """A zeroed uint8 payload of ``nbytes`` (zero so that padding bytes are deterministic)."""
        return torch.zeros(self.nbytes, dtype=torch.uint8, device=device)

    def allocate_padding_zeroed(self, device: torch.device | str) -> torch.Tensor:
        """A uint8 payload of ``nbytes`` whose alignment padding is zero and whose sections are NOT initialised:
        for writers that fill every section byte (saves a pass over the payload)."""
        payload = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        for a, b in self._gaps:
            payload[a:b].zero_()
        return payload


def check_input(x: torch.Tensor, what: str = "input") -> None:
    """Raise CodecError unless ``x`` is a floating tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise CodecError(f"{what} has dtype {str(x.dtype).replace('torch.', '')}; expected one of {names}")


def check_payload(payload: torch.Tensor, expected_nbytes: int, codec: str) -> None:
    """Raise CodecError unless ``payload`` is a 1-D contiguous uint8 tensor of ``expected_nbytes`` bytes."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        got = payload.dtype if isinstance(payload, torch.Tensor) else type(payload).__name__
        raise CodecError(f"{codec}: payload must be a uint8 tensor, got {got}")
    if payload.dim() != 1 or payload.numel() != expected_nbytes:
        raise CodecError(
            f"{codec}: payload has shape {tuple(payload.shape)}; expected 1-D with {expected_nbytes} bytes "
            "(payload of another codec or another tensor shape?)"
        )
    if not payload.is_contiguous():
        raise CodecError(f"{codec}: payload must be contiguous")


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten ``x`` (row-major), convert to fp32, zero-pad to a multiple of ``block``.

    Returns:
        fp32 tensor of shape ``[ceil(numel / block), block]``.
    """
    flat = x.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block)


def from_blocks(blocks: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drop the padding, reshape to ``shape``, cast to ``dtype``."""
    n = numel_of(shape)
    return blocks.reshape(-1)[:n].reshape(tuple(shape)).to(dtype)


def finite_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`to_blocks` with non-finite blocks zeroed, and the mask of those blocks.

    Returns:
        (fp32 ``[nblocks, block]`` with every block holding NaN/Inf set to 0, bool ``[nblocks]`` marking them):
        codecs encode the zeroed blocks and store a NaN scale for the marked ones (the module's NaN rule).
    """
    blocks = to_blocks(x, block)
    bad = nonfinite_blocks(blocks)
    return torch.where(bad.unsqueeze(1), torch.zeros_like(blocks), blocks), bad


def divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor``, correctly rounded on every device.

    CUDA computes ``tensor / python_scalar`` as ``tensor * (1 / scalar)``, which can differ in the last bit from
    true division (measured: 101 of 2M int4 group scales one fp16 step off); dividing by a tensor is exact on
    CPU and GPU alike, and it is what the CUDA kernels do, so payloads do not depend on the device.
    """
    return t / torch.full_like(t, divisor)


def clamp_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (fp32) clamped to the finite range of ``dtype`` (NaN stays NaN): a decoded value that rounding
    pushed past the largest finite value of the output dtype (a finite fp16 65504 decoding to 65520) stays
    finite instead of becoming Inf."""
    top = torch.finfo(dtype).max
    return t.clamp(-top, top)


def to_bf16_saturating(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 (bf16 input returned as is): finite values beyond bf16's largest finite value are
    clamped to it instead of rounding to Inf; Inf and NaN stay."""
    if t.dtype == torch.bfloat16:
        return t
    top = torch.finfo(torch.bfloat16).max
    f = t.float()
    return torch.where(torch.isinf(f), f, f.clamp(-top, top)).to(torch.bfloat16)


#: Entries a codec memoizes per table (:meth:`Codec.memo`; cleared when full).
MEMO_SIZE = 64
_MISSING = object()


def nonfinite_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Bool ``[nblocks]``: True where a block holds NaN or +-Inf (such blocks decode to NaN)."""
    return ~torch.isfinite(blocks).all(dim=1)


class Codec(ABC):
    """Encode a floating tensor to one uint8 payload and decode it back.

    Subclasses document their wire layout at the top of their module. ``spec`` is the canonical spec string
    (``parse_spec(codec.spec)`` rebuilds an equal codec) and ``cs`` the parsed spec it came from
    (``canonical(codec.cs) == codec.spec``; None for a codec not built from a spec, such as a test's stand-in).

    The public :meth:`encode`, :meth:`decode` and :meth:`decode_sum` go through the installed kernel dispatcher
    (:func:`install_dispatcher`; ``megatron_tpcomp.backends`` installs it when the package is imported), which
    runs a fused kernel where one implements the codec's format or the codec's own torch reference
    (:meth:`_encode`, :meth:`_decode`, :meth:`_decode_sum`) otherwise. A codec written outside this package may
    override the public methods instead: then no kernel runs it, and its inner codecs still get theirs.
    """

    spec: str = "?"
    cs: CodecSpec | None = None
    #: True when the codec uses the last dimension as channels (outlier channels): such payloads are
    #: per-row structured and a collective must split the tensor along rows, never inside a row.
    row_structured: bool = False
    #: True when every block of values is encoded on its own (no per-tensor state such as NVFP4's global scale):
    #: then any split of a message on block boundaries encodes to the same blocks, and a collective may cut a
    #: message into pieces (the pipelined one-shot all-reduce) without changing a bit.
    block_local: bool = False
    #: A block-local codec's pieces must start on multiples of this many values to encode as in the whole
    #: message (its super-block, see ``scales.py``); collectives cut on multiples of it (``chunk_alignment``).
    chunk_values: int = 1

    @property
    def chunk_alignment(self) -> int:
        """Values per chunk boundary when a collective cuts a message (two-shot, pipelined one-shot): chunks split
        on whole blocks (and rotation blocks, and rows of per-channel codecs), so the codec pads nothing inside a
        chunk and every value keeps its channel. This default is for codecs that do not say."""
        return CHUNK_ALIGN

    @abstractmethod
    def payload_nbytes(self, shape: Sequence[int]) -> int:
        """Exact payload size in bytes for an input of ``shape`` (depends on shape only)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` (fp32/bf16/fp16, any shape, any strides).

        Returns:
            uint8 tensor, 1-D, contiguous, ``payload_nbytes(x.shape)`` bytes, on ``x.device``.
        """
        return _dispatcher.encode(self, x)

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Decode a payload produced by :meth:`encode` for a tensor of ``shape``.

        Returns:
            contiguous tensor of ``shape`` and ``dtype`` on ``payload.device``.
        """
        return _dispatcher.decode(self, payload, shape, dtype)

    def decode_sum(
        self,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of the decodes of ``count`` payloads (the all-reduce's reduction), added in fp32 in order 0..count-1.

        Args:
            payloads: uint8 ``[count * payload_nbytes(shape)]``, contiguous: payload r at ``r * nbytes``.
            count: number of payloads (>= 1).
            shape: shape of each decoded tensor and of the result.
            dtype: result dtype; the fp32 sum is rounded to it once.
            out: optional contiguous ``dtype`` tensor with ``prod(shape)`` elements to write the result into
                (returned, viewed as ``shape``).

        Returns:
            contiguous ``dtype`` tensor of ``shape`` on ``payloads.device``; ``decode_sum(p, 1, ...) ==
            decode(p, ...)``. Every caller on every rank gets the same bits for the same payloads. Each payload's
            decoded values are clamped to the finite range of ``dtype`` before the sum (module docstring).
        """
        return _dispatcher.decode_sum(self, payloads, count, shape, dtype, out)

    # --- the torch reference: defines the wire format, runs on every device ------------------------------------

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The reference :meth:`encode` (same contract); a codec that overrides the public method instead has that."""
        if type(self).encode is not Codec.encode:
            return self.encode(x)
        raise NotImplementedError(f"{type(self).__name__} implements neither _encode (the reference) nor encode")

    def _decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The reference :meth:`decode` (same contract); a codec that overrides the public method instead has that."""
        if type(self).decode is not Codec.decode:
            return self.decode(payload, shape, dtype)
        raise NotImplementedError(f"{type(self).__name__} implements neither _decode (the reference) nor decode")

    def _decode_sum(
        self,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reference :meth:`decode_sum` (same contract): the reference decodes, clamped and added in order."""
        nbytes = self.payload_nbytes(shape)
        check_payload(payloads, count * nbytes, self.spec)
        acc = clamp_to(self._decode(payloads[:nbytes], shape, torch.float32), dtype)
        for r in range(1, count):
            acc += clamp_to(self._decode(payloads[r * nbytes : (r + 1) * nbytes], shape, torch.float32), dtype)
        return _into(acc.to(dtype), out, shape)

    def memo(self, table: str, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` computed once per ``key`` and kept on this codec (codecs do not change after construction),
        for what every call asks and costs microseconds of Python to rebuild (payload layouts, a backend's
        format). The table is a dict attribute: a cache, which the rank-agreement digest skips."""
        cache = self.__dict__.setdefault(table, {})
        value = cache.get(key, _MISSING)
        if value is _MISSING:
            value = build()
            if len(cache) >= MEMO_SIZE:
                cache.clear()
            cache[key] = value
        return value

    def bits_per_value(self, shape: Sequence[int]) -> float:
        """Exact bits on the wire per input value for ``shape``: data, scales, outliers and padding."""
        n = numel_of(shape)
        if n == 0:
            return 0.0
        return 8.0 * self.payload_nbytes(shape) / n

    def nominal_bits_per_value(self) -> float:
        """Bits per value for a large, block-aligned tensor (the figure quoted in tables)."""
        return self.bits_per_value((1 << 20, 1024))

    def max_abs_error_bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """Optional elementwise bound on |decode(encode(x)) - x| (same shape as x, fp32), for tests."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec))


class Dispatcher(Protocol):
    """Runs a codec's public calls: a fused kernel or the codec's reference (``megatron_tpcomp.backends``)."""

    def encode(self, codec: Codec, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codec: Codec, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...

    def decode_sum(
        self,
        codec: Codec,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None,
    ) -> torch.Tensor: ...


class ReferenceDispatcher:
    """Every call runs the codec's torch reference: the dispatcher until ``megatron_tpcomp.backends`` installs its
    own (the codecs import nothing above them, so they cannot reach the kernels themselves)."""

    def encode(self, codec: Codec, x: torch.Tensor) -> torch.Tensor:
        return codec._encode(x)

    def decode(self, codec: Codec, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return codec._decode(payload, shape, dtype)

    def decode_sum(
        self,
        codec: Codec,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        return codec._decode_sum(payloads, count, shape, dtype, out)


_dispatcher: Dispatcher = ReferenceDispatcher()


def install_dispatcher(dispatcher: Dispatcher | None) -> Dispatcher:
    """Route every codec call through ``dispatcher`` (None: the reference again); returns the one it replaces."""
    global _dispatcher
    previous = _dispatcher
    _dispatcher = dispatcher if dispatcher is not None else ReferenceDispatcher()
    return previous


def _into(result: torch.Tensor, out: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """``result`` viewed as ``shape``, or copied into ``out`` (checked) and ``out`` returned so viewed."""
    if out is None:
        return result.view(tuple(shape))
    check_out(out, result.dtype, numel_of(shape))
    out.view(-1).copy_(result.reshape(-1))
    return out.view(tuple(shape))


def check_out(out: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    """Raise CodecError unless ``out`` is a contiguous ``dtype`` tensor of ``numel`` elements."""
    if out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
        raise CodecError(
            f"out must be a contiguous {dtype} tensor of {numel} elements; got {out.dtype} "
            f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )


class IdentityCodec(Codec):
    """``none``: the raw tensor bytes in the input dtype (used for fallbacks and as the baseline).

    Wire layout: ``numel`` values of the *decode* dtype is not known at encode time, so the payload holds the
    input dtype's bytes; callers that use it must agree on the dtype (the collectives pass it explicitly).
    """

    spec = "none"
    cs = NONE

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype

    @property
    def chunk_alignment(self) -> int:
        """Raw values: any cut is whole values."""
        return 1

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return numel_of(shape) * _itemsize(self.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        return x.to(self.dtype).contiguous().reshape(-1).view(torch.uint8)

    def _decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        check_payload(payload, self.payload_nbytes(shape), self.spec)
        return payload.view(self.dtype).reshape(tuple(shape)).to(dtype)
