#!/usr/bin/env bash
# One-command GPU check (issue 18): runs every step, continues past failures, writes one JSON report.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--only STEP[,STEP...]]
#
# Steps (each under its own time limit; the limits add up to 460 s, so the whole check fits one 8-minute command
# on one H100/H200 with room for the report):
#   env              installs the carried wheels (below), then nvidia-smi, python, torch (CUDA), triton, nvcc
#                    versions
#   build_cuda_ext   python setup.py build_ext --inplace (the INT4 CUDA extension, for this GPU's arch only)
#   tests_gpu        pytest tests/backends (but the CPU library's and nvcc's tests, which CI runs) and the GPU test
#                    of tpcomp bench kernels, TRITON_INTERPRET unset: the Triton kernels compiled for the GPU
#                    against the torch reference on CUDA tensors, the INT4 CUDA kernels, the dispatch, TE's FP8
#   tests_gpu_float  pytest tests/backends/test_triton_float.py on the GPU: the fp8 / nvfp4 / minifloat and +chscale
#                    Triton kernels compiled for it, against the reference (its own step: many kernel variants)
#   tests_interpret  the interpreter tests that pin rounding and the no-sync property, TRITON_INTERPRET=1 (CI runs
#                    all of them; here they show the interpreter on this machine agrees)
#   bench_kernels    python -m megatron_tpcomp.bench.triton_kernels: GB/s of the Triton encode/decode-sum vs the
#                    device's copy bandwidth, decode (1x576) and prefill (8 MiB) sizes, JSON in DIR/bench.json
#   cuda_graph_capture  python scripts/graph_check.py: one compressed all_reduce (encode + decode_sum of
#                    int4:g32+had through the dispatch, TPCOMP_BACKEND=auto and =reference) captured in a CUDA
#                    graph, replayed on two inputs and bit-compared with eager; then a whole compressed forward
#                    (2-layer random SmolLM2-shaped megatron-core model, rank 0 of a fake TP=3 world, the
#                    plug-in's real all-reduce path; needs megatron-core) captured and bit-compared the same way;
#                    JSON in DIR/graph_check.json
#   tp_forward       python scripts/tp_forward_check.py --device cuda: three gloo ranks share the GPU (CUDA
#                    tensors) and run a random SmolLM2-135M-shaped megatron-core model at TP=3, uncompressed vs
#                    fp8, int4:g32+had and the shipped searched config through the plug-in: max |logit diff|,
#                    top-1 agreement, KL, bytes sent, ms per forward, kernel backends; JSON in DIR/tp_forward.json
#   megatron_dynamic_engine  pytest tests/megatron_lm/test_dynamic_engine.py -k on_gpu: Megatron-LM's
#                    gpt_static_inference.py through the zero-edit launch, dynamic engine and legacy static engine,
#                    stock and int4:g32+had. Says which of megatron-core and flash-attn are installed; without
#                    megatron-core, or when pytest skips (flash-attn, Megatron-LM source, the SmolLM2 assets
#                    missing), the step passes saying "skipped: <reason>" (pytest's own reason). Megatron-LM's
#                    static-engine CPU test (test_static_inference.py) is gloo-only and skips on CUDA.
#   report           DIR/gpu_check.json: per step its command, exit code, seconds, skip reasons and log tail
# Carried wheels: the GPU machine has no package registry. Every *.whl in gpu_wheels/ (ignored by git;
# scripts/fetch_gpu_wheels.sh downloads megatron-core 0.19.2 for Python 3.12 there) is installed by the env step
# with pip --no-deps --no-index --target gpu_wheels/site-packages (unpacked if pip is missing), and every step runs
# with that folder and the checkout on PYTHONPATH. --only without env installs nothing: add env to the list.
# --dry-run prints every step's command and time limit and runs nothing. --only STEP[,STEP...] runs (or lists)
# just those steps, in the order above: e.g. the long Megatron step alone with a larger TIMEOUT_ in its own command.
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default DIR = $OUT if set, else ./gpu_check_out),
# GPU_CHECK_WHEELS (default gpu_wheels/), TIMEOUT_<STEP> in seconds to override a step's limit. Needs pytest on the
# machine for the test steps (a step that cannot run reports why and the check goes on).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-${OUT:-$root/gpu_check_out}}
dry=0
only=""
all_steps=(env build_cuda_ext tests_gpu tests_gpu_float tests_interpret bench_kernels cuda_graph_capture tp_forward megatron_dynamic_engine)
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=${2:?gpu_check: --out needs a directory}; shift ;;
    --only) only=${2:?gpu_check: --only needs a comma-separated list of steps}; shift ;;
    -h|--help) sed -n '2,46p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'; expected --dry-run, --out DIR, --only STEP[,STEP] or --help" >&2; exit 2 ;;
  esac
  shift
done

