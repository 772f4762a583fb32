"""Compressed collectives over real gloo process groups of 2, 3 and 4 ranks.

Each world size is spawned ONCE for the module (``world`` fixture): every (codec, collective, shape) case and
every fallback/error scenario runs inside that one run and the ranks return their outputs; the tests below then
assert per case so that a failure names its case. Per case:

- all ranks hold bit-identical results (all-reduce, all-gather);
- the result equals, bit for bit, a single-process replay of the algorithm (decode every payload, fp32 sum in
  rank order, requantize the reduced chunk once for two-shot): the distributed plumbing adds nothing;
- the result is within a stated bound of the exact fp32 sum / concatenation (see :func:`replay`);
- shape and dtype are preserved, and the stats report exactly the payload bytes the algorithm sends.
"""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp import collectives
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.algorithms import algorithm, all_gather_flat, reduce_scatter_flat
from megatron_tpcomp.launch import run_distributed

SPECS = [
    "int4:g32",
    "int8:g32",
    "int4:g32:asym",
    "fp8",
    "fp8-e5m2:b128",
    "mxfp4",
    "nvfp4",
    "fp5:b32",
    "int4:g32+had",
    "int4:g32+outliers:k8",
]
OPS = ["one-shot", "two-shot", "auto", "gather0", "gather-1", "scatter0"]
#: [s, b, h]: SmolLM2's hidden size (s = 24 divides by 2, 3 and 4 for the reduce-scatter; kept small because
#: the test process replays every case), and an odd shape whose sizes are not multiples of any block (padding
#: inside blocks and chunks).
SHAPES = {"smollm": (24, 2, 576), "odd": (12, 3, 50)}
#: Other input dtypes, on one codec: the output keeps the input dtype.
DTYPE_CASES = [("int4:g32", op, "odd", dtype) for dtype in ("float32", "float16") for op in OPS]
WORLD_SIZES = [2, 3, 4]


