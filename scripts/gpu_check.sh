#!/usr/bin/env bash
# One-command GPU check (issue 18): runs every step, continues past failures, writes one JSON report.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps (each under its own time limit so the whole check fits one 8-minute command on one H100/H200):
#   env              nvidia-smi, python, torch (CUDA), triton and nvcc versions
#   build_cuda_ext   python setup.py build_ext --inplace (the INT4 CUDA extension, for this GPU's arch only)
#   tests_gpu        pytest tests/gpu with TRITON_INTERPRET unset: the Triton kernels compiled for the GPU
#                    against the torch reference on CUDA tensors, plus the INT4 CUDA kernel tests
#   tests_interpret  pytest tests/gpu -k interpret with TRITON_INTERPRET=1 (the CI path, on this machine)
#   bench_kernels    python -m megatron_tpcomp.gpu.bench: GB/s of the Triton encode/decode-sum vs the device's
#                    copy bandwidth, decode (1x576) and prefill (8 MiB) sizes, JSON in DIR/bench.json
#   report           DIR/gpu_check.json: per step its command, exit code, seconds and the tail of its log
# --dry-run prints every step's command and time limit and runs nothing.
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default DIR = $OUT if set, else ./gpu_check_out),
# TIMEOUT_<STEP> in seconds to override a step's limit. Needs pytest on the machine for the test steps
# (a step that cannot run reports why and the check goes on).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-${OUT:-$root/gpu_check_out}}
dry=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'; expected --dry-run, --out DIR or --help" >&2; exit 2 ;;
  esac
  shift
done

steps=(env build_cuda_ext tests_gpu tests_interpret bench_kernels)
declare -A cmd limit
cmd[env]="nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader && $py -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__); assert torch.cuda.is_available(), \"torch sees no CUDA device\"' && nvcc --version | tail -n 1"
cmd[build_cuda_ext]="cd '$root' && TORCH_CUDA_ARCH_LIST=\$($py -c 'import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())') $py setup.py build_ext --inplace && $py -c 'from megatron_tpcomp import kernels; ok, why = kernels.cuda_int4_available(); print(\"INT4 CUDA extension:\", ok, why); raise SystemExit(0 if ok else 1)'"
cmd[tests_gpu]="cd '$root' && env -u TRITON_INTERPRET $py -m pytest -q -p no:cacheprovider tests/gpu"
cmd[tests_interpret]="cd '$root' && TRITON_INTERPRET=1 $py -m pytest -q -p no:cacheprovider tests/gpu -k interpret"
cmd[bench_kernels]="cd '$root' && env -u TRITON_INTERPRET $py -m megatron_tpcomp.gpu.bench --json '$out/bench.json'"
# Limits add up to 460 s: the check fits one 8-minute command with room for the report and process starts.
# tests_gpu gets the most: it compiles every kernel variant the tests use (Triton caches them for the bench).
limit[env]=${TIMEOUT_ENV:-15}
limit[build_cuda_ext]=${TIMEOUT_BUILD_CUDA_EXT:-100}
limit[tests_gpu]=${TIMEOUT_TESTS_GPU:-240}
limit[tests_interpret]=${TIMEOUT_TESTS_INTERPRET:-45}
limit[bench_kernels]=${TIMEOUT_BENCH_KERNELS:-60}

if [[ $dry -eq 1 ]]; then
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
    report["steps"].append({"name": name, "exit": int(rc), "ok": rc == "0", "timed_out": rc in ("124", "137"),
                            "seconds": int(secs) / 1000, "log_tail": log[-3000:]})
bench = out / "bench.json"
if bench.exists():
    report["bench"] = json.loads(bench.read_text())
report["ok"] = all(s["ok"] for s in report["steps"])
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"gpu_check: report {out / 'gpu_check.json'}: " + ", ".join(f"{s['name']}={'ok' if s['ok'] else 'FAIL'}" for s in report["steps"]))
PY
