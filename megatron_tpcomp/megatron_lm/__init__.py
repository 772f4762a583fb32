"""Run Megatron-LM's own scripts, unmodified, with compressed TP communication: one module, one flag.

    torchrun --nproc-per-node 3 -m megatron_tpcomp.megatron_lm \\
        Megatron-LM/examples/inference/gpt/gpt_static_inference.py [the script's own flags] \\
        --tp-comm-compression int4:g32+had

What the launch does, in this order (:func:`run_script`):

1. ``sys.path`` as ``python SCRIPT`` would have it (the script's directory first), plus the Megatron-LM tree the
   script lives in (the nearest parent with ``megatron/training``), so its ``megatron`` package is the one used;
   where that tree lacks the root modules the inference scripts import by bare name (``model_provider``,
   ``gpt_builders``, ...: source archives of ``megatron/`` and ``examples/`` do), stand-ins from
   ``repo_root/`` are appended after everything else.
2. On a machine without CUDA only: the CPU patches of ``megatron_tpcomp.megatron.cpu`` (megatron-core's and
   ``megatron.training``'s, each listed there). On a GPU nothing is patched for the CPU.
3. Hooks (:func:`install_hooks`, undone by :func:`uninstall_hooks`):

   - ``megatron.training.arguments.parse_args`` (and its binding in ``megatron.training.initialize``, through
     which ``initialize_megatron`` calls it): whatever ``extra_args_provider`` the script passes is chained with
     :func:`megatron_tpcomp.add_arguments`, so the script's own parser accepts ``--tp-comm-compression`` and
     friends and checks their values while parsing (a bad spec exits with argparse's error, naming the flag,
     before anything is built). ``$TPCOMP_COMPRESSION`` (a spec or a config path) is the flag's default.
   - ``megatron.training.get_model`` (both bindings): the returned chunks get compression (telemetry on) before
     the call returns. The intercept is forward hooks, independent of the weights, so the script's
     ``load_checkpoint`` that follows leaves it in place, and whatever the script does next (static engine,
     dynamic engine, text generation server) runs through it.
4. The script runs as ``__main__``; at exit every rank that had compression on prints (rank 0) or writes
   (``--tp-comm-compression-summary FILE``) the compression summary: bytes sent per rank against Megatron's
   uncompressed collectives, per site.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import json
import logging
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("megatron_tpcomp")

REPO_ROOT_STANDINS = Path(__file__).resolve().parent / "repo_root"
SUMMARY_FLAG = "--tp-comm-compression-summary"


# ------------------------------------------------------------------------------------------------ sys.path


def megatron_lm_root(script: Path) -> Path | None:
    """The nearest parent of ``script`` holding Megatron-LM's ``megatron/training`` package, or None."""
    for parent in script.resolve().parents:
        if (parent / "megatron" / "training" / "__init__.py").is_file():
            return parent
    return None


def setup_sys_path(script: Path) -> list[str]:
    """Make imports resolve as for ``cd MEGATRON_LM && python SCRIPT``; returns the entries added.

    The script's directory goes first (what ``python SCRIPT`` does); the Megatron-LM root second, ahead of
    site-packages, so a checkout's ``megatron.core`` wins over an installed megatron-core wheel; the stand-ins
    for missing root modules last, only when ``model_provider`` is not importable otherwise.
    """
    added = []
    script_dir = str(script.resolve().parent)
    sys.path.insert(0, script_dir)
    added.append(script_dir)
    root = megatron_lm_root(script)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(1, str(root))
        added.append(str(root))
    if importlib.util.find_spec("model_provider") is None:
        sys.path.append(str(REPO_ROOT_STANDINS))
        added.append(str(REPO_ROOT_STANDINS))
        logger.info(
            "megatron-tpcomp: %s has no model_provider.py/gpt_builders.py at its root; using megatron-tpcomp's "
            "stand-ins (dense GPT models only)",
            root or script.parent,
        )
    return added


# ------------------------------------------------------------------------------------------------- hooks


