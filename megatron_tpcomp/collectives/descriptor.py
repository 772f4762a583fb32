"""What an algorithm descriptor is (:class:`Algorithm`), and the shares, codec work and chunk plans that several
algorithms have in common. Each algorithm's own module (``ring``, ``one_shot``, ``two_shot``, ``gather``,
``scatter``) builds its descriptor from these; :mod:`.algorithms` lists them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.chunking import ChunkPlan


@dataclass(frozen=True)
class CodecTerm:
    """``calls`` codec calls (``enc`` or ``dec``) on ``share`` of the message's uncompressed bytes each."""

    kind: Literal["enc", "dec"]
    calls: int
    share: Fraction


class Runner(Protocol):
    """Runs one algorithm on this rank: ``(output, bytes this rank sent)``. ``dim``: all-gather /
    reduce-scatter dimension (already normalised); ``chunks``: pipeline chunks of the one-shot all-reduce."""

    def __call__(
        self, x: torch.Tensor, codec: Codec, group: dist.ProcessGroup | None, n: int, *, dim: int, chunks: int
    ) -> tuple[torch.Tensor, int]: ...


@dataclass(frozen=True)
class Algorithm:
    """One collective algorithm (see the module table).

    Attributes:
        op: ``all_reduce`` | ``all_gather`` | ``reduce_scatter``.
        name: ``stock`` | ``one-shot`` | ``two-shot`` | ``all-gather`` | ``all-to-all`` (``CommStats.algo`` and
            the cost model's path keys).
        steps_per_peer: message steps per peer; the path takes ``steps_per_peer * (N-1)`` latency terms.
        step_share: N -> share of the message (payload P, or B for stock) each step sends.
        codec_work: N -> the codec calls of one call (empty for stock).
        plan: (shape, codec, N, dim, chunks) -> the pieces this rank encodes.
        pipelined: whether the pipelining rule (:func:`chunking.pipeline_chunks`) applies.
        run: the function that runs it.
    """

    op: str
    name: str
    steps_per_peer: int
    step_share: Callable[[int], Fraction]
    codec_work: Callable[[int], tuple[CodecTerm, ...]]
    plan: Callable[[Sequence[int], Codec, int, int, int], ChunkPlan]
    pipelined: bool
    run: Runner

    @property
    def compressed(self) -> bool:
        return self.name != "stock"

    @property
    def quantizations(self) -> int:
        """How many times each value is quantized on its way (0 for stock)."""
        return sum(t.calls for t in self.codec_work(2) if t.kind == "enc")

    def rounds(self, n: int) -> int:
        """Latency terms (message steps) for N ranks."""
        return self.steps_per_peer * (n - 1)

    def wire_fraction(self, n: int) -> Fraction:
        """Bytes this rank sends per byte of payload (of input for stock), for N ranks."""
        return self.steps_per_peer * (n - 1) * self.step_share(n)

    def wire_bytes(self, payload: int, n: int) -> int:
        """Bytes this rank sends for a ``payload``-byte message (input bytes for stock), rounded down."""
        return int(payload * self.wire_fraction(n))

    def chunks(self, nbytes: int, device_type: str, block_local: bool) -> int:
        """Pipeline chunks for a message of ``nbytes`` (uncompressed): 1 where the algorithm is not pipelined."""
        return chunking.pipeline_chunks(nbytes, device_type, block_local) if self.pipelined else 1


_ONE = Fraction(1)


def whole_message(n: int) -> Fraction:
    """Each step sends the whole message (payload)."""
    return _ONE


def per_rank_share(n: int) -> Fraction:
    """Each step sends one rank's share of the message."""
    return Fraction(1, n)


def whole_plan(shape: Sequence[int], codec: Codec, n: int, dim: int, chunks: int) -> ChunkPlan:
    return ChunkPlan((tuple(shape),))


def no_work(n: int) -> tuple[CodecTerm, ...]:
    return ()


def whole_work(n: int) -> tuple[CodecTerm, ...]:
    """Encode the message, decode N whole payloads (one-shot, all-gather)."""
    return CodecTerm("enc", 1, _ONE), CodecTerm("dec", n, _ONE)


def scatter_work(n: int) -> tuple[CodecTerm, ...]:
    """Encode the message (as N pieces), decode N payloads of one piece each (reduce-scatter)."""
    return CodecTerm("enc", 1, _ONE), CodecTerm("dec", n, Fraction(1, n))
