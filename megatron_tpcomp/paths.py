"""Where megatron-tpcomp keeps files it creates: one small module at the bottom of the import graph.

Both the tools (``assets.py``: model checkpoints, text) and the kernel backends (``backends/cpu.py``: the
compiled CPU codec library) cache under the same folder, so it is defined here rather than in either of them.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TPCOMP_CACHE`` or ``~/.cache/megatron-tpcomp`` (not created here)."""
    return Path(os.environ.get("TPCOMP_CACHE") or Path.home() / ".cache" / "megatron-tpcomp")
