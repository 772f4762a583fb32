"""``scripts/gpu_check.sh``: the steps it lists with ``--dry-run``, ``--only``, that it reports every step past
failures, and that a step pytest skips (or that cannot import megatron-core) passes saying ``skipped: <reason>``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = (
    "env",
    "build_cuda_ext",
    "tests_gpu",
    "tests_gpu_float",
    "tests_interpret",
    "bench_kernels",
    "cuda_graph_capture",
    "tp_forward",
    "megatron_dynamic_engine",
)


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    # No wheels unless a test carries some: the checkout's gpu_wheels/ may hold real ones.
    env = {"GPU_CHECK_WHEELS": "/nonexistent/gpu_wheels", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_gpu_check_dry_run_lists_every_step():
    """Every step in order with its command and limit; the limits fit one 8-minute command; nothing is run."""
    res = run("--dry-run", "--out", "/nonexistent/gpu_check_out")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.strip().splitlines() if line.startswith("gpu_check: step ")]
    found = [m.group(1) for m in (re.match(r"gpu_check: step (\w+)", line) for line in lines) if m]
    assert found == [*STEPS, "report"], res.stdout
    by_step = dict(zip(found, lines, strict=True))
    assert "setup.py build_ext --inplace" in by_step["build_cuda_ext"]
    assert "cuda_int4_available" in by_step["build_cuda_ext"]  # a build that built nothing fails the step
    assert "env -u TRITON_INTERPRET" in by_step["tests_gpu"] and "tests/backends " in by_step["tests_gpu"]
    assert "tests/bench/test_bench_kernels_gpu.py" in by_step["tests_gpu"]
    assert "--ignore=tests/backends/test_triton_float.py" in by_step["tests_gpu"]
    assert "tests/backends/test_triton_float.py" in by_step["tests_gpu_float"]
    assert "TRITON_INTERPRET=1" in by_step["tests_interpret"]
    assert "-k 'interpret and (pins or no_sync)'" in by_step["tests_interpret"]
    assert "megatron_tpcomp.bench.triton_kernels" in by_step["bench_kernels"]
    assert "/nonexistent/gpu_check_out/bench.json" in by_step["bench_kernels"]
    assert "scripts/graph_check.py --spec int4:g32+had --forward-layers 2" in by_step["cuda_graph_capture"]
    assert "/nonexistent/gpu_check_out/graph_check.json" in by_step["cuda_graph_capture"]
    assert "scripts/tp_forward_check.py --device cuda --tp 3" in by_step["tp_forward"]
    assert "/nonexistent/gpu_check_out/tp_forward.json" in by_step["tp_forward"]
    dyn = by_step["megatron_dynamic_engine"]
    assert "tests/megatron_lm/test_dynamic_engine.py -k on_gpu" in dyn and "-rs" in dyn  # -rs: skip reasons
    assert "/nonexistent/gpu_check_out/gpu_check.json" in by_step["report"]
    limits = {s: int(re.search(r"\(limit (\d+) s\)", by_step[s]).group(1)) for s in STEPS}
    assert sum(limits.values()) <= 8 * 60 - 20, f"step limits {limits} leave no room in an 8-minute command"
    # tp_forward's own multi-process timeout ends before the step's limit, so it reports which rank hung.
    own = int(re.search(r"--timeout (\d+)", by_step["tp_forward"]).group(1))
    assert own + 5 <= limits["tp_forward"], (own, limits["tp_forward"])
    assert "wheels: none in /nonexistent/gpu_wheels" in res.stdout
    assert not Path("/nonexistent/gpu_check_out").exists()


def test_gpu_check_dry_run_shows_the_carried_wheels_install(tmp_path):
    """A wheel in the wheel folder: the env step installs it (no deps, no index) before anything else, into a
    folder every step has on PYTHONPATH."""
    wheel = tmp_path / "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    res = run("--dry-run", GPU_CHECK_WHEELS=str(tmp_path))
    assert res.returncode == 0, res.stderr
    site = f"{tmp_path}/site-packages"
    assert f"wheels: the env step installs {wheel} into {site}" in res.stdout
    assert re.search(rf"PYTHONPATH={re.escape(str(ROOT))}:{re.escape(site)}(:|$)", res.stdout, re.M), res.stdout
    env_line = next(line for line in res.stdout.splitlines() if line.startswith("gpu_check: step env "))
    install = f"-m pip install --disable-pip-version-check --no-deps --no-index --upgrade --target '{site}' {wheel}"
    assert install in env_line and env_line.index(install) < env_line.index("nvidia-smi"), env_line


def test_gpu_check_env_step_installs_a_carried_wheel(tmp_path):
    """A real (tiny, pure-Python) wheel is installed into the site folder by the env step, which then fails here
    without a GPU (nvidia-smi) after the install."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tpcomp_carried-0.1-py3-none-any.whl", "w") as z:
        z.writestr("tpcomp_carried/__init__.py", "VALUE = 42\n")
        dist = "tpcomp_carried-0.1.dist-info"
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: tpcomp-carried\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    out = tmp_path / "out"
    res = run("--only", "env", "--out", str(out), PYTHON=sys.executable, GPU_CHECK_WHEELS=str(wheels), TIMEOUT_ENV="60")
    assert res.returncode == 0, res.stderr
    log = (out / "env.log").read_text()
    assert "installing the carried wheels" in log, log
    assert (wheels / "site-packages" / "tpcomp_carried" / "__init__.py").exists(), log
    check = subprocess.run(
        [sys.executable, "-c", "import tpcomp_carried; print(tpcomp_carried.VALUE)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(wheels / "site-packages")},
    )
    assert check.stdout.strip() == "42", check.stderr


def test_gpu_check_only_selects_steps_in_order():
    res = run("--dry-run", "--only", "megatron_dynamic_engine,env")
    assert res.returncode == 0, res.stderr
    found = re.findall(r"gpu_check: step (\w+)", res.stdout)
    assert found == ["env", "megatron_dynamic_engine", "report"], res.stdout


@pytest.mark.parametrize("only", ["bench", "env,,nope"])
def test_gpu_check_only_rejects_unknown_steps(only):
    res = run("--dry-run", "--only", only)
    bad = "bench" if only == "bench" else ""
    assert res.returncode == 2, res.stdout
    assert f"--only: unknown step '{bad}'" in res.stderr and "megatron_dynamic_engine" in res.stderr


def test_gpu_check_rejects_unknown_argument():
    res = run("--fast")
    assert res.returncode == 2 and "unknown argument '--fast'" in res.stderr


def test_gpu_check_reports_every_step_past_failures(tmp_path):
    """With 1-second limits every step fails or times out here, and the JSON report still lists all of them."""
    limits = {f"TIMEOUT_{s.upper()}": "1" for s in STEPS}
    res = run("--out", str(tmp_path), PYTHON=sys.executable, **limits)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(STEPS)
    for step in report["steps"]:
        assert set(step) >= {"exit", "ok", "timed_out", "skipped", "seconds", "log_tail"}
        if not step["ok"]:
            assert step["exit"] != 0
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
        assert report["ok"] is False and not report["steps"][0]["ok"], "no GPU here: the env step must fail"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer; on a GPU the step runs the capture")
def test_cuda_graph_capture_step_says_skipped_without_cuda(tmp_path):
    res = run("--only", "cuda_graph_capture", "--out", str(tmp_path), PYTHON=sys.executable)
    assert res.returncode == 0, res.stderr
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert step["ok"] and step["skipped"] == ["no CUDA"], step
    assert "cuda_graph_capture=skipped" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer; on a GPU the step runs the TP forward")
def test_tp_forward_step_says_skipped_without_cuda(tmp_path):
    res = run("--only", "tp_forward", "--out", str(tmp_path), PYTHON=sys.executable)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (step,) = report["steps"]
    assert step["ok"] and step["skipped"] == ["no CUDA"], step
    assert report["tp_forward"]["status"] == "skipped" and report["tp_forward"]["tp"] == 3
    assert "tp_forward=skipped" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer: pytest skips the GPU test here")
def test_megatron_dynamic_engine_step_reports_pytest_s_skip_reason(tmp_path):
    """Here (no CUDA, no flash-attn) pytest skips the dynamic-engine GPU test; the step passes with its reason."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed: the step reports that instead")
    res = run("--only", "megatron_dynamic_engine", "--out", str(tmp_path), PYTHON=sys.executable)
    assert res.returncode == 0, res.stderr
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert step["ok"], step["log_tail"]
    (reason,) = step["skipped"]
    assert reason.startswith("the dynamic engine needs CUDA and flash-attn"), reason
    log = (tmp_path / "megatron_dynamic_engine.log").read_text()
    assert "megatron-core: installed" in log and "SKIPPED [2]" in log
    has_fa = importlib.util.find_spec("flash_attn") is not None
    assert ("flash-attn: installed" if has_fa else "flash-attn: not installed") in log


def test_megatron_dynamic_engine_step_without_megatron_core(tmp_path):
    """A ``megatron`` package without ``core`` first on the path (what a bare GPU machine's import sees: no
    megatron.core): the step says which package is missing and skips without running pytest."""
    (tmp_path / "path" / "megatron").mkdir(parents=True)
    (tmp_path / "path" / "megatron" / "__init__.py").write_text("")
    out = tmp_path / "out"
    res = run(
        "--only", "megatron_dynamic_engine", "--out", str(out), PYTHON=sys.executable, PYTHONPATH=str(tmp_path / "path")
    )
    assert res.returncode == 0, res.stderr
    (step,) = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert step["ok"] and step["skipped"] == [
        "megatron-core is not installed, so the dynamic-engine test cannot be imported"
    ], step
    log = (out / "megatron_dynamic_engine.log").read_text()
    assert "megatron-core: not installed (carry its wheel" in log and "passed" not in log and "SKIPPED" not in log


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_gpu_check_help(flag):
    res = run(flag)
    assert res.returncode == 0 and "--dry-run" in res.stdout


#: Kernels the compile check builds: integer formats (fp16 and e4m3 scales, the first with +chscale) and float
#: formats (E4M3/E5M2/E2M1/E3M2 elements, fp32/e4m3/e8m0/bf16 scales, nvfp4 with its amax pass, +had, +chscale).
COMPILE_INT_SPECS = ("int4:g32+chscale", "int5:g64:se4m3+had", "int6:g128+had:b128")
COMPILE_FLOAT_SPECS = (
    "fp8",
    "fp8-e5m2:b32:se4m3+had+chscale",
    "nvfp4+had:b16+chscale",
    "mxfp4",
    "fp6-e3m2:b32:sbf16",
)

COMPILE_CHECK = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.backends import triton as tc, triton_float as tf

assert not tc.INTERPRETED
INT_SPECS, FLOAT_SPECS = sys.argv[1].split(","), sys.argv[2].split(",")
f32, i32 = "fp32", "i32"
enc_sig = dict(x_ptr="*i16", payload_ptr="*u8", signs_ptr="*fp32", up_ptr="*fp32", n=i32, h=i32, nblocks=i32,
               scales_off=i32, exps_off=i32, rot_c=f32)
dec_sig = dict(payload_ptr="*u8", out_ptr="*bf16", signs_ptr="*fp32", down_ptr="*fp32", count=i32, nbytes=i32, n=i32,
               h=i32, nblocks=i32, scales_off=i32, exps_off=i32, rot_c=f32, clamp_max=f32, out_max=f32)
amax_sig = dict(x_ptr="*i16", up_ptr="*fp32", signs_ptr="*fp32", tmax_ptr="*i32", n=i32, n_inner=i32, h=i32,
                rot_c=f32)
fenc_sig = dict(x_ptr="*i16", payload_ptr="*u8", signs_ptr="*fp32", up_ptr="*fp32", tmax_ptr="*i32", n=i32,
                n_inner=i32, h=i32, nblocks=i32, scales_off=i32, tscale_off=i32, exps_off=i32, rot_c=f32, cap=f32,
                tcap=f32)
fdec_sig = dict(payload_ptr="*u8", out_ptr="*bf16", signs_ptr="*fp32", down_ptr="*fp32", count=i32, nbytes=i32,
                n=i32, h=i32, nblocks=i32, scales_off=i32, tscale_off=i32, exps_off=i32, rot_c=f32, clamp_max=f32,
                out_max=f32)


def kernels(spec):
    codec = make_codec(spec, channel_scale_exponents=[1, -2, 0, 3] if "chscale" in spec else None)
    plan = tc._split(codec)
    ch = plan.chscale is not None
    hb = plan.had.block if plan.had is not None else 0
    rot = dict(HB=hb, LOG_HB=hb.bit_length() - 1 if hb else 0)
    if spec in INT_SPECS:
        cx = tc._constexprs(plan.inner, plan.had)
        yield "encode", tc._encode_kernel, enc_sig, {**cx, "IN_BF16": True, "CH": ch}
        dec = {k: v for k, v in cx.items() if k not in ("LIM_MANT_BITS", "LIM_EXP")}
        yield "decode_sum", tc._decode_sum_kernel, dec_sig, {**dec, "OUT": 2, "CH": ch}
        return
    cx = tf.constexprs(plan.inner)
    common = dict(TILE_=tf.TILE, IN_BF16=True, CH=ch, **rot)
    if cx["TSCALE"]:
        yield "amax", tf._amax_kernel, amax_sig, dict(B=cx["B"], **common)
    yield "encode", tf._encode_kernel, fenc_sig, {**cx, **common}
    dec = {k: v for k, v in cx.items() if k not in tf.ENCODE_ONLY}
    yield "decode_sum", tf._decode_sum_kernel, fdec_sig, {**dec, "TILE_": tf.TILE, "OUT": 2, "CH": ch, **rot}


for arch, spec in itertools.product((80, 90), INT_SPECS + FLOAT_SPECS):
    for kind, kernel, sig, const in kernels(spec):
        signature = {**sig, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(kernel, signature, const), target=GPUTarget("cuda", arch, 32),
                           options={"enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        bad = [op for op in ("fma.", "div.full", "div.approx", "rcp.approx", ".ftz") if op in ptx]
        print(f"{kind} {spec} sm_{arch}: {'ok' if not bad else 'uses ' + ', '.join(bad)}")
"""


def test_triton_kernels_compile_for_sm80_sm90_without_fast_math():
    """The real Triton compiler (no GPU needed: PTX and ptxas only) builds the encode and decode-sum kernels (and
    nvfp4's amax pass) of integer and float formats, with +had and +chscale, for sm_80 and sm_90, and their PTX
    has no FMA contraction, no approximate division or reciprocal and no flush of subnormals to zero: what the
    interpreter tests cannot see (it caught a constexpr reassignment the interpreter accepts). bf16 inputs are
    compiled as what the host passes, their int16 bits."""
    pytest.importorskip("triton", reason="triton is not installed (the megatron-lm extra brings it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [",".join(COMPILE_INT_SPECS), ",".join(COMPILE_FLOAT_SPECS)]
    res = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip(f"triton's ptxas is unavailable here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    per_arch = (
        2 * len(COMPILE_INT_SPECS) + 2 * len(COMPILE_FLOAT_SPECS) + sum("nvfp4" in s for s in COMPILE_FLOAT_SPECS)
    )
    assert len(lines) == 2 * per_arch and all(line.endswith(": ok") for line in lines), res.stdout
