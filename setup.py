"""Build steps that need code; the metadata is in pyproject.toml.

- build_py copies the kernel sources (``kernels/*.cpp|h|cu``, the single source of truth at the repository root)
  into the package as ``megatron_tpcomp/_csrc/``, so that an installed wheel can compile the fused CPU codecs
  (``megatron_tpcomp/backends/cpu.py`` looks there first). Editable installs use ``kernels/`` directly.
- The INT4 CUDA extension is built only where a CUDA-enabled torch and nvcc exist (and says so).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
#: Where the kernel sources go inside the package (backends/cpu.py's PACKAGE_SOURCES names the same folder).
PACKAGE_SOURCES = ("megatron_tpcomp", "_csrc")
KERNEL_SUFFIXES = (".cpp", ".h", ".cu")


def kernel_sources() -> list[Path]:
    """The files copied into the package, sorted; raises when kernels/ lacks the CPU codec source."""
    listing = KERNELS.iterdir() if KERNELS.is_dir() else ()
    files = sorted(p for p in listing if p.is_file() and p.suffix in KERNEL_SUFFIXES)
    if not any(p.name == "cpu_codecs.cpp" for p in files):
        raise SystemExit(
            f"megatron-tpcomp: {KERNELS / 'cpu_codecs.cpp'} is missing; expected the kernel sources in kernels/ "
            "(an sdist must carry them: see MANIFEST.in)"
        )
    return files


class BuildPyWithKernels(build_py):
    """build_py that also copies kernels/ into megatron_tpcomp/_csrc/ of the build (not in editable mode)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the package is the source tree: backends/cpu.py finds the repository's kernels/ itself
        target = Path(self.build_lib, *PACKAGE_SOURCES)
        if target.exists():
            shutil.rmtree(target)  # no stale file from an earlier build survives a renamed source
        target.mkdir(parents=True)
        for src in kernel_sources():
            self.copy_file(str(src), str(target / src.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(Path(self.build_lib, *PACKAGE_SOURCES, p.name)) for p in kernel_sources()]


ext_modules = []
cmdclass = {"build_py": BuildPyWithKernels}


def _has_cuda_headers(home: str | None) -> bool:
    return home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _point_cuda_home_at_the_toolkit() -> None:
    """Without CUDA_HOME / CUDA_PATH, torch takes the folder above ``which nvcc``; where that nvcc is a link or a
    wrapper script (say /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) the folder has no CUDA headers.
    Then set CUDA_HOME, before torch.utils.cpp_extension reads it, to the first toolkit with headers among the
    one the link points into and /usr/local/cuda (torch's own last resort)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or _has_cuda_headers(os.path.dirname(os.path.dirname(nvcc))):
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if _has_cuda_headers(home):
            os.environ["CUDA_HOME"] = home
            return


def _cuda_extension_reason() -> str | None:
    """None when the CUDA extension can be built, else why not."""
    if os.environ.get("TPCOMP_NO_CUDA_EXT"):
        return "TPCOMP_NO_CUDA_EXT is set"
    _point_cuda_home_at_the_toolkit()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable at build time (install with --no-build-isolation after torch)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc / CUDA_HOME not found"
    if not _has_cuda_headers(CUDA_HOME):
        return f"no CUDA headers under CUDA_HOME={CUDA_HOME} (include/cuda_runtime.h): set CUDA_HOME to the toolkit"
    return None


_reason = _cuda_extension_reason()
if _reason is None:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            name="megatron_tpcomp._int4_cuda",
            sources=["kernels/int4_binding.cpp", "kernels/int4_kernels.cu"],
            include_dirs=[str(KERNELS)],
            # No fast math: the kernels must round exactly like the torch reference.
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-fmad=false"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension
    print("megatron-tpcomp: building the INT4 CUDA extension (megatron_tpcomp._int4_cuda)")
else:
    print(f"megatron-tpcomp: not building the INT4 CUDA extension: {_reason}")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
