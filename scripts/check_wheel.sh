#!/usr/bin/env bash
# Does the package work when installed from a wheel, away from the checkout? (CI runs this before the tests.)
#
#   1. sdist from the working tree (tracked and untracked-but-not-ignored files, copied to a temporary folder so
#      that no build output lands in the checkout); it must carry kernels/, LICENSE, README.md, CHANGELOG.md;
#   2. a wheel built from that sdist (`pip wheel --no-deps --no-build-isolation`): it must carry the kernel
#      sources in megatron_tpcomp/_csrc/ and the license;
#   3. a fresh virtual environment in a temporary folder outside the checkout: torch (CPU, pinned first so
#      nothing pulls a CUDA build), then the wheel with its declared dependencies;
#   4. from a working directory outside the checkout: the fused CPU codec library compiles from the installed
#      sources and loads (TPCOMP_BACKEND=cpu, empty cache), `tpcomp --version`, `tpcomp specs`, a 2-rank
#      compressed all-reduce over gloo equal to the reference decode, and the text-generation launcher's --help.
#
# Usage: scripts/check_wheel.sh [BUILD_PYTHON]
#   BUILD_PYTHON  interpreter that builds (needs setuptools>=77; torch lets setup.py decide about the CUDA
#                 extension); default .venv/bin/python. The fresh environment uses $PYTHON (default python3).
# Each step prints its time; the temporary folder is removed on exit (KEEP_WORK=1 keeps it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Absolute without resolving symlinks (a venv's python must be called through the venv), since steps cd elsewhere.
build_py=$(realpath -s "${1:-$root/.venv/bin/python}")
python=${PYTHON:-python3}
torch_version=2.13.0

