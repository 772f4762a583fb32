"""megatron-core's dynamic inference engine with the plug-in: where it runs, and exactly why not on a CPU.

In Megatron-LM 0.16 ``gpt_static_inference.py``'s default engine is ``StaticInferenceEngine(legacy=False)``,
which builds a ``DynamicInferenceEngine`` and, if that raises, warns "Error initializing dynamic engine: ..."
and falls back to the legacy static engine. On a CPU the CUDA-only calls before attention are patched
(megatron_tpcomp.megatron.cpu D1/D2: ``torch.cuda.synchronize``, pinned sampling metadata); what remains is
attention itself: under dynamic batching megatron-core computes it over the paged KV cache only with
flash-attn's CUDA kernels. These tests pin that boundary (the fallback must name flash-attn, never a CUDA call we
could redirect); check that the script's default command, on a Megatron ``torch_dist`` checkpoint (written by
megatron-core's own saver, read by Megatron-LM's own loader with ``--use-checkpoint-args``), still generates the
launcher's tokens and bytes with compression; and, on a CUDA machine with flash-attn, run the dynamic engine
itself through the zero-edit launch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_tpcomp.checkpoint import megatron_args, read_metadata
from megatron_tpcomp.launch import run_distributed
from tests.checkpoint.test_torch_dist import export, mcore_writes_common_inside_index
from tests.megatron_lm.test_static_inference import PROMPTS, SPEC, TOKENS, _launcher, _static_script

pytestmark = pytest.mark.megatron
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU boundary; the GPU test covers CUDA")
FALLBACK = "Error initializing dynamic engine"


def _dynamic_engine_error(rank: int, world_size: int, dynamic_patches: bool) -> dict[str, object]:
    """Build Megatron's default (non-legacy) engine around a small GPT model on CPU; what its fallback said."""
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine

    from megatron_tpcomp.megatron import cpu, generate
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu(inference=True, dynamic=dynamic_patches)
    M.init_parallel(world_size)
    cfg = M.ModelConfig()
    gpt = M.build_gpt_model(cfg, world_size, seed=0)
    legacy = generate.build_static_engine(gpt, generate.ByteTokenizer(), vocab_size=cfg.vocab_size, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = StaticInferenceEngine(legacy.controller, max_batch_size=4, legacy=False, buffer_size_gb=0.01)
    said = [str(w.message) for w in caught if FALLBACK in str(w.message)]
    return {"fell_back": engine.legacy, "said": said}


@CPU_ONLY
@pytest.mark.skipif(
    mcore_writes_common_inside_index(),
    reason="the D1/D2 patches target megatron-core 0.16.1's dynamic engine; 0.17+ pins memory elsewhere (not patched)",
)
def test_on_cpu_the_dynamic_engine_stops_only_at_flash_attention() -> None:
    without, with_patches = (run_distributed(_dynamic_engine_error, 1, d, timeout_s=240)[0] for d in (False, True))
    # Without D1/D2 it stops at the first CUDA-only call, which is only a memory kind on a CPU.
    assert without["fell_back"] and "pin_memory" in without["said"][0], without
    # With them the context, controller and engine are built and the warm-up step reaches attention, whose
    # paged-KV kernels are flash-attn's (CUDA only): the one reason left.
    assert with_patches["fell_back"], with_patches
    (said,) = with_patches["said"]
    assert "flash_attn" in said or "flash attn" in said, said
    assert "pin_memory" not in said and "CUDA" not in said, said


@CPU_ONLY
@pytest.mark.slow
def test_the_scripts_default_engine_on_a_torch_dist_checkpoint_with_compression_equals_the_launcher(
    megatron_lm_dir: Path, described_ckpt: Path, tmp_path: Path
) -> None:
    """What a user holding a Megatron torch_dist checkpoint types: its --load with --use-checkpoint-args, the
    dynamic engine's buffer flag (no --use-legacy-static-engine), and the one compression flag."""
    pytest.importorskip("psutil", reason="megatron-core's torch_dist saver needs psutil (pip install psutil)")
    td = tmp_path / "td"
    written = export(described_ckpt, td, 3)  # megatron-core's own saver, 3 gloo ranks
    assert written.returncode == 0, written.stderr[-3000:]
    meta = read_metadata(described_ckpt)
    out = tmp_path / "megatron.json"
    flags = ["--load", str(td), "--use-checkpoint-args", "--tensor-model-parallel-size", "3"]
    flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(td)]
    # --use-checkpoint-args leaves norm_epsilon alone (megatron_args.py): given as `tpcomp megatron-args` does.
    flags += ["--norm-epsilon", repr(meta.model_config.norm_epsilon)]
    flags += [f for flag in megatron_args.CPU_FLAGS for f in flag.split()]
    flags += ["--tp-comm-compression", SPEC, "--tp-comm-compression-summary", str(tmp_path / "summary-{rank}.json")]
    flags += ["--prompts", *PROMPTS, "--num-tokens-to-generate", str(TOKENS), "--top_k", "1"]
    flags += ["--output-path", str(out), "--inference-dynamic-batching-buffer-size-gb", "0.2"]
    proc = _static_script(megatron_lm_dir, flags, tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert f"loading release distributed checkpoint from {td}" in proc.stdout  # Megatron-LM's torch_dist loader
    assert "Setting rotary_base to 100000 from checkpoint" in proc.stdout  # the args our writer stored
    reasons = [line for line in proc.stderr.splitlines() if FALLBACK in line]
    assert len(reasons) == 3, proc.stderr[-3000:]  # every rank tried the dynamic engine, and said why not
    assert all(("flash_attn" in r or "flash attn" in r) and "pin_memory" not in r for r in reasons), reasons
    results = json.loads(out.read_text())
    got = [results[k]["generated_tokens"] for k in sorted(results, key=int)]
    expected, launcher_summary = _launcher(described_ckpt, tmp_path, SPEC)
    assert all(len(t) == TOKENS for t in expected)
    assert got == expected  # greedy, same fp32 model and compressed collectives: the same tokens
    for rank in range(3):
        mine = json.loads((tmp_path / f"summary-{rank}.json").read_text())
        assert mine["wire_bytes_per_rank"] == launcher_summary["wire_bytes_per_rank"] > 0, rank
        assert mine["per_site"] == launcher_summary["per_site"], rank


# ------------------------------------------------------------------------------------------------------- GPU


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None or importlib.util.find_spec("flash_attn_3") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _has_flash_attn(),
    reason="the dynamic engine needs CUDA and flash-attn (>= 2.7.3): megatron-core computes its paged attention "
    "only with flash-attn kernels",
)
@pytest.mark.parametrize("spec", [None, SPEC], ids=["stock", "int4-had"])
def test_dynamic_engine_on_gpu_through_the_zero_edit_launch(
    megatron_lm_dir: Path, described_ckpt: Path, tmp_path: Path, spec: str | None
) -> None:
    """Not run on the CPU machines of CI (skipped); the GPU check runs it. TP = 3 with three GPUs (SmolLM2's
    9 heads / 3 KV groups allow TP 1 or 3), else 1, where compression has nothing to send."""
    tp = 3 if torch.cuda.device_count() >= 3 else 1
    meta = read_metadata(described_ckpt)
    base = " ".join(megatron_args.flag_line(meta.model_config, tp, meta.dtype, described_ckpt, cpu=True)).split()
    # flash-attn computes in bf16/fp16 only; the fp32 checkpoint is cast by Megatron's Float16Module.
    base += ["--bf16", "--prompts", *PROMPTS, "--num-tokens-to-generate", str(TOKENS), "--top_k", "1"]
    if spec:
        base += ["--tp-comm-compression", spec, "--tp-comm-compression-summary", str(tmp_path / "s-{rank}.json")]
    runs = {}
    for engine, extra in (("dynamic", ["--inference-dynamic-batching-buffer-size-gb", "2"]), ("legacy", [])):
        out = tmp_path / f"{engine}.json"
        extra = extra + (["--use-legacy-static-engine"] if engine == "legacy" else [])
        script = megatron_lm_dir / "examples" / "inference" / "gpt" / "gpt_static_inference.py"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)]
        cmd += ["-m", "megatron_tpcomp.megatron_lm", str(script), *base, "--output-path", str(out), *extra]
        env = {k: v for k, v in os.environ.items() if k != "TPCOMP_COMPRESSION"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, (engine, proc.stderr[-4000:])
        if engine == "dynamic":
            assert FALLBACK not in proc.stderr, proc.stderr[-3000:]  # the dynamic engine itself ran
        results = json.loads(out.read_text())
        runs[engine] = [results[k]["generated_tokens"] for k in sorted(results, key=int)]
        if spec and tp > 1:
            summaries = [json.loads((tmp_path / f"s-{r}.json").read_text()) for r in range(tp)]
            assert all(s["wire_bytes_per_rank"] == summaries[0]["wire_bytes_per_rank"] > 0 for s in summaries)
            assert all(s["per_site"] == summaries[0]["per_site"] for s in summaries)
    assert all(len(t) == TOKENS for t in runs["dynamic"])
    # bf16 flash-attn vs the legacy engine's unfused attention round differently: the prefill's greedy choice
    # (largest logit, a margin far above bf16 rounding for these prompts) must agree; later tokens may diverge
    # after a near-tie.
    assert [t[0] for t in runs["dynamic"]] == [t[0] for t in runs["legacy"]], runs