@dataclass
class _Hooked:
    owner: Any
    name: str
    original: Any


@dataclass
class LaunchState:
    """What the hooks did: the config applied, the chunks it was applied to, and where the summary goes."""

    config: Any = None
    chunks: list[Any] = field(default_factory=list)
    num_layers: int = 0
    rank: int = 0
    tp: int = 0
    summary_path: str | None = None
    summary_done: bool = False


_hooked: list[_Hooked] = []
state = LaunchState()


def chain_provider(provider: Callable[[argparse.ArgumentParser], Any] | None) -> Callable[..., Any]:
    """An ``extra_args_provider`` that runs ``provider`` (the script's own, may be None) and then adds the
    plug-in's flags (unless the script already added them: the three-line patch and the launch together)."""
    from megatron_tpcomp.megatron.args import add_arguments, has_arguments

    def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if provider is not None:
            parser = provider(parser) or parser
        if not has_arguments(parser):
            add_arguments(parser)
        if SUMMARY_FLAG not in parser._option_string_actions:
            parser.add_argument(
                SUMMARY_FLAG,
                metavar="FILE",
                default=None,
                help="write the compression summary (bytes per rank, per site) as JSON at exit; '{rank}' in FILE "
                "writes one per rank, otherwise rank 0 writes it (megatron-tpcomp launch)",
            )
        return parser

    return extra_args_provider


def check_parsed(args: argparse.Namespace) -> None:
    """Parse-time check of the flags together (spec, config file, min-bytes, algorithm) and, where the
    architecture flags are given, against the model; exits like argparse (status 2) naming the flag."""
    from megatron_tpcomp.megatron.args import config_from_args

    try:
        config = config_from_args(args)
        if config is not None and args.num_layers and args.hidden_size:
            config.check_model(args.num_layers, args.hidden_size, args.tensor_model_parallel_size)
    except ValueError as exc:
        flag = (
            "--tp-comm-compression-config"
            if getattr(args, "tp_comm_compression_config", None)
            else "--tp-comm-compression"
        )
        print(f"{Path(sys.argv[0]).name}: error: argument {flag}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _wrap_parse_args(original: Callable[..., Any]) -> Callable[..., Any]:
    def parse_args(extra_args_provider: Any = None, ignore_unknown_args: bool = False, *a: Any, **kw: Any) -> Any:
        args = original(chain_provider(extra_args_provider), ignore_unknown_args, *a, **kw)
        check_parsed(args)
        return args

    parse_args.__wrapped__ = original  # type: ignore[attr-defined]
    return parse_args


def checkpoint_compression(args: argparse.Namespace) -> Any:
    """The per-layer config a megatron-tpcomp checkpoint (``--load``) records (``tpcomp convert
    --compression-config``), used when no flag or variable asks for compression; None otherwise."""
    from megatron_tpcomp.checkpoint.locate import META_FILE
    from megatron_tpcomp.checkpoint.metadata import read_metadata
    from megatron_tpcomp.config import CompressionConfig

    load = getattr(args, "load", None)
    if not load or not (Path(load) / META_FILE).is_file():
        return None
    meta = read_metadata(load)
    return CompressionConfig.from_dict(meta.compression, source=str(load)) if meta.compression else None


def apply_to(model: Any) -> None:
    """Compression as the parsed flags say on ``model`` (get_model's list of chunks), telemetry on."""
    import torch.distributed as dist
    from megatron.training import get_args

    from megatron_tpcomp.megatron.args import config_from_args, enable_chunks, model_chunks, warn_unverified

    args = get_args()
    config, source = config_from_args(args), "flags"
    if config is None:
        config, source = checkpoint_compression(args), f"the checkpoint {args.load}"
    state.rank = dist.get_rank() if dist.is_initialized() else 0
    state.summary_path = getattr(args, "tp_comm_compression_summary", None)
    if config is None:
        if state.rank == 0:
            print(
                "megatron-tpcomp: compression off (no --tp-comm-compression, no $TPCOMP_COMPRESSION, none recorded "
                "in the checkpoint)",
                flush=True,
            )
        return
    warn_unverified(args)
    enable_chunks(model, config, telemetry=True)
    state.config = config
    state.chunks = model_chunks(model)
    state.num_layers = int(args.num_layers)
    state.tp = int(getattr(args, "tensor_model_parallel_size", 0) or 0)
    if state.rank == 0:
        print(
            f"megatron-tpcomp: compression from {source} on {len(state.chunks)} model chunk(s): default "
            f"{config.default.spec}, algo {config.algo}",
            flush=True,
        )
    atexit.register(report)


class ArchitectureMismatchError(ValueError):
    """Megatron-LM's arguments build a model other than the one ``--load`` holds."""


def check_checkpoint_args(args: argparse.Namespace) -> None:
    """Before the model is built: when ``--load`` is a megatron-tpcomp checkpoint, every architecture flag
    must agree with what it records (Megatron-LM loads with ``strict=False`` and would "successfully load" a
    wrong ``--rotary-base``). Raises ArchitectureMismatchError naming each disagreeing flag."""
    from megatron_tpcomp.checkpoint import megatron_args
    from megatron_tpcomp.checkpoint.locate import META_FILE
    from megatron_tpcomp.checkpoint.metadata import read_metadata

    load = getattr(args, "load", None)
    if not load or not (Path(load) / META_FILE).is_file():
        return
    meta = read_metadata(load)
    recorded = megatron_args.megatron_args(meta.model_config, meta.tp_size, meta.dtype)
    wrong = megatron_args.mismatches(recorded, args)
    if wrong:
        raise ArchitectureMismatchError(
            f"--load {load} holds another model than the flags describe: {'; '.join(wrong)}. Give the "
            f"checkpoint's flags (`tpcomp megatron-args {load}` prints them) or --use-checkpoint-args"
        )


def _wrap_get_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_model(*a: Any, **kw: Any) -> Any:
        from megatron.training import get_args

        check_checkpoint_args(get_args())
        model = original(*a, **kw)
        apply_to(model)
        return model

    get_model.__wrapped__ = original  # type: ignore[attr-defined]
    return get_model


HOOKS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("megatron.training.arguments", "parse_args", _wrap_parse_args),
    ("megatron.training.initialize", "parse_args", _wrap_parse_args),  # bound by name at import
    ("megatron.training.training", "get_model", _wrap_get_model),
    ("megatron.training", "get_model", _wrap_get_model),  # re-exported by the package
)


