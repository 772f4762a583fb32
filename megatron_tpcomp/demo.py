"""The demo (``make demo`` / ``tpcomp demo``): a real pretrained LLM served with compressed TP communication.

Converts the embedded SmolLM2-135M once (cached), starts TP=3 local processes over gloo, and runs three
settings of the row-parallel all-reduces in the same ranks: uncompressed, the shipped searched per-layer config
(``megatron_tpcomp/configs/smollm2-135m-tp3-kl0.006.json``: INT4-8 per layer, found by ``tpcomp calibrate
--search`` under a KL budget) and one INT4 codec everywhere (``int4:g32+had``: Hadamard-rotated, groups of 32).
For each: greedy generation for a few prompts through megatron-core's static inference engine, perplexity on a
slice of held-out real text, and the bytes every rank sent. Prints a comparison and which to use when.

Run as root (with ``ip`` and ``tc``), it also times the three settings on a shaped link (``--link``, default
1 Gbit/s): the ranks in network namespaces joined by a tc-shaped veth, through :func:`megatron_tpcomp.bench.e2e.run`
(time to first token of one 512-token prompt, time per output token over a few decode steps; medians, slowest
rank). Loopback on a CPU makes the link free, so without root that timing is skipped, and the demo says why.
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
SEARCHED_CONFIG = "smollm2-135m-tp3-kl0.006.json"
#: Its column label in the report.
SEARCHED_LABEL = "searched config"
#: The shaped link timed when run as root: the comm-bound rate of ``tpcomp bench e2e`` (about half of the
#: baseline's prefill is TP communication there on a 2-core host).
DEFAULT_LINK = "1gbit"
#: Link timing: one prompt of this many tokens, this many generated (TTFT + decode steps for TPOT), repetitions
#: (medians; the settings alternate within each) after one untimed warm-up pass. Sized to add well under a minute
#: on 2 cores; 3 repetitions let :func:`recommendation` test that the ranges do not overlap.
LINK_PROMPT_TOKENS = 512
LINK_GEN_TOKENS = 4
LINK_REPS = 3
#: A link speedup is named in the recommendation only when at least this large and every repetition of the
#: setting beat every repetition of the baseline (a 2-core host's noise is ~5-10% per run).
CLEAR_SPEEDUP = 1.1


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
    from megatron_tpcomp.config import CompressionConfig
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron.generate import build_static_engine
    from megatron_tpcomp.session import rank_session
    from megatron_tpcomp.tokenizer import TextTokenizer

    with rank_session(ckpt, world_size) as session:
        model, meta = session.model, session.meta
        _say(rank, f"loaded {meta.source.get('name', ckpt)} shards on {world_size} ranks in {session.load_s:.1f} s")
        tok = TextTokenizer.from_checkpoint(meta)
        max_len = max(len(tok.tokenize(p)) for p in prompts) + gen_tokens + 8
        engine = build_static_engine(
            model, tok, vocab_size=meta.model_config.vocab_size, max_batch=len(prompts), max_seq_len=max_len,
            progress=False,
        )  # fmt: skip
        out: dict[str, Any] = {}
        for name, setting in variants:
            intercept.disable(model)
            intercept.reset_counts()
            if name != "none":
                cfg = setting if isinstance(setting, str) else CompressionConfig.from_dict(setting, source=name)
                intercept.enable(model, cfg, telemetry=True)
            out[name] = _demo_variant(rank, world_size, model, tok, engine, name, prompts, gen_tokens, ppl_ids)
    return out if rank == 0 else None


def _demo_variant(
    rank: int, world_size: int, model: torch.nn.Module, tok: Any, engine: Any, name: str, prompts: list[str],
    gen_tokens: int, ppl_ids: list[int],
) -> dict[str, Any]:  # fmt: skip
    """Generate, measure perplexity and count the bytes sent with the collectives as they are routed now."""
    from megatron_tpcomp.megatron import intercept
    from megatron_tpcomp.megatron.generate import greedy_generate

    label = "uncompressed" if name == "none" else name
    _say(rank, f"{label}: generating {gen_tokens} tokens for {len(prompts)} prompts ...")
    t0 = time.perf_counter()
    tokens = greedy_generate(engine, list(prompts), gen_tokens)
    gen_s = time.perf_counter() - t0
    traffic = intercept.telemetry_summary()
    bits = _bits_per_value(intercept.telemetry_records, world_size)
    _say(rank, f"{label}: perplexity on {len(ppl_ids) - 1} tokens of held-out text ...")
    t0 = time.perf_counter()
    ids = torch.tensor(ppl_ids)
    with torch.no_grad():
        logits = model(
            ids[:-1][None], torch.arange(len(ids) - 1)[None], attention_mask=None, runtime_gather_output=True
        )
    nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[1:]).item()
    return {
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


def _bits_per_value(records: list[tuple[str, Any]], world_size: int) -> float | None:
    """Payload bits per activation value over the one-shot all-reduces in ``records`` (a one-shot sends its
    payload to each of the ``world_size - 1`` peers; activations are fp32 here: 4 bytes a value), or None."""
    sent = values = 0.0
    for _, st in records:
        if st.algo == "one-shot" and st.fallback is None:
            sent += 8 * st.wire_bytes / max(world_size - 1, 1)
            values += st.raw_bytes / 4
    return sent / values if values else None


def rate_text(bps: int) -> str:
    """``1000000000`` -> ``"1 Gbit/s"`` (for the report's row labels)."""
    for unit, scale in (("Tbit/s", 10**12), ("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps} bit/s"


def time_on_link(
    ckpt: str,
    tp: int,
    rate: str,
    variants: list[tuple[str, str | dict[str, Any]]],
    *,
    prompt_tokens: int = LINK_PROMPT_TOKENS,
    gen_tokens: int = LINK_GEN_TOKENS,
    reps: int = LINK_REPS,
) -> dict[str, Any]:
    """TTFT and TPOT of the demo's ``variants`` on a ``rate`` link shaped with tc, through
    :func:`megatron_tpcomp.bench.e2e.run` (one launch of ``tp`` ranks in network namespaces; fp32).

    Returns ``{"rate", "rate_bps", "prompt_tokens", "gen_tokens", "reps", "by": {variant name: {ttft_ms, tpot_ms,
    ttft_times_ms, speedup, tpot_speedup}}}``, or ``{"skipped": reason}`` when the link cannot be shaped here (not
    root, no ``tc``, namespaces refused) or the timing run failed: the rest of the demo stands without it.
    """
    from megatron_tpcomp.bench import e2e
    from megatron_tpcomp.bench import link as linkmod
    from megatron_tpcomp.bench.ranks import BenchError

    bps = linkmod.parse_rate(rate)
    if bps is None:
        return {"skipped": f"--link {rate!r} is not a shaped rate"}
    reason = linkmod.unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    print(
        f"[demo] timing {len(variants)} settings on a {rate_text(bps)} link shaped with tc ({prompt_tokens}-token "
        f"prompt, {gen_tokens} tokens, {reps} repetitions) ...",
        flush=True,
    )
    specs = [s for n, s in variants if isinstance(s, str)]
    configs = {n: s for n, s in variants if not isinstance(s, str)}
    try:
        records = e2e.run(
            [rate],
            [prompt_tokens],
            specs,
            tp=tp,
            gen_tokens=gen_tokens,
            reps=reps,
            warmup=1,
            model=ckpt,
            timeout_s=600,
            log=lambda msg: print(f"[demo] {msg}", flush=True),
            configs=configs,
        )
    except (BenchError, ValueError) as exc:
        return {"skipped": f"the timing run failed: {exc}"}
    if not records or not records[0]["shaped"]:  # the link could not be built: loopback numbers mean nothing here
        info = records[0]["link_info"] if records else {}
        return {"skipped": f"cannot shape the link ({info.get('reason', 'unknown reason')})"}
    keep = ("ttft_ms", "tpot_ms", "ttft_times_ms", "speedup", "tpot_speedup")
    return {
        "rate": rate,
        "rate_bps": bps,
        "prompt_tokens": records[0]["prompt_tokens"],
        "gen_tokens": gen_tokens,
        "reps": reps,
        "by": {r["spec"]: {k: r[k] for k in keep} for r in records},
    }


def run(
    model: str = "smollm2-135m",
    tp: int = 3,
    spec: str = "int4:g32+had",
    prompts: list[str] | None = None,
    gen_tokens: int = 16,
    ppl_tokens: int = 512,
    config: str | None = "",
    link: str | None = None,
    link_prompt_tokens: int = LINK_PROMPT_TOKENS,
) -> dict[str, Any]:
    """Run the demo and return rank 0's measurements (also printed by :func:`main`).

    ``config``: a compression config file to compare; ``""`` (default) the shipped searched config, skipped with
    a note when it does not fit the model and TP size (it was searched for SmolLM2-135M at TP=3); None: none.
    ``link``: a tc rate (``"1gbit"``) to time the settings on afterwards (:func:`time_on_link`; its result, or
    the reason it was skipped, in ``result["link"]``); None (default): no link timing.
    """
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.cliutil import check_model_and_tp
    from megatron_tpcomp.codecs import make_codec
    from megatron_tpcomp.config import CompressionConfig, ConfigError
    from megatron_tpcomp.launch import run_distributed
    from megatron_tpcomp.tokenizer import TextTokenizer

    make_codec(spec)  # a bad spec fails before anything is converted or started
    if link is not None:
        from megatron_tpcomp.bench import link as linkmod

        linkmod.parse_rate(link)  # a typo fails before anything starts
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
    if link is not None:
        result["link"] = time_on_link(str(ckpt), tp, link, variants, prompt_tokens=link_prompt_tokens)
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
        line = f"Use {best_q[0]}: best quality ({best_q[1]:+.1f}% perplexity) and fewest bytes ({best_q[3]})."
    else:
        line = (
            f"Use the {best_q[0]} for quality ({best_q[1]:+.1f}% perplexity at {best_q[3]}); "
            f"{fewest[0]} when bytes matter most ({fewest[3]}, {fewest[1]:+.1f}% perplexity)."
        )
    return line + _link_clause(result.get("link"), m["variants"][1:])


def _link_clause(link: dict[str, Any] | None, names: list[str]) -> str:
    """`` On a 1 Gbit/s link (512 tokens) X cuts the time to first token 1.5x; Y is 2.0x slower.`` for the
    settings clearly faster or slower than uncompressed on the shaped link (a ratio of :data:`CLEAR_SPEEDUP` or
    more, and every repetition beyond every baseline repetition); ``""`` when none is, or there was no timing."""
    if not link or "by" not in link or "none" not in link["by"]:
        return ""
    base = link["by"]["none"]["ttft_times_ms"]
    faster, slower = [], []
    for name in names:
        r = link["by"].get(name)
        if not r or not r.get("speedup"):
            continue
        x, times = r["speedup"], r["ttft_times_ms"]
        if x >= CLEAR_SPEEDUP and max(times) < min(base):
            faster.append(f"{name} {x:.1f}x")
        elif 1 / x >= CLEAR_SPEEDUP and min(times) > max(base):
            slower.append(f"{name} is {1 / x:.1f}x slower")
    if not faster and not slower:
        return ""
    parts = []
    if faster:
        parts.append(f"the time to first token drops ({' and '.join(faster)})")
    if slower:
        parts.append(" and ".join(slower))
    rate, tokens = rate_text(link["rate_bps"]), link["prompt_tokens"]
    return f" On a {rate} link ({tokens} tokens) {'; '.join(parts)}."


def report(result: dict[str, Any]) -> str:
    """The comparison as text: the generations side by side, a table (perplexity, bytes, bits, agreement,
    time) and the one-line recommendation."""
    m = result["_meta"]
    names = m["variants"]
    cols = ["uncompressed" if n == "none" else n for n in names]
    w = max(14, *(len(c) for c in cols))
    head = ", ".join(c for c in cols[1:])
    lines = [f"\n{m['model']}, TP={m['tp']}, row-parallel all-reduces: uncompressed vs {head}"]
    if m.get("config_source"):
        lines.append(f"searched config: {m['config_source']}")
    lines.append("")
    generations, agree = _generations(result, w)
    lines += generations
    lines += ["", _row("", cols, w)] + _table(result, agree, w)
    lines += _notes(result.get("link"))
    lines += ["", recommendation(result)]
    return "\n".join(lines)


def _row(label: str, cells: list[str], w: int) -> str:
    return f"{label:<26}" + "".join(f" {c:>{w}}" for c in cells)


def _generations(result: dict[str, Any], w: int) -> tuple[list[str], dict[str, list[int]]]:
    """Each prompt's generations, uncompressed first, and per variant the leading tokens equal to it."""
    names = result["_meta"]["variants"]
    base = result["none"]
    lines: list[str] = []
    agree: dict[str, list[int]] = {n: [] for n in names[1:]}
    for i, prompt in enumerate(result["_meta"]["prompts"]):
        lines.append(f"prompt: {prompt!r}")
        lines.append(f"  {'uncompressed':<{w}}: {base['text'][i]!r}")
        for n in names[1:]:
            comp = result[n]
            same = prefix_len(base["tokens"][i], comp["tokens"][i])
            agree[n].append(same)
            lines.append(f"  {n:<{w}}: {comp['text'][i]!r}   ({same}/{len(base['tokens'][i])} leading tokens equal)")
    return lines, agree


def _table(result: dict[str, Any], agree: dict[str, list[int]], w: int) -> list[str]:
    """The table's rows: perplexity, bytes, bits, greedy agreement, time, and TTFT/TPOT on a shaped link."""
    names = result["_meta"]["variants"]
    base = result["none"]
    n_tok = len(base["tokens"][0]) if base["tokens"] else 0
    base_mb = result[names[-1]]["baseline_wire_bytes"] / 2**20 if len(names) > 1 else 0.0
    rows = [
        (
            "perplexity (held-out)",
            [f"{base['ppl']:.3f}"]
            + [f"{result[n]['ppl']:.3f} ({100 * (result[n]['ppl'] / base['ppl'] - 1):+.1f}%)" for n in names[1:]],
        ),
        (
            "TP bytes sent per rank",
            [f"{base_mb:.2f}MB"]
            + [
                f"{result[n]['wire_bytes'] / 2**20:.2f}MB "
                f"({result[n]['baseline_wire_bytes'] / max(result[n]['wire_bytes'], 1):.1f}x)"
                for n in names[1:]
            ],
        ),
        (
            "bits per value sent",
            ["32 (fp32)"] + [f"{result[n]['bits']:.2f}" if result[n].get("bits") else "-" for n in names[1:]],
        ),
        (
            f"greedy tokens agreeing/{n_tok}",
            ["-"] + [f"{sum(agree[n]) / max(len(agree[n]), 1):.1f}" for n in names[1:]],
        ),
        ("generation time (CPU)", [f"{result[n]['gen_s']:.1f}s" for n in names]),
    ]
    link = result.get("link")
    if link and "by" in link:
        rate = rate_text(link["rate_bps"])

        def cell(n: str, key: str, ratio: str) -> str:
            r = link["by"].get(n)
            if not r or r.get(key) is None:
                return "-"
            if n == "none" or r.get(ratio) is None:
                return f"{r[key]:.0f} ms"
            return f"{r[key]:.0f} ms ({r[ratio]:.2f}x)"

        rows.append((f"TTFT on {rate}", [cell(n, "ttft_ms", "speedup") for n in names]))
        rows.append((f"TPOT on {rate}", [cell(n, "tpot_ms", "tpot_speedup") for n in names]))
    return [_row(label, cells, w) for label, cells in rows]


def _notes(link: dict[str, Any] | None) -> list[str]:
    """What the columns mean, and how the shaped-link times were taken (or why they were skipped)."""
    lines = [
        "",
        "The model runs in fp32 here; the uncompressed column is Megatron's ring all-reduce of fp32 partials (x: how",
        "many times fewer bytes; halve it for bf16 partials). Greedy agreement: mean leading tokens equal to the",
        "uncompressed text. Generation time is loopback on a CPU, where the link is free and the codec is the cost.",
    ]
    if link and "by" in link:
        rate = rate_text(link["rate_bps"])
        lines += [
            f"TTFT/TPOT: one {link['prompt_tokens']}-token prompt, {link['gen_tokens']} tokens generated, ranks in "
            "network namespaces over a",
            f"tc-shaped {rate} link (x: faster than uncompressed); medians of {link['reps']} alternating "
            "repetitions, slowest rank.",
            "More prompt lengths and links: `tpcomp bench e2e` (--config FILE for a per-layer config).",
        ]
    elif link and "skipped" in link:
        lines.append(f"Time on a shaped link skipped: {link['skipped']}.")
    return lines


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
    lk = p.add_mutually_exclusive_group()
    lk.add_argument(
        "--link",
        default=None,
        metavar="RATE",
        help=f"also time the settings on a link shaped to RATE with tc (needs root; default {DEFAULT_LINK} when "
        "root, skipped with a note otherwise)",
    )
    lk.add_argument("--no-link", action="store_true", help="skip the shaped-link timing")
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
        link = None if args.no_link else (args.link or DEFAULT_LINK)
        result = run(args.model, args.tp, args.spec, args.prompt, args.gen_tokens, args.ppl_tokens, config, link)
    except (ValueError, CheckpointError, AssetError) as exc:
        print(f"tpcomp demo: error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s")
    return 0
