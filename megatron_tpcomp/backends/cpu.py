"""The ``cpu`` backend: fused CPU codecs (``kernels/cpu_codecs.cpp``), one pass over memory per direction, bytes
equal to the reference.

On a CPU the codec's own speed decides whether compression pays: the torch reference codecs make
five to ten passes over memory per direction (blocks, amax, scale, round, clamp, pack, ...). This library does
each direction in one: encode reads a tile of the input, rotates it (``+had``) and quantizes it in L1 cache;
decode-sum reads the N payloads of an all-reduce tile by tile, adds the decoded values in fp32, rotates back
once and writes the output dtype.

Formats (everything else runs the torch reference):

- ``int<N>:g<G>`` for N in 4, 5, 6, 8 (symmetric), with fp16 scales or e4m3 ones (``:se4m3``); G even for int4,
  a multiple of 8 for int5/int6 (groups start on a byte);
- ``fp8-e4m3:b<B>`` with fp32 scales (the default ``fp8``);
- either one inside ``+had[:b<H>]``, and any of these inside ``+chscale`` (the per-channel powers of two are
  applied as the library loads the input and after it sums the payloads).

Which codecs these are is decided here (:func:`native_format`, from the codec's bits, group, scale format,
Hadamard block and signs, channel scales), not in the codecs. The wire layout stays defined in Python
(``IntCodec.layout``, ``Fp8Codec.layout``): this module passes the offsets of the scales and of the super-block
exponents (``exps``) to the library, and the tests check every byte against the reference codecs. The library
handles block sizes that divide 4096 (one super-block per tile).

Build: the first use compiles the library with ``g++ -O3 -march=native -ffp-contract=off -fopenmp`` (about 6 s)
into ``<cache>/native/`` (``$TPCOMP_CACHE`` or ``~/.cache/megatron-tpcomp``), keyed by a hash of the sources, the
flags and the compiler, under a file lock so that concurrent ranks build it once. ``-march=native`` is right
because the library is built on the machine that runs it (it falls back to the baseline ISA if the compiler
refuses). The source is the package's own copy (``megatron_tpcomp/_csrc/``, written into the wheel by setup.py)
or, in a source checkout, ``kernels/`` (:func:`source_dir`). No compiler, no source or a failed build: the
reference codecs run, :func:`available` says why and ``TPCOMP_BACKEND=auto`` logs one warning saying so.

Control: ``TPCOMP_BACKEND`` (``backends/dispatch.py``): ``auto`` (default) uses the library for CPU tensors when
it builds, ``cpu`` makes a library that cannot be used an error, ``reference`` never uses it. The payload bytes
do not depend on the setting; decoded values match the reference bit for bit too, so ranks with different
settings still agree.

Threads: ``torch.get_num_threads()`` OpenMP threads per call (one below 64K values).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.resources
import logging
import math
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from megatron_tpcomp.codecs.base import Codec, PayloadLayout, numel_of
from megatron_tpcomp.codecs.chscale import ChannelScaleCodec
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.codecs.hadamard import HadamardCodec, rotation_scale, rotation_signs
from megatron_tpcomp.codecs.intx import IntCodec
from megatron_tpcomp.paths import cache_dir

logger = logging.getLogger("megatron_tpcomp")

#: The repository's kernel sources (a source checkout or an editable install).
KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
#: The copy of kernels/ inside an installed package (setup.py's build_py writes it into the wheel).
PACKAGE_SOURCES = "_csrc"
SOURCES = ("cpu_codecs.cpp", "cpu_bitpack.h", "cpu_e4m3.h", "int4_core.h")
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-fast-math")
NATIVE_FLAGS = ("-march=native",)

FORMAT_INT = 0
FORMAT_FP8_E4M3 = 1
#: Integer widths the library packs (``kernels/cpu_bitpack.h``).
INT_BITS = (4, 5, 6, 8)
#: Integer group scale formats -> the library's code.
INT_SCALES = {"fp16": 0, "e4m3": 1}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def source_dir(package: str = "megatron_tpcomp", repo_dir: Path = KERNELS_DIR) -> Path:
    """The folder that holds ``cpu_codecs.cpp``: the package's own copy (``<package>/_csrc``, an installed wheel)
    first, then the repository's ``kernels/`` (editable install). Raises RuntimeError naming both places."""
    copy = importlib.resources.files(package) / PACKAGE_SOURCES
    # g++ needs real files: a package imported from a zip has no usable copy (it is named in the error below).
    if isinstance(copy, Path) and (copy / SOURCES[0]).is_file():
        return copy
    if (repo_dir / SOURCES[0]).is_file():
        return repo_dir
    raise RuntimeError(
        f"the kernel source {SOURCES[0]} is missing: looked in {copy} (installed package) and {repo_dir} "
        "(source checkout); expected a wheel or sdist built by this project's setup.py"
    )


