"""What the command-line tools share so that a bad request fails before the work and finished results survive.

- argparse ``type=`` validators (:func:`int_at_least`, :func:`float_at_least`, ...): the error names the flag and
  the value (``argument --gen-tokens: expected an integer >= 0, got '-1'``);
- :func:`check_output_file`: an output path is checked (and its parent folder created) before any work starts,
  so a typo does not cost a whole run;
- :func:`atomic_write_text` and :class:`ResultsFile`: final files appear complete or not at all (a temporary
  file in the same folder, then ``os.replace``); records are appended to ``PATH.partial`` as they finish, so an
  interrupted run keeps them;
- :func:`source_model_config`, :func:`check_tp`, :func:`check_config_for_model`: the model's shape from its
  checkpoint metadata or its GGUF header, checked against a TP size or a compression config in the launching
  process, before anything is converted or any rank is spawned.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the flag, the path and why."""


# ------------------------------------------------------------------------------------------- argparse types


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type=`` accepting integers ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_at_least(low: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` accepting finite floats ``>= low`` (``> low`` with ``strict``)."""
    import math

    bound = f"> {low:g}" if strict else f">= {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = f"float_{'gt' if strict else 'ge'}_{low:g}"
    return parse


positive_float = float_at_least(0.0, strict=True)
nonnegative_float = float_at_least(0.0)


def split_list(text: str, flag: str) -> list[str]:
    """The non-empty items of a comma-separated option; an empty list is an error naming ``flag``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{flag} {text!r}: empty list; give at least one comma-separated value")
    return items


# ----------------------------------------------------------------------------------- one flag convention
# Every subcommand spells shared options the same way: Megatron-LM's name first, the project's older name as an
# alias (both parse to the same ``dest``), so a Megatron user's muscle memory and the older README commands both
# work. Reports are ``--json FILE``; artifacts (configs, tables, results) are ``--out FILE``.


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not when the help already speaks of its default (any
    "default" in it), and not for a default that says nothing (``None``, ``False`` of a switch, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings:
            return action.help
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class AliasedStore(argparse.Action):
    """Stores ``convert(value)`` for an option with several spellings; a bad value's error names the spelling the
    user typed (``argument --tp: expected an integer >= 1, got '0'``), where argparse would name them all."""

    def __init__(self, option_strings: list[str], dest: str, convert: Callable[[str], Any] = str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.convert = convert

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        try:
            value = self.convert(values)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(None, f"argument {option_string}: {exc}") from None
        except ValueError:
            name = getattr(self.convert, "__name__", "")
            raise argparse.ArgumentError(None, f"argument {option_string}: invalid {name} value: {values!r}") from None
        setattr(namespace, self.dest, value)


def add_tp_argument(
    parser: argparse.ArgumentParser | Any,
    default: int | None,
    help: str = "tensor-parallel size",
    *,
    type: Callable[[str], int] = positive_int,
) -> None:
    """``--tensor-model-parallel-size N`` (Megatron's name), alias ``--tp``; parsed into ``args.tp``."""
    parser.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tp",
        action=AliasedStore,
        convert=type,
        default=default,
        metavar="N",
        help=help,
    )


def add_load_argument(
    parser: argparse.ArgumentParser | Any,
    default: str | None = "smollm2-135m",
    help: str = "checkpoint directory (tpcomp convert), or smollm2-135m: the embedded SmolLM2-135M",
    *,
    required: bool = False,
) -> None:
    """``--load CKPT`` (Megatron's name), alias ``--model``; parsed into ``args.model``."""
    parser.add_argument(
        "--load", "--model", dest="model", default=default, required=required, metavar="CKPT", help=help
    )


def add_specs_argument(parser: argparse.ArgumentParser | Any, default: str | None, help: str) -> None:
    """``--specs A,B,...``, alias ``--spec`` (a list of one is a list); parsed into ``args.specs``."""
    parser.add_argument("--specs", "--spec", dest="specs", default=default, metavar="SPECS", help=help)


def add_gen_tokens_argument(
    parser: argparse.ArgumentParser | Any,
    default: int,
    help: str,
    *,
    type: Callable[[str], int] = positive_int,
) -> None:
    """``--num-tokens-to-generate N`` (Megatron's name), alias ``--gen-tokens``; parsed into ``args.gen_tokens``."""
    parser.add_argument(
        "--num-tokens-to-generate",
        "--gen-tokens",
        dest="gen_tokens",
        action=AliasedStore,
        convert=type,
        default=default,
        metavar="N",
        help=help,
    )


def add_quiet_argument(parser: argparse.ArgumentParser | Any, help: str = "no progress bars or progress lines") -> None:
    """``--quiet``: results and errors only."""
    parser.add_argument("--quiet", "-q", action="store_true", help=help)


# ------------------------------------------------------------------------------------------------- outputs


def check_output_file(path: str | Path, flag: str, *, mkdir: bool = True) -> Path:
    """Check before any work that ``path`` can be written as a file; create its parent folder (``mkdir``).

    Creates and removes a probe file in the parent folder: permission bits alone do not tell (root, ACLs,
    read-only mounts).

    Raises:
        OutputPathError: ``path`` is a directory, a parent is a file, the folder cannot be created or written.
    """
    p = Path(path)
    where = f"{flag} {p}" if flag else str(p)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputPathError(f"{where}: not a file name")
    if p.is_dir():
        raise OutputPathError(f"{where}: is a directory; expected a file path")
    if p.exists() and not p.is_file():
        if os.access(p, os.W_OK):  # a device or a FIFO (/dev/stdout): written directly, not replaced
            return p
        raise OutputPathError(f"{where}: exists, is not a regular file and is not writable")
    parent = p.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{where}: {ancestor} is a file, not a directory")
    if not parent.is_dir():
        if not mkdir:
            raise OutputPathError(f"{where}: directory {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"{where}: cannot create directory {parent}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputPathError(f"{where}: cannot write in {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return p


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Check before any work that ``path`` is a writable directory or can be created as one (nothing is created:
    the tool makes it when it has something to write).

    Raises:
        OutputPathError: ``path`` or one of its parents is a file, or the nearest existing folder is not writable.
    """
    p = Path(path)
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        what = "is a file" if ancestor == p else f"{ancestor} is a file"
        raise OutputPathError(f"{flag} {p}: {what}, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tpcomp.", suffix=".probe", dir=ancestor)
    except OSError as exc:
        raise OutputPathError(f"{flag} {p}: cannot write in {ancestor}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the complete new one, never a part.

    A temporary file in the same folder is written, flushed to disk and renamed over ``path`` (``os.replace``).
    A symlink's target is replaced; a device or FIFO (``/dev/stdout``) is written directly.
    """
    p = Path(path)
    if p.exists() and not p.is_file():
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        return
    target = Path(os.path.realpath(p))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def partial_path(path: str | Path) -> Path:
    """Where the records of an unfinished run are kept: ``PATH.partial`` beside ``PATH``."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


class ResultsFile:
    """JSON-lines results written as they finish: each record is appended to ``PATH.partial`` and flushed;
    :meth:`commit` renames the file to ``PATH`` once the run is complete. An interrupted run leaves
    ``PATH.partial`` with every record finished before the interruption, and no ``PATH`` that looks complete.

    A device or FIFO path (``/dev/stdout``) is written directly, record by record.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.direct = self.path.exists() and not self.path.is_file()
        self.partial = self.path if self.direct else partial_path(self.path)
        self._f: IO[str] | None = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 - closed by commit
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        assert self._f is not None, "write after commit"
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.count += 1

    def commit(self) -> Path:
        """Close the file and move it to its final name; returns the final path."""
        if self._f is not None:
            if not self.direct:
                os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            if not self.direct:
                os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without committing (the ``.partial`` file stays, with the records written so far)."""
        if self._f is not None:
            self._f.close()
            self._f = None


# ------------------------------------------------------------------------------------------- model checks


def source_model_config(model: str | Path) -> Any:
    """The :class:`~megatron_tpcomp.megatron.model.ModelConfig` of ``model`` without converting anything.

    ``model`` is a checkpoint directory (its metadata) or a known model name (a cached checkpoint of it at any TP
    size, else the GGUF header: a few seconds, against tens for a conversion).

    Raises:
        CheckpointError: a directory that is not a readable checkpoint.
        AssetError: a known model whose source file is not installed.
    """
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata
    from megatron_tpcomp.checkpoint.locate import META_FILE

    name = str(model)
    if name not in assets.MODELS:
        return read_metadata(model).model_config
    for tp in range(1, 65):
        ckpt = assets.checkpoint_dir(name, tp)
        if (ckpt / META_FILE).is_file():
            try:
                return read_metadata(ckpt).model_config
            except ValueError:
                continue  # a damaged cache entry: the source file says the same
    return _gguf_model_config(assets.default_gguf_path(name))


def _gguf_model_config(path: Path) -> Any:
    """The model config from a GGUF file's header (no tensor is read)."""
    from gguf import GGUFReader

    from megatron_tpcomp.checkpoint import CheckpointError
    from megatron_tpcomp.checkpoint.gguf_source import _field
    from megatron_tpcomp.megatron.model import ModelConfig

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # bad magic, truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file: {exc}") from exc
    heads = int(_field(reader, "llama.attention.head_count", path=path))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return ModelConfig(
        num_layers=int(_field(reader, "llama.block_count", path=path)),
        hidden_size=int(_field(reader, "llama.embedding_length", path=path)),
        num_attention_heads=heads,
        num_query_groups=int(_field(reader, "llama.attention.head_count_kv", heads, path=path)),
        ffn_hidden_size=int(_field(reader, "llama.feed_forward_length", path=path)),
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens.data) if tokens else 0, path=path)),
        max_sequence_length=int(_field(reader, "llama.context_length", 2048, path=path)),
    )


def check_tp(model: str | Path, model_config: Any, tp: int, flag: str = "--tp") -> None:
    """Raise ValueError (one line) if ``tp`` does not divide the model's heads, KV groups, FFN or vocabulary."""
    try:
        model_config.check_tp(tp)
    except ValueError as exc:
        raise ValueError(f"{flag} {tp}: {model} cannot be split {tp} ways ({exc})") from None


def check_model_and_tp(model: str, tp: int) -> Any:
    """The model's config, after checking in this process that ``tp`` divides it (and that a checkpoint directory
    is sharded for ``tp``): a bad TP size fails in a second, not after a conversion."""
    from megatron_tpcomp import assets
    from megatron_tpcomp.checkpoint import read_metadata

    model_cfg = source_model_config(model)
    if str(model) not in assets.MODELS:
        meta = read_metadata(model)
        if meta.tp_size != tp:
            raise ValueError(
                f"--tp {tp}: {model} is sharded for TP={meta.tp_size}; reshard it with "
                f"`tpcomp convert {model} OUT --tp {tp}` or pass --tp {meta.tp_size}"
            )
    check_tp(model, model_cfg, tp)
    return model_cfg


def check_config_for_model(config: Any, model_config: Any, tp: int, where: str) -> None:
    """Check a :class:`~megatron_tpcomp.config.CompressionConfig` against the model it is about to run on, in
    the launching process: layers, hidden size and TP recorded in the config, per-layer tables, and the
    performance table of policy ``auto`` (an explicit path that does not exist is an error).

    Args:
        where: the config's origin (file path or spec) put at the head of the message.

    Raises:
        ConfigError: naming ``where`` and the mismatch.
    """
    from megatron_tpcomp.config import ConfigError

    check = getattr(config, "check_against", None)
    try:
        if check is not None:
            check(model_config, tp_size=tp, source=where)
        else:
            config.check_model(model_config.num_layers, model_config.hidden_size, tp)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if str(where) in message else f"{where}: {message}") from None
    # Each codec sized for a message of this model (the layers' collectives carry [tokens, hidden]): a spec that
    # cannot encode it (more outlier channels than the model has, ...) fails here, not in every rank.
    from megatron_tpcomp.codecs import CodecError

    seen: set[str] = set()
    for layer in range(model_config.num_layers):
        for site in ("attention", "mlp"):
            try:
                codec = config.codec_for(site, layer)
                if codec is None or codec.spec in seen:
                    continue
                seen.add(codec.spec)
                codec.payload_nbytes((max(tp, 1), model_config.hidden_size))
            except (CodecError, ConfigError) as exc:
                raise ConfigError(f"{where}: layer {layer} {site}: {exc}") from None
    table = getattr(config, "perf_table", None)
    if table is not None and not Path(table).is_file():
        raise ConfigError(
            f"{where}: perf_table {table!r} (resolved: {Path(table).resolve()}) does not exist; write one with "
            "`tpcomp bench perf-table` or remove the key to use the published defaults"
        )
