"""Compressed collectives over real gloo process groups of 2, 3 and 4 ranks.

Each world size is spawned once; every (codec, collective) case runs inside it and the ranks return their
outputs. The test process then checks, per case:
- all ranks hold bit-identical results (all-reduce, all-gather);
- the result equals, bit for bit, a single-process simulation of the algorithm (decode every payload, fp32
  sum in rank order, requantize once for two-shot): the distributed plumbing adds nothing;
- the result is within the codec's stated error bound of the exact sum: one-shot sum_r bound(x_r); two-shot
  that plus the requantization bound of the reduced chunk; plus the final bf16 rounding (|value| * 2^-8) and
  fp32 summation round-off (1e-6 * sum_r |x_r|);
- fallbacks equal the stock collective exactly; stats report what was sent.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp import collectives
from megatron_tpcomp.codecs import make_codec
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
SHAPES = {"aligned": (48, 2, 96), "odd": (12, 3, 50)}
WORLD_SIZES = [2, 3, 4]


def make_input(rank: int, case: str, shape: tuple[int, ...]) -> torch.Tensor:
    seed = int(hashlib.sha256(f"{rank}/{case}".encode()).hexdigest()[:8], 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 40.0  # an outlier channel, as in row-parallel partials
    return x.to(torch.bfloat16)


def cases() -> list[tuple[str, str, str]]:
    return [(spec, op, shape) for spec in SPECS for op in OPS for shape in SHAPES]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _run_all(rank: int, world_size: int) -> dict:
    out: dict = {}
    for spec, op, shape_name in cases():
        key = f"{spec}|{op}|{shape_name}"
        x = make_input(rank, key, SHAPES[shape_name])
        stats: list[collectives.CommStats] = []
        if op in ("one-shot", "two-shot", "auto"):
            y = collectives.all_reduce(x, spec, algo=op, stats=stats)
        elif op.startswith("gather"):
            y = collectives.all_gather(x, spec, dim=int(op[6:]), stats=stats)
        else:
            y = collectives.reduce_scatter(x, spec, dim=0, stats=stats)
        out[key] = (y, stats[0])
    # Fallbacks: below the size threshold and codec "none" run the stock collective.
    x = make_input(rank, "fallback", (16, 64))
    stock = x.clone()
    dist.all_reduce(stock)
    stats = []
    out["fallback_small"] = (collectives.all_reduce(x, "int4:g32", min_bytes=1 << 20, stats=stats), stats[0], stock)
    stats = []
    out["fallback_none"] = (collectives.all_reduce(x, "none", stats=stats), stats[0], stock)
    gathered = torch.empty(world_size * 16, 64, dtype=x.dtype)
    dist.all_gather_into_tensor(gathered, x)
    out["fallback_gather"] = (collectives.all_gather(x, None), None, gathered)
    # Errors must be raised on every rank, before any communication (no hang).
    errors = {}
    try:
        collectives.reduce_scatter(torch.zeros(world_size * 2 + 1, 8), "int4:g32")
    except collectives.CollectiveError as exc:
        errors["indivisible"] = str(exc)
    bad = torch.ones(64, 64)
    bad[3, 3] = float("nan")
    try:
        collectives.all_reduce(bad, "int4:g32", check_finite=True)
    except collectives.CollectiveError as exc:
        errors["nonfinite"] = str(exc)
    try:
        collectives.all_reduce(bad, "int4:g32", algo="three-shot")
    except collectives.CollectiveError as exc:
        errors["algo"] = str(exc)
    out["errors"] = errors
    # A NaN on one rank decodes to NaN (never a finite value) on every rank.
    poisoned = torch.ones(8, 64)
    if rank == 1:
        poisoned[2, 5] = float("nan")
    out["nan"] = collectives.all_reduce(poisoned, "int4:g32")
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def world(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    n = request.param
    return n, run_distributed(_run_all, n, timeout_s=240)


def _with_rounding(bound: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Add the final bf16 rounding of a value within ``bound`` of ``magnitude`` (half an ulp: 2^-9 relative,
    taken as 2^-8 for margin) and fp32 summation round-off (1e-6 relative)."""
    return bound + (magnitude + bound) * 2**-8 + magnitude * 1e-6


