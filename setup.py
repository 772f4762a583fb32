"""Build script. The CUDA extension (INT4 kernels) is built only where a CUDA-enabled torch and nvcc exist."""

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}

setup(
    name="megatron-tpcomp",
    version="0.1.0",
    description="Compressed tensor-parallel communication for Megatron-Core inference",
    packages=find_packages(include=["megatron_tpcomp", "megatron_tpcomp.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.4", "numpy>=1.26", "megatron-core>=0.16.1,<0.20", "tqdm", "pyyaml"],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff"],
    },
    entry_points={"console_scripts": ["tpcomp=megatron_tpcomp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
