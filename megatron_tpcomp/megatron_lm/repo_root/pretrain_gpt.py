"""Stand-in for Megatron-LM's root ``pretrain_gpt.py``: only its ``model_provider`` (what the inference scripts
import from it)."""

from __future__ import annotations

from typing import Any

from gpt_builders import gpt_builder
from model_provider import model_provider as _model_provider


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> Any:
    """A GPT model chunk (see ``gpt_builders.gpt_builder``)."""
    return _model_provider(gpt_builder, pre_process, post_process, vp_stage, config, pg_collection)
