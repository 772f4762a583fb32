"""Which kind of checkpoint a directory holds: finding the files of a Megatron ``torch_dist`` checkpoint (its
tracker file and iteration directories) without reading any tensor. Below ``store`` and ``torch_dist``, so that
both can tell a user which tool reads the directory they gave."""

from __future__ import annotations

import re
from pathlib import Path

from megatron_tpcomp.checkpoint.errors import CheckpointError

#: A megatron-tpcomp checkpoint's metadata (``metadata.py``), and the Hugging Face tokenizer file beside it.
META_FILE = "tpcomp_checkpoint.json"
TOKENIZER_FILE = "tokenizer.json"
#: Megatron ``torch_dist`` files (``torch_dist.py``): the tracker beside the iteration directories, and in one
#: the config, the common state and the index.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
INDEX_FILE = ".metadata"
#: Largest ``metadata.json`` / tracker file read (a real one is ~120 bytes).
MAX_SMALL_FILE = 1 << 20
ITER_DIR = re.compile(r"iter_(\d{7,})")


def read_small(path: Path, what: str) -> str:
    size = path.stat().st_size
    if size > MAX_SMALL_FILE:
        raise CheckpointError(f"{path}: {size} bytes; expected at most {MAX_SMALL_FILE} for {what}")
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not text ({exc}); expected {what}") from None


def _has_files(d: Path) -> bool:
    return any((d / n).exists() for n in (CONFIG_FILE, COMMON_FILE, INDEX_FILE)) or any(d.glob("*.distcp"))


def tracked_dir(root: Path) -> tuple[Path, int | None] | None:
    """(iteration directory, iteration; None for a release) that ``root``'s tracker file names; None without a
    tracker file."""
    tracker = root / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = read_small(tracker, "'release' or an iteration number").strip()
    if text == "release":
        return root / "release", None
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise CheckpointError(f"{tracker}: holds {text[:40]!r}; expected 'release' or an iteration number")
    iteration = int(text)
    return root / f"iter_{iteration:07d}", iteration


def find_checkpoint(path: str | Path) -> Path | None:
    """The iteration directory of the ``torch_dist`` checkpoint at ``path`` (``path`` itself, or the directory
    its ``latest_checkpointed_iteration.txt`` names), incomplete ones included; None when ``path`` is something
    else (a megatron-tpcomp checkpoint, a Hugging Face model, Megatron's legacy per-rank ``torch`` layout).

    Raises:
        CheckpointError: a tracker file that names no iteration, or an iteration directory that does not exist.
    """
    p = Path(path)
    if not p.is_dir() or (p / META_FILE).exists():
        return None
    tracked = tracked_dir(p)  # Megatron-LM's layout first: the tracker says which directory holds the files
    if tracked is None:
        return p if _has_files(p) else None
    d, _ = tracked
    if not d.is_dir():
        raise CheckpointError(
            f"{p / TRACKER_FILE} names {d.name}, but {d} does not exist (an incomplete or partly copied Megatron "
            "checkpoint)"
        )
    if any(d.glob("mp_rank_*")):
        return None  # Megatron's legacy per-rank layout (ckpt-format torch), not this one
    return d


def is_torch_dist(path: str | Path) -> bool:
    """Whether ``path`` is (or looks like an incomplete) Megatron ``torch_dist`` checkpoint; never raises."""
    try:
        return find_checkpoint(path) is not None
    except CheckpointError:
        return True  # a tracker naming a missing iteration: a Megatron checkpoint, broken
    except OSError:
        return False
