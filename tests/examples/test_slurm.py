"""examples/slurm/run_text_generation.sbatch on a real (local) Slurm cluster, against direct torchrun runs.

Two nodes ``n1``, ``n2`` served by two slurmd on this machine (see slurm_cluster.py), CPU ranks over gloo:

- one-node job: the embedded SmolLM2-135M at TP=3 (its 9 heads / 3 KV heads allow TP 1 or 3 only), one
  launcher starting 3 ranks;
- two-node job: a tiny random-weight Llama at TP=2, one launcher per node starting one rank each, so the TP
  group really spans the two slurmd nodes (c10d rendezvous on ``n1``), with compression flags passed through.

Greedy decoding with the same ranks, checkpoint and prompts is deterministic, so each job must produce exactly
the tokens of a direct ``torchrun --standalone`` run of the same launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.examples.slurm_cluster import LocalSlurmCluster, SlurmUnavailable, local_slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.megatron, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "run_text_generation.sbatch"
LAUNCHER = ROOT / "examples" / "run_text_generation.py"
PROMPTS = ["The state of our union is", "Tonight I"]
TOKENS = 8
#: Flags shared by the Slurm jobs and the direct runs; short sequences keep the KV cache (and the run) small.
COMMON = ["--num-tokens-to-generate", str(TOKENS), "--micro-batch-size", "2", "--inference-max-seq-length", "64"]
#: Bounds on a 2-core machine that other jobs share: a job is seconds of generation after ~30-60 s of imports.
JOB_TIMEOUT_S = 600.0
#: config.json keys of the special token ids -> the checkpoint metadata's names for them.
BOS_EOS = {"bos_token_id": "bos_id", "eos_token_id": "eos_id"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """A two-node cluster for the module; the context manager stops every daemon and job, also on failure."""
    try:
        with local_slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c:
            yield c
    except SlurmUnavailable as exc:
        pytest.skip(f"no local Slurm cluster: {exc}")


@pytest.fixture(scope="module")
def smollm2_tp3() -> Path:
    from megatron_tpcomp import assets

    try:
        assets.default_gguf_path()
    except assets.AssetError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")
    return assets.ensure_checkpoint(assets.DEFAULT_MODEL, 3, progress=False)


@pytest.fixture(scope="module")
def tiny_llama_tp2(smollm2_tp3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama (4 heads, 2 KV heads: TP 2 divides it) with SmolLM2's tokenizer, at TP=2.

    Written as a Hugging Face directory (config.json, safetensors, tokenizer.json) and converted with the
    project's converter, as a user would; plain torch, because importing transformers alone costs tens of seconds
    on a loaded 2-core machine.
    """
    import torch
    from safetensors.torch import save_file

    from megatron_tpcomp.checkpoint import hf, read_metadata
    from megatron_tpcomp.checkpoint.convert import convert
    from megatron_tpcomp.megatron.model import ModelConfig

    meta = read_metadata(smollm2_tp3)
    assert meta.tokenizer_path is not None
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        vocab_size=meta.model_config.vocab_size,  # every id the tokenizer produces must be an embedding row
        max_sequence_length=128,
        tie_embeddings=False,
    )
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    shapes = {"embed_tokens": (v, h), "lm_head": (v, h), "q_proj": (nq, h), "k_proj": (nkv, h), "v_proj": (nkv, h)}
    shapes |= {"o_proj": (h, nq), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key in hf.expected_hf_keys(cfg):
        name = key.split(".")[-2]
        if name.endswith("norm"):  # RMSNorm gains around 1
            sd[key] = torch.empty(h).uniform_(0.5, 1.5, generator=gen)
        else:  # std 0.1 rather than HF's 0.02, so that logits are far from uniform and argmaxes are decisive
            sd[key] = torch.randn(shapes[name], generator=gen) * 0.1
    hf_dir = tmp_path_factory.mktemp("tiny-llama-hf")
    config = hf.hf_config_from_model(cfg) | {k: meta.tokenizer.get(i) for k, i in BOS_EOS.items()}
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "tokenizer.json").write_text(meta.tokenizer_path.read_text())  # picked up by the HF reader
    return convert(hf_dir, tmp_path_factory.mktemp("tiny-llama") / "tp2", 2, progress=False).path