def simulate(spec: str, op: str, inputs: list[torch.Tensor], n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Single-process replay of the algorithm: (expected outputs per rank, elementwise error bound)."""
    codec = make_codec(spec)
    x0 = inputs[0]
    abs_sum = torch.stack([x.float().abs() for x in inputs]).sum(0)

    def rt(t: torch.Tensor) -> torch.Tensor:
        return codec.decode(codec.encode(t), t.shape, torch.float32)

    if op.startswith("gather"):
        dim = int(op[6:])
        got = torch.cat([codec.decode(codec.encode(x), x.shape, x.dtype) for x in inputs], dim=dim)
        bound = torch.cat([_with_rounding(codec.max_abs_error_bound(x), x.float().abs()) for x in inputs], dim=dim)
        return [got] * n, bound
    if op == "scatter0":
        outs, bounds = [], []
        for r in range(n):
            blocks = [x.reshape(n, -1, *x.shape[1:])[r] for x in inputs]
            acc = rt(blocks[0])
            for b in blocks[1:]:
                acc += rt(b)
            outs.append(acc.to(x0.dtype))
            bounds.append(sum(codec.max_abs_error_bound(b) for b in blocks))
        return outs, _with_rounding(torch.cat(bounds), abs_sum.reshape(torch.cat(bounds).shape))
    algo = op if op != "auto" else collectives.choose_algo(n, x0.numel() * x0.element_size())
    if algo == "one-shot":
        first_bound = sum(codec.max_abs_error_bound(x) for x in inputs)
        acc = rt(inputs[0])
        for x in inputs[1:]:
            acc += rt(x)
        return [acc.to(x0.dtype)] * n, _with_rounding(first_bound, abs_sum)
    # Two-shot: the first quantization is per chunk (dynamic choices such as outlier channels are made per
    # chunk too), the reduced chunk is requantized once.
    chunked = [collectives._chunk_view(x, codec, n) for x in inputs]
    chunk_shape = chunked[0][1]
    full, bounds = [], []
    for r in range(n):
        acc = rt(chunked[0][0][r])
        for c, _ in chunked[1:]:
            acc += rt(c[r])
        full.append(codec.decode(codec.encode(acc), chunk_shape, x0.dtype))
        first = sum(codec.max_abs_error_bound(c[r]) for c, _ in chunked)
        bounds.append(first + codec.max_abs_error_bound(acc))

    def unchunk(parts: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(parts)
        if len(chunk_shape) == 1:
            return stacked.reshape(-1)[: x0.numel()].reshape(x0.shape)
        return stacked.reshape(-1, chunk_shape[-1])[: x0.numel() // chunk_shape[-1]].reshape(x0.shape)

    bound = _with_rounding(unchunk(bounds), abs_sum)
    return [unchunk(full)] * n, bound


@pytest.mark.parametrize(("spec", "op", "shape_name"), cases())
def test_collective_case(world: tuple[int, list[dict]], spec: str, op: str, shape_name: str) -> None:
    n, results = world
    key = f"{spec}|{op}|{shape_name}"
    outs = [res[key][0] for res in results]
    stats = results[0][key][1]
    inputs = [make_input(r, key, SHAPES[shape_name]) for r in range(n)]
    expected, bound = simulate(spec, op, inputs, n)
    for r in range(n):
        assert outs[r].dtype == torch.bfloat16
        assert torch.equal(outs[r], expected[r]), f"rank {r} differs from the single-process replay"
    if op != "scatter0":
        assert len({_digest(o) for o in outs}) == 1, "ranks hold different results"
    if op.startswith("gather"):
        exact = torch.cat(inputs, dim=int(op[6:])).float()
        assert bool(((outs[0].float() - exact).abs() <= bound).all())
    elif op == "scatter0":
        exact = torch.stack([x.float() for x in inputs]).sum(0).reshape(n, -1, *inputs[0].shape[1:])
        got = torch.stack([o.float() for o in outs])
        assert bool(((got - exact).abs() <= bound.reshape(got.shape)).all())
    else:
        exact = torch.stack([x.float() for x in inputs]).sum(0)
        assert bool(((outs[0].float() - exact).abs() <= bound).all())
    assert stats.spec == make_codec(spec).spec and stats.fallback is None
    assert stats.raw_bytes == inputs[0].numel() * 2
    bits = make_codec(spec).nominal_bits_per_value()
    if bits < 6 and shape_name == "aligned" and op in ("one-shot", "gather0", "scatter0") and n == 2:
        assert stats.wire_bytes < stats.baseline_wire_bytes / 2.5, stats


def test_fallbacks_equal_the_stock_collective(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for res in results:
        for key in ("fallback_small", "fallback_none", "fallback_gather"):
            got, stats, stock = res[key]
            assert torch.equal(got, stock), key
        assert res["fallback_small"][1].fallback.startswith("message of 2048 bytes is below")
        assert res["fallback_none"][1].fallback == "codec is 'none'"


def test_errors_are_raised_on_every_rank(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for rank, res in enumerate(results):
        errors = res["errors"]
        assert f"size {2 * n + 1} along dim 0 is not divisible by the world size {n}" in errors["indivisible"]
        assert f"rank {rank} holds 1 NaN/Inf" in errors["nonfinite"]
        assert "three-shot" in errors["algo"] and "one-shot" in errors["algo"]


def test_nan_on_one_rank_reaches_every_rank(world: tuple[int, list[dict]]) -> None:
    n, results = world
    for res in results:
        y = res["nan"]
        assert torch.isnan(y[2, 5])
        assert int(torch.isnan(y).sum()) == 32  # exactly the poisoned group of 32
