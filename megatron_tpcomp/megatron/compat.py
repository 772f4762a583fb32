"""Which megatron-core versions we support, and the internal names our overrides attach to.

Megatron's consumers bind the public ``*_region`` functions at import time, so replacing those attributes
reaches nothing (measured: 0 calls caught). What every call does reach is looked up at call time:

- the private primitives of ``tensor_parallel.mappings`` that the autograd Function classes call
  (``_reduce``, ``_gather_along_last_dim``, ``_gather_along_first_dim``, ``_reduce_scatter_along_first_dim``);
- ``tensor_parallel.layers.dist_all_gather_func``: the sequence-parallel all-gather inside
  ``LinearWithGradAccumulationAndAsyncCommunication.forward``, which bypasses ``mappings``.

:func:`intercept_points` resolves them and fails loudly, naming what moved, on a megatron-core that no longer
has them: a silent miss would mean silently uncompressed (or, worse, half-compressed) communication.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

MIN_VERSION = Version("0.16.1")
#: Newest version tested in CI (0.17+ declares Requires-Python >= 3.12 but megatron.core runs on 3.11).
MAX_TESTED_VERSION = Version("0.19.2")


class MegatronCompatError(RuntimeError):
    """megatron-core is missing, too old, or lacks an internal our overrides need."""


@dataclass(frozen=True)
class InterceptPoint:
    """One attribute we replace: ``module.attr``, and the collective it performs."""

    module: str
    attr: str
    role: str


INTERCEPT_POINTS: tuple[InterceptPoint, ...] = (
    InterceptPoint("megatron.core.tensor_parallel.mappings", "_reduce", "TP all-reduce (row-parallel, embedding)"),
    InterceptPoint("megatron.core.tensor_parallel.mappings", "_gather_along_last_dim", "TP all-gather, last dim"),
    InterceptPoint("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim", "SP all-gather, first dim"),
    InterceptPoint(
        "megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim", "SP reduce-scatter, first dim"
    ),
    InterceptPoint("megatron.core.tensor_parallel.layers", "dist_all_gather_func", "SP all-gather inside linear"),
)


def megatron_version() -> Version:
    """The installed megatron-core version; raises MegatronCompatError if it is not importable."""
    try:
        info = importlib.import_module("megatron.core.package_info")
    except ImportError as exc:
        raise MegatronCompatError(
            f"megatron-core is not importable ({exc}); install megatron-core>={MIN_VERSION} "
            "(scripts/setup_venv.sh does it)"
        ) from exc
    return Version(info.__version__)


def check_version() -> Version:
    """Raise if megatron-core is older than MIN_VERSION; return the version (newer than tested is allowed:
    :func:`intercept_points` and the interception-count tests are what catch a moved collective)."""
    version = megatron_version()
    if version < MIN_VERSION:
        raise MegatronCompatError(f"megatron-core {version} is too old; megatron-tpcomp needs >= {MIN_VERSION}")
    return version


def intercept_points() -> dict[str, tuple[Any, InterceptPoint]]:
    """Resolve every intercept point: ``{"module.attr": (module_object, point)}``.

    Raises:
        MegatronCompatError: naming every missing attribute and the megatron-core version.
    """
    version = check_version()
    found: dict[str, tuple[Any, InterceptPoint]] = {}
    missing: list[str] = []
    for point in INTERCEPT_POINTS:
        module = importlib.import_module(point.module)
        if callable(getattr(module, point.attr, None)):
            found[f"{point.module}.{point.attr}"] = (module, point)
        else:
            missing.append(f"{point.module}.{point.attr} ({point.role})")
    if missing:
        raise MegatronCompatError(
            f"megatron-core {version} lacks internals that megatron-tpcomp intercepts: {'; '.join(missing)}. "
            f"Supported: {MIN_VERSION} .. {MAX_TESTED_VERSION}."
        )
    return found