steps=("${all_steps[@]}")
if [[ -n $only ]]; then
  IFS=, read -r -a wanted <<<"$only"
  for w in "${wanted[@]}"; do
    if [[ " ${all_steps[*]} " != *" $w "* ]]; then
      echo "gpu_check: --only: unknown step '$w'; expected steps from: ${all_steps[*]}" >&2; exit 2
    fi
  done
  steps=()
  for s in "${all_steps[@]}"; do
    [[ ",$only," == *",$s,"* ]] && steps+=("$s")
  done
fi

# The megatron_dynamic_engine step's runner (read from the environment by the step's python -c): reports which of
# megatron-core and flash-attn are installed, runs the pytest command it is given, and turns pytest's skip
# reasons into "skipped: <reason>" lines (the report collects them). Without megatron-core the test module cannot
# even be imported (it builds Megatron models), so that case is reported without running pytest.
read -r -d '' GPU_CHECK_PYTEST_STEP <<'PY'
import importlib.metadata as md, importlib.util, re, subprocess, sys

def installed(module, dist):
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ModuleNotFoundError:  # the parent package (megatron) is absent
        return None
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "(version unknown: not from a wheel)"

core = installed("megatron.core", "megatron-core")
fa = installed("flash_attn", "flash-attn") or installed("flash_attn_3", "flash-attn-3")
for name, version in (("megatron-core", core), ("flash-attn", fa)):
    print(f"{name}: " + (f"installed {version}" if version else "not installed (carry its wheel and pip install it on this machine first)"))
if core is None:
    print("skipped: megatron-core is not installed, so the dynamic-engine test cannot be imported")
    raise SystemExit(0)
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
lines = []
for line in proc.stdout:
    print(line, end="", flush=True)
    lines.append(line.rstrip("\n"))
rc = proc.wait()
reasons = []
for line in lines:
    m = re.match(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)$", line)
    if m and m.group(1) not in reasons:
        reasons.append(m.group(1))
ran = any(re.search(r"\d+ (passed|failed|error)", line) for line in lines[-3:])
if rc == 5:
    print("gpu_check: pytest selected no test (renamed?): " + " ".join(sys.argv[1:]))
    raise SystemExit(1)
if rc == 0 and reasons and not ran:
    for reason in reasons:
        print(f"skipped: {reason}")
raise SystemExit(rc)
PY
export GPU_CHECK_PYTEST_STEP

