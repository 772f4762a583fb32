"""Stand-in for Megatron-LM's root ``model_provider.py`` (see ``__init__.py`` of this directory)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def model_provider(
    model_builder: Callable[..., Any],
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> Any:
    """Build one model chunk with ``model_builder(args, pre_process, post_process, vp_stage, config=,
    pg_collection=)`` from Megatron-LM's global arguments."""
    from megatron.training import get_args

    return model_builder(get_args(), pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)
