"""One rank of ``tpcomp bench e2e``: loads the model once, then times prefill and decode through megatron-core's
static inference engine for every compression spec, alternately; rank 0 writes the per-run results.

Started by :mod:`megatron_tpcomp.bench.e2e` once per rank (inside the rank's network namespace when the link is
shaped)::

    python -m megatron_tpcomp.bench.e2e_worker --rank R --world-size N --master-addr A --master-port P \\
        --plan PLAN.json --out RESULTS.json

``PLAN.json``: ``{"label", "model", "dtype", "threads", "timeout_s", "prompt_lens", "gen_tokens", "specs",
"configs", "reps", "warmup", "perf_table", "workdir"}`` (see :func:`megatron_tpcomp.bench.e2e.run`). ``specs``
lists the settings in order: a codec spec, or a label of ``configs`` (``{label: per-layer config mapping}``,
already checked against the model by the launching process).

How one run is measured (every rank, same order):

- compression is switched in the running engine with :func:`megatron_tpcomp.megatron.intercept.enable` (the
  baseline ``none`` too: it routes every collective to Megatron's own, uncompressed one, through the same
  hooks, so the baseline pays the same few microseconds of hook overhead as the compressed runs);
- after a barrier each rank starts its clock and calls ``engine.generate`` on one prompt of exactly
  ``prompt_len`` tokens for ``gen_tokens`` tokens (early termination off);
- a forward hook on the model stamps the end of every forward: the first is the prefill (``ttft``: from the
  start to the end of the first forward, whose logits give the first token), the others are decode steps
  (``tpot``: median interval between consecutive forward ends, sampling included);
- every TP collective the intercept routes (stock or compressed) is timed by a wrapper around the intercept's
  dispatch, so ``comm`` is the wall time spent inside TP collectives (waiting for slower peers included), split
  into prefill and decode by the forward stamps, with the bytes each rank sent (CommStats for compressed calls,
  the stock ring volume for the others) and how many calls were compressed;
- the ranks' numbers are gathered: times are the slowest rank's, communication shares the mean of the ranks'.

Rank checks (``TPCOMP_CHECK_RANKS``) run during the untimed warm-up and are then switched off: each switch of
spec re-enables the model, which would otherwise repeat the check (an extra small all-gather per site) in every
timed prefill, a cost a deployed model pays once.

Policy ``auto`` needs the cost model's table for the link: unless the plan names one, the ranks measure it
together before the warm-up (stock all-reduces over the link at the run's message sizes, and the codec on every
rank at once, as in the real collectives; the slowest rank's times) and fit it with
:func:`megatron_tpcomp.costmodel.fit`. All ranks use the same numbers, so they take the same decisions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_tpcomp.collectives.algorithms import STOCK

#: The collective of each intercept op name; its stock ring descriptor gives the bytes a rank sends.
_STOCK_OP: dict[str, str] = {
    "all_reduce": "all_reduce",
    "reduce_scatter": "reduce_scatter",
    "all_gather_last": "all_gather",
    "all_gather_first": "all_gather",
    "all_gather_linear": "all_gather",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def stock_wire_bytes(op: str, tensor: torch.Tensor | None, n: int) -> int:
    """Bytes one rank sends with the stock ring collective ``op`` on ``tensor`` (0 when unknown)."""
    if tensor is None or op not in _STOCK_OP:
        return 0
    return STOCK[_STOCK_OP[op]].wire_bytes(tensor.numel() * tensor.element_size(), n)


class CommClock:
    """Times every TP collective the intercept dispatches: ``events`` of ``(start, end, wire_bytes, compressed)``.

    A :func:`megatron_tpcomp.megatron.intercept.dispatch_hook` (``with intercept.dispatch_hook(clock):``): the
    stock path (no codec for the site, spec ``none``, or ``auto`` choosing uncompressed) and the compressed path
    are both inside the dispatch, Transformer Engine's collectives included. Compressed calls report what they
    really sent when the model is enabled with ``telemetry=True``; the others count the stock ring volume.
    """

    def __init__(self, world_size: int):
        self.n = world_size
        self.events: list[tuple[float, float, int, bool]] = []

    def __call__(self, call: Any, proceed: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = proceed()
        t1 = time.perf_counter()
        if call.stats is not None:  # a compressed call (telemetry on): what it really sent
            self.events.append((t0, t1, int(call.stats.wire_bytes), call.stats.fallback is None))
        else:
            self.events.append((t0, t1, stock_wire_bytes(call.op, call.tensor, self.n), False))
        return out

    def split(self, boundary: float) -> tuple[dict[str, float], dict[str, float]]:
        """Totals of the events ending by ``boundary`` (the prefill) and after it (decode): ``comm_s``,
        ``wire_bytes``, ``calls``, ``compressed_calls``."""
        parts = [dict(comm_s=0.0, wire_bytes=0, calls=0, compressed_calls=0) for _ in range(2)]
        for t0, t1, wire, comp in self.events:
            p = parts[0 if t1 <= boundary else 1]
            p["comm_s"] += t1 - t0
            p["wire_bytes"] += wire
            p["calls"] += 1
            p["compressed_calls"] += int(comp)
        return parts[0], parts[1]


class StepClock:
    """Forward hook on the model: ``ends`` = perf_counter at the end of every forward since :meth:`start`."""

    def __init__(self, model: torch.nn.Module):
        self.t0 = 0.0
        self.ends: list[float] = []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.ends.append(time.perf_counter())

    def start(self) -> None:
        self.ends = []
        self.t0 = time.perf_counter()


def exact_prompt(tokenize: Callable[[str], list[int]], detokenize: Callable[[list[int]], str], ids: list[int], n: int):
    """A text that the engine tokenizes to exactly ``n`` tokens (prefixes of ``ids``, adjusted when a detokenized
    prefix re-tokenizes to a different count); returns ``(text, tokens)``, ``tokens`` as close to ``n`` as found."""
    m, best = n, None
    for _ in range(12):
        m = max(1, min(m, len(ids)))
        text = detokenize(ids[:m])
        got = len(tokenize(text))
        if best is None or abs(got - n) < abs(best[1] - n):
            best = (text, got)
        if got == n:
            break
        m += n - got
    assert best is not None
    return best


def _gather_rows(values: list[float], n: int) -> torch.Tensor:
    """``[n, len(values)]``: every rank's values (float64), on every rank."""
    mine = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(out, mine)
    return torch.stack(out)