def _prompts_file(d: Path) -> Path:
    f = d / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return f


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.contextmanager
def _direct_torchrun(nproc: int, args: list[str], out_dir: Path) -> Iterator[Callable[[], list[dict]]]:
    """The reference: the same launcher under a local ``torchrun --standalone`` (no Slurm), on CPU.

    Started in the background so that it overlaps the Slurm job (most of either run is imports); yields a
    function that waits for it and returns its records. Killed on the way out if the test fails first.
    """
    out, log = out_dir / "direct.jsonl", out_dir / "direct.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [str(LAUNCHER), *args, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "wb") as f:  # a file, not a pipe: nobody reads a pipe while the job runs, and it could fill up
        proc = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=f, stderr=subprocess.STDOUT)

    def records() -> list[dict]:
        rc = proc.wait(JOB_TIMEOUT_S)
        assert rc == 0, f"direct torchrun failed ({rc}):\n{log.read_text(errors='replace')[-4000:]}"
        return _records(out)

    try:
        yield records
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _job_env(out_dir: Path, **extra: str) -> dict[str, str]:
    """What the job needs from the submitting shell: this interpreter, CPU ranks, where to write."""
    return {"PYTHON": sys.executable, "TPCOMP_DEVICE": "cpu", "OUT_DIR": str(out_dir), **extra}


def test_one_node_job_runs_smollm2_at_tp3_like_direct_torchrun(
    cluster: LocalSlurmCluster, smollm2_tp3: Path, tmp_path: Path
):
    prompts = _prompts_file(tmp_path)
    out_dir = tmp_path / "job"
    env = _job_env(out_dir, MODEL_ENV="examples/slurm/models/smollm2-135m.env", CHECKPOINT=str(smollm2_tp3))
    # Submitted from the repository root (the script finds the launcher through it). The #SBATCH
    # account/partition placeholders are overridden on the command line, as a user would.
    sbatch = ["--nodes=1", "--partition=debug", "--account=test"]
    job = cluster.submit(SCRIPT, ["--prompts-file", str(prompts), *COMMON], env=env, sbatch_args=sbatch, cwd=ROOT)
    direct_args = ["--load", str(smollm2_tp3), "--prompts-file", str(prompts), *COMMON]
    with _direct_torchrun(3, direct_args, tmp_path) as direct:
        result = cluster.wait(job, JOB_TIMEOUT_S)
        assert result.state == "COMPLETED", result.describe()
        ref = direct()

    assert "1 node(s) x 3 rank(s) = TP 3 on cpu" in result.log
    got = _records(out_dir / "generations.jsonl")
    assert [r["id"] for r in got] == [0, 1]
    assert all(len(r["generated_tokens"]) == TOKENS for r in got)
    # Per-rank logs of the single launcher: ranks 0-2 of node 0.
    assert sorted(p.parent.name for p in (out_dir / "logs" / "node0").rglob("stderr.log")) == ["0", "1", "2"]
    assert [r["generated_tokens"] for r in got] == [r["generated_tokens"] for r in ref], result.describe()
    assert [r["generated_text"] for r in got] == [r["generated_text"] for r in ref]


def test_two_node_job_spans_tp2_over_both_nodes_like_direct_torchrun(
    cluster: LocalSlurmCluster, tiny_llama_tp2: Path, tmp_path: Path
):
    prompts = _prompts_file(tmp_path)
    out_dir = tmp_path / "job"
    model_env = tmp_path / "tiny-llama.env"  # a per-model settings file, like examples/slurm/models/*.env
    model_env.write_text(f"CHECKPOINT={tiny_llama_tp2}\nTP_SIZE=2\nTPCOMP_DEVICE=cpu\n")
    # Submitted from elsewhere, so the repository comes from TPCOMP_REPO; compression through the environment;
    # NPROC_PER_NODE is derived: TP 2 / 2 nodes = 1.
    env = _job_env(out_dir, MODEL_ENV=str(model_env), TPCOMP_REPO=str(ROOT), TPCOMP_COMPRESSION="int8:g32")
    sbatch = ["--nodes=2", "--partition=debug"]
    job = cluster.submit(SCRIPT, ["--prompts-file", str(prompts), *COMMON], env=env, sbatch_args=sbatch, cwd=tmp_path)
    direct_args = ["--load", str(tiny_llama_tp2), "--prompts-file", str(prompts), *COMMON]
    with _direct_torchrun(2, [*direct_args, "--tp-comm-compression", "int8:g32"], tmp_path) as direct:
        result = cluster.wait(job, JOB_TIMEOUT_S)
        assert result.state == "COMPLETED", result.describe()
        ref = direct()

    assert "2 node(s) x 1 rank(s) = TP 2 on cpu, rendezvous n1:" in result.log
    assert result.info["NodeList"] == "n[1-2]"
    # One launcher per node, each with its one rank: the TP group really spans the two slurmd nodes.
    for node in ("node0", "node1"):
        assert [p.parent.name for p in (out_dir / "logs" / node).rglob("stderr.log")] == ["0"], node
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["compression"] is not None and summary["bytes_saved_per_rank"] > 0, summary
    got = _records(out_dir / "generations.jsonl")
    assert all(len(r["generated_tokens"]) == TOKENS for r in got)
    assert [r["generated_tokens"] for r in got] == [r["generated_tokens"] for r in ref], result.describe()