def _build_key(cxx: str, flags: tuple[str, ...], src: Path) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((src / name).read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    h.update(" ".join((cxx, *flags, version, platform.machine())).encode())
    return h.hexdigest()[:16]


def _compile(cxx: str, flags: tuple[str, ...], out: Path, src: Path) -> str | None:
    """Compile into ``out`` atomically. Returns None, or the compiler's complaint."""
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, "-I", str(src), str(src / "cpu_codecs.cpp"), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-500:]
        os.replace(tmp, out)  # a reader never sees a half-written library
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(cache: Path | None = None) -> Path:
    """Compile the library if needed and return its path. Raises RuntimeError saying why it cannot be built."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ not on PATH and $CXX unset)")
    src = source_dir()
    if cache is None:
        cache = cache_dir()
    folder = cache / "native"
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (BASE_FLAGS + NATIVE_FLAGS, BASE_FLAGS):
        lib = folder / f"libtpcomp_cpu-{_build_key(cxx, flags, src)}.so"
        if lib.exists():
            return lib
        with open(folder / ".lock", "w") as lock:  # concurrent ranks: one compiles, the others wait and reuse
            fcntl.flock(lock, fcntl.LOCK_EX)
            if lib.exists():
                return lib
            logger.info("megatron-tpcomp: compiling the CPU codec library (%s)", " ".join(flags))
            error = _compile(cxx, flags, lib, src)
        if error is None:
            return lib
        errors.append(f"{' '.join(flags)}: {error}")
    raise RuntimeError(f"{cxx} failed to build {src / SOURCES[0]}: " + " | ".join(errors))


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as exc:
        return None, str(exc)
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    codec_args = [i32, i32, i32, i32, f32, f32, i64, i64, i32, ptr, f32, i32, ptr, ptr]
    lib.tpc_cpu_encode.argtypes = [*codec_args, ptr, i32, i64, ptr, i32]
    lib.tpc_cpu_decode_sum.argtypes = [*codec_args, ptr, i32, i64, i64, ptr, i32, i32]
    return lib, ""


def available() -> tuple[bool, str]:
    """``(True, "")`` when the library is built and loadable here, else ``(False, reason)``."""
    lib, reason = _load()
    return lib is not None, reason


@dataclass(frozen=True)
class NativeFormat:
    """What the library needs to know about a codec: the element format, the block, the rotation.

    Attributes:
        format: ``FORMAT_INT`` or ``FORMAT_FP8_E4M3``.
        block: values per scale.
        bits: integers: the code width (``INT_BITS``).
        scale_fmt: integers: the group scale format's code (``INT_SCALES``).
        scale_cap: fp8 only: the cap of the ideal scale (``Fp8Codec.scale_cap`` rounded to fp32).
        range_limit: the top-binade limit of the super-block exponents (``scales.range_limit``), 0 for the
            window rule of wide scale formats.
        rot_block: Hadamard block (0 = no rotation).
        signs: fp32 ``[rot_block]`` of +-1 (the rotation's random signs), or None.
        rot_scale: fp32 ``1 / sqrt(rot_block)`` exactly as the reference multiplies by it.
        ch_up: ``+chscale``: fp32 ``[h]`` contiguous CPU tensor of ``2^e_c`` (the codec's own, kept alive by it),
            or None.
        ch_down: ``+chscale``: fp32 ``[h]`` of ``2^-e_c``, or None.
    """

    format: int
    block: int
    bits: int = 0
    scale_fmt: int = 0
    scale_cap: float = 0.0
    range_limit: float = 0.0
    rot_block: int = 0
    signs: torch.Tensor | None = None
    rot_scale: float = 0.0
    ch_up: torch.Tensor | None = None
    ch_down: torch.Tensor | None = None

    def args(self, scales_offset: int, exps_offset: int) -> tuple:
        signs = self.signs.data_ptr() if self.signs is not None else None
        h = 0 if self.ch_up is None else self.ch_up.numel()
        up = None if self.ch_up is None else self.ch_up.data_ptr()
        down = None if self.ch_down is None else self.ch_down.data_ptr()
        return (
            self.format,
            self.bits,
            self.scale_fmt,
            self.block,
            self.scale_cap,
            self.range_limit,
            scales_offset,
            exps_offset,
            self.rot_block,
            signs,
            self.rot_scale,
            h,
            up,
            down,
        )

    def tile(self) -> int:
        """Values per tile of the library: one super-block (``lcm(block, 4096)``; the rotation block divides it)."""
        return math.lcm(self.block, self.rot_block or 1, 4096)


def _library() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"the CPU codec library is unavailable: {reason}")
    return lib


def encode_into(
    fmt: NativeFormat, x: torch.Tensor, payload: torch.Tensor, scales_offset: int, exps_offset: int
) -> None:
    """Write the codes, scales and exponents of ``x`` into ``payload`` (uint8, 1-D, contiguous; alignment padding
    zeroed by the caller).

    Args:
        x: CPU fp32/bf16/fp16 tensor, any shape (read row-major; non-contiguous input is copied first).
    """
    lib = _library()
    xc = x.contiguous()
    rc = lib.tpc_cpu_encode(
        *fmt.args(scales_offset, exps_offset),
        xc.data_ptr(),
        _DTYPES[xc.dtype],
        xc.numel(),
        payload.data_ptr(),
        _threads(),
    )
    if rc != 0:
        raise ValueError(f"CPU codec library refused the format {fmt} for dtype {xc.dtype}")


def _decode_sum(
    fmt: NativeFormat,
    payloads: torch.Tensor,
    count: int,
    nbytes: int,
    scales_offset: int,
    exps_offset: int,
    numel: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum in fp32, in order, of the decodes of ``count`` payloads (uint8 ``[count * nbytes]``, contiguous).

    Args:
        out: optional contiguous CPU ``dtype`` tensor of ``numel`` elements to write into (checked by the caller).

    Returns:
        ``dtype`` ``[numel]`` (fp32/bf16/fp16), rounded once from the fp32 sum (``out`` flattened, if given);
        each payload's values are clamped to ``dtype``'s finite range before the sum (``+had``: the sum).
    """
    lib = _library()
    out = torch.empty(numel, dtype=dtype) if out is None else out.view(-1)
    rc = lib.tpc_cpu_decode_sum(
        *fmt.args(scales_offset, exps_offset),
        payloads.data_ptr(),
        count,
        nbytes,
        numel,
        out.data_ptr(),
        _DTYPES[dtype],
        _threads(),
    )
    if rc != 0:
        raise ValueError(f"CPU codec library refused the format {fmt} for dtype {dtype}")
    return out


def _threads() -> int:
    return max(1, torch.get_num_threads())


# --- the backend interface (backends/dispatch.py) -------------------------------------------------------------


def _as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), as ``torch.tensor(value, dtype=float32)`` stores
    it, without creating a tensor on every codec call."""
    return struct.unpack("f", struct.pack("f", value))[0]


def native_format(codec: Codec) -> NativeFormat | None:
    """What the library needs to run ``codec``, or None when it does not implement it: ``int<N>:g<G>`` (N in
    ``INT_BITS``, symmetric, fp16 or e4m3 scales, G even for int4 and a multiple of 8 for int5/int6),
    ``fp8-e4m3:b<B>`` with fp32 scales, either one inside ``+had``, and any of these inside ``+chscale``; one
    super-block (``lcm(block, 4096)`` values, the rotation block included) must fit the library's 4096-value tile.
    Memoized on the codec (codecs do not change after construction; every call asks)."""
    return codec.memo("_cpu_backend_memo", "native_format", lambda: _native_format(codec))


def _native_format(codec: Codec) -> NativeFormat | None:
    if type(codec) is ChannelScaleCodec:
        inner = native_format(codec.inner)
        if inner is None:
            return None
        up, down = codec._factors(torch.device("cpu"))  # cached by the codec: the pointers stay valid
        return replace(inner, ch_up=up, ch_down=down)
    if type(codec) is HadamardCodec:
        inner = native_format(codec.inner)
        if inner is None or inner.rot_block:
            return None
        fmt = replace(
            inner,
            rot_block=codec.block,
            signs=rotation_signs(codec.block, codec.seed),
            rot_scale=rotation_scale(codec.block),
        )
    elif type(codec) is IntCodec:
        if codec.bits not in INT_BITS or codec.asym or codec.scale_fmt not in INT_SCALES:
            return None
        if codec.group * codec.bits % 8 or (codec.bits not in (4, 8) and codec.group % 8):
            return None
        fmt = NativeFormat(
            FORMAT_INT,
            codec.group,
            bits=codec.bits,
            scale_fmt=INT_SCALES[codec.scale_fmt],
            range_limit=codec.range_limit or 0.0,
        )
    elif type(codec) is Fp8Codec:
        if codec.fp8_dtype != torch.float8_e4m3fn or codec.scale_fmt != "fp32":
            return None
        cap = _as_float32(codec.scale_cap)  # what clamp(max=cap) compares with
        fmt = NativeFormat(FORMAT_FP8_E4M3, codec.block, scale_cap=cap, range_limit=codec.range_limit or 0.0)
    else:
        return None
    return fmt if fmt.tile() <= 4096 else None


def unsupported(codec: Codec, op: str) -> str | None:
    """None when the library implements ``op`` (``encode`` / ``decode``) for ``codec``, else why not."""
    if native_format(codec) is None:
        return (
            "not one of int4/5/6/8:g<G> (fp16 or e4m3 scales), fp8-e4m3 (fp32 scales), optionally +had and "
            "+chscale, within 4096 values"
        )
    return None


def unavailable(device_type: str) -> str | None:
    """None when the library can run on tensors of ``device_type`` here, else why not."""
    if device_type != "cpu":
        return f"the CPU codec library runs on CPU tensors only, not {device_type}"
    ok, reason = available()
    return None if ok else f"the CPU codec library is unavailable: {reason}"


def _layout(codec: Codec, shape: Sequence[int]) -> PayloadLayout:
    """The payload layout the library writes: the codec's, for ``+had`` the inner codec's for the padded size,
    for ``+chscale`` its inner codec's."""
    if type(codec) is ChannelScaleCodec:
        codec.payload_nbytes(shape)  # raises the CodecError naming a shape that is not whole rows of channels
        return _layout(codec.inner, shape)
    if type(codec) is HadamardCodec:
        return codec.inner.layout((-(-numel_of(shape) // codec.block) * codec.block,))
    return codec.layout(shape)


def encode(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """``codec.encode(x)`` by the library (``x``: a CPU fp32/bf16/fp16 tensor; ``native_format(codec)`` not None)."""
    layout = _layout(codec, x.shape)
    payload = layout.allocate_padding_zeroed(x.device)  # the library writes every code, scale and exponent byte
    if x.numel():
        encode_into(native_format(codec), x, payload, layout.sections["scales"].offset, layout.sections["exps"].offset)
    return payload


def decode_sum(
    codec: Codec,
    payloads: torch.Tensor,
    count: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``codec.decode_sum`` by the library (arguments checked by the dispatcher; ``out`` on the CPU)."""
    n = numel_of(shape)
    if n == 0:
        return out.view(tuple(shape)) if out is not None else torch.empty(tuple(shape), dtype=dtype)
    layout = _layout(codec, shape)
    scales, exps = layout.sections["scales"].offset, layout.sections["exps"].offset
    fmt = native_format(codec)
    return _decode_sum(fmt, payloads, count, layout.nbytes, scales, exps, n, dtype, out=out).view(tuple(shape))
