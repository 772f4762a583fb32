"""One rank of ``tpcomp bench collectives``: joins the process group, times every case, rank 0 writes the results.

Started by :mod:`megatron_tpcomp.bench.collectives` once per rank (inside the rank's network namespace when the
link is shaped)::

    python -m megatron_tpcomp.bench.collectives_worker --rank R --world-size N --master-addr A --master-port P \\
        --cases CASES.json --out RESULTS.json

``CASES.json``: ``{"reps", "warmup", "threads", "dtype", "timeout_s", "label", "cases": [{"op", "spec", "algo",
"bytes"}, ...]}``. Every rank runs every case in the same order. Per repetition the stock and the compressed
collective are timed back to back (the order alternates between repetitions so that neither always runs on a
freshly idle link or a warm cache), each after a barrier so that all ranks start together; the time of a
repetition is the slowest rank's. ``codec_ms`` times the codec work of one compressed call (encode plus the N
decodes and the fp32 sum) without communication, all ranks at once as in the real collective. Rank 0 writes one
JSON record per case to ``--out`` and prints a progress line per case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_tpcomp import collectives
from megatron_tpcomp.bench.common import DTYPES, message
from megatron_tpcomp.codecs import Codec
from megatron_tpcomp.collectives import chunking
from megatron_tpcomp.collectives.algorithms import all_gather_flat, reduce_scatter_flat

OPS = ("all_reduce", "all_gather", "reduce_scatter")


def make_input(op: str, nbytes: int, world_size: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's message of about ``nbytes``: ``[tokens, 576]`` in ``dtype``, seeded by rank.

    N(0, 1) with one channel 300x larger, like :func:`megatron_tpcomp.bench.common.message`, but different on
    every rank (real partial sums differ). For reduce-scatter ``tokens`` is rounded down to a multiple of the
    world size (at least one token per rank), for the others it is at least 1.
    """
    return message(nbytes, dtype, seed=1000 + rank, tokens_multiple=world_size if op == "reduce_scatter" else 1)