work=$(mktemp -d "${TMPDIR:-/tmp}/tpcomp-wheel.XXXXXX")
case "$work/" in
  "$root"/*) echo "check_wheel: the temporary folder $work is inside the checkout $root; set TMPDIR elsewhere" >&2
             exit 2 ;;
esac
t_all=$(date +%s%N)
t0=$t_all
step() {  # step NAME: print the time since the previous step
  local now ds
  now=$(date +%s%N)
  ds=$(((now - t0) / 100000000))  # tenths of a second
  printf '[check_wheel] %-44s %5d.%d s\n' "$1" $((ds / 10)) $((ds % 10))
  t0=$now
}
cleanup() {
  if [[ -n "${KEEP_WORK:-}" ]]; then
    echo "[check_wheel] kept $work" >&2
  else
    rm -rf "$work"
    step "cleanup"
  fi
}
trap cleanup EXIT
# This machine's pip config lists local index folders that may be absent; drop those warnings, keep the rest.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# 1. sdist from a copy of the working tree.
mkdir -p "$work/src" "$work/dist"
(cd "$root" && git ls-files -z --cached --others --exclude-standard) |
  (cd "$root" && xargs -0 cp --parents -t "$work/src" 2>/dev/null || true)
[[ -f "$work/src/pyproject.toml" ]] || { echo "check_wheel: could not copy the working tree of $root" >&2; exit 1; }
(cd "$work/src" && TPCOMP_NO_CUDA_EXT=1 "$build_py" -c \
  "from setuptools import build_meta; build_meta.build_sdist('$work/dist')" >"$work/sdist.log" 2>&1) ||
  { cat "$work/sdist.log" >&2; exit 1; }
sdist=$(ls "$work"/dist/megatron_tpcomp-*.tar.gz)
"$build_py" - "$sdist" "$root/kernels" <<'EOF'
import sys, tarfile
from pathlib import Path

sdist, kernels = sys.argv[1], Path(sys.argv[2])
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
want = {f"kernels/{p.name}" for p in kernels.iterdir() if p.suffix in (".cpp", ".h", ".cu")}
want |= {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "setup.py"}
missing = sorted(want - names)
if missing or not any(n.endswith(".cu") for n in want):
    sys.exit(f"check_wheel: the sdist {sdist} lacks {missing}")
print(f"[check_wheel] sdist {Path(sdist).name}: {len(names)} entries, " + ", ".join(sorted(n for n in want)))
EOF
step "sdist"

# 2. wheel from the sdist (what `pip install <sdist>` would build).
(cd "$work" && quiet_pip "$build_py" -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation \
  -w "$work/dist" "$sdist")
wheel=$(ls "$work"/dist/megatron_tpcomp-*.whl)
"$build_py" - "$wheel" "$root/kernels" <<'EOF'
import sys, zipfile
from pathlib import Path

wheel, kernels = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = {f"megatron_tpcomp/_csrc/{p.name}" for p in kernels.iterdir() if p.suffix in (".cpp", ".h", ".cu")}
missing = sorted(want - names)
if missing or not any(n.endswith("/licenses/LICENSE") for n in names):
    sys.exit(f"check_wheel: the wheel {wheel} lacks {missing or 'the LICENSE'}")
print(f"[check_wheel] wheel {Path(wheel).name}: {len(names)} files, {len(want)} kernel sources in _csrc")
EOF
step "wheel (from the sdist)"

# 3. fresh environment outside the checkout.
"$python" -m venv "$work/venv"
vpy="$work/venv/bin/python"
echo "torch==$torch_version" >"$work/constraints.txt"  # the wheel's dependencies must not move torch
# --no-compile: no .pyc for all of torch up front (a third of the install time; imports compile what they use).
quiet_pip "$vpy" -m pip --disable-pip-version-check install -q --no-compile "torch==$torch_version"
step "venv + torch $torch_version"
quiet_pip "$vpy" -m pip --disable-pip-version-check install -q --no-compile -c "$work/constraints.txt" "$wheel"
step "wheel + its dependencies"

# 4. checks, from a folder outside the checkout, with an empty kernel cache (the library really compiles here).
mkdir -p "$work/run"
cd "$work/run"
export TPCOMP_CACHE="$work/cache"
unset PYTHONPATH
TPCOMP_BACKEND=cpu "$vpy" - "$root" <<'EOF'
import sys
from pathlib import Path

import megatron_tpcomp
from megatron_tpcomp.backends import cpu as cpu_codecs

root = Path(sys.argv[1]).resolve()
pkg = Path(megatron_tpcomp.__file__).resolve().parent
src = cpu_codecs.source_dir().resolve()
if root in pkg.parents or src != pkg / "_csrc":
    sys.exit(f"check_wheel: imported {pkg} with kernel sources {src}; expected the installed package's _csrc")
ok, why = cpu_codecs.available()
if not ok:
    sys.exit(f"check_wheel: the fused CPU codec library did not build from {src}: {why}")
print(f"[check_wheel] CPU codec library built from {src} -> {cpu_codecs.build().name}")
EOF
step "CPU codec library (compile + load)"

version=$("$work/venv/bin/tpcomp" --version)
want=$("$vpy" -c "import importlib.metadata as m, megatron_tpcomp as p; \
assert m.version('megatron-tpcomp') == p.__version__, (m.version('megatron-tpcomp'), p.__version__); \
print(f'tpcomp (megatron-tpcomp) {p.__version__}')")
[[ "$version" == "$want" ]] || { echo "check_wheel: tpcomp --version said '$version', expected '$want'" >&2; exit 1; }
"$work/venv/bin/tpcomp" specs >"$work/specs.txt"
grep -q "^int4:g32+had " "$work/specs.txt" || { cat "$work/specs.txt" >&2; echo "check_wheel: tpcomp specs" >&2; exit 1; }
echo "[check_wheel] $version; tpcomp specs lists $(($(wc -l <"$work/specs.txt") - 1)) presets"
step "tpcomp --version, tpcomp specs"

# A module file, not `python -c`: the ranks (forkserver) import the rank function from it.
cat >"$work/run/allreduce_check.py" <<'EOF'
"""2 gloo ranks, compressed all-reduce with the fused library; every rank's result == the reference decode-sum."""

import os

import torch

from megatron_tpcomp.collectives import CommStats, all_reduce
from megatron_tpcomp.launch import run_distributed

SPEC, SHAPE = "int4:g32+had", (96, 576)


def partial(rank: int) -> torch.Tensor:
    """Rank ``rank``'s bf16 ``[96, 576]`` input (seeded)."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + rank)).bfloat16()


def work(rank: int, world_size: int) -> tuple[torch.Tensor, CommStats]:
    stats: list[CommStats] = []
    out = all_reduce(partial(rank), SPEC, algo="one-shot", min_bytes=0, stats=stats)
    return out, stats[0]


if __name__ == "__main__":
    os.environ["TPCOMP_BACKEND"] = "cpu"  # the ranks must run the installed library, not the reference
    results = run_distributed(work, 2, timeout_s=120)
    # The reference: the torch codecs (encode each rank's input, decode-sum in fp32 in rank order, +had rotated
    # back once, one rounding to bf16), i.e. what every rank must have computed without the library.
    os.environ["TPCOMP_BACKEND"] = "reference"
    from megatron_tpcomp.codecs import make_codec

    codec = make_codec(SPEC)
    ref = codec.decode_sum(torch.cat([codec.encode(partial(r)) for r in range(2)]), 2, SHAPE, torch.bfloat16)
    for rank, (out, stat) in enumerate(results):
        assert stat.spec == codec.spec and stat.algo == "one-shot", (rank, stat)
        assert torch.equal(out, ref), f"rank {rank}: max |diff| {(out.float() - ref.float()).abs().max().item()}"
    err = (ref.float() - (partial(0).float() + partial(1).float())).abs().max().item()
    print(f"[check_wheel] 2-rank {SPEC} all-reduce == reference decode-sum bit for bit (max |err| vs exact {err:.3f})")
EOF
"$vpy" "$work/run/allreduce_check.py"
step "2-rank compressed all-reduce (gloo)"

# The launcher's logic is megatron_tpcomp.textgen (examples/run_text_generation.py is a two-line wrapper that is
# not installed); its parser must build from the installed package.
"$vpy" -c "from megatron_tpcomp.textgen import main; raise SystemExit(main(['--help']))" >"$work/textgen-help.txt"
grep -q -- "--tp-comm-compression" "$work/textgen-help.txt" ||
  { cat "$work/textgen-help.txt" >&2; echo "check_wheel: the launcher's --help lacks --tp-comm-compression" >&2; exit 1; }
step "launcher --help (megatron_tpcomp.textgen)"

cleanup
trap - EXIT
t0=$t_all
step "check_wheel total"
