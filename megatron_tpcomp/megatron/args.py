"""Megatron-style command-line flags: ``add_arguments`` (usable as Megatron's ``extra_args_provider``) and
``apply_args`` (turn the parsed flags into compression on a built model)."""

from __future__ import annotations

import argparse

import torch

from megatron_tpcomp.collectives import ALGOS
from megatron_tpcomp.config import CompressionConfig, ConfigError
from megatron_tpcomp.spec import describe_grammar


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tp-comm-compression`` group to ``parser`` and return it (Megatron's extra_args_provider)."""
    group = parser.add_argument_group(
        "tp-comm-compression", "compressed tensor-parallel communication (megatron-tpcomp)"
    )
    group.add_argument(
        "--tp-comm-compression",
        metavar="SPEC",
        default=None,
        help="codec for every transformer layer's TP collectives, e.g. int4:g32+had or fp8 (default: off). "
        + describe_grammar(),
    )
    group.add_argument(
        "--tp-comm-compression-config",
        metavar="FILE",
        default=None,
        help="per-layer compression config (JSON or YAML; schema in megatron_tpcomp/config.py); "
        "overrides --tp-comm-compression",
    )
    group.add_argument(
        "--tp-comm-compression-min-bytes",
        type=int,
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
        config = CompressionConfig.from_spec(spec)
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


def apply_args(
    model: torch.nn.Module, args: argparse.Namespace, *, telemetry: bool = False
) -> CompressionConfig | None:
    """Enable compression on ``model`` as the parsed flags say; returns the config, or None if off."""
    from megatron_tpcomp.megatron import intercept

    config = config_from_args(args)
    if config is None:
        return None
    return intercept.enable(model, config, telemetry=telemetry)
