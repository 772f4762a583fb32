"""The torchrun text-generation launcher (examples/run_text_generation.py) on the embedded real model, TP=3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tpcomp import textgen
from megatron_tpcomp.launch import run_distributed

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "examples" / "run_text_generation.py"
PROMPTS = ["The state of our union is", "Tonight I"]
TOKENS = 6


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    cmd += [str(LAUNCHER), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _engine_tokens(rank: int, world_size: int, ckpt: str) -> list[list[int]]:
    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M
    from megatron_tpcomp.megatron.generate import build_static_engine, greedy_generate
    from megatron_tpcomp.tokenizer import TextTokenizer

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, meta = load_model(ckpt)
    tok = TextTokenizer.from_checkpoint(meta)
    engine = build_static_engine(model, tok, vocab_size=meta.model_config.vocab_size, max_seq_len=64, progress=False)
    return greedy_generate(engine, PROMPTS, TOKENS)


def test_launcher_generates_what_the_engine_generates(real_ckpt: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    proc = _torchrun(
        ["--load", str(real_ckpt), "--prompts-file", str(prompts), "--num-tokens-to-generate", str(TOKENS)]
        + ["--output", str(out), "--micro-batch-size", "2"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1]  # input keys are carried through, in order
    assert all(r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 and r["generated_text"] for r in records)
    assert "compression summary: off" in proc.stderr
    expected = run_distributed(_engine_tokens, 3, str(real_ckpt), timeout_s=300)[0]
    assert [r["generated_tokens"] for r in records] == expected


def test_launcher_applies_the_compression_config_recorded_in_the_checkpoint(real_ckpt: Path, tmp_path: Path):
    from megatron_tpcomp.checkpoint.convert import convert

    cfg = {"default": "int8:g32", "layers": {"0": {"mlp": "none"}}}
    ckpt = convert(real_ckpt, tmp_path / "ck", 3, compression=cfg, progress=False).path
    summary = tmp_path / "summary.json"
    proc = _torchrun(
        ["--load", str(ckpt), "--prompt", PROMPTS[0], "--num-tokens-to-generate", "3", "--summary-json", str(summary)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compression from checkpoint" in proc.stderr
    s = json.loads(summary.read_text())
    assert s["per_layer_codec"]["0"]["mlp"] == "none" and s["per_layer_codec"]["1"]["mlp"].startswith("int8:g32")
    # int8 with fp16 scales per 32 (8.5 bits) one-shot to 2 peers vs the fp32 ring: (2 * 8.5/8) / (4/3 * 4) -> 2.5x
    assert 2.3 < s["ratio"] < 2.6, s["ratio"]
    assert s["bytes_saved_per_rank"] > 0


def test_launcher_errors_are_clear(real_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert textgen.main(["--load", str(real_ckpt)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert textgen.main(["--load", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"txt": "neither text nor prompt"}\n')
    assert textgen.main(["--load", str(real_ckpt), "--prompts-file", str(bad)]) == 2
    assert 'p.jsonl:1: expected an object with a string "text" (or "prompt")' in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # the flag's own type check: a usage error
        textgen.main(["--load", str(real_ckpt), "--prompt", "x", "--tp-comm-compression", "int4:g3x"])
    assert info.value.code == 2 and "int4:g3x" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        textgen.main(["--load", str(real_ckpt), "--prompt", "x", "--micro-batch-size", "0"])
    assert info.value.code == 2 and "argument --micro-batch-size: expected an integer >= 1, got '0'" in (
        capsys.readouterr().err
    )


# ------------------------------------------------------------------- Megatron-LM's flag names, installed launcher


def _value(argv: list[str], dest: str) -> object:
    return getattr(textgen.build_parser().parse_args(["--load", "ck", *argv]), dest)


@pytest.mark.parametrize(
    ("dest", "megatron", "older"),
    [
        ("prompt", ["--prompts", "a", "b c"], ["--prompt", "a", "--prompt", "b c"]),
        ("prompts_file", ["--prompt-file", "p.jsonl"], ["--prompts-file", "p.jsonl"]),
        ("top_k", ["--top_k", "5"], ["--top-k", "5"]),
        ("output", ["--output-path", "o.jsonl"], ["--output", "o.jsonl"]),
        ("output", ["--output-path", "o.jsonl"], ["--out", "o.jsonl"]),
        ("summary_json", ["--json", "s.json"], ["--summary-json", "s.json"]),
        ("tp", ["--tensor-model-parallel-size", "2"], ["--tp", "2"]),
        ("gen_tokens", ["--num-tokens-to-generate", "7"], ["--gen-tokens", "7"]),
        ("quiet", ["--quiet"], ["-q"]),
    ],
)
def test_launcher_aliases_parse_to_the_same_value(dest: str, megatron: list[str], older: list[str]) -> None:
    assert _value(megatron, dest) == _value(older, dest)
    assert _value(megatron, dest) != _value([], dest)  # the flag set something other than the default


def test_launcher_load_alias_and_prompts_mix() -> None:
    p = textgen.build_parser()
    assert p.parse_args(["--model", "ck"]).model == p.parse_args(["--load", "ck"]).model == "ck"
    # --prompts (Megatron-LM, several at once) and --prompt (repeatable) add to one list, in command-line order
    assert p.parse_args(["--load", "ck", "--prompt", "x", "--prompts", "y", "z"]).prompt == ["x", "y", "z"]


def test_launcher_timeout_in_minutes_or_seconds() -> None:
    p = textgen.build_parser()
    assert textgen.dist_timeout_s(p.parse_args(["--load", "ck"])) == 600.0  # Megatron-LM's default, 10 minutes
    assert textgen.dist_timeout_s(p.parse_args(["--load", "ck", "--distributed-timeout-minutes", "2"])) == 120.0
    assert textgen.dist_timeout_s(p.parse_args(["--load", "ck", "--dist-timeout", "90"])) == 90.0
    both = p.parse_args(["--load", "ck", "--distributed-timeout-minutes", "2", "--dist-timeout", "90"])
    with pytest.raises(ValueError, match="give one of the two"):
        textgen.dist_timeout_s(both)


def test_prompt_file_takes_megatron_lms_text_key(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "Hello", "id": 3}) + "\n\n" + json.dumps({"prompt": "Bye", "text": "x"}) + "\n")
    args = textgen.build_parser().parse_args(["--load", "ck", "--prompts", "first", "--prompt-file", str(path)])
    assert textgen.read_prompts(args) == [
        {"prompt": "first"},
        {"text": "Hello", "id": 3, "prompt": "Hello"},  # the line's keys are kept, the prompt under "prompt" too
        {"prompt": "Bye", "text": "x"},  # "prompt" wins when a line has both
    ]


@pytest.mark.parametrize(
    "cmd",
    [["-m", "megatron_tpcomp.cli", "generate", "--help"], ["-m", "megatron_tpcomp.textgen", "--help"]],
    ids=["tpcomp generate", "python -m megatron_tpcomp.textgen"],
)
def test_installed_launcher_help(cmd: list[str]) -> None:
    # Both run from the installed package, not from examples/: the working directory is not the repository.
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--prompts", "--prompt-file", "--top_k", "--output-path", "--distributed-timeout-minutes"):
        assert flag in proc.stdout
    assert proc.stdout.count("(default: the checkpoint's)") == 1 and "(default: None)" not in proc.stdout


def test_tpcomp_generate_at_tp1_says_compression_is_a_no_op(real_assets: None, tmp_path: Path) -> None:
    # One real rank (TP=1) through `tpcomp generate`, which starts torchrun itself, with Megatron-LM's flag names.
    from megatron_tpcomp import assets

    ckpt = assets.ensure_checkpoint(assets.DEFAULT_MODEL, 1, progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": PROMPTS[1], "id": "file"}) + "\n")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    argv = ["generate", "--load", str(ckpt), "--tensor-model-parallel-size", "1", "--prompts", PROMPTS[0]]
    argv += ["--prompt-file", str(prompts), "--num-tokens-to-generate", "3", "--top_k", "1"]
    argv += ["--output-path", str(out), "--json", str(summary), "--distributed-timeout-minutes", "5"]
    argv += ["--tp-comm-compression", "int4:g32+had"]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_tpcomp.cli", *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in records] == [None, "file"]
    assert all(len(r["generated_tokens"]) == 3 for r in records)
    # Before: "compression from flags: default int4:g32+had" and "compression summary: 0.00 MB ... (1.00x, ...)"
    assert proc.stderr.count("compression is a no-op at TP=1 (nothing is exchanged)") >= 2, proc.stderr[-3000:]
    assert "1.00x" not in proc.stderr and "compression enabled" not in proc.stderr
    s = json.loads(summary.read_text())
    assert s["tp"] == 1 and s["wire_bytes_per_rank"] == 0 and s["uncompressed_bytes_per_rank"] == 0
