"""Stand-in for Megatron-LM's root ``mamba_builders.py``: importable (the inference scripts import it), but
building a Mamba model needs Megatron-LM's own file."""

from __future__ import annotations

from typing import Any


def mamba_builder(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(
        "megatron-tpcomp's stand-in mamba_builders cannot build Mamba models (--model-provider mamba): run from a "
        "full Megatron-LM checkout (MEGATRON_LM_DIR)"
    )
