"""Build script. The INT4 CUDA extension is built only where a CUDA-enabled torch and nvcc exist (and says so)."""

import os
import shutil

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}


def _cuda_extension_reason() -> str | None:
    """None when the CUDA extension can be built, else why not."""
    if os.environ.get("TPCOMP_NO_CUDA_EXT"):
        return "TPCOMP_NO_CUDA_EXT is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable at build time (install with --no-build-isolation after torch)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc / CUDA_HOME not found"
    return None


_reason = _cuda_extension_reason()
if _reason is None:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            name="megatron_tpcomp._int4_cuda",
            sources=["kernels/int4_binding.cpp", "kernels/int4_kernels.cu"],
            include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")],
            # No fast math: the kernels must round exactly like the torch reference.
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-fmad=false"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension
    print("megatron-tpcomp: building the INT4 CUDA extension (megatron_tpcomp._int4_cuda)")
else:
    print(f"megatron-tpcomp: not building the INT4 CUDA extension: {_reason}")

setup(
    name="megatron-tpcomp",
    version="0.1.0",
    description="Compressed tensor-parallel communication for Megatron-Core inference",
    packages=find_packages(include=["megatron_tpcomp", "megatron_tpcomp.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26",
        "megatron-core>=0.16.1,<0.20",
        "tqdm",
        "pyyaml",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "gguf>=0.10",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff", "transformers"],
    },
    entry_points={"console_scripts": ["tpcomp=megatron_tpcomp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
