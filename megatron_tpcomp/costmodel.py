"""Cost model: predicted time of each collective path from message size, world size, link and codec speed.

Terms (per rank; N = world size, B = uncompressed message bytes, P = payload bytes of the whole message):

- link: a message step of ``m`` bytes costs ``alpha + m / beta`` (latency ``alpha`` s, bandwidth ``beta``
  bytes/s, per direction);
- codec: encoding or decoding ``b`` input bytes costs ``lat + b / bw`` (a per-call latency plus a throughput);

Paths: every formula is built from the algorithm's descriptor (:mod:`megatron_tpcomp.collectives.algorithms`,
whose table lists rounds, bytes sent and codec work per algorithm):

- ``t = codec + rounds * alpha + wire(P) / beta``, with ``codec`` the sum of the descriptor's codec calls
  (``enc``/``dec`` of their share of B) and ``wire`` its bytes sent per rank (of B for the stock ring
  collectives, of P for the compressed ones);
- pipelined (one-shot all-reduce of CPU tensors in K chunks, ``collectives.pipeline_chunks``): with
  ``e`` and ``d`` the encodes and decodes of one chunk (B/K) and ``w = rounds * alpha + wire(P/K) / beta``,
  ``e + (K-1) max(e + d, w) + w + d`` (one core encodes chunk i+1 and decodes chunk i-1 while chunk i travels).

Each compressed path also has a measured per-call overhead ``o`` (seconds, keyed by op, algorithm and world
size, added to its formula): the formulas count message steps, but a compressed path makes several library calls
(codec launches, an all-gather of a payload list, two-shot's all-to-all and second all-gather), and on a CPU each
costs more than a ring step. Ignoring it made ``auto`` compress one-token decode messages that then ran slower
(measured, README). :func:`fit_overheads` takes it from the compressed records of ``tpcomp bench collectives``
at the smallest size measured for the path, where it dominates; without such records it is 0.

Parameters come from a performance table (JSON, written by :func:`fit` from the benchmark outputs of
``tpcomp bench codecs`` and ``tpcomp bench collectives``), keyed by device, dtype and world size. Without a
table the model uses :data:`DEFAULTS`, published figures, and says so in ``source``; a table path that does not
exist is an error, not the defaults. Nothing is measured here.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from megatron_tpcomp.collectives import algorithms
from megatron_tpcomp.collectives.algorithms import Algorithm

TABLE_VERSION = 1

#: Published defaults, used only when no measured table exists. Link: PCIe Gen4 x16 peer-to-peer, ~25 GB/s per
#: direction and ~10 us per message step (NCCL over PCIe); codec: a fused one-pass GPU kernel at ~70% of an
#: H100's 3.35 TB/s HBM bandwidth (the kernel benchmark's target) with ~5 us launch latency.
DEFAULTS: dict[str, Any] = {
    "link": {"alpha_s": 10e-6, "beta_bytes_per_s": 25e9, "source": "default: PCIe Gen4 x16 (published)"},
    "codec": {"lat_s": 5e-6, "bw_bytes_per_s": 2.3e12, "source": "default: fused GPU kernel at 70% of H100 HBM"},
}


@dataclass(frozen=True)
class Link:
    alpha_s: float
    beta_bytes_per_s: float
    source: str = "default"

    def step(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.beta_bytes_per_s


@dataclass(frozen=True)
class CodecSpeed:
    enc_lat_s: float
    enc_bw: float
    dec_lat_s: float
    dec_bw: float
    source: str = "default"

    def enc(self, nbytes: float) -> float:
        return self.enc_lat_s + nbytes / self.enc_bw

    def dec(self, nbytes: float) -> float:
        return self.dec_lat_s + nbytes / self.dec_bw


@dataclass
class CostModel:
    """Predicts collective times; see the module docstring for the formulas.

    Attributes:
        links: world size -> :class:`Link` (``0`` is the fallback for world sizes not measured).
        codecs: canonical codec spec -> :class:`CodecSpeed` (``"*"`` is the fallback).
        device, dtype: what the table was measured on.
        overheads: :func:`path_key` (op, algorithm, world size) -> measured per-call overhead of that compressed
            path in seconds (missing: 0).
    """

    links: dict[int, Link] = field(default_factory=dict)
    codecs: dict[str, CodecSpeed] = field(default_factory=dict)
    device: str = "unknown"
    dtype: str = "bfloat16"
    overheads: dict[str, float] = field(default_factory=dict)

    @classmethod
    def default(cls) -> CostModel:
        d = DEFAULTS
        link = Link(d["link"]["alpha_s"], d["link"]["beta_bytes_per_s"], d["link"]["source"])
        c = d["codec"]
        codec = CodecSpeed(c["lat_s"], c["bw_bytes_per_s"], c["lat_s"], c["bw_bytes_per_s"], c["source"])
        return cls(links={0: link}, codecs={"*": codec})

    def link(self, world_size: int) -> Link:
        return self.links.get(world_size) or self.links.get(0) or CostModel.default().links[0]

    def codec(self, spec: str) -> CodecSpeed:
        return self.codecs.get(spec) or self.codecs.get("*") or CostModel.default().codecs["*"]

    # ------------------------------------------------------------------------------------------- predictions

    def stock(self, op: str, nbytes: int, n: int) -> float:
        """Seconds of the stock ring collective (``op`` in all_reduce | all_gather | reduce_scatter)."""
        stock = algorithms.algorithm(op, "stock")
        return 0.0 if n <= 1 else self._formula(stock, nbytes, n, "*", nbytes, 1)

    def compressed(
        self, op: str, nbytes: int, n: int, spec: str, payload: int, algo: str = "one-shot", chunks: int = 1
    ) -> float:
        """Seconds of the compressed path: ``payload`` = bytes of the whole message's payload; ``chunks`` = pieces
        of a pipelined one-shot all-reduce (1: not pipelined). Includes the path's measured overhead."""
        if n <= 1:
            return 0.0
        t = self.path_formula(op, nbytes, n, spec, payload, algo, chunks)
        return max(t + self.overheads.get(path_key(op, algo, n), 0.0), 0.0)

    def path_formula(
        self, op: str, nbytes: int, n: int, spec: str, payload: int, algo: str = "one-shot", chunks: int = 1
    ) -> float:
        """The module docstring's formula of a compressed path (``algo``: :func:`algorithms.algorithm` of
        ``op``), without the measured overhead."""
        return self._formula(algorithms.algorithm(op, algo), nbytes, n, spec, payload, chunks)

    def _formula(self, algo: Algorithm, nbytes: int, n: int, spec: str, payload: int, chunks: int) -> float:
        """``algo``'s seconds for ``nbytes`` input and ``payload`` bytes on the wire (input bytes for stock)."""
        link, c = self.link(n), self.codec(spec)
        k = chunks if algo.pipelined and chunks > 1 else 1
        e = d = 0.0
        for term in algo.codec_work(n):
            if term.kind == "enc":
                e += term.calls * c.enc(nbytes * term.share / k)
            else:
                d += term.calls * c.dec(nbytes * term.share / k)
        w = algo.rounds(n) * link.alpha_s + float(algo.wire_fraction(n)) * (payload / k) / link.beta_bytes_per_s
        if k > 1:
            return e + (k - 1) * max(e + d, w) + w + d
        return e + w + d

    def choose(
        self,
        op: str,
        nbytes: int,
        n: int,
        options: Iterable[tuple[str, int]],
        algos: Iterable[str] = ("one-shot",),
        chunks: int = 1,
    ) -> tuple[str, str, float]:
        """The fastest path: ``("none", "stock", t)`` or ``(spec, algo, t)`` among ``options`` = (spec, payload
        bytes) pairs the layer's quality config allows. For all-reduce ``algo`` is the fastest of ``algos``
        (:func:`algorithms.choose_algo`'s cost rule); other ops have one algorithm and report ``one-shot`` (the
        config's all-reduce setting, which they ignore). ``chunks``: pieces the one-shot all-reduce would be
        pipelined in."""
        best = ("none", "stock", self.stock(op, nbytes, n))
        candidates = tuple(algos) if op == "all_reduce" else ("one-shot",)
        for spec, payload in options:

            def predict(algo: str, spec: str = spec, payload: int = payload) -> float:
                return self.compressed(op, nbytes, n, spec, payload, algo, chunks)

            algo = algorithms.choose_algo(n, nbytes, predict, candidates)
            t = predict(algo)
            if t < best[2]:
                best = (spec, algo, t)
        return best

    def choose_message(self, op: str, x: Any, codec: Any, n: int, algo: str) -> tuple[str, str]:
        """Policy ``auto`` for one message: :meth:`choose` between the stock collective and ``codec`` (on
        ``algo``'s algorithms: both for ``auto``) for tensor ``x`` (this rank's input; ``op`` in all_reduce |
        all_gather | reduce_scatter, world size ``n``), with the payload and the pipelining the collectives would
        use. Returns ``(spec, algo)`` or ``("none", "stock")``. The Megatron intercept and the collective
        benchmark both decide through here."""
        nbytes = x.numel() * x.element_size()
        # The payload of the op's first compressed algorithm, uncut (two-shot's chunk padding is not counted).
        first = algorithms.compressed_algorithms(op)[0]
        payload = first.plan(x.shape, codec, max(n, 1), 0, 1).payload_nbytes(codec)
        chunks = first.chunks(nbytes, x.device.type, codec.block_local)
        algos = ("one-shot", "two-shot") if algo == "auto" else (algo,)
        spec, chosen, _ = self.choose(op, nbytes, n, [(codec.spec, payload)], algos, chunks)
        return spec, chosen

    # ---------------------------------------------------------------------------------------------------- I/O

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "links": {str(n): vars(link) for n, link in self.links.items()},
            "codecs": {spec: vars(c) for spec, c in self.codecs.items()},
            "overheads": dict(self.overheads),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "table") -> CostModel:
        if not isinstance(data, Mapping) or data.get("version") != TABLE_VERSION:
            raise ValueError(f"{source}: not a version-{TABLE_VERSION} performance table")
        try:
            links = {int(n): Link(**v) for n, v in data["links"].items()}
            codecs = {spec: CodecSpeed(**v) for spec, v in data["codecs"].items()}
            overheads = {_normalize_key(str(k)): float(v) for k, v in data.get("overheads", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: malformed performance table: {exc}") from None
        if any(link.beta_bytes_per_s <= 0 or link.alpha_s < 0 for link in links.values()):
            raise ValueError(f"{source}: link bandwidths must be > 0 and latencies >= 0")
        if any(c.enc_bw <= 0 or c.dec_bw <= 0 or c.enc_lat_s < 0 or c.dec_lat_s < 0 for c in codecs.values()):
            raise ValueError(f"{source}: codec throughputs must be > 0 and latencies >= 0")
        if not all(map(math.isfinite, overheads.values())):
            raise ValueError(f"{source}: path overheads must be finite seconds")
        return cls(links, codecs, str(data.get("device", "unknown")), str(data.get("dtype", "bfloat16")), overheads)

    @classmethod
    def load(cls, path: str | Path | None) -> CostModel:
        """The table at ``path`` (relative paths from the current directory); None gives :meth:`default`.

        Raises:
            ValueError: ``path`` is given but is not a file (a typo must not silently mean the published
                defaults), or it is not a valid table.
        """
        if path is None:
            return cls.default()
        if not Path(path).is_file():
            raise ValueError(
                f"perf_table {str(path)!r} (resolved: {Path(path).resolve()}) does not exist; write one with "
                "`tpcomp bench perf-table`, or leave perf_table out to use the published defaults"
            )
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read performance table: {exc}") from None
        return cls.from_json(data, str(path))


def _normalize_key(key: str) -> str:
    """A path key of an older table (``reduce_scatter/one-shot/3``) under today's name (:func:`path_key`)."""
    op, algo, n = key.split("/")
    return path_key(op, algo, int(n))


# ------------------------------------------------------------------------------------------------------ fitting


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` with a >= 0, minimising the RELATIVE residuals ``(a + b x - y) / y`` (weights
    ``1 / y^2``): sizes span three decades, and an absolute fit lets the largest message decide alone, which
    drives the latency ``a`` to 0 and mispredicts every small message. A negative intercept is clamped and the
    slope refitted. With a single distinct ``x`` the intercept cannot be told from the slope: the line goes
    through the origin."""
    if len({p[0] for p in points}) == 1:
        x = points[0][0]
        y = statistics.fmean(p[1] for p in points)
        return 0.0, y / x if x else 0.0
    w = [1.0 / max(p[1], 1e-30) ** 2 for p in points]
    sw = sum(w)
    mx = sum(wi * p[0] for wi, p in zip(w, points, strict=True)) / sw
    my = sum(wi * p[1] for wi, p in zip(w, points, strict=True)) / sw
    sxx = sum(wi * (p[0] - mx) ** 2 for wi, p in zip(w, points, strict=True))
    b = sum(wi * (p[0] - mx) * (p[1] - my) for wi, p in zip(w, points, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    if a < 0:
        num = sum(wi * p[0] * p[1] for wi, p in zip(w, points, strict=True))
        a, b = 0.0, num / sum(wi * p[0] ** 2 for wi, p in zip(w, points, strict=True))
    return a, b


def fit_codecs(records: Iterable[Mapping[str, Any]]) -> dict[str, CodecSpeed]:
    """Per canonical spec, encode/decode latency and throughput from ``tpcomp bench codecs`` records
    (``canonical``, ``bytes``, ``encode_ms``, ``decode_ms``) at two or more sizes."""
    by_spec: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_spec.setdefault(r["canonical"], []).append(r)
    out = {}
    for spec, rows in by_spec.items():
        enc = _line([(r["bytes"], r["encode_ms"] / 1e3) for r in rows])
        dec = _line([(r["bytes"], r["decode_ms"] / 1e3) for r in rows])
        out[spec] = CodecSpeed(enc[0], 1 / max(enc[1], 1e-18), dec[0], 1 / max(dec[1], 1e-18), "measured")
    return out


def fit_links(records: Iterable[Mapping[str, Any]]) -> dict[int, Link]:
    """Per world size, link latency and bandwidth from the stock all-reduce timings of ``tpcomp bench
    collectives`` records (``op``, ``world_size``, ``bytes``, ``baseline_median_ms``): the ring formula is linear
    in (steps, bytes on the wire per rank)."""
    ring = algorithms.STOCK["all_reduce"]
    by_n: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        if r.get("op") != "all_reduce" or r.get("baseline_median_ms") is None:
            continue
        n = int(r["world_size"])
        wire = float(ring.wire_fraction(n)) * r["bytes"]
        by_n.setdefault(n, []).append((wire, r["baseline_median_ms"] / 1e3))
    out = {}
    for n, points in by_n.items():
        a, b = _line(points)
        out[n] = Link(a / ring.rounds(n), 1 / max(b, 1e-18), "measured")
    return out


def path_key(op: str, algo: str, n: int) -> str:
    """Key of a compressed path's overhead, ``op/algorithm/N`` with the algorithm's name as ``CommStats.algo``
    has it: ``"all_reduce/one-shot/3"``, ``"reduce_scatter/all-to-all/3"`` (:func:`algorithms.algorithm`
    resolves ``algo``; for ops with one algorithm any all-reduce setting names it)."""
    return f"{op}/{algorithms.algorithm(op, algo).name}/{n}"


def payload_bytes(rec: Mapping[str, Any]) -> int:
    """Payload bytes of the whole message, from a collective record's per-rank ``wire_bytes``: the inverse of
    the algorithm's :meth:`~algorithms.Algorithm.wire_bytes`."""
    n = int(rec["world_size"])
    algo = algorithms.algorithm(rec["op"], rec.get("algo_used") or rec.get("algo") or "one-shot")
    return round(Fraction(float(rec["wire_bytes"])) / algo.wire_fraction(n))


def fit_overheads(model: CostModel, records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per compressed path (:func:`path_key`), the median of measured minus :meth:`CostModel.path_formula`
    seconds over that path's records at its smallest message size (where a per-call cost dominates the
    bandwidth terms), from ``tpcomp bench collectives`` records (``op``, ``world_size``, ``bytes``,
    ``median_ms``, ``wire_bytes``, ``canonical``, ``algo_used``, ``chunks``). Records of codecs the model has
    no measured speed for, fallbacks and stock-only records are skipped. May be negative (a path faster than its
    formula)."""
    by_path: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        spec = r.get("canonical")
        if r.get("fallback") or r.get("median_ms") is None or spec not in model.codecs or "wire_bytes" not in r:
            continue
        n = int(r["world_size"])
        by_path.setdefault(path_key(r["op"], r.get("algo_used") or r.get("algo") or "one-shot", n), []).append(r)
    out = {}
    for key, rows in by_path.items():
        op, algo, n = key.split("/")
        smallest = min(int(r["bytes"]) for r in rows)
        residuals = [
            r["median_ms"] / 1e3
            - model.path_formula(
                op, smallest, int(n), r["canonical"], payload_bytes(r), algo, int(r.get("chunks") or 1)
            )
            for r in rows
            if int(r["bytes"]) == smallest
        ]
        out[key] = statistics.median(residuals)
    return out


def fit(
    codec_records: Iterable[Mapping[str, Any]],
    collective_records: Iterable[Mapping[str, Any]] = (),
    *,
    device: str = "cpu",
    dtype: str = "bfloat16",
) -> CostModel:
    """A model from benchmark records; link entries not measured fall back to :data:`DEFAULTS`; path overheads
    come from the compressed timings among ``collective_records`` (:func:`fit_overheads`)."""
    collective_records = list(collective_records)
    model = CostModel.default()
    model.codecs.update(fit_codecs(codec_records))
    model.links.update(fit_links(collective_records))
    model.overheads.update(fit_overheads(model, collective_records))
    model.device, model.dtype = device, dtype
    return model
