"""Calibration (``tpcomp calibrate``): per-site statistics of what each TP collective communicates and the
calibrated outlier channels (:mod:`.stats`), the per-layer configs built from them, plain or searched under a
quality budget (:mod:`.configs`), and the command line (:mod:`.cli`)."""

from megatron_tpcomp.calibration.cli import build_parser, format_report, main
from megatron_tpcomp.calibration.configs import plan_algo_of, search_config, to_config
from megatron_tpcomp.calibration.stats import REDUCTION_OPS, calibrate

__all__ = [
    "REDUCTION_OPS",
    "build_parser",
    "calibrate",
    "format_report",
    "main",
    "plan_algo_of",
    "search_config",
    "to_config",
]