def calibrate(spec: str, sizes: list[int], dtype: torch.dtype, reps: int, n: int) -> tuple[dict, list, list]:
    """The cost-model table for policy ``auto`` on this link, measured by all ranks together.

    Link: stock all-reduces of ``[tokens, 576]`` messages of ``sizes`` bytes over the TP group (slowest rank per
    repetition, medians). Path overheads: the compressed one-shot and two-shot all-reduces of ``spec``, timed
    alternately with the stock one. Codec: :func:`megatron_tpcomp.bench.codec_speed.run` of ``spec`` on every rank
    at once (the ranks share the cores as they do in the model), slowest rank per size. Returns ``(table,
    link_records, codec_records)`` (link records include the compressed ones); the table is the same on every
    rank.
    """
    from megatron.core import parallel_state

    from megatron_tpcomp import collectives
    from megatron_tpcomp.bench.codec_speed import run as codec_run
    from megatron_tpcomp.bench.common import message
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.costmodel import fit

    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank()
    codec = make_codec(spec)
    algos = ("one-shot", "two-shot")
    link_records = []
    for nbytes in sizes:
        x = message(nbytes, dtype, seed=100 + rank)
        times: dict[str, list[float]] = {a: [] for a in ("stock", *algos)}
        stats: dict[str, Any] = {}
        for i in range(reps + 1):
            for path in times:
                y = x.clone()
                record: list[Any] = []
                dist.barrier()
                t0 = time.perf_counter()
                if path == "stock":
                    dist.all_reduce(y, group=group)
                else:
                    collectives.all_reduce(y, codec, group, algo=path, stats=record)
                if i:  # the first is a warm-up
                    times[path].append(time.perf_counter() - t0)
                    stats[path] = record[0] if record else None
        worst = {path: _gather_rows(t, n).amax(dim=0) for path, t in times.items()}
        size = x.numel() * x.element_size()
        link_records.append(
            dict(op="all_reduce", world_size=n, bytes=size, baseline_median_ms=float(worst["stock"].median()) * 1e3)
        )
        for algo in algos:
            st = stats[algo]
            if st is None or st.fallback:
                continue
            link_records.append(
                dict(
                    op="all_reduce",
                    world_size=n,
                    bytes=size,
                    canonical=st.spec,
                    algo_used=st.algo,
                    wire_bytes=st.wire_bytes,
                    chunks=st.chunks,
                    median_ms=float(worst[algo].median()) * 1e3,
                )
            )
    mine = codec_run([spec], sizes, dtype, reps=reps)
    everyone: list[Any] = [None] * n
    dist.all_gather_object(everyone, mine)
    codec_records = []
    for k, rec in enumerate(mine):
        worst_rec = dict(rec)
        worst_rec["encode_ms"] = max(r[k]["encode_ms"] for r in everyone)
        worst_rec["decode_ms"] = max(r[k]["decode_ms"] for r in everyone)
        codec_records.append(worst_rec)
    model = fit(codec_records, link_records, device="cpu", dtype=str(dtype).replace("torch.", ""))
    return model.to_json(), link_records, codec_records


