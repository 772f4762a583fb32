"""Megatron-LM's unmodified ``examples/inference/gpt/gpt_static_inference.py`` through the zero-edit launch
(``python -m megatron_tpcomp.megatron_lm``): SmolLM2-135M at TP=3 over gloo on CPU, with and without
``--tp-comm-compression int4:g32+had``. Its tokens must equal the project's launcher's (megatron_tpcomp.textgen)
and every rank's bytes (per site) its telemetry: the same model, engine and collectives, started by Megatron-LM's
own ``initialize_megatron``/``get_model``/``load_checkpoint``. Also: ``--use-checkpoint-args`` with no
architecture flag, a wrong architecture flag refused before the model is built, a bad spec refused while
parsing, and the shards' Megatron-LM ``args``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tpcomp.checkpoint import megatron_args, read_metadata

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch; the GPU check covers CUDA"),
]

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The state of our union is", "Tonight I"]
TOKENS = 8
SPEC = "int4:g32+had"


def _torchrun(target: list[str], cwd: Path, timeout: int = 540) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", *target]
    env = {k: v for k, v in os.environ.items() if k != "TPCOMP_COMPRESSION"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _static_script(lm_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = lm_dir / "examples" / "inference" / "gpt" / "gpt_static_inference.py"
    return _torchrun(["-m", "megatron_tpcomp.megatron_lm", str(script), *args], cwd)


def _generation_flags(out: Path) -> list[str]:
    return [
        "--prompts",
        *PROMPTS,
        "--num-tokens-to-generate",
        str(TOKENS),
        "--top_k",
        "1",
        "--output-path",
        str(out),
        # The script's default engine tries the dynamic engine first, whose 40 GB buffer CPU RAM refuses, then
        # falls back to this one; asking for it directly skips the doomed allocation.
        "--use-legacy-static-engine",
    ]


def _launcher(ckpt: Path, tmp: Path, spec: str | None) -> tuple[list[list[int]], dict]:
    out, summary = tmp / "textgen.jsonl", tmp / "textgen-summary.json"
    args = [
        str(ROOT / "examples" / "run_text_generation.py"),
        "--load",
        str(ckpt),
        "--num-tokens-to-generate",
        str(TOKENS),
    ]
    for p in PROMPTS:
        args += ["--prompt", p]
    args += ["--output", str(out), "--summary-json", str(summary)]
    if spec:
        args += ["--tp-comm-compression", spec]
    proc = _torchrun(args, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = [json.loads(line)["generated_tokens"] for line in out.read_text().splitlines()]
    return tokens, json.loads(summary.read_text())


@pytest.mark.parametrize("spec", [None, SPEC], ids=["stock", "int4-had"])
def test_unmodified_static_script_equals_the_project_launcher(
    megatron_lm_dir: Path, described_ckpt: Path, tmp_path: Path, spec: str | None
) -> None:
    meta = read_metadata(described_ckpt)
    out = tmp_path / "megatron.json"
    if spec is None:
        # Every architecture flag as `tpcomp megatron-args --cpu` prints it.
        flags = " ".join(megatron_args.flag_line(meta.model_config, 3, meta.dtype, described_ckpt, cpu=True)).split()
        flags += ["--tp-comm-compression-summary", str(tmp_path / "summary-{rank}.json")]
    else:
        # --use-checkpoint-args: no architecture flag at all, the shards' args provide them.
        flags = ["--load", str(described_ckpt), "--use-checkpoint-args", "--tensor-model-parallel-size", "3"]
        flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(described_ckpt)]
        flags += [f for flag in megatron_args.CPU_FLAGS for f in flag.split()]
        flags += ["--tp-comm-compression", spec, "--tp-comm-compression-summary", str(tmp_path / "summary-{rank}.json")]
    proc = _static_script(megatron_lm_dir, [*flags, *_generation_flags(out)], tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    if spec is not None:
        assert "Setting rotary_base to 100000 from checkpoint" in proc.stdout
        assert "Setting num_layers to 30 from checkpoint" in proc.stdout
    results = json.loads(out.read_text())
    got = [results[k]["generated_tokens"] for k in sorted(results, key=int)]
    assert [results[k]["input_prompt"] for k in sorted(results, key=int)] == PROMPTS

    expected, launcher_summary = _launcher(described_ckpt, tmp_path, spec)
    assert all(len(t) == TOKENS for t in expected)
    assert got == expected  # greedy, same fp32 model and collectives: exactly the same tokens

    if spec is None:
        assert "compression off" in proc.stdout
        assert launcher_summary["wire_bytes_per_rank"] == 0
        assert not list(tmp_path.glob("summary-*.json"))  # nothing compressed, nothing to summarise
        return
    assert "compression summary:" in proc.stdout
    for rank in range(3):
        mine = json.loads((tmp_path / f"summary-{rank}.json").read_text())
        # The launcher writes rank 0's summary; every TP rank sends the same bytes in these collectives.
        assert mine["wire_bytes_per_rank"] == launcher_summary["wire_bytes_per_rank"] > 0, rank
        assert mine["uncompressed_bytes_per_rank"] == launcher_summary["uncompressed_bytes_per_rank"], rank
        assert mine["per_site"] == launcher_summary["per_site"], rank
        assert mine["per_layer_codec"]["29"]["mlp"] == "int4:g32:sfp16+had:b32"
    # int4 + fp16 scale per 32 (4.5 bits) one-shot to 2 peers vs the fp32 ring (4/3 * 32 bits): ~4.7x
    assert 4.0 < launcher_summary["ratio"] < 5.5


def test_wrong_architecture_flag_is_refused_before_the_model_is_built(
    megatron_lm_dir: Path, described_ckpt: Path, tmp_path: Path
) -> None:
    meta = read_metadata(described_ckpt)
    flags = " ".join(megatron_args.flag_line(meta.model_config, 3, meta.dtype, described_ckpt, cpu=True)).split()
    flags[flags.index("--rotary-base") + 1] = "10000"  # Megatron-LM alone "successfully loads" this one
    proc = _static_script(megatron_lm_dir, [*flags, *_generation_flags(tmp_path / "o.json")], tmp_path)
    assert proc.returncode != 0
    assert "--rotary-base 10000 (checkpoint: 100000)" in proc.stderr
    assert "number of parameters" not in proc.stdout  # get_model never built it
    assert not (tmp_path / "o.json").exists()


def test_bad_spec_is_refused_while_parsing(megatron_lm_dir: Path, described_ckpt: Path, tmp_path: Path) -> None:
    flags = ["--load", str(described_ckpt), "--use-checkpoint-args", "--tensor-model-parallel-size", "3"]
    flags += ["--tp-comm-compression", "int4:g7"]
    proc = _static_script(megatron_lm_dir, [*flags, *_generation_flags(tmp_path / "o.json")], tmp_path)
    assert proc.returncode != 0
    assert "argument --tp-comm-compression: 'int4:g7'" in proc.stderr
    assert "loading release checkpoint" not in proc.stdout and "number of parameters" not in proc.stdout


def test_shards_carry_megatron_lm_args_and_the_tokenizer_its_config(described_ckpt: Path) -> None:
    from tokenizers import Tokenizer

    meta = read_metadata(described_ckpt)
    for rank in range(3):
        with megatron_args.safe_globals():
            blob = torch.load(described_ckpt / f"release/mp_rank_{rank:02d}/model_optim_rng.pt", weights_only=True)
        args = blob["args"]
        assert blob["iteration"] == 0 and blob["checkpoint_version"] == 3.0
        assert (args.num_layers, args.hidden_size, args.ffn_hidden_size) == (30, 576, 1536)
        assert (args.num_attention_heads, args.num_query_groups, args.kv_channels) == (9, 3, 64)
        assert args.rotary_base == 100000 and isinstance(args.rotary_base, int)  # Megatron-LM's type=int
        assert args.tensor_model_parallel_size == 3 and args.padded_vocab_size == 49152
        assert args.untie_embeddings_and_output_weights is False and args.swiglu and not args.add_bias_linear
    config = json.loads((described_ckpt / "tokenizer_config.json").read_text())
    tk = Tokenizer.from_file(str(described_ckpt / "tokenizer.json"))
    assert tk.token_to_id(config["eos_token"]) == meta.tokenizer["eos_id"] == 2
    assert tk.token_to_id(config["bos_token"]) == meta.tokenizer["bos_id"] == 1