def make_input(rank: int, case: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rank-specific row-parallel-like partial: N(0, 1) with one outlier channel 40x larger."""
    seed = int(hashlib.sha256(f"{rank}/{case}".encode()).hexdigest()[:8], 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 40.0
    return x.to(dtype)


def cases() -> list[tuple[str, str, str, str]]:
    main = [(spec, op, shape, "bfloat16") for spec in SPECS for op in OPS for shape in SHAPES]
    return main + DTYPE_CASES


def case_key(spec: str, op: str, shape_name: str, dtype: str) -> str:
    return f"{spec}|{op}|{shape_name}|{dtype}"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _run_case(x: torch.Tensor, spec: str, op: str, stats: list) -> torch.Tensor:
    if op in ("one-shot", "two-shot", "auto"):
        return collectives.all_reduce(x, spec, algo=op, stats=stats)
    if op.startswith("gather"):
        return collectives.all_gather(x, spec, dim=int(op[6:]), stats=stats)
    return collectives.reduce_scatter(x, spec, dim=0, stats=stats)


def _errors(fn, *args, **kwargs) -> str:
    """The CollectiveError message of ``fn(*args, **kwargs)``, or a marker if it did not raise."""
    try:
        fn(*args, **kwargs)
    except collectives.CollectiveError as exc:
        return str(exc)
    return "<no error>"


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_all(rank: int, world_size: int) -> dict:
    """Everything this module checks, on one rank of one process group; returns {scenario: result}."""
    out: dict = {}
    for spec, op, shape_name, dtype in cases():
        key = case_key(spec, op, shape_name, dtype)
        x = make_input(rank, key, SHAPES[shape_name], getattr(torch, dtype))
        stats: list[collectives.CommStats] = []
        try:  # a broken codec fails its own cases (errors are symmetric across ranks), not the whole module
            out[key] = (_run_case(x, spec, op, stats), stats[0])
        except Exception as exc:  # reported by the per-case test
            out[key] = f"{type(exc).__name__}: {exc}"

    # auto on a message above the two-shot threshold: the table's choice, bit-identical to naming it.
    big = make_input(rank, "big", (512, 576))  # 576 KiB of bf16
    stats = []
    auto = collectives.all_reduce(big, "int4:g32", algo="auto", stats=stats)
    named = collectives.all_reduce(big, "int4:g32", algo=collectives.choose_algo(world_size, big.numel() * 2))
    out["auto_big"] = (stats[0].algo, torch.equal(auto, named), _digest(auto))

    # Pipelined one-shot (large CPU messages, here with small chunks): the same bits as the whole-message path.
    piped = {}
    saved = chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES
    for spec in ("int4:g32+had", "fp8", "int8:g32", "nvfp4"):
        m = make_input(rank, "pipe", (1000, 576))  # 1.1 MiB of bf16
        try:
            chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = 1 << 16, 1 << 16
            chunks = chunking.tensor_pipeline_chunks(m, make_codec(spec))
            st: list[collectives.CommStats] = []
            pipelined = collectives.all_reduce(m, spec, algo="one-shot", stats=st)
            chunking.PIPELINE_MIN_BYTES = 1 << 62
            whole = collectives.all_reduce(m, spec, algo="one-shot")
        finally:
            chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = saved
        piped[spec] = (chunks, torch.equal(pipelined, whole), pipelined.shape == m.shape, st[0].wire_bytes)
    out["pipelined"] = piped

    handler = _ListHandler()
    logging.getLogger("megatron_tpcomp").addHandler(handler)
    logging.getLogger("megatron_tpcomp").setLevel(logging.INFO)

    # Fallbacks: each must equal the stock collective exactly, for every op.
    x = make_input(rank, "fallback", (16, 64))  # 2 KiB of bf16
    stock_ar = x.clone()
    dist.all_reduce(stock_ar)
    stock_ag = torch.empty(world_size * 16, 64, dtype=x.dtype)
    all_gather_flat(stock_ag, x)
    xs = make_input(rank, "fallback", (12 * world_size, 64))
    stock_rs = torch.empty(12, 64, dtype=x.dtype)
    reduce_scatter_flat(stock_rs, xs.clone())
    fb: dict = {}
    for name, fn, inp, stock, kwargs in (
        ("ar_small", collectives.all_reduce, x, stock_ar, dict(codec="int4:g32", min_bytes=4096)),
        ("ar_small_again", collectives.all_reduce, x, stock_ar, dict(codec="int4:g32", min_bytes=4096)),
        ("ar_none", collectives.all_reduce, x, stock_ar, dict(codec="none")),
        ("ar_None", collectives.all_reduce, x, stock_ar, dict(codec=None)),
        ("ag_small", collectives.all_gather, x, stock_ag, dict(codec="int4:g32", min_bytes=4096)),
        ("ag_none", collectives.all_gather, x, stock_ag, dict(codec="none")),
        ("rs_small", collectives.reduce_scatter, xs, stock_rs, dict(codec="int4:g32", min_bytes=1 << 20)),
    ):
        stats = []
        got = fn(inp, stats=stats, **kwargs)
        fb[name] = (got, stock, stats[0])
    # Non-float dtypes run the stock collective; float8 is gathered as raw bytes (gloo rejects float8).
    ints = torch.arange(6, dtype=torch.int32) * (rank + 1)
    fb["ar_int32"] = (collectives.all_reduce(ints, "int4:g32"), ints * sum(range(1, world_size + 1)) // (rank + 1))
    f8 = (torch.arange(8, dtype=torch.float32) + rank).to(torch.float8_e4m3fn)
    gathered8 = collectives.all_gather(f8, "int4:g32")
    fb["ag_float8"] = (gathered8.dtype, gathered8.view(torch.uint8))  # float8 tensors do not unpickle in 2.13
    out["fallbacks"] = fb

    # A codec object works like its spec string; a non-contiguous input like its contiguous copy.
    base = make_input(rank, "strided", (64, 96))
    out["strided"] = (
        collectives.all_reduce(base.t(), make_codec("int4:g32"), algo="two-shot"),
        collectives.all_reduce(base.t().contiguous(), "int4:g32", algo="two-shot"),
        collectives.reduce_scatter(base, "int8:g32", dim=1),
        base,
    )

    # Sub-groups: a group of one rank falls back to a copy; a 2-rank group in a larger world reduces its ranks.
    singles = [dist.new_group([r]) for r in range(world_size)]
    own = singles[rank]
    y = make_input(rank, "single", (8, 64))
    out["single"] = (
        y,
        collectives.all_reduce(y, "int4:g32", own),
        collectives.all_gather(y, "int4:g32", own, dim=-1),
        collectives.reduce_scatter(y, "int4:g32", own),
    )
    pair = dist.new_group([0, 1])
    if rank in (0, 1):
        out["pair"] = collectives.all_reduce(make_input(rank, "pair", (8, 64)), "int4:g32", pair)

    # Errors: raised on every rank before any communication, or agreed on first (check_finite); the group keeps
    # working afterwards (the final all-reduce below would hang or fail otherwise).
    errors = {
        "indivisible": _errors(collectives.reduce_scatter, torch.zeros(world_size * 2 + 1, 8), "int4:g32"),
        "indivisible_dim1": _errors(collectives.reduce_scatter, torch.zeros(4, world_size + 1), "int4:g32", dim=1),
        "algo": _errors(collectives.all_reduce, torch.zeros(64), "int4:g32", algo="three-shot"),
        "dim": _errors(collectives.all_gather, torch.zeros(4, 4), "int4:g32", dim=2),
        "float8_reduce": _errors(collectives.all_reduce, f8, "none"),
    }
    bad = torch.ones(64, 64)
    if rank == world_size - 1:
        bad[3, 3] = float("nan")
        bad[4, 4] = float("inf")
    errors["nonfinite"] = _errors(collectives.all_reduce, bad, "int4:g32", check_finite=True)
    errors["nonfinite_gather"] = _errors(collectives.all_gather, bad, "int4:g32", check_finite=True)
    out["after_errors"] = collectives.all_reduce(torch.ones(64), "none")
    out["errors"] = errors

    # Without check_finite, a NaN on one rank decodes to NaN for its block on every rank (never a finite value).
    poisoned = torch.ones(8, 64)
    if rank == 1:
        poisoned[2, 5] = float("nan")
    out["nan"] = collectives.all_reduce(poisoned, "int4:g32")
    out["log"] = handler.messages
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def world(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    n = request.param
    return n, run_distributed(_run_all, n, timeout_s=150, pg_timeout_s=60)


def _with_rounding(bound: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Add the final rounding to ``dtype`` of a value within ``bound`` of ``magnitude`` (half an ulp, taken as a
    full ulp for margin: 2^-8 relative for bf16, 2^-11 fp16, 2^-24 fp32) and fp32 round-off of the N-term sum
    (1e-6 relative, generous for N <= 4)."""
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]
    return bound + (magnitude + bound) * ulp + magnitude * 1e-6