def _config(setting: str, perf_table: str | None, configs: dict[str, Any] | None = None) -> Any:
    """The CompressionConfig of ``setting``: a label of ``configs`` (a per-layer config mapping) or a spec.
    Policy ``auto`` gets ``perf_table`` unless a config file names its own."""
    from megatron_tpcomp.config import CompressionConfig

    if configs and setting in configs:
        cfg = CompressionConfig.from_dict(configs[setting], source=setting)
        if cfg.policy == "auto" and cfg.perf_table is None:
            cfg.perf_table = perf_table
        return cfg
    cfg = CompressionConfig.from_spec(setting)
    if cfg.policy == "auto":
        cfg.perf_table = perf_table
    return cfg


def run_once(engine: Any, params: Any, prompt: str, steps: StepClock, comm: CommClock, n: int) -> dict[str, Any]:
    """One timed generate of ``prompt``; returns the slowest-rank / mean-share numbers (same on every rank)."""
    comm.events = []
    dist.barrier()
    steps.start()
    engine.generate(prompts=[prompt], sampling_params=params)
    t_end = time.perf_counter()
    if not steps.ends:
        raise RuntimeError("the engine ran no forward pass")
    prefill_end = steps.ends[0]
    intervals = [b - a for a, b in zip(steps.ends, steps.ends[1:], strict=False)]
    pre, dec = comm.split(prefill_end)
    ttft = prefill_end - steps.t0
    decode_s = steps.ends[-1] - prefill_end
    row = [
        ttft,
        statistics.median(intervals) if intervals else float("nan"),
        pre["comm_s"],
        dec["comm_s"],
        decode_s,
        pre["wire_bytes"],
        dec["wire_bytes"],
        pre["calls"],
        pre["compressed_calls"],
        dec["calls"],
        dec["compressed_calls"],
        len(intervals),
        t_end - steps.t0,
    ]
    every = _gather_rows(row, n)
    worst = every.amax(dim=0)
    share = (every[:, 2] / every[:, 0]).mean()
    dshare = (every[:, 3] / every[:, 4].clamp_min(1e-12)).mean() if len(intervals) else float("nan")
    return dict(
        ttft_ms=float(worst[0]) * 1e3,
        tpot_ms=float(worst[1]) * 1e3 if intervals else None,
        comm_ms=float(every[:, 2].mean()) * 1e3,
        comm_share=float(share),
        decode_comm_ms=float(every[:, 3].mean()) * 1e3,
        decode_comm_share=float(dshare) if intervals else None,
        wire_bytes=int(worst[5]),
        decode_wire_bytes=int(worst[6]),
        prefill_calls=int(every[0, 7]),
        prefill_compressed_calls=int(every[0, 8]),
        decode_calls=int(every[0, 9]),
        decode_compressed_calls=int(every[0, 10]),
        decode_steps=int(every[0, 11]),
        total_ms=float(worst[12]) * 1e3,
    )


