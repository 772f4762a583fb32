#!/usr/bin/env bash
# Compile-check the CUDA sources where nvcc exists (CI has nvcc as a compiler only, no GPU; nothing is run):
#   1. every kernels/*.cu with nvcc -c for each arch in ARCHS (default "80 90"; e.g. ARCHS="80 90 100a"), with
#      the flags torch's CUDAExtension uses (C++20, no half operators);
#   2. the torch binding (kernels/*_binding.cpp) with g++ -fsyntax-only against the headers of the torch in
#      PYTHON (default .venv/bin/python) plus the CUDA headers. A CPU torch lacks one generated CUDA header
#      (c10/cuda/impl/cuda_cmake_macros.h, empty in practice); it is stubbed in a temp folder.
# Prints one line per check ("check_cuda: compiled ...", "check_cuda: syntax-checked ...", or why it skipped);
# exits non-zero on the first compile error. Linking the extension needs a CUDA torch: see setup.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: skipped: nvcc not found on PATH (install the CUDA toolkit to compile-check kernels/*.cu)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Same defines as torch.utils.cpp_extension.COMMON_NVCC_FLAGS, so this sees what the real build sees.
nvcc_flags=(-std=c++20 -O3 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -I"$root/kernels")
for arch in ${ARCHS:-80 90}; do
  for cu in "$root"/kernels/*.cu; do
    nvcc "${nvcc_flags[@]}" -c -arch="sm_$arch" -o "$tmp/$(basename "$cu" .cu).sm_$arch.o" "$cu"
    echo "check_cuda: compiled $(basename "$cu") for sm_$arch"
  done
done

# The CUDA include folder, from nvcc itself (nvcc may be a wrapper script outside the toolkit).
cuda_top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
cuda_include=${CUDA_HOME:+$CUDA_HOME/include}
[[ -f "${cuda_include:-}/cuda_runtime_api.h" ]] || cuda_include=$cuda_top/include
if [[ ! -f "$cuda_include/cuda_runtime_api.h" ]]; then
  echo "check_cuda: skipped the binding syntax check: cuda_runtime_api.h not found (set CUDA_HOME)"
  exit 0
fi
# One interpreter start (importing torch takes seconds): line 1 torch's version, line 2 the include flags.
if ! torch_info=$("$py" -c "import sysconfig, torch, torch.utils.cpp_extension as c
print(torch.__version__)
print(' '.join('-I' + p for p in [*c.include_paths(), sysconfig.get_paths()['include']]))" 2>/dev/null); then
  echo "check_cuda: skipped the binding syntax check: torch is not importable with $py (set PYTHON)"
  exit 0
fi
torch_version=$(sed -n 1p <<<"$torch_info")
read -r -a include_flags <<<"$(sed -n 2p <<<"$torch_info")"
mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#pragma once" >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
for cpp in "$root"/kernels/*_binding.cpp; do
  g++ -std=c++20 -fsyntax-only -Wall -Wno-unused-function "${include_flags[@]}" -I"$tmp/stub" \
    -I"$cuda_include" -I"$root/kernels" -DTORCH_EXTENSION_NAME=_int4_cuda "$cpp"
  echo "check_cuda: syntax-checked $(basename "$cpp") with g++ against torch $torch_version's headers"
done
