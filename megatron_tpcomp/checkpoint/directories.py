"""Writing a directory so that it is never seen half-written: it is filled as a temporary sibling
``.NAME.partial-PID`` (its writer's host and PID inside) and renamed into place; a later run removes such
siblings once their writer is gone, and ``force`` replaces only a directory this package wrote."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.locate import META_FILE, TOKENIZER_FILE, TRACKER_FILE
from megatron_tpcomp.checkpoint.megatron_args import TOKENIZER_CONFIG_FILE

logger = logging.getLogger("megatron_tpcomp")


#: Written into a Hugging Face export (``tpcomp convert --to hf``) so that ``--force`` may replace it later.
HF_EXPORT_MARKER = "tpcomp_hf_export.json"


HF_EXPORT_FORMAT = "megatron-tpcomp-hf-export"


#: Written into a temporary ``.NAME.partial-PID`` directory while it is being filled (host and PID of the writer),
#: removed before the rename: lets a later run on another host of a shared file system leave it alone.
OWNER_FILE = ".tpcomp-writer.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _foreign_entries(out: Path) -> tuple[str | None, list[str]]:
    """(what tpcomp output ``out`` is: ``checkpoint``/``hf export``/None, the paths in it tpcomp did not write)."""
    top = {p.name for p in out.iterdir()}
    if META_FILE in top:
        kind, allowed = "checkpoint", {META_FILE, TRACKER_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "release"}
    elif HF_EXPORT_MARKER in top:
        kind, allowed = "hf export", {HF_EXPORT_MARKER, "config.json", "model.safetensors", TOKENIZER_FILE}
    else:
        return None, sorted(top)
    foreign = sorted(n for n in top if n not in allowed)
    release = out / "release"
    if kind == "checkpoint" and "release" in top:
        if release.is_symlink() or not release.is_dir():
            foreign.append("release")
        else:
            for rank_dir in sorted(release.iterdir()):
                rel = f"release/{rank_dir.name}"
                if not re.fullmatch(r"mp_rank_\d{2,}", rank_dir.name) or rank_dir.is_symlink() or not rank_dir.is_dir():
                    foreign.append(rel)
                    continue
                foreign += [f"{rel}/{p.name}" for p in sorted(rank_dir.iterdir()) if p.name != "model_optim_rng.pt"]
    return kind, foreign


def check_replaceable(out: str | Path, force: bool) -> None:
    """Raise unless ``out`` may be written: it does not exist, or ``force`` is set and it is an empty directory or
    one that tpcomp wrote (a checkpoint with ``tpcomp_checkpoint.json`` or an HF export with its marker) holding
    nothing else. Anything else (a file, a link, someone's directory) is never deleted.

    Raises:
        CheckpointError: one line naming ``out`` and why.
    """
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not force:
        raise CheckpointError(f"{out} already exists; pass --force (force=True) to replace it")
    refuse = "--force replaces only a directory written by tpcomp; refusing to delete it"
    if out.is_symlink():
        raise CheckpointError(f"{out} is a symbolic link, not a directory written by tpcomp; {refuse}")
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a directory written by tpcomp; {refuse}")
    kind, foreign = _foreign_entries(out)
    if kind is None and foreign:
        raise CheckpointError(
            f"{out} is a non-empty directory without {META_FILE} or {HF_EXPORT_MARKER} (not written by tpcomp); "
            f"{refuse}"
        )
    if foreign:
        raise CheckpointError(
            f"{out} is a tpcomp {kind} but also holds {foreign[:3]}, which tpcomp did not write; {refuse} "
            f"(move them out first)"
        )


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as gone: it will never finish a write)."""
    if pid <= 0:
        return False  # 0 and negatives address process groups in kill(); no writer has such a PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OverflowError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def _writer_host(tmp: Path) -> str | None:
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
        return str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Remove the ``.NAME.partial-PID`` (and ``.NAME.old-PID``) siblings of ``out`` that a killed run left behind.

    A directory is removed when its PID is no longer alive on this host (or is this process's own); one whose
    process still runs, or that was written on another host (shared file system), is left alone and mentioned.
    Each removal is logged with its size (logger ``megatron_tpcomp``, WARNING: reaches stderr without setup).

    Returns:
        the directories removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    host = socket.gethostname()
    removed = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        pid = int(m[2])
        if p.is_symlink() or not p.is_dir():
            logger.warning("megatron-tpcomp: %s is not a directory; left alone", p)
            continue
        writer = _writer_host(p)
        if writer is not None and writer != host:
            logger.warning("megatron-tpcomp: %s was written on host %s (PID %d there); left alone", p, writer, pid)
            continue
        if pid != os.getpid() and _pid_alive(pid):
            logger.warning("megatron-tpcomp: %s belongs to PID %d, which is still running; left alone", p, pid)
            continue
        size = _tree_bytes(p)
        shutil.rmtree(p)
        removed.append(p)
        who = "this process" if pid == os.getpid() else f"PID {pid}, which is no longer running"
        logger.warning("megatron-tpcomp: removed stale %s (%.1f MB) left by %s", p, size / 1e6, who)
    return removed


def make_partial_dir(out: Path) -> Path:
    """A fresh ``.NAME.partial-PID`` sibling of ``out`` with the writer's host and PID inside (see
    :data:`OWNER_FILE`), after removing stale ones of earlier runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if os.path.lexists(tmp):  # left alone above: a same-PID writer on another host of a shared file system
        raise CheckpointError(f"{tmp} exists and belongs to another writer; remove it if no conversion is running")
    tmp.mkdir()
    (tmp / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    return tmp


def install_partial_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename the filled ``tmp`` to ``out``, replacing what :func:`check_replaceable` allows (checked again now:
    ``out`` may have appeared or changed since the start)."""
    check_replaceable(out, force)
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    fsync_dir(tmp)
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)