def stock_fn(op: str, x: torch.Tensor, world_size: int) -> Callable[[], torch.Tensor]:
    """The stock collective on ``x`` (out of place, like the compressed ones): ``[t, h] -> [t, h]`` all-reduce,
    ``[N*t, h]`` all-gather, ``[t/N, h]`` reduce-scatter."""
    if op == "all_reduce":

        def fn() -> torch.Tensor:
            y = x.clone()
            dist.all_reduce(y)
            return y

    elif op == "all_gather":

        def fn() -> torch.Tensor:
            y = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype)
            all_gather_flat(y, x)
            return y

    else:

        def fn() -> torch.Tensor:
            y = torch.empty((x.shape[0] // world_size, *x.shape[1:]), dtype=x.dtype)
            reduce_scatter_flat(y, x)
            return y

    return fn


def compressed_fn(
    op: str, x: torch.Tensor, spec: str, algo: str, stats: list[collectives.CommStats]
) -> Callable[[], torch.Tensor]:
    """The compressed collective of :mod:`megatron_tpcomp.collectives` on ``x``, appending to ``stats``."""
    if op == "all_reduce":
        return lambda: collectives.all_reduce(x, spec, algo=algo, stats=stats)
    if op == "all_gather":
        return lambda: collectives.all_gather(x, spec, dim=0, stats=stats)
    return lambda: collectives.reduce_scatter(x, spec, dim=0, stats=stats)


def auto_choice(op: str, x: torch.Tensor, algo: str, n: int, perf_table: str | None) -> tuple[str, str]:
    """Policy ``auto`` for one message, decided as the Megatron intercept decides it
    (:meth:`CostModel.choose_message`): ``(spec, algo)`` of the path the cost model predicts fastest,
    ``("none", "stock")`` for the stock collective."""
    from megatron_tpcomp.config import AUTO_DEFAULT_SPEC
    from megatron_tpcomp.costmodel import CostModel

    return CostModel.load(perf_table).choose_message(op, x, collectives.resolve_codec(AUTO_DEFAULT_SPEC), n, algo)


def _decode_sum(codec: Codec, payloads: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Sum of decoded payloads as the collectives compute it (:meth:`Codec.decode_sum`): ``dtype`` ``shape``."""
    return codec.decode_sum(torch.cat(payloads), len(payloads), shape, dtype)


def codec_only_fn(op: str, algo_used: str, x: torch.Tensor, codec: Codec, n: int) -> Callable[[], object]:
    """The codec work of one compressed call on one rank, without communication (this rank's own payloads stand
    in for the peers': same sizes, same work).

    - all-reduce one-shot: encode ``x``, decode N payloads of ``x.shape``, fp32 sum, cast.
    - all-reduce two-shot: encode N chunks (:func:`chunking.chunk_view`), decode and sum N chunks, encode the
      reduced chunk, decode N chunks.
    - all-gather: encode ``x``, decode N payloads.
    - reduce-scatter: encode N blocks of ``x.shape[0]/N`` rows, decode and sum N blocks.
    """
    if op == "all_reduce" and algo_used == "one-shot":

        def fn() -> object:
            p = codec.encode(x)
            return _decode_sum(codec, [p] * n, tuple(x.shape), x.dtype)

    elif op == "all_reduce":  # two-shot: the collectives' own chunk plan
        view, chunk_shape = chunking.chunk_view(x, codec, n)
        chunks = list(view.unbind(0))

        def fn() -> object:
            payloads = [codec.encode(c) for c in chunks]
            mine = codec.encode(_decode_sum(codec, payloads, chunk_shape, torch.float32))
            return [codec.decode(mine, chunk_shape, x.dtype) for _ in range(n)]

    elif op == "all_gather":

        def fn() -> object:
            p = codec.encode(x)
            return torch.cat([codec.decode(p, x.shape, x.dtype) for _ in range(n)])

    else:
        blocks = x.tensor_split(n, 0)

        def fn() -> object:
            payloads = [codec.encode(b) for b in blocks]
            return _decode_sum(codec, payloads, tuple(blocks[0].shape), x.dtype)

    return fn


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one ``fn()`` call started right after a barrier (all ranks start together), and its result."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_case(
    case: dict, reps: int, warmup: int, dtype: torch.dtype, rank: int, n: int, perf_table: str | None = None
) -> dict:
    """Time one case on this rank; every rank must call it with the same case. Returns (on every rank) the record
    described in the module docstring; timings are the slowest rank's per repetition, medians in ms."""
    op, spec, algo = case["op"], case["spec"], case["algo"]
    x = make_input(op, case["bytes"], n, rank, dtype)
    choice = None
    if spec == "auto":  # decided once: every repetition sends the same message
        choice = auto_choice(op, x, algo, n, perf_table)
        spec, algo = choice if choice[0] != "none" else ("none", "one-shot")
    codec = collectives.resolve_codec(spec)
    stats: list[collectives.CommStats] = []
    stock, comp = stock_fn(op, x, n), compressed_fn(op, x, spec, algo, stats)
    base_t, comp_t = [], []
    rel_err = None
    for i in range(warmup + reps):
        order = ((stock, base_t), (comp, comp_t)) if i % 2 == 0 else ((comp, comp_t), (stock, base_t))
        outs = {}
        for fn, times in order:
            t, outs[id(times)] = _timed(fn)
            if i >= warmup:
                times.append(t)
        if rel_err is None:  # once: the compressed result against the stock one (a sanity check, not timed)
            ref = outs[id(base_t)].float()
            diff = (outs[id(comp_t)].float() - ref).norm()
            rel_err = float(diff / ref.norm().clamp_min(1e-30))
    last = stats[-1]
    codec_t = [0.0] * reps
    if last.fallback is None:
        work = codec_only_fn(op, last.algo, x, codec, n)
        for _ in range(warmup):
            work()
        codec_t = [_timed(work)[0] for _ in range(reps)]
    # The slowest rank's time per repetition: [3, reps] from every rank -> [N, 3, reps] -> max over ranks.
    mine = torch.tensor([base_t, comp_t, codec_t], dtype=torch.float64)
    every = torch.empty(n * mine.numel(), dtype=torch.float64)  # gloo gathers flat: [N * 3 * reps]
    all_gather_flat(every, mine.reshape(-1))
    worst = every.view(n, *mine.shape).amax(dim=0) * 1e3  # ms
    base_ms, comp_ms, codec_ms = (worst[k].tolist() for k in range(3))
    return dict(
        op=op,
        spec=case["spec"],
        algo=case["algo"],
        algo_used=last.algo,
        canonical=last.spec,
        fallback=last.fallback,
        world_size=n,
        dtype=str(dtype).replace("torch.", ""),
        bytes=x.numel() * x.element_size(),
        requested_bytes=case["bytes"],
        shape=list(x.shape),
        median_ms=statistics.median(comp_ms),
        baseline_median_ms=statistics.median(base_ms),
        codec_ms=statistics.median(codec_ms) if last.fallback is None else 0.0,
        wire_bytes=last.wire_bytes,
        baseline_wire_bytes=last.baseline_wire_bytes,
        chunks=last.chunks,
        auto_choice="/".join(choice) if choice else None,
        rel_err=rel_err,
        times_ms=comp_ms,
        baseline_times_ms=base_ms,
        reps=reps,
        warmup=warmup,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collectives_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--cases", required=True, help="JSON file with the settings and the cases")
    parser.add_argument("--out", required=True, help="rank 0 writes the result records (JSON list) here")
    args = parser.parse_args(argv)
    with open(args.cases) as f:
        plan = json.load(f)
    rank, n = args.rank, args.world_size
    # N ranks on a few cores: a share of the cores each, or they fight over them (as launch.run_distributed).
    torch.set_num_threads(int(plan["threads"]))
    timeout = datetime.timedelta(seconds=float(plan["timeout_s"]))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master_addr}:{args.master_port}",
        rank=rank,
        world_size=n,
        timeout=timeout,
    )
    try:
        records = []
        dtype = DTYPES[plan["dtype"]]
        for k, case in enumerate(plan["cases"]):
            rec = run_case(case, int(plan["reps"]), int(plan["warmup"]), dtype, rank, n, plan.get("perf_table"))
            records.append(rec)
            if rank == 0:
                print(
                    f"[{plan['label']}] {k + 1}/{len(plan['cases'])} {rec['op']} {rec['spec']} {rec['algo_used']} "
                    f"{rec['bytes'] / 1024:.1f} KiB: {rec['median_ms']:.2f} ms "
                    f"vs stock {rec['baseline_median_ms']:.2f} ms "
                    f"({rec['baseline_median_ms'] / rec['median_ms']:.2f}x), codec {rec['codec_ms']:.2f} ms",
                    flush=True,
                )
        if rank == 0:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as f:
                json.dump(records, f)
            os.replace(tmp, args.out)
        dist.barrier()  # nobody tears the group down while rank 0 still writes
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
