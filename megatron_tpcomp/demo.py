"""The demo (``make demo`` / ``tpcomp demo``): a real pretrained LLM served with compressed TP communication.

Converts the embedded SmolLM2-135M once (cached), starts TP=3 local processes over gloo, and runs three
settings of the row-parallel all-reduces in the same ranks: uncompressed, the shipped searched per-layer config
(``megatron_tpcomp/configs/smollm2-135m-tp3-kl0.0085.json``: INT4-6 per layer, found by ``tpcomp calibrate
--search`` under a KL budget) and one INT4 codec everywhere (``int4:g32+had``: Hadamard-rotated, groups of 32).
For each: greedy generation for a few prompts through megatron-core's static inference engine, perplexity on a
slice of held-out real text, and the bytes every rank sent. Prints a comparison and which to use when.

Time on a slow link is not part of the demo: loopback on a CPU makes the link free, and the shaped-link benchmark
(``tpcomp bench e2e``, root only) takes codec specs, not per-layer configs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

import torch

from megatron_tpcomp.evaluation import DEFAULT_PROMPTS, prefix_len

logger = logging.getLogger("megatron_tpcomp")

#: The searched config shipped as package data (a copy of examples/configs/, which pip does not install).
SEARCHED_CONFIG = "smollm2-135m-tp3-kl0.0085.json"
#: Its column label in the report.
SEARCHED_LABEL = "searched config"


def shipped_config_text(name: str = SEARCHED_CONFIG) -> str:
    """The JSON text of a config shipped in :mod:`megatron_tpcomp.configs` (found with importlib.resources, so
    it works from a checkout and from an installed wheel alike)."""
    from importlib import resources

    return resources.files("megatron_tpcomp.configs").joinpath(name).read_text(encoding="utf-8")


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[demo] {msg}", flush=True)


def _demo_worker(
    rank: int,
    world_size: int,
    ckpt: str,
    variants: list[tuple[str, str | dict[str, Any]]],
    prompts: list[str],
    gen_tokens: int,
    ppl_ids: list[int],
) -> dict[str, Any] | None:
    """One rank: for each ``(label, spec or config dict)`` in ``variants`` (``"none"`` first: the baseline),
    generate, measure perplexity on ``ppl_ids`` and count the bytes sent. Rank 0 returns
    ``{label: {tokens, text, gen_s, ppl, ppl_s, wire_bytes, baseline_wire_bytes, compressed_calls, bits}}``."""
    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import cpu, intercept
    from megatron_tpcomp.megatron import model as M
    from megatron_tpcomp.megatron.generate import build_static_engine, greedy_generate
    from megatron_tpcomp.tokenizer import TextTokenizer

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    t0 = time.perf_counter()
    model, meta = load_model(ckpt)
    _say(
        rank, f"loaded {meta.source.get('name', ckpt)} shards on {world_size} ranks in {time.perf_counter() - t0:.1f} s"
    )
    tok = TextTokenizer.from_checkpoint(meta)
    max_len = max(len(tok.tokenize(p)) for p in prompts) + gen_tokens + 8
    engine = build_static_engine(
        model, tok, vocab_size=meta.model_config.vocab_size, max_batch=len(prompts), max_seq_len=max_len, progress=False
    )
    out: dict[str, Any] = {}
    ids = torch.tensor(ppl_ids)
    for name, setting in variants:
        label = "uncompressed" if name == "none" else name
        intercept.disable(model)
        intercept.reset_counts()
        if name != "none":
            cfg = setting if isinstance(setting, str) else CompressionConfig.from_dict(setting, source=name)
            intercept.enable(model, cfg, telemetry=True)
        _say(rank, f"{label}: generating {gen_tokens} tokens for {len(prompts)} prompts ...")
        t0 = time.perf_counter()
        tokens = greedy_generate(engine, list(prompts), gen_tokens)
        gen_s = time.perf_counter() - t0
        traffic = intercept.telemetry_summary()
        bits = _bits_per_value(intercept.telemetry_records, world_size)
        _say(rank, f"{label}: perplexity on {len(ppl_ids) - 1} tokens of held-out text ...")
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(
                ids[:-1][None], torch.arange(len(ids) - 1)[None], attention_mask=None, runtime_gather_output=True
            )
        nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[1:]).item()
        out[name] = {
            "tokens": tokens,
            "text": [tok.detokenize(t) for t in tokens],
            "gen_s": gen_s,
            "ppl": math.exp(nll),
            "ppl_s": time.perf_counter() - t0,
            "wire_bytes": sum(r["wire_bytes"] for r in traffic.values()),
            "baseline_wire_bytes": sum(r["baseline_wire_bytes"] for r in traffic.values()),
            "compressed_calls": sum(r["calls"] for r in traffic.values()),
            "bits": bits,
        }
    intercept.disable(model)
    M.destroy_parallel()
    return out if rank == 0 else None


def _bits_per_value(records: list[tuple[str, Any]], world_size: int) -> float | None:
    """Payload bits per activation value over the one-shot all-reduces in ``records`` (a one-shot sends its
    payload to each of the ``world_size - 1`` peers; activations are fp32 here: 4 bytes a value), or None."""
    sent = values = 0.0
    for _, st in records:
        if st.algo == "one-shot" and st.fallback is None:
            sent += 8 * st.wire_bytes / max(world_size - 1, 1)
            values += st.raw_bytes / 4
    return sent / values if values else None


def run(
    model: str = "smollm2-135m",
    tp: int = 3,
    spec: str = "int4:g32+had",
    prompts: list[str] | None = None,
    gen_tokens: int = 16,
    ppl_tokens: int = 512,
    config: str | None = "",
) -> dict[str, Any]:
    """Run the demo and return rank 0's measurements (also printed by :func:`main`).

    ``config``: a compression config file to compare; ``""`` (default) the shipped searched config, skipped with
    a note when it does not fit the model and TP size (it was searched for SmolLM2-135M at TP=3); None: none.
    """
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.cliutil import check_model_and_tp
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.config import CompressionConfig, ConfigError
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    make_codec(spec)  # a bad spec fails before anything is converted or started
    if tp < 1 or gen_tokens < 1 or ppl_tokens < 1:
        raise ValueError(f"need tp, gen_tokens and ppl_tokens >= 1, got {tp}, {gen_tokens}, {ppl_tokens}")
    # A bad config fails here, before anything is converted or started; the ranks get it as a mapping (the
    # shipped one is package data, which may not be a plain file).
    cfg_data: dict[str, Any] | None = None
    source = config or f"megatron_tpcomp/configs/{SEARCHED_CONFIG}"
    if config:
        cfg_data = CompressionConfig.load(config).to_dict()
    elif config is not None:
        cfg_data = json.loads(shipped_config_text())
        CompressionConfig.from_dict(cfg_data, source=source)
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"--prompt {empty[0] + 1} is empty; every prompt needs text to continue")
    check_model_and_tp(model, tp)  # a TP size that does not divide the model fails before a conversion
    print(f"[demo] step 1/3: the model ({model}, converted for TP={tp} once, then cached)", flush=True)
    ckpt = assets.ensure_checkpoint(model, tp)
    meta = read_metadata(ckpt)
    if cfg_data is not None:
        mc = meta.model_config
        try:
            CompressionConfig.from_dict(cfg_data, source=source).check_model(mc.num_layers, mc.hidden_size, tp)
        except ConfigError as exc:
            if config:  # the user's own file: a real error
                raise
            print(f"[demo] skipping the searched config (made for SmolLM2-135M at TP=3): {exc}", flush=True)
            cfg_data = None
    variants: list[tuple[str, str | dict[str, Any]]] = [("none", "none")]
    if cfg_data is not None:
        variants.append((SEARCHED_LABEL, cfg_data))
    variants.append((spec, spec))
    print("[demo] step 2/3: held-out real text (State of the Union addresses, 2001-2021)", flush=True)
    ids = TextTokenizer.from_checkpoint(meta).tokenize(assets.eval_text())[: ppl_tokens + 1]
    names = ", ".join(n for n, _ in variants[1:])
    print(f"[demo] step 3/3: {tp} ranks over gloo, uncompressed vs {names}", flush=True)
    result = run_distributed(_demo_worker, tp, str(ckpt), variants, prompts, gen_tokens, ids, timeout_s=1800)[0]
    result["_meta"] = {
        "model": meta.source.get("name", str(ckpt)),
        "tp": tp,
        "spec": spec,
        "variants": [n for n, _ in variants],
        "config_source": source if cfg_data is not None else None,
        "prompts": prompts,
    }
    return result


def recommendation(result: dict[str, Any]) -> str:
    """One line: which setting to use when, from the measured perplexity increase and bits per value."""
    m = result["_meta"]
    base = result["none"]["ppl"]
    parts = []
    for name in m["variants"][1:]:
        r = result[name]
        bits = f"{r['bits']:.1f} bits/value" if r.get("bits") else "?"
        parts.append((name, 100 * (r["ppl"] / base - 1), r["wire_bytes"], bits))
    if not parts:
        return ""
    best_q = min(parts, key=lambda p: p[1])
    fewest = min(parts, key=lambda p: p[2])
    if best_q is fewest:
        return f"Use {best_q[0]}: best quality ({best_q[1]:+.1f}% perplexity) and fewest bytes ({best_q[3]})."
    return (
        f"Use the {best_q[0]} for quality ({best_q[1]:+.1f}% perplexity at {best_q[3]}); "
        f"{fewest[0]} when bytes matter most ({fewest[3]}, {fewest[1]:+.1f}% perplexity)."
    )


def report(result: dict[str, Any]) -> str:
    """The comparison as text: the generations side by side, a table (perplexity, bytes, bits, agreement,
    time) and the one-line recommendation."""
    m = result["_meta"]
    names = m["variants"]
    base = result["none"]
    cols = ["uncompressed" if n == "none" else n for n in names]
    w = max(14, *(len(c) for c in cols))
    head = ", ".join(c for c in cols[1:])
    lines = [f"\n{m['model']}, TP={m['tp']}, row-parallel all-reduces: uncompressed vs {head}"]
    if m.get("config_source"):
        lines.append(f"searched config: {m['config_source']}")
    lines.append("")
    agree: dict[str, list[int]] = {n: [] for n in names[1:]}
    for i, prompt in enumerate(m["prompts"]):
        lines.append(f"prompt: {prompt!r}")
        lines.append(f"  {'uncompressed':<{w}}: {base['text'][i]!r}")
        for n in names[1:]:
            comp = result[n]
            same = prefix_len(base["tokens"][i], comp["tokens"][i])
            agree[n].append(same)
            lines.append(f"  {n:<{w}}: {comp['text'][i]!r}   ({same}/{len(base['tokens'][i])} leading tokens equal)")

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<26}" + "".join(f" {c:>{w}}" for c in cells)

    n_tok = len(base["tokens"][0]) if base["tokens"] else 0
    lines += ["", row("", cols)]
    lines.append(
        row(
            "perplexity (held-out)",
            [f"{base['ppl']:.3f}"]
            + [f"{result[n]['ppl']:.3f} ({100 * (result[n]['ppl'] / base['ppl'] - 1):+.1f}%)" for n in names[1:]],
        )
    )
    base_mb = result[names[-1]]["baseline_wire_bytes"] / 2**20 if len(names) > 1 else 0.0
    lines.append(
        row(
            "TP bytes sent per rank",
            [f"{base_mb:.2f}MB"]
            + [
                f"{result[n]['wire_bytes'] / 2**20:.2f}MB "
                f"({result[n]['baseline_wire_bytes'] / max(result[n]['wire_bytes'], 1):.1f}x)"
                for n in names[1:]
            ],
        )
    )
    lines.append(
        row(
            "bits per value sent",
            ["32 (fp32)"] + [f"{result[n]['bits']:.2f}" if result[n].get("bits") else "-" for n in names[1:]],
        )
    )
    lines.append(
        row(
            f"greedy tokens agreeing/{n_tok}",
            ["-"] + [f"{sum(agree[n]) / max(len(agree[n]), 1):.1f}" for n in names[1:]],
        )
    )
    lines.append(row("generation time (CPU)", [f"{result[n]['gen_s']:.1f}s" for n in names]))
    lines += [
        "",
        "The model runs in fp32 here; the uncompressed column is Megatron's ring all-reduce of fp32 partials (x: how",
        "many times fewer bytes; halve it for bf16 partials). Greedy agreement: mean leading tokens equal to the",
        "uncompressed text. Time is loopback on a CPU, where the link is free and the codec is the cost; the bytes",
        "are what a slow link (PCIe, Ethernet) would carry (`tpcomp bench e2e` times a shaped link, as root).",
        "",
        recommendation(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from megatron_tpcomp.cliutil import positive_int

    p = argparse.ArgumentParser(prog="tpcomp demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint directory or smollm2-135m (default)")
    p.add_argument("--tp", type=positive_int, default=3, help="tensor-parallel size (default 3)")
    p.add_argument(
        "--spec", default="int4:g32+had", help="codec spec to compare with uncompressed (default int4:g32+had)"
    )
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument(
        "--config",
        default="",
        metavar="FILE",
        help=f"compression config (JSON/YAML) to compare too (default: the shipped {SEARCHED_CONFIG})",
    )
    cfg.add_argument("--no-config", action="store_true", help="compare uncompressed and --spec only")
    # 16 tokens (24 before there were three settings to run) keep the demo at about its old length on 2 cores.
    p.add_argument("--gen-tokens", type=positive_int, default=16, help="greedy tokens per prompt (default 16)")
    p.add_argument("--ppl-tokens", type=positive_int, default=512, help="tokens of held-out text for perplexity")
    p.add_argument("--prompt", action="append", help="a prompt (repeat); default: four fixed prompts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_tpcomp.assets import AssetError
    from megatron_tpcomp.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        config = None if args.no_config else args.config
        result = run(args.model, args.tp, args.spec, args.prompt, args.gen_tokens, args.ppl_tokens, config)
    except (ValueError, CheckpointError, AssetError) as exc:
        print(f"tpcomp demo: error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s")
    return 0
