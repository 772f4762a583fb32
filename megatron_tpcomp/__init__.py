"""megatron-tpcomp: compressed tensor-parallel communication for Megatron-Core inference.

The whole public API::

    megatron_tpcomp.enable(model, "int4:g32+had")      # or a CompressionConfig / per-layer config file
    megatron_tpcomp.disable(model)                     # Megatron's own collectives again, bit for bit
    megatron_tpcomp.add_arguments(parser)              # --tp-comm-compression ... (Megatron extra_args_provider)
    megatron_tpcomp.apply_args(model, args)

Where things are:
- codecs (formats):            ``megatron_tpcomp/codecs/`` (``make_codec(spec)``), spec grammar in ``spec.py``
- compressed collectives:      ``megatron_tpcomp/collectives.py``
- Megatron-Core plug-in:       ``megatron_tpcomp/megatron/`` (intercept.py, cpu.py, args.py)
- CUDA kernels and backends:   ``kernels/`` (sources), ``megatron_tpcomp/kernels.py`` (loader, backend enum)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.config import CompressionConfig, ConfigError
from megatron_tpcomp.spec import CodecSpec, describe_grammar, parse_spec

__version__ = "0.1.0"

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
    """Compress ``model``'s forward TP collectives (a spec, a CompressionConfig, or a config file path)."""
    from megatron_tpcomp.megatron import intercept

    if isinstance(spec_or_config, Path):
        spec_or_config = CompressionConfig.load(spec_or_config)
    return intercept.enable(model, spec_or_config, telemetry=telemetry)


def disable(model: Any) -> None:
    """Undo :func:`enable`: the model uses Megatron's own collectives again."""
    from megatron_tpcomp.megatron import intercept

    intercept.disable(model)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--tp-comm-compression`` and friends; usable as Megatron's ``extra_args_provider``."""
    from megatron_tpcomp.megatron.args import add_arguments as _add

    return _add(parser)


def apply_args(model: Any, args: argparse.Namespace, *, telemetry: bool = False) -> CompressionConfig | None:
    """Enable compression on ``model`` from parsed ``add_arguments`` flags (None when off)."""
    from megatron_tpcomp.megatron.args import apply_args as _apply

    return _apply(model, args, telemetry=telemetry)