# The carried wheels and where they go; the checkout first on the path (nothing is installed on the GPU machine).
wheel_dir=${GPU_CHECK_WHEELS:-$root/gpu_wheels}
site=$wheel_dir/site-packages
shopt -s nullglob
wheels=("$wheel_dir"/*.whl)
shopt -u nullglob
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
install=""
if [[ ${#wheels[@]} -gt 0 ]]; then
  quoted=$(printf " %q" "${wheels[@]}")
  install="echo 'gpu_check: installing the carried wheels into $site:'$quoted && mkdir -p '$site' && if $py -m pip --version >/dev/null 2>&1; then $py -m pip install --disable-pip-version-check --no-deps --no-index --upgrade --target '$site'$quoted; else echo 'gpu_check: no pip: unpacking the wheels (a wheel is a zip)' && for w in$quoted; do $py -m zipfile -e \"\$w\" '$site' || exit 1; done; fi && "
fi
declare -A cmd limit
cmd[env]="${install}nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader && $py -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__); assert torch.cuda.is_available(), \"torch sees no CUDA device\"' && nvcc --version | tail -n 1"
cmd[build_cuda_ext]="cd '$root' && TORCH_CUDA_ARCH_LIST=\$($py -c 'import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())') $py setup.py build_ext --inplace && $py -c 'from megatron_tpcomp.backends import cuda_int4; ok, why = cuda_int4.cuda_int4_available(); print(\"INT4 CUDA extension:\", ok, why); raise SystemExit(0 if ok else 1)'"
cmd[tests_gpu]="cd '$root' && env -u TRITON_INTERPRET $py -m pytest -q -p no:cacheprovider tests/backends --ignore=tests/backends/test_cpu.py --ignore=tests/backends/test_cuda_compile.py --ignore=tests/backends/test_triton_float.py tests/bench/test_bench_kernels_gpu.py"
cmd[tests_gpu_float]="cd '$root' && env -u TRITON_INTERPRET $py -m pytest -q -p no:cacheprovider tests/backends/test_triton_float.py"
cmd[tests_interpret]="cd '$root' && TRITON_INTERPRET=1 $py -m pytest -q -p no:cacheprovider tests/backends -k 'interpret and (pins or no_sync)'"
cmd[bench_kernels]="cd '$root' && env -u TRITON_INTERPRET $py -m megatron_tpcomp.bench.triton_kernels --json '$out/bench.json'"
cmd[cuda_graph_capture]="cd '$root' && env -u TRITON_INTERPRET -u TPCOMP_COMPRESSION $py scripts/graph_check.py --spec int4:g32+had --forward-layers 2 --json '$out/graph_check.json'"
cmd[tp_forward]="cd '$root' && env -u TRITON_INTERPRET -u TPCOMP_COMPRESSION -u TPCOMP_BACKEND $py scripts/tp_forward_check.py --device cuda --tp 3 --tokens 2x128 --reps 3 --timeout 70 --json '$out/tp_forward.json'"
cmd[megatron_dynamic_engine]="cd '$root' && env -u TRITON_INTERPRET -u TPCOMP_COMPRESSION $py -c \"\$GPU_CHECK_PYTEST_STEP\" $py -m pytest -q -rs -p no:cacheprovider tests/megatron_lm/test_dynamic_engine.py -k on_gpu"
# Limits add up to 460 s: the whole check fits one 8-minute command (480 s) with room for the report and process
# starts. Nothing here has run on a GPU yet, so these are estimates: tests_gpu gets the most (it compiles every
# kernel variant the tests use; Triton caches them for the bench, the graph check and tp_forward); tp_forward
# starts three ranks that each import megatron-core and build a 135M-parameter model on the CPU (its own
# --timeout, 70 s, lets it report before the step's limit). megatron_dynamic_engine skips in seconds without
# flash-attn; with it, its four Megatron-LM launches need more: run it alone
# (--only env,megatron_dynamic_engine, TIMEOUT_MEGATRON_DYNAMIC_ENGINE=400).
limit[env]=${TIMEOUT_ENV:-15}
limit[build_cuda_ext]=${TIMEOUT_BUILD_CUDA_EXT:-70}
limit[tests_gpu]=${TIMEOUT_TESTS_GPU:-100}
limit[tests_gpu_float]=${TIMEOUT_TESTS_GPU_FLOAT:-80}
limit[tests_interpret]=${TIMEOUT_TESTS_INTERPRET:-20}
limit[bench_kernels]=${TIMEOUT_BENCH_KERNELS:-35}
limit[cuda_graph_capture]=${TIMEOUT_CUDA_GRAPH_CAPTURE:-35}
limit[tp_forward]=${TIMEOUT_TP_FORWARD:-75}
limit[megatron_dynamic_engine]=${TIMEOUT_MEGATRON_DYNAMIC_ENGINE:-30}

if [[ $dry -eq 1 ]]; then
  if [[ -n $install ]]; then
    echo "gpu_check: wheels: the env step installs${quoted} into $site (pip --no-deps --no-index)"
  else
    echo "gpu_check: wheels: none in $wheel_dir (scripts/fetch_gpu_wheels.sh downloads megatron-core 0.19.2 there)"
  fi
  echo "gpu_check: PYTHONPATH=$PYTHONPATH"
  for s in "${steps[@]}"; do
    echo "gpu_check: step $s (limit ${limit[$s]} s): ${cmd[$s]}"
  done
  echo "gpu_check: step report: write $out/gpu_check.json (each step's command, exit code, seconds, log tail)"
  exit 0
fi

mkdir -p "$out"
for s in "${steps[@]}"; do
  echo "gpu_check: step $s (limit ${limit[$s]} s)"
  t0=$(date +%s%N)
  timeout --kill-after=10 "${limit[$s]}" bash -c "${cmd[$s]}" >"$out/$s.log" 2>&1
  rc=$?
  echo "$rc $(( ($(date +%s%N) - t0) / 1000000 ))" >"$out/$s.rc"
  echo "gpu_check: step $s -> exit $rc"
  tail -n 5 "$out/$s.log"
done

# The report: one JSON with every step (a step's exit 124 means it ran past its limit).
STEPS="${steps[*]}" OUTDIR="$out" "$py" - <<'PY' || echo "gpu_check: could not write the JSON report"
import json, os, pathlib
out = pathlib.Path(os.environ["OUTDIR"])
report = {"steps": []}
for name in os.environ["STEPS"].split():
    rc, secs = (out / f"{name}.rc").read_text().split()
    log = (out / f"{name}.log").read_text(errors="replace")
    skipped = [line[len("skipped: "):] for line in log.splitlines() if line.startswith("skipped: ")]
    report["steps"].append({"name": name, "exit": int(rc), "ok": rc == "0", "timed_out": rc in ("124", "137"),
                            "skipped": skipped, "seconds": int(secs) / 1000, "log_tail": log[-3000:]})
for key, name in (("bench", "bench.json"), ("graph_check", "graph_check.json"), ("tp_forward", "tp_forward.json")):
    if (out / name).exists():
        report[key] = json.loads((out / name).read_text())
report["ok"] = all(s["ok"] for s in report["steps"])
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"gpu_check: report {out / 'gpu_check.json'}: " + ", ".join(f"{s['name']}={('skipped' if s['skipped'] else 'ok') if s['ok'] else 'FAIL'}" for s in report["steps"]))
PY
