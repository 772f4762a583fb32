"""Stand-in for Megatron-LM's root ``pretrain_mamba.py``: only its ``model_provider``, which refuses (see
``mamba_builders``)."""

from __future__ import annotations

from typing import Any

from mamba_builders import mamba_builder


def model_provider(*args: Any, **kwargs: Any) -> Any:
    return mamba_builder(*args, **kwargs)