def replay(spec: str, op: str, inputs: list[torch.Tensor], n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Single-process replay of the algorithm: (expected output of each rank, elementwise error bound).

    Bounds (``b(t)`` = ``codec.max_abs_error_bound(t)``, the round-trip error of one encode/decode):
    - all-gather: each part is quantized once: ``b(x_r)`` on rank r's part;
    - one-shot and reduce-scatter: the output is a sum of N decoded partials, so the errors add:
      ``sum_r b(x_r)`` (per element, triangle inequality);
    - two-shot: the first stage adds ``sum_r b(chunk_r)``; the reduced chunk ``acc`` (fp32 sum of decoded
      partials) is quantized once more, adding ``b(acc)``: ``|q(acc) - exact| <= |q(acc) - acc| + |acc - exact|``;
    - plus the final rounding to the output dtype and fp32 summation round-off (:func:`_with_rounding`).
    """
    codec = make_codec(spec)
    x0 = inputs[0]
    abs_sum = torch.stack([x.float().abs() for x in inputs]).sum(0)

    def rt_sum(parts: list[torch.Tensor]) -> torch.Tensor:
        # The sum of the round trips as the codec defines it (decode_sum: fp32, in rank order; +had rotates the
        # sum back once), computed here from separately encoded parts.
        return codec.decode_sum(torch.cat([codec.encode(t) for t in parts]), len(parts), parts[0].shape, torch.float32)

    if op.startswith("gather"):
        dim = int(op[6:])
        got = torch.cat([codec.decode(codec.encode(x), x.shape, x.dtype) for x in inputs], dim=dim)
        bound = torch.cat(
            [_with_rounding(codec.max_abs_error_bound(x), x.float().abs(), x0.dtype) for x in inputs], dim=dim
        )
        return [got] * n, bound
    if op == "scatter0":
        outs, bounds = [], []
        for r in range(n):
            blocks = [x.tensor_split(n, 0)[r] for x in inputs]
            outs.append(rt_sum(blocks).to(x0.dtype))
            bounds.append(sum(codec.max_abs_error_bound(b) for b in blocks))
        return outs, _with_rounding(torch.cat(bounds), abs_sum, x0.dtype)
    algo = op if op != "auto" else collectives.choose_algo(n, x0.numel() * x0.element_size())
    if algo == "one-shot":
        acc = rt_sum(inputs)
        first = sum(codec.max_abs_error_bound(x) for x in inputs)
        return [acc.to(x0.dtype)] * n, _with_rounding(first, abs_sum, x0.dtype)
    # Two-shot: the first quantization is per chunk (dynamic choices such as outlier channels are made per
    # chunk too), the reduced chunk is requantized once.
    chunked = [chunking.chunk_view(x, codec, n)[0] for x in inputs]
    full, bounds = [], []
    for r in range(n):
        acc = rt_sum([c[r] for c in chunked])
        full.append(codec.decode(codec.encode(acc), acc.shape, x0.dtype))
        bounds.append(sum(codec.max_abs_error_bound(c[r]) for c in chunked) + codec.max_abs_error_bound(acc))
    out = chunking.unchunk(torch.stack(full), x0.shape)
    return [out] * n, _with_rounding(chunking.unchunk(torch.stack(bounds), x0.shape), abs_sum, x0.dtype)


def expected_wire_bytes(spec: str, op: str, x: torch.Tensor, n: int) -> tuple[str, int]:
    """(algorithm, payload bytes one rank sends) for a compressed case."""
    codec = make_codec(spec)
    if op.startswith("gather"):
        return "all-gather", (n - 1) * codec.payload_nbytes(x.shape)
    if op == "scatter0":
        return "all-to-all", (n - 1) * codec.payload_nbytes(x.tensor_split(n, 0)[0].shape)
    algo = op if op != "auto" else collectives.choose_algo(n, x.numel() * x.element_size())
    if algo == "one-shot":
        return algo, (n - 1) * codec.payload_nbytes(x.shape)
    return algo, 2 * (n - 1) * codec.payload_nbytes(chunking.chunk_view(x, codec, n)[1])


@pytest.mark.timeout(240)  # includes the module fixture: one gloo run per world size
@pytest.mark.parametrize(("spec", "op", "shape_name", "dtype"), cases())
def test_collective_case(world: tuple[int, list[dict]], spec: str, op: str, shape_name: str, dtype: str) -> None:
    n, results = world
    key = case_key(spec, op, shape_name, dtype)
    for res in results:
        assert not isinstance(res[key], str), res[key]
    outs = [res[key][0] for res in results]
    stats = [res[key][1] for res in results]
    inputs = [make_input(r, key, SHAPES[shape_name], getattr(torch, dtype)) for r in range(n)]
    x0 = inputs[0]
    expected, bound = replay(spec, op, inputs, n)

    # Shape and dtype preserved; every rank equals the replay bit for bit.
    for r in range(n):
        assert outs[r].dtype == x0.dtype and outs[r].shape == expected[r].shape and outs[r].is_contiguous()
        assert torch.equal(outs[r], expected[r]), f"rank {r} differs from the single-process replay"
    if op != "scatter0":
        assert len({_digest(o) for o in outs}) == 1, "ranks hold different results"

    # Within the bound of the exact result.
    if op.startswith("gather"):
        exact = torch.cat([x.float() for x in inputs], dim=int(op[6:]))
        got = outs[0].float()
    elif op == "scatter0":
        exact = torch.stack([x.float() for x in inputs]).sum(0)
        got = torch.cat([o.float() for o in outs])
    else:
        exact = torch.stack([x.float() for x in inputs]).sum(0)
        got = outs[0].float()
    excess = (got - exact).abs() - bound
    assert bool((excess <= 0).all()), f"error exceeds the bound by up to {float(excess.max()):.3g}"

    # Stats: exactly the payload bytes of the algorithm, fewer than the stock collective for <6-bit codecs.
    algo, wire = expected_wire_bytes(spec, op, x0, n)
    for s in stats:
        assert (s.spec, s.algo, s.fallback) == (make_codec(spec).spec, algo, None)
        assert s.raw_bytes == x0.numel() * x0.element_size() and s.wire_bytes == wire
    # ... and what the algorithm's descriptor says it sends for its chunk plan.
    codec = make_codec(spec)
    op_name = "all_gather" if op.startswith("gather") else "reduce_scatter" if op == "scatter0" else "all_reduce"
    desc = algorithm(op_name, algo)
    payload = desc.plan(x0.shape, codec, n, 0, stats[0].chunks).payload_nbytes(codec)
    assert desc.wire_bytes(payload, n) == wire
    if make_codec(spec).nominal_bits_per_value() < 6 and shape_name == "smollm":
        assert stats[0].wire_bytes < stats[0].baseline_wire_bytes, stats[0]
        if n == 2 and op != "two-shot":  # one payload vs one full copy: ~3.5x for 4.5 bits
            assert stats[0].compression > 2.5, stats[0]


def test_fallbacks_equal_the_stock_collective_exactly(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for rank, res in enumerate(results):
        fb = res["fallbacks"]
        for name in ("ar_small", "ar_small_again", "ar_none", "ar_None", "ag_small", "ag_none", "rs_small"):
            got, stock, stats = fb[name]
            assert got.dtype == stock.dtype and torch.equal(got, stock), (rank, name)
            assert stats.spec == "none" and stats.algo == "stock" and stats.wire_bytes == stats.baseline_wire_bytes
        assert fb["ar_small"][2].fallback == "message of 2048 bytes is below the 4096-byte minimum (min_bytes)"
        assert fb["rs_small"][2].fallback.startswith(f"message of {12 * n * 64 * 2} bytes is below")
        assert fb["ar_none"][2].fallback == "codec is 'none'"
        got, want = fb["ar_int32"]
        assert got.dtype == torch.int32 and torch.equal(got, want)
        dtype8, bytes8 = fb["ag_float8"]
        want8 = torch.cat([(torch.arange(8, dtype=torch.float32) + r).to(torch.float8_e4m3fn) for r in range(n)])
        assert dtype8 == torch.float8_e4m3fn and torch.equal(bytes8, want8.view(torch.uint8))


def test_fallback_reasons_are_logged_once_per_reason(world: tuple[int, list[dict]]) -> None:
    _, results = world
    for res in results:
        small = [m for m in res["log"] if "all_reduce runs uncompressed: message of" in m]
        assert len(small) == 1, res["log"]  # ar_small ran twice, logged once
        assert any("all_reduce runs uncompressed: codec is 'none'" in m for m in res["log"])
        assert any("dtype int32 is not one of" in m for m in res["log"])


def test_pipelined_one_shot_equals_the_whole_message_path(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for res in results:
        for spec, (chunks, equal, same_shape, wire) in res["pipelined"].items():
            # 1.1 MiB / 64 KiB chunks, capped at PIPELINE_MAX_CHUNKS; nvfp4 has a per-tensor scale: never cut.
            assert chunks == (1 if spec == "nvfp4" else 16), spec
            assert equal and same_shape, spec
            # 16 payloads, each padded to 16 bytes at most: within 16 * 16 bytes per peer of one whole payload.
            whole = (n - 1) * make_codec(spec).payload_nbytes((1000 * 576,))
            assert whole <= wire <= whole + (n - 1) * 16 * 16 * 2, spec


def test_codec_objects_and_strided_inputs(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for res in results:
        strided, contiguous, scattered, _ = res["strided"]
        assert torch.equal(strided, contiguous) and strided.shape == (96, 64)
        assert scattered.shape == (64, 96 // n)
    # reduce_scatter along dim 1: rank r holds columns block r of the sum, within int8's bound.
    exact = torch.stack([res["strided"][3].float() for res in results]).sum(0)
    got = torch.cat([res["strided"][2].float() for res in results], dim=1)
    assert got.shape == exact.shape and float((got - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_groups_of_one_and_sub_groups(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for res in results:
        y, reduced, gathered, scattered = res["single"]
        assert torch.equal(reduced, y) and torch.equal(gathered, y) and torch.equal(scattered, y)
    pair = [res["pair"] for res in results[:2]]
    expected, _ = replay("int4:g32", "one-shot", [make_input(r, "pair", (8, 64)) for r in range(2)], 2)
    assert torch.equal(pair[0], expected[0]) and torch.equal(pair[1], expected[0])
    assert all("pair" not in res for res in results[2:])


def test_errors_are_raised_on_every_rank_without_a_hang(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for rank, res in enumerate(results):
        errors = res["errors"]
        assert errors["indivisible"].startswith(
            f"reduce_scatter: size {2 * n + 1} along dim 0 is not divisible by the world size {n}"
        )
        assert f"size {n + 1} along dim 1 is not divisible by the world size {n}" in errors["indivisible_dim1"]
        assert "unknown algorithm 'three-shot'" in errors["algo"] and "one-shot" in errors["algo"]
        assert "dim 2 is out of range for a tensor of shape (4, 4)" in errors["dim"]
        assert "no stock reduction for torch.float8_e4m3fn" in errors["float8_reduce"]
        # Only the last rank has NaN/Inf, yet every rank raises and names it.
        for key in ("nonfinite", "nonfinite_gather"):
            assert f"rank {n - 1} holds 2 NaN/Inf values" in errors[key] and f"raised on rank {rank}" in errors[key]
        assert torch.equal(res["after_errors"], torch.full((64,), float(n)))


def test_nan_on_one_rank_reaches_every_rank_as_nan(world: tuple[int, list[dict]]) -> None:
    _, results = world
    for res in results:
        y = res["nan"]
        assert torch.isnan(y[2, 5])
        assert int(torch.isnan(y).sum()) == 32  # exactly the poisoned group of 32
        assert bool(torch.isfinite(y[3]).all()) and float((y[3] - len(results)).abs().max()) < 0.01


def test_auto_picks_two_shot_for_large_messages_from_four_ranks(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for res in results:
        algo, same, digest = res["auto_big"]
        assert algo == ("two-shot" if n >= 4 else "one-shot") and same
        assert digest == results[0]["auto_big"][2]
