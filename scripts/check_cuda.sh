#!/usr/bin/env bash
# Compile-check the CUDA sources where nvcc exists (CI has nvcc as a compiler only, no GPU):
#   - every kernels/*.cu for sm_80 and sm_90 (override with ARCHS="80 90 100a");
#   - the torch binding (kernels/*_binding.cpp) with g++ -fsyntax-only against torch's headers, when the
#     CUDA headers are found (a CPU torch lacks one generated header, stubbed in a temp folder).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found: skipped the CUDA compile check"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for arch in ${ARCHS:-80 90}; do
  for cu in "$root"/kernels/*.cu; do
    nvcc -std=c++17 -O2 -fmad=false -c -arch="sm_$arch" -I"$root/kernels" -o "$tmp/$(basename "$cu").sm_$arch.o" "$cu"
    echo "check_cuda: compiled $(basename "$cu") for sm_$arch"
  done
done
cuda_include=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
if [[ ! -f "$cuda_include/cuda_runtime_api.h" ]]; then
  # nvcc may be a wrapper script: ask it where it lives.
  cuda_include=$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1/include|p' "$(command -v nvcc)" | head -n1)
fi
if [[ -f "$cuda_include/cuda_runtime_api.h" ]] && "$py" -c "import torch" 2>/dev/null; then
  mkdir -p "$tmp/stub/c10/cuda/impl"
  echo "#pragma once" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  read -r -a torch_inc < <("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
  py_inc=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  for cpp in "$root"/kernels/*_binding.cpp; do
    g++ -std=c++20 -fsyntax-only -w "${torch_inc[@]}" -I"$tmp/stub" -I"$py_inc" -I"$cuda_include" -I"$root/kernels" \
      -DTORCH_EXTENSION_NAME=_int4_cuda "$cpp"
    echo "check_cuda: syntax-checked $(basename "$cpp") against torch's headers"
  done
else
  echo "check_cuda: CUDA headers or torch not found: skipped the binding syntax check"
fi