def install_hooks() -> list[str]:
    """Install the launch hooks (idempotent); returns their qualified names. Raises MegatronCompatError naming
    the attribute when Megatron-LM moved one (nothing is hooked then)."""
    from megatron_tpcomp.megatron.compat import MegatronCompatError

    if _hooked:
        return [f"{h.owner.__name__}.{h.name}" for h in _hooked]
    resolved = []
    for module, name, wrap in HOOKS:
        try:
            owner = importlib.import_module(module)
        except ImportError as exc:
            raise MegatronCompatError(
                f"megatron_lm launch: {module} is not importable ({exc}); put a Megatron-LM checkout on the path"
            ) from exc
        if not callable(getattr(owner, name, None)):
            raise MegatronCompatError(f"megatron_lm launch: {module}.{name} not found; this Megatron-LM is unsupported")
        resolved.append((owner, name, wrap))
    for owner, name, wrap in resolved:
        original = getattr(owner, name)
        setattr(owner, name, wrap(original))
        _hooked.append(_Hooked(owner, name, original))
    return [f"{h.owner.__name__}.{h.name}" for h in _hooked]


def uninstall_hooks() -> None:
    """Put every hooked attribute back (the same objects)."""
    while _hooked:
        h = _hooked.pop()
        setattr(h.owner, h.name, h.original)


# ----------------------------------------------------------------------------------------------- summary


