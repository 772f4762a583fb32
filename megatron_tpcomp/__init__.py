"""megatron-tpcomp: compressed tensor-parallel communication for Megatron-Core inference.

The whole public API::

    megatron_tpcomp.enable(model, "int4:g32+had")      # or a CompressionConfig / per-layer config file
    megatron_tpcomp.disable(model)                     # Megatron's own collectives again, bit for bit
    megatron_tpcomp.add_arguments(parser)              # --tp-comm-compression ... (Megatron extra_args_provider)
    megatron_tpcomp.apply_args(model, args)

Where things are:
- codecs (formats):            ``megatron_tpcomp/codecs/`` (``make_codec(spec)``), spec grammar in ``spec.py``
- kernel backends, dispatch:   ``megatron_tpcomp/backends/`` (``TPCOMP_BACKEND``; imported below, which routes every
                                codec call through its dispatcher), C/CUDA sources in ``kernels/``
- compressed collectives:      ``megatron_tpcomp/collectives/``
- Megatron-Core plug-in:       ``megatron_tpcomp/megatron/`` (intercept.py, cpu.py, args.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import megatron_tpcomp.backends  # noqa: F401 - installs the kernel dispatcher into the codecs
from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.config import CompressionConfig, ConfigError
from megatron_tpcomp.spec import CodecSpec, describe_grammar, parse_spec

# The package's one version: pyproject.toml reads it from here (tool.setuptools.dynamic), `tpcomp --version` prints it.
__version__ = "0.2.0"

__all__ = [
    "Codec",
    "CodecError",
    "CodecSpec",
    "CompressionConfig",
    "ConfigError",
    "add_arguments",
    "apply_args",
    "describe_grammar",
    "disable",
    "enable",
    "make_codec",
    "parse_spec",
    "__version__",
]


def enable(model: Any, spec_or_config: str | CompressionConfig | Path, *, telemetry: bool = False) -> CompressionConfig:
    """Compress ``model``'s forward TP collectives.

    ``model``: a megatron-core model, a list of model chunks (what Megatron-LM's ``get_model`` returns), or
    wrapped models (Float16Module, DDP). ``spec_or_config``: a spec (``"int4:g32+had"``), a CompressionConfig,
    or a config file path (a ``Path``, or a string ending in ``.json``/``.yaml``/``.yml``).
    """
    from megatron_tpcomp.megatron.args import enable_chunks, load_spec_or_config

    if isinstance(spec_or_config, Path):
        spec_or_config = CompressionConfig.load(spec_or_config)
    elif isinstance(spec_or_config, str):
        spec_or_config = load_spec_or_config(spec_or_config)
    elif not isinstance(spec_or_config, CompressionConfig):
        raise ConfigError(
            f"expected a spec string, a CompressionConfig or a config file path, got {type(spec_or_config).__name__}"
        )
    return enable_chunks(model, spec_or_config, telemetry=telemetry)


def disable(model: Any) -> None:
    """Undo :func:`enable` (same kinds of ``model``): Megatron's own collectives again."""
    from megatron_tpcomp.megatron.args import disable_chunks

    disable_chunks(model)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--tp-comm-compression`` and friends; usable as Megatron's ``extra_args_provider``."""
    from megatron_tpcomp.megatron.args import add_arguments as _add

    return _add(parser)


def apply_args(model: Any, args: argparse.Namespace, *, telemetry: bool = False) -> CompressionConfig | None:
    """Enable compression on ``model`` (a model, chunks, or wrapped models) from parsed ``add_arguments`` flags
    (None when off)."""
    from megatron_tpcomp.megatron.args import apply_args as _apply

    return _apply(model, args, telemetry=telemetry)
