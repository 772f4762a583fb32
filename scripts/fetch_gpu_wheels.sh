#!/usr/bin/env bash
# Download the wheels the GPU check carries to a GPU machine that has no package registry, into gpu_wheels/
# (ignored by git; the GPU check's env step installs every *.whl found there with --no-deps --no-index).
#
#   scripts/fetch_gpu_wheels.sh [DIR]      DIR default: gpu_wheels/ at the repository root
#
# What it fetches: megatron-core 0.19.2, the cp312 manylinux_2_28 x86_64 build (the GPU machine runs Python 3.12;
# about 2.4 MB). Only the wheel itself (--no-deps): its dependencies that matter for inference (torch, numpy,
# packaging) are already on the GPU machine. Environment: PYTHON (default python3), MCORE_VERSION (default 0.19.2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/gpu_wheels}
py=${PYTHON:-python3}
version=${MCORE_VERSION:-0.19.2}
mkdir -p "$dest"
"$py" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 "megatron-core==$version" -d "$dest"
ls -l "$dest"/*.whl