def _quiet() -> None:
    # megatron-core's import-time notices about optional GPU packages, and one INFO line per enable(): noise here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="[rank %(process)d] %(message)s")
    logging.getLogger("megatron_tpcomp").setLevel(logging.WARNING)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="e2e_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--plan", required=True, help="JSON file with the settings")
    parser.add_argument("--out", required=True, help="rank 0 writes the results (JSON) here")
    return parser.parse_args(argv)


def _engine_and_prompts(session: Any, lens: list[int], gen: int, dtype: torch.dtype) -> tuple[Any, dict[int, Any]]:
    """The static inference engine of ``session.model`` and, per prompt length, ``(text, tokens)`` of a prompt
    of exactly that many tokens (as the engine tokenizes it)."""
    from megatron_tpcomp import assets
    from megatron_tpcomp.megatron.generate import build_static_engine
    from megatron_tpcomp.tokenizer import TextTokenizer

    meta = session.meta
    tok = TextTokenizer.from_checkpoint(meta)
    engine = build_static_engine(
        session.model,
        tok,
        vocab_size=meta.model_config.vocab_size,
        max_batch=1,
        max_seq_len=max(lens) + gen + 8,
        dtype=dtype,
        progress=False,
    )
    controller = engine.controller if hasattr(engine, "controller") else engine.text_generation_controller

    def tokenize(text: str) -> list[int]:
        return controller.tokenize_prompt(text)  # what the engine does with a prompt

    ids = tok.tokenize(assets.eval_text()[: 12 * max(lens) + 1000])
    if len(ids) < max(lens):
        raise ValueError(f"the prompt text has only {len(ids)} tokens, fewer than {max(lens)}")
    return engine, {L: exact_prompt(tokenize, tok.detokenize, ids, L) for L in lens}


def _perf_table(
    plan: dict[str, Any], lens: list[int], dtype: torch.dtype, n: int, say: Callable[[str], None]
) -> tuple[str | None, dict[str, Any] | None]:
    """The perf table for the plan's ``auto`` settings: the plan's own, or measured here by all ranks together
    when a setting needs one (then also the calibration records). Returns ``(perf_table path, calibration)``."""
    specs, plan_configs = list(plan["specs"]), plan.get("configs") or {}
    perf_table = plan.get("perf_table")
    # Settings whose auto policy needs the table measured here (a config file naming its own table does not).
    auto_cfg = [s for s in specs if (c := _config(s, None, plan_configs)).policy == "auto" and c.perf_table is None]
    if not auto_cfg or perf_table is not None:
        return perf_table, None
    t_cal = time.perf_counter()
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = sorted({576 * elem * t for t in (1, min(lens), max(lens))})
    codec_spec = _config(auto_cfg[0], None, plan_configs).default.spec
    table, link_recs, codec_recs = calibrate(codec_spec, sizes, dtype, reps=5, n=n)
    # One file for all (the path is part of the config every rank must agree on): rank 0 writes it.
    perf_table = os.path.join(plan["workdir"], "perf-table.json")
    if dist.get_rank() == 0:
        with open(f"{perf_table}.tmp", "w") as f:
            json.dump(table, f)
        os.replace(f"{perf_table}.tmp", perf_table)
    dist.barrier()
    link = table["links"].get(str(n), {})
    say(
        f"auto: cost model calibrated on this link in {time.perf_counter() - t_cal:.1f} s "
        f"(alpha {link.get('alpha_s', 0) * 1e6:.0f} us, beta {link.get('beta_bytes_per_s', 0) / 1e6:.1f} MB/s)"
    )
    return perf_table, dict(table=table, link_records=link_recs, codec_records=codec_recs)


