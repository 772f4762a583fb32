"""Rank agreement for the compressed collectives: every rank must encode, send and decode the same way.

A compressed collective is only bit-identical across ranks (and only terminates) if every rank uses the same
operation, shape, dtype, codec (spec string AND every parameter outside it: Hadamard seeds, calibrated outlier
and channel-scale tables, anything a future codec adds), algorithm, chunk plan and min_bytes decision. Nothing on
the wire says which codec made a payload, so a mismatch either diverges silently (equal payload sizes) or hangs
(different collectives) until the process-group timeout.

:func:`exchange` makes that an error instead: each rank packs a fixed-size record (``RECORD_BYTES`` uint8: its
count of non-finite input values, one 8-byte digest per :data:`COMPONENTS` entry and a short text describing its
call) and ONE all-gather of that fixed-size tensor runs before any payload moves. Every rank then holds every
rank's record, takes the same decision from the same data, and all raise ``CollectiveError`` together, naming each
rank's op, shape, codec and path. Fixed size matters: records never mismatch, so a mismatch cannot hang the check
(a peer that never calls still meets the process-group timeout).

The codec digest (:func:`codec_fingerprint`) is computed generically from the codec object: its class and every
attribute, recursively through inner codecs, dataclasses and sequences; tensors are hashed by dtype, shape and
bytes. A new codec is covered without code here. Attributes holding dicts or sets are skipped, name and value
(so a cache created on first use changes nothing): in this code base those are caches filled on use (per-device
constants, index tables derived from the parameters, memoized layouts), which differ with a rank's history but
never change the bits; a codec must keep its parameters in scalars, tensors, sequences, dataclasses or codec
objects.

``check_ranks="first"`` (the collectives' default) runs the exchange at the first call of each distinct local
fingerprint per process group (cached; later calls cost a tuple and a set lookup). That catches ranks set up
differently from the start, the common case. It cannot catch a rank that changes its setup mid-run while the
others repeat a call they already checked: only that rank sees a new fingerprint and exchanges alone, and the
collectives mismatch as without a check. ``check_ranks=True`` exchanges on every call (use it where setups may
change mid-run); ``False`` never.

Host synchronisation: an exchange reads the gathered records back to the host (on a GPU it waits for the
device), so it must not run inside a captured CUDA graph. With ``"first"`` it runs at the warm-up call of each
fingerprint only; later calls cost the tuple and the set lookup and touch no tensor. ``True`` (and the
collectives' ``check_finite``) syncs on every call.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
import weakref
from typing import Any

import torch
import torch.distributed as dist

#: Bytes of one rank's record: 8 (non-finite count) + 8 per component + the description text.
RECORD_BYTES = 256

#: What the per-component digests cover, in record order, with the words used in error messages.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("op", "the operation (op, dim)"),
    ("shape", "the shape or dtype"),
    ("spec", "the codec spec"),
    ("params", "the codec parameters outside the spec string (seeds, calibrated tables)"),
    ("path", "the algorithm, chunking or min_bytes decision"),
)
_HEADER = 8 + 8 * len(COMPONENTS)
_TEXT_BYTES = RECORD_BYTES - _HEADER
_MAX_DEPTH = 12  # nesting of codec objects is 3-4 deep; deeper means a cycle-like structure: stop

_exchanges = 0  # number of exchanges this process ran (tests read it through exchange_count())


def exchange_count() -> int:
    """How many agreement exchanges this process has run (for tests and the overhead benchmark)."""
    return _exchanges


# ---------------------------------------------------------------------------------------- codec fingerprint


def _feed(h: Any, obj: Any, depth: int, active: set[int]) -> None:
    """Write a canonical, process-independent byte encoding of ``obj`` into hash ``h`` (no ``hash()``: Python
    randomizes it per process)."""
    if depth > _MAX_DEPTH:
        h.update(b"<deep>")
        return
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, float):
        h.update(f"float:{obj.hex()};".encode())  # exact and canonical
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}:{obj};".encode())
    elif isinstance(obj, enum.Enum):
        h.update(f"enum:{type(obj).__qualname__}.{obj.name};".encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"tensor:{t.dtype}:{tuple(obj.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}]:".encode())
        for item in obj:
            _feed(h, item, depth + 1, active)
    elif isinstance(obj, (dict, set, frozenset)):
        h.update(b"<cache>;")  # caches by this code base's convention (see the module docstring)
    elif callable(obj) and not hasattr(obj, "__dict__"):
        h.update(f"callable:{getattr(obj, '__qualname__', type(obj).__qualname__)};".encode())
    else:
        if id(obj) in active:  # a reference back up the tree: its content is being written already
            h.update(b"<cycle>;")
            return
        active.add(id(obj))
        try:
            cls = type(obj)
            h.update(f"object:{cls.__module__}.{cls.__qualname__}{{".encode())
            if hasattr(obj, "tobytes") and hasattr(obj, "dtype") and hasattr(obj, "shape"):  # numpy arrays
                h.update(f"{obj.dtype}:{tuple(obj.shape)}:".encode() + obj.tobytes())
            elif dataclasses.is_dataclass(obj):
                for f in dataclasses.fields(obj):
                    h.update(f"{f.name}=".encode())
                    _feed(h, getattr(obj, f.name), depth + 1, active)
            else:
                for name in sorted(getattr(obj, "__dict__", {})):
                    value = obj.__dict__[name]
                    if isinstance(value, (dict, set, frozenset)):
                        continue  # a cache, name and all: one filled lazily on first use changes nothing
                    h.update(f"{name}=".encode())
                    _feed(h, value, depth + 1, active)
            h.update(b"};")
        finally:
            active.discard(id(obj))


def codec_fingerprint(codec: Any) -> bytes:
    """sha256 (32 bytes) of everything in ``codec`` that can change the bits: its class, its spec and every
    parameter outside the spec string (seeds, tables, inner codecs), computed from its attributes."""
    h = hashlib.sha256()
    _feed(h, codec, 0, set())
    return h.digest()


_codec_cache: dict[int, bytes] = {}  # id(codec) -> fingerprint, dropped when the codec object dies


def cached_codec_fingerprint(codec: Any) -> bytes:
    """:func:`codec_fingerprint`, computed once per codec object (codecs are not changed after construction).

    Keyed by ``id`` with a finalizer that drops the entry when the object dies, so a new object that reuses the
    id never inherits a stale fingerprint; objects that take no weak reference are fingerprinted every call.
    """
    key = id(codec)
    digest = _codec_cache.get(key)
    if digest is None:
        digest = codec_fingerprint(codec)
        try:
            weakref.finalize(codec, _codec_cache.pop, key, None)
        except TypeError:
            return digest
        _codec_cache[key] = digest
    return digest


# ------------------------------------------------------------------------------------------ the exchange


@dataclasses.dataclass(frozen=True)
class CallFingerprint:
    """What one rank's collective call will do, as far as the bits and the communication pattern go.

    Attributes:
        op: ``all_reduce`` | ``all_gather`` | ``reduce_scatter``.
        option: op-specific argument that changes the result (``dim=0``; the all-reduce's requested algorithm).
        shape, dtype: of this rank's input.
        spec: the codec's canonical spec string.
        codec: :func:`codec_fingerprint` of the codec (32 bytes).
        path: digest text of the path taken: ``one-shot``, ``one-shot pipelined in 4 chunks of 1024 values``,
            ``two-shot in chunks of (256,)``, ``all-gather``, ``all-to-all`` or ``stock (small)``.
        path_detail: the path for people (a fallback's full reason); not compared.
    """

    op: str
    option: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    spec: str
    codec: bytes
    path: str
    path_detail: str

    @property
    def key(self) -> tuple:
        """The compared content as a plain tuple (what ``check_ranks="first"`` caches)."""
        return (self.op, self.option, self.shape, self.dtype, self.codec, self.path)

    def digests(self) -> list[bytes]:
        """One 8-byte digest per :data:`COMPONENTS` entry, in order."""
        parts = (
            f"{self.op}|{self.option}".encode(),
            f"{self.shape}|{self.dtype}".encode(),
            self.spec.encode(),
            self.codec,
            self.path.encode(),
        )
        return [hashlib.sha256(p).digest()[:8] for p in parts]

    def describe(self) -> str:
        """One rank's call for an error message."""
        dtype = str(self.dtype).removeprefix("torch.")
        option = f" {self.option}" if self.option else ""
        return (
            f"{self.op}{option} of shape {self.shape} {dtype}, codec {self.spec!r} "
            f"(parameters #{self.codec[:4].hex()}), {self.path_detail}"
        )


class _Checked:
    """Per process group: the keys (:attr:`CallFingerprint.key`) already agreed on (``check_ranks="first"``).

    Weakly keyed by the group object, so a destroyed group's entries go with it and a new group starts afresh.
    """

    def __init__(self) -> None:
        self._by_group: weakref.WeakKeyDictionary[Any, set[tuple]] = weakref.WeakKeyDictionary()
        self._fallback: dict[int, set[tuple]] = {}

    def seen(self, group: Any) -> set[tuple]:
        pg = group if group is not None else dist.group.WORLD
        try:
            found = self._by_group.get(pg)  # no weak reference made on the hot path (setdefault makes one)
            if found is None:
                found = self._by_group[pg] = set()
            return found
        except TypeError:  # a group object that takes no weak reference: key by id
            return self._fallback.setdefault(id(pg), set())

    def clear(self) -> None:
        self._by_group = weakref.WeakKeyDictionary()
        self._fallback.clear()


_checked = _Checked()


def reset() -> None:
    """Forget which fingerprints were checked (every process group). Call on every rank or on none."""
    _checked.clear()


def needs_exchange(mode: bool | str, key: tuple, group: Any) -> bool:
    """Whether ``check_ranks=mode`` asks for an agreement exchange for this call: always (True), never (False),
    or (``"first"``) unless an exchange of this group already agreed on ``key`` (:attr:`CallFingerprint.key`)."""
    if mode is True or mode is False:
        return mode
    return key not in _checked.seen(group)


def _pack(fp: CallFingerprint, nonfinite: int) -> bytes:
    text = fp.describe().encode()
    if len(text) > _TEXT_BYTES:
        text = text[: _TEXT_BYTES - 3] + b"..."
    return struct.pack("<q", nonfinite) + b"".join(fp.digests()) + text.ljust(_TEXT_BYTES, b"\0")


def _unpack(row: bytes) -> tuple[int, list[bytes], str]:
    count = struct.unpack("<q", row[:8])[0]
    digests = [row[8 + 8 * i : 16 + 8 * i] for i in range(len(COMPONENTS))]
    text = row[_HEADER:].rstrip(b"\0").decode(errors="replace")
    return count, digests, text


def exchange(
    fp: CallFingerprint,
    group: dist.ProcessGroup | None,
    device: torch.device,
    *,
    nonfinite: int,
    check_finite: bool,
    error: type[Exception],
) -> None:
    """One all-gather of every rank's fixed-size record; raise ``error`` on EVERY rank if any rank's input is
    not finite (``check_finite``) or the ranks' fingerprints differ in any component.

    Args:
        fp: this rank's call.
        group: the collective's process group.
        device: where the collective's tensors live (NCCL needs device tensors).
        nonfinite: this rank's count of NaN/Inf input values (0 when not counted).
        check_finite: raise on non-finite input anywhere.
        error: the exception class to raise (the collectives' ``CollectiveError``).
    """
    global _exchanges
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.frombuffer(bytearray(_pack(fp, nonfinite)), dtype=torch.uint8).to(device)  # [RECORD_BYTES]
    gathered = torch.empty(n * RECORD_BYTES, dtype=torch.uint8, device=device)  # [N * RECORD_BYTES]
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, mine, group=group)
    _exchanges += 1
    raw = gathered.cpu().numpy().tobytes()
    rows = [_unpack(raw[r * RECORD_BYTES : (r + 1) * RECORD_BYTES]) for r in range(n)]
    if check_finite:
        bad = [r for r, row in enumerate(rows) if row[0]]
        if bad:
            where = ", ".join(f"rank {r} holds {rows[r][0]} NaN/Inf values" for r in bad)
            raise error(f"{fp.op}: input is not finite (check_finite=True): {where}; raised on rank {rank}")
    differ = [i for i in range(len(COMPONENTS)) if any(row[1][i] != rows[0][1][i] for row in rows)]
    if not differ:
        _checked.seen(group).add(fp.key)  # agreed: "first" skips it from now on (a mismatch is checked again)
        return
    names = [k for k, _ in COMPONENTS]
    if names.index("spec") in differ:  # a different spec makes the parameters differ too: name the cause only
        differ.remove(names.index("params"))
    what = ", ".join(COMPONENTS[i][1] for i in differ)
    detail = "; ".join(f"rank {r}: {row[2]}" for r, row in enumerate(rows))
    raise error(
        f"{fp.op}: ranks disagree on the message ({what}); every rank must pass the same shape, dtype, codec "
        f"(with the same seeds and tables) and options; this rank uses codec {fp.spec!r}: {detail}; "
        f"raised on rank {rank}"
    )
