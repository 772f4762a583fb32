"""Megatron-style command-line flags: ``add_arguments`` (usable as Megatron's ``extra_args_provider``) and
``apply_args`` (turn the parsed flags into compression on a built model).

Values are checked while the command line is parsed (argparse ``type=`` functions that raise
``ArgumentTypeError`` with the spec or config parser's message), so a bad spec stops the launch before any model
is built. ``--tp-comm-compression`` takes a spec (``int4:g32+had``) or, recognised by its suffix (``.json``,
``.yaml``, ``.yml``), a per-layer config file; its default is the environment variable ``TPCOMP_COMPRESSION``
(same two forms), so a launch script can be switched without touching its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_tpcomp.collectives import ALGOS
from megatron_tpcomp.config import CompressionConfig, ConfigError
from megatron_tpcomp.spec import describe_grammar

logger = logging.getLogger("megatron_tpcomp")

#: Keys of the warnings already given (once per process and flag); tests clear it.
WARNED: set[str] = set()

#: Environment variable with a spec or a config file path: the default of ``--tp-comm-compression``.
ENV_VAR = "TPCOMP_COMPRESSION"
#: File suffixes that make a ``--tp-comm-compression`` value a config file path instead of a spec.
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
FLAG = "--tp-comm-compression"


def is_config_path(value: str) -> bool:
    """True when ``value`` names a config file (by its suffix), False for a codec spec."""
    return Path(value).suffix.lower() in CONFIG_SUFFIXES


def load_spec_or_config(value: str) -> CompressionConfig:
    """The CompressionConfig of a spec or of a config file path (by suffix); raises ConfigError."""
    if is_config_path(value):
        return CompressionConfig.load(value)
    try:
        return CompressionConfig.from_spec(value)
    except ValueError as exc:  # CodecError is a ValueError too; say which flag it came from
        raise ConfigError(str(exc)) from None


def _spec_or_config(value: str) -> str:
    """argparse ``type=`` of ``--tp-comm-compression``: checks the spec or config file, returns it unchanged."""
    try:
        load_spec_or_config(value)
    except (ConfigError, ValueError) as exc:
        origin = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) == value else ""
        raise argparse.ArgumentTypeError(f"{value!r}{origin}: {exc}") from None
    return value


def _config_file(value: str) -> str:
    """argparse ``type=`` of ``--tp-comm-compression-config``: the file must load as a config."""
    try:
        CompressionConfig.load(value)
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _min_bytes(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer (bytes)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 bytes, got {n}")
    return n


def has_arguments(parser: argparse.ArgumentParser) -> bool:
    """True when ``parser`` already has ``--tp-comm-compression`` (adding it twice is an argparse error)."""
    return FLAG in parser._option_string_actions


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tp-comm-compression`` group to ``parser`` and return it (Megatron's extra_args_provider)."""
    group = parser.add_argument_group(
        "tp-comm-compression", "compressed tensor-parallel communication (megatron-tpcomp)"
    )
    group.add_argument(
        FLAG,
        metavar="SPEC",
        type=_spec_or_config,
        default=os.environ.get(ENV_VAR) or None,
        help="codec for every transformer layer's TP collectives, e.g. int4:g32+had or fp8, or a per-layer config "
        f"file ({', '.join(CONFIG_SUFFIXES)}); default: ${ENV_VAR}, else off. " + describe_grammar(),
    )
    group.add_argument(
        "--tp-comm-compression-config",
        metavar="FILE",
        type=_config_file,
        default=None,
        help="per-layer compression config (JSON or YAML; schema in megatron_tpcomp/config.py); "
        "overrides --tp-comm-compression",
    )
    group.add_argument(
        "--tp-comm-compression-min-bytes",
        type=_min_bytes,
        default=None,
        metavar="N",
        help="messages smaller than N bytes are sent uncompressed (default 0, or the config file's value)",
    )
    group.add_argument(
        "--tp-comm-compression-algo",
        choices=ALGOS,
        default=None,
        help="all-reduce algorithm: one-shot (all-gather of compressed partials), two-shot (compressed "
        "reduce-scatter + all-gather, requantizes once), auto (by world and message size; default)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> CompressionConfig | None:
    """The CompressionConfig the flags describe, or None when compression is off."""
    path = getattr(args, "tp_comm_compression_config", None)
    spec = getattr(args, "tp_comm_compression", None)
    if path:
        config = CompressionConfig.load(path)
    elif spec:
        config = load_spec_or_config(spec)
    else:
        return None
    min_bytes = getattr(args, "tp_comm_compression_min_bytes", None)
    if min_bytes is not None:
        if min_bytes < 0:
            raise ConfigError(f"--tp-comm-compression-min-bytes must be >= 0, got {min_bytes}")
        config.min_bytes = min_bytes
    algo = getattr(args, "tp_comm_compression_algo", None)
    if algo is not None:
        config = config.with_algo(algo)  # an explicit flag wins over the config's per-site algorithms too
    return config


def model_chunks(model: Any) -> list[torch.nn.Module]:
    """The megatron-core models inside ``model``: a model, a list/tuple of chunks (Megatron-LM's ``get_model``
    returns one per virtual pipeline stage), each possibly wrapped (Float16Module, DDP: ``.module`` chains).

    Raises:
        ConfigError: something that is neither a module nor a list of modules.
    """

    def walk(obj: Any) -> Iterator[torch.nn.Module]:
        if isinstance(obj, (list, tuple)):
            for item in obj:
                yield from walk(item)
            return
        if not isinstance(obj, torch.nn.Module):
            raise ConfigError(
                f"expected a megatron-core model, a list of model chunks or a wrapped model, got {type(obj).__name__}"
            )
        while not hasattr(obj, "decoder") and isinstance(getattr(obj, "module", None), torch.nn.Module):
            obj = obj.module  # Float16Module / DDP / other wrappers keep the model in .module
        yield obj

    chunks = list(walk(model))
    if not chunks:
        raise ConfigError("expected a megatron-core model or a non-empty list of model chunks, got an empty list")
    return chunks


def enable_chunks(model: Any, config: CompressionConfig, *, telemetry: bool = False) -> CompressionConfig:
    """``intercept.enable`` on every chunk of ``model`` (see :func:`model_chunks`); returns the config."""
    from megatron_tpcomp.megatron import intercept

    for chunk in model_chunks(model):
        intercept.enable(chunk, config, telemetry=telemetry)
    return config


def disable_chunks(model: Any) -> None:
    """``intercept.disable`` on every chunk of ``model``."""
    from megatron_tpcomp.megatron import intercept

    for chunk in model_chunks(model):
        intercept.disable(chunk)


def apply_args(model: Any, args: argparse.Namespace, *, telemetry: bool = False) -> CompressionConfig | None:
    """Enable compression on ``model`` (a model, a list of chunks, or wrapped modules) as the parsed flags say;
    returns the config, or None if off. Warns once per flag when CUDA graphs or ``--tp-comm-overlap`` are on
    (the zero-edit launch calls :func:`warn_unverified` too)."""
    config = config_from_args(args)
    if config is None:
        return None
    warn_unverified(args)
    return enable_chunks(model, config, telemetry=telemetry)


def _warn_once(key: str, message: str) -> None:
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(message, stacklevel=3)
        logger.warning(message)


# Megatron-LM's validate_args rewrites these deprecated flags into --cuda-graph-impl and deletes them, so the
# warning (given after validation) names both spellings: the user may have typed either.
_DEPRECATED_GRAPH_FLAGS = {"local": "--enable-cuda-graph", "transformer_engine": "--external-cuda-graph"}


def _cuda_graph_flag(args: argparse.Namespace) -> str | None:
    """The CUDA-graph flag that is on, as the user may have typed it, or None when CUDA graphs are off."""
    for impl, deprecated in _DEPRECATED_GRAPH_FLAGS.items():
        if getattr(args, deprecated[2:].replace("-", "_"), False):  # not validated yet: the flag as typed
            return f"{deprecated} (--cuda-graph-impl {impl})"
    graphs = getattr(args, "cuda_graph_impl", "none")
    if graphs in (None, "none"):
        return None
    deprecated = _DEPRECATED_GRAPH_FLAGS.get(graphs)
    return f"--cuda-graph-impl {graphs}" + (f" (or the deprecated {deprecated})" if deprecated else "")


def warn_unverified(args: argparse.Namespace) -> None:
    """Warn (once per flag) where the compressed collectives are not (yet) known to run as configured."""
    flag = _cuda_graph_flag(args)
    if flag is not None:
        _warn_once(
            "cuda-graphs",
            f"megatron-tpcomp: {flag} is on: compressed collectives are not yet verified under CUDA-graph capture "
            "(a captured graph may replay Megatron's own collectives or fail); check the output, or run without it",
        )
    if getattr(args, "tp_comm_overlap", False):
        _warn_once(
            "tp-comm-overlap",
            "megatron-tpcomp: --tp-comm-overlap is on: Transformer Engine runs those overlapped TP collectives "
            "itself, uncompressed; only the other TP collectives are compressed",
        )