def _timed_runs(
    plan: dict[str, Any],
    model: torch.nn.Module,
    engine: Any,
    prompts: dict[int, Any],
    configs: dict[str, Any],
    comm: CommClock,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The warm-up, then ``reps`` x prompt lengths x settings timed runs, alternating the settings."""
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_tpcomp.megatron import intercept

    n = dist.get_world_size()
    specs, lens = list(plan["specs"]), [int(x) for x in plan["prompt_lens"]]
    params = SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=int(plan["gen_tokens"]))
    params.no_early_termination = True  # always gen_tokens steps (read by the static controller)
    steps = StepClock(model)

    def switch(spec: str) -> None:
        intercept.enable(model, configs[spec], telemetry=True)
        intercept.reset_counts()

    warm = int(plan["warmup"])
    for w in range(warm):
        for s in specs:
            say(f"warm-up {w + 1}/{warm}: {s}, {min(lens)} tokens")
            switch(s)
            run_once(engine, params, prompts[min(lens)][0], steps, comm, n)
    os.environ["TPCOMP_CHECK_RANKS"] = "off"  # checked in the warm-up; see the module docstring
    runs = []
    total = int(plan["reps"]) * len(lens) * len(specs)
    for rep in range(int(plan["reps"])):
        for L in lens:
            for s in specs:  # alternating: baseline, spec1, spec2, ..., then again
                switch(s)
                r = run_once(engine, params, prompts[L][0], steps, comm, n)
                choices = {f"{op}|{site}|{c}": v for (op, site, c), v in intercept.auto_choices.items()}
                r.update(rep=rep, prompt_len=L, prompt_tokens=prompts[L][1], spec=s, auto_choices=choices)
                runs.append(r)
                tpot = "-" if r["tpot_ms"] is None else f"{r['tpot_ms']:.1f}"
                say(
                    f"{len(runs)}/{total} rep {rep + 1} {L} tokens {s}: ttft {r['ttft_ms']:.1f} ms, tpot {tpot} ms, "
                    f"comm {100 * r['comm_share']:.0f}% of prefill"
                )
    intercept.disable(model)
    return runs


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _quiet()
    with open(args.plan) as f:
        plan = json.load(f)
    rank, n = args.rank, args.world_size

    def say(msg: str) -> None:
        if rank == 0:
            print(f"[{plan['label']}] {msg}", file=sys.stderr, flush=True)

    torch.set_num_threads(int(plan["threads"]))  # N ranks on a few cores: a share each (as the other benches)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master_addr}:{args.master_port}",
        rank=rank,
        world_size=n,
        timeout=datetime.timedelta(seconds=float(plan["timeout_s"])),
    )
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.session import rank_session

    comm = CommClock(n)
    dtype = DTYPES[plan["dtype"]]
    lens = [int(x) for x in plan["prompt_lens"]]
    try:
        with rank_session(plan["model"], n, dtype=dtype) as session:
            t0 = time.perf_counter()
            engine, prompts = _engine_and_prompts(session, lens, int(plan["gen_tokens"]), dtype)
            say(f"model loaded on {n} ranks in {session.load_s + time.perf_counter() - t0:.1f} s ({plan['dtype']})")
            with intercept.dispatch_hook(comm):
                perf_table, calibration = _perf_table(plan, lens, dtype, n, say)
                configs = {s: _config(s, perf_table, plan.get("configs") or {}) for s in plan["specs"]}
                runs = _timed_runs(plan, session.model, engine, prompts, configs, comm, say)
            if rank == 0:
                mc = session.meta.model_config
                result = dict(
                    runs=runs,
                    prompts={str(L): prompts[L][1] for L in lens},
                    calibration=calibration,
                    perf_table=plan.get("perf_table"),
                    threads=torch.get_num_threads(),
                    dtype=plan["dtype"],
                    model=str(plan["model"]),
                    num_layers=mc.num_layers,
                    hidden_size=mc.hidden_size,
                )
                _write_json(args.out, result)
            dist.barrier()  # nobody tears the group down while rank 0 still writes
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