def summary(config: Any, num_layers: int, traffic: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The compression summary of this rank (same keys as the project's launcher's ``--summary-json``)."""
    wire = sum(r["wire_bytes"] for r in traffic.values())
    base = sum(r["baseline_wire_bytes"] for r in traffic.values())
    layers = {
        str(layer): {block: config.setting_for(block, layer).spec for block in ("attention", "mlp")}
        for layer in range(num_layers)
    }
    return {
        "compression": config.to_dict(),
        "per_layer_codec": layers,
        "wire_bytes_per_rank": wire,
        "uncompressed_bytes_per_rank": base,
        "bytes_saved_per_rank": base - wire,
        "ratio": base / wire if wire else None,
        "per_site": traffic,
    }


def report() -> dict[str, Any] | None:
    """Print (rank 0) and write (``--tp-comm-compression-summary``) the summary; runs once, at exit."""
    from megatron_tpcomp.megatron import intercept

    if state.config is None or state.summary_done:
        return None
    state.summary_done = True
    result = summary(state.config, state.num_layers, intercept.telemetry_summary())
    if state.rank == 0 and state.tp == 1:  # TP collectives are identities: "1.00x" would misread as "no gain"
        print("megatron-tpcomp: compression summary: compression is a no-op at TP=1 (nothing is exchanged)")
    elif state.rank == 0:
        codecs = sorted({s for blocks in result["per_layer_codec"].values() for s in blocks.values()})
        print(
            f"megatron-tpcomp: compression summary: {result['wire_bytes_per_rank'] / 1e6:.2f} MB sent per rank "
            f"instead of {result['uncompressed_bytes_per_rank'] / 1e6:.2f} MB ({result['ratio'] or 1.0:.2f}x, "
            f"{result['bytes_saved_per_rank'] / 1e6:.2f} MB saved); codecs: {', '.join(codecs)}",
            flush=True,
        )
    path = state.summary_path
    if path and ("{rank}" in path or state.rank == 0):
        Path(path.replace("{rank}", str(state.rank))).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ launch


def run_script(script: str | Path, argv: list[str]) -> None:
    """Run Megatron-LM script ``script`` with arguments ``argv`` (steps 1-4 of the module docstring)."""
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"megatron_lm launch: script {path} does not exist")
    setup_sys_path(path)
    import torch

    if not torch.cuda.is_available():
        from megatron_tpcomp.megatron import cpu

        cpu.enable_cpu(inference=True, training=True, dynamic=True)
    install_hooks()
    sys.argv = [str(path), *argv]
    runpy.run_path(str(path), run_name="__main__")
    report()  # also registered with atexit, for scripts that end with sys.exit / os._exit paths that allow it


USAGE = """usage: python -m megatron_tpcomp.megatron_lm SCRIPT.py [SCRIPT ARGS ...] [--tp-comm-compression SPEC]

Runs a Megatron-LM script (gpt_static_inference.py, gpt_dynamic_inference.py, run_text_generation_server.py,
...) unmodified, with megatron-tpcomp's flags added to its own parser and compression applied to the model it
builds. Start it with torchrun, one process per rank, as the script itself would be:

    torchrun --nproc-per-node 3 -m megatron_tpcomp.megatron_lm \\
        examples/inference/gpt/gpt_static_inference.py --load CKPT ... --tp-comm-compression int4:g32+had

Flags added to the script's parser: --tp-comm-compression SPEC|CONFIG.json (default $TPCOMP_COMPRESSION),
--tp-comm-compression-config FILE, --tp-comm-compression-min-bytes N, --tp-comm-compression-algo ALGO,
--tp-comm-compression-summary FILE. Without CUDA, megatron.training's CUDA assumptions are patched for CPU
(gloo); with CUDA nothing is patched.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0].startswith("-"):
        print(
            f"{USAGE}\nmegatron_tpcomp.megatron_lm: error: expected SCRIPT.py first, got {argv[0]!r}", file=sys.stderr
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_script(argv[0], argv[1:])
    except FileNotFoundError as exc:
        print(f"megatron_tpcomp.megatron_lm: error: {exc}", file=sys.stderr)
        return 2
    return 0
