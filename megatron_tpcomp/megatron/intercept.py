"""Route a Megatron-Core model's forward TP collectives through the compressed collectives, layer by layer.

Install point (see ``compat.py``): the private primitives of ``tensor_parallel.mappings`` that Megatron's
autograd Functions look up at call time, and ``tensor_parallel.layers.dist_all_gather_func``. Those primitives do
not know which layer called them, so :func:`enable` also registers forward hooks that record the current *site*
(layer index + ``attention`` | ``mlp`` | ``embedding`` | ``logits``) on a small stack. A primitive called with a
site on the stack uses that site's codec; one called with no site (backward passes, other code) runs Megatron's
own collective unchanged. Backward is therefore always Megatron's, uncompressed.

Every intercepted call is counted per (op, site), so tests can prove that a megatron-core release still routes
each collective through the install point.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_tpcomp import collectives
from megatron_tpcomp.collectives import CommStats
from megatron_tpcomp.config import CompressionConfig, ConfigError
from megatron_tpcomp.megatron.compat import intercept_points
from megatron_tpcomp.megatron.site import Site

logger = logging.getLogger("megatron_tpcomp")


class RankMismatchError(RuntimeError):
    """Ranks of a tensor-parallel group were given different compression settings."""


@dataclass
class _ModelState:
    config: CompressionConfig
    handles: list[Any]
    telemetry: bool
    cost: Any = None  # CostModel when the config's policy is "auto"
    tp_size: int = 1
    by_algo: dict[str, CompressionConfig] = field(default_factory=dict)


#: Environment variable choosing when compressed collectives verify that all ranks agree on everything that
#: changes the bits (op, shape, dtype, codec spec, seeds and tables, algorithm, chunking, min_bytes decision; one
#: extra all-gather of a fixed-size record, see ``megatron_tpcomp.agreement``): ``first`` (default: the first
#: call of each distinct such fingerprint per process group, which catches a rank that was set up differently;
#: CUDA-graph safe after a warm-up forward), ``always`` (every call: a host sync per collective, not graph-safe),
#: ``off``.
CHECK_RANKS_ENV = "TPCOMP_CHECK_RANKS"

#: ``TPCOMP_CHECK_RANKS`` value -> the collectives' ``check_ranks`` argument.
_CHECK_RANKS: dict[str, bool | str] = {"first": "first", "always": True, "off": False}


def check_ranks_mode() -> str:
    """The ``TPCOMP_CHECK_RANKS`` mode: ``first`` | ``always`` | ``off`` (ConfigError for anything else)."""
    mode = os.environ.get(CHECK_RANKS_ENV, "first").strip().lower()
    if mode not in ("first", "always", "off"):
        raise ConfigError(f"{CHECK_RANKS_ENV}={mode!r}: expected first, always or off")
    return mode


_state: dict[int, _ModelState] = {}  # id(model) -> state
_site_stack: list[tuple[Site, _ModelState]] = []
_originals: dict[str, tuple[Any, Any]] = {}
#: (op, site or "none") -> number of intercepted calls since the last reset_counts().
call_counts: collections.Counter[tuple[str, str]] = collections.Counter()
#: (op, site, choice) -> calls, for policy "auto": what the cost model picked ("none" or "SPEC@ALGO").
auto_choices: collections.Counter[tuple[str, str, str]] = collections.Counter()
#: (site, CommStats) of compressed calls, recorded only for models enabled with telemetry=True.
telemetry_records: list[tuple[str, CommStats]] = []


def reset_counts() -> None:
    call_counts.clear()
    telemetry_records.clear()
    auto_choices.clear()


def _current() -> tuple[Site, _ModelState] | None:
    return _site_stack[-1] if _site_stack else None


#: Called as ``observer(op, site, tensor)`` for every intercepted call made inside a site, before it is sent
#: (calibration records the statistics of what each collective communicates). None: no observer, no cost.
_observer: Callable[[str, Site, torch.Tensor], None] | None = None


@contextlib.contextmanager
def observe(callback: Callable[[str, Site, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, call ``callback(op, site, tensor)`` with this rank's input of every intercepted
    collective of an enabled model (``tensor``: the partial sum ``[s, b, h]`` of an all-reduce or
    reduce-scatter, the local shard of an all-gather). Enable the model with spec ``none`` to observe Megatron's
    own, uncompressed communication."""
    global _observer
    previous, _observer = _observer, callback
    try:
        yield
    finally:
        _observer = previous


@dataclass
class Dispatch:
    """One intercepted collective, as a :func:`dispatch_hook` sees it.

    ``op``: ``all_reduce`` | ``reduce_scatter`` | ``all_gather_last`` | ``all_gather_first`` |
    ``all_gather_linear`` (or a Transformer Engine collective's op); ``site``: the site on the stack, None outside
    any (Megatron's own collective runs); ``tensor``: this rank's input (None where the primitive has none);
    ``stats``: after the dispatch, the CommStats of a compressed call of a model enabled with ``telemetry=True``,
    else None.
    """

    op: str
    site: Site | None
    tensor: torch.Tensor | None
    stats: CommStats | None = None


#: ``hook(call, proceed) -> result``: wraps the dispatch of every intercepted primitive; it must call
#: ``proceed()`` exactly once and return its result (see :func:`dispatch_hook`).
DispatchHook = Callable[[Dispatch, Callable[[], Any]], Any]
_dispatch_hooks: list[DispatchHook] = []


@contextlib.contextmanager
def dispatch_hook(hook: DispatchHook) -> Iterator[None]:
    """Within the block, every intercepted primitive (stock or compressed path, Transformer Engine's included)
    is dispatched as ``hook(call, proceed)``, where ``call`` is a :class:`Dispatch` and ``proceed()`` runs the
    collective and returns its result, which the hook must return. Hooks nest: the first installed is the
    outermost. Benchmarks time the collectives with it; no hook, no cost."""
    _dispatch_hooks.append(hook)
    try:
        yield
    finally:
        _dispatch_hooks.remove(hook)


def _run(op: str, fallback: Any, compressed: Any, tensor: torch.Tensor | None = None) -> Any:
    """Dispatch one intercepted primitive through the installed :func:`dispatch_hook` s (see :func:`_dispatch`)."""
    if not _dispatch_hooks:
        return _dispatch(op, fallback, compressed, tensor, None)
    top = _current()
    call = Dispatch(op, top[0] if top else None, tensor)
    proceed: Callable[[], Any] = functools.partial(_dispatch, op, fallback, compressed, tensor, call)
    for hook in reversed(_dispatch_hooks):
        proceed = functools.partial(hook, call, proceed)
    return proceed()


def _dispatch(op: str, fallback: Any, compressed: Any, tensor: torch.Tensor | None, call: Dispatch | None) -> Any:
    """Count the call; use ``compressed(codec, cfg, stats, check_ranks)`` when the current site has a codec.

    ``check_ranks`` (from :data:`CHECK_RANKS_ENV`: ``"first"``, True or False) makes the collective verify that
    every rank makes the same call (codec parameters, algorithm and chunking included), so a mismatch is an
    error naming the ranks instead of a hang or garbage. ``call``: a hooked dispatch's record (gets the stats)."""
    top = _current()
    call_counts[(op, str(top[0]) if top else "none")] += 1
    if top is None:
        return fallback()
    site, state = top
    if _observer is not None and tensor is not None:
        _observer(op, site, tensor)
    codec = state.config.codec_for(site.kind, site.layer)
    if codec is None:
        return fallback()
    algo = state.config.algo_for(site.kind, site.layer)
    cfg = _config_with_algo(state, algo)
    if state.cost is not None and tensor is not None:
        cfg = _auto_config(op, site, tensor, codec, state, algo)
        if cfg is None:
            return fallback()
    stats: list[CommStats] | None = [] if state.telemetry else None
    out = compressed(codec, cfg, stats, _CHECK_RANKS[check_ranks_mode()])
    if stats:
        telemetry_records.append((str(site), stats[0]))
        if call is not None:
            call.stats = stats[0]
    return out


_COST_OPS = {"all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter"}


def _config_with_algo(state: _ModelState, algo: str) -> CompressionConfig:
    """The model's config with all-reduce algorithm ``algo`` (what the collective wrappers read), cached."""
    if algo == state.config.algo:
        return state.config
    if algo not in state.by_algo:
        state.by_algo[algo] = dataclasses.replace(state.config, algo=algo)
    return state.by_algo[algo]


def _auto_config(op: str, site: Site, tensor: torch.Tensor, codec: Any, state: _ModelState, algo: str) -> Any:
    """Policy ``auto``: the config to compress this message with (its algorithm chosen among ``algo``'s: both
    for ``auto``), or None to send it uncompressed, whichever the cost model predicts faster. Every rank sees the
    same shape, dtype, config and table, so every rank takes the same decision."""
    spec, chosen = state.cost.choose_message(_COST_OPS.get(op, "all_gather"), tensor, codec, state.tp_size, algo)
    auto_choices[(op, str(site), "none" if spec == "none" else f"{spec}@{chosen}")] += 1
    if spec == "none":
        return None
    return _config_with_algo(state, chosen)


def _wrap_reduce(original: Any) -> Any:
    def _reduce(input_: torch.Tensor, group: Any) -> torch.Tensor:
        if group is None or group.size() == 1:
            return original(input_, group)
        return _run(
            "all_reduce",
            lambda: original(input_, group),
            lambda codec, cfg, stats, check: collectives.all_reduce(
                input_, codec, group, algo=cfg.algo, min_bytes=cfg.min_bytes, stats=stats, check_ranks=check
            ),
            input_,
        )

    return _reduce


def _wrap_gather_last(original: Any) -> Any:
    def _gather_along_last_dim(input_: torch.Tensor, group: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if group is None or group.size() == 1 or args or kwargs:
            return original(input_, group, *args, **kwargs)
        return _run(
            "all_gather_last",
            lambda: original(input_, group),
            lambda codec, cfg, stats, check: collectives.all_gather(
                input_, codec, group, dim=-1, min_bytes=cfg.min_bytes, stats=stats, check_ranks=check
            ),
            input_,
        )

    return _gather_along_last_dim


def _wrap_gather_first(original: Any) -> Any:
    def _gather_along_first_dim(
        input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        def stock() -> torch.Tensor:
            return original(input_, group, output_split_sizes, use_global_buffer)

        if group is None or group.size() == 1 or output_split_sizes is not None:
            return stock()
        return _run(
            "all_gather_first",
            stock,
            lambda codec, cfg, stats, check: collectives.all_gather(
                input_, codec, group, dim=0, min_bytes=cfg.min_bytes, stats=stats, check_ranks=check
            ),
            input_,
        )

    return _gather_along_first_dim


def _wrap_reduce_scatter_first(original: Any) -> Any:
    def _reduce_scatter_along_first_dim(
        input_: torch.Tensor, group: Any, input_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        def stock() -> torch.Tensor:
            return original(input_, group, input_split_sizes, use_global_buffer)

        if group is None or group.size() == 1 or input_split_sizes is not None:
            return stock()
        return _run(
            "reduce_scatter",
            stock,
            lambda codec, cfg, stats, check: collectives.reduce_scatter(
                input_, codec, group, dim=0, min_bytes=cfg.min_bytes, stats=stats, check_ranks=check
            ),
            input_,
        )

    return _reduce_scatter_along_first_dim


class _DoneHandle:
    """Stands in for an async work handle: the compressed all-gather completed synchronously."""

    def wait(self) -> None:
        return None


def _wrap_dist_all_gather(original: Any) -> Any:
    def dist_all_gather_func(output: torch.Tensor, input_: torch.Tensor, group: Any = None, async_op: bool = False):
        def stock() -> Any:
            return original(output, input_, group=group, async_op=async_op)

        def compressed(codec: Any, cfg: CompressionConfig, stats: Any, check: bool | str) -> Any:
            out = collectives.all_gather(
                input_, codec, group, dim=0, min_bytes=cfg.min_bytes, stats=stats, check_ranks=check
            )
            output.copy_(out)
            return _DoneHandle() if async_op else None

        if dist.get_world_size(group) == 1:
            return stock()
        return _run("all_gather_linear", stock, compressed, input_)

    return dist_all_gather_func


_WRAPPERS = {
    "_reduce": _wrap_reduce,
    "_gather_along_last_dim": _wrap_gather_last,
    "_gather_along_first_dim": _wrap_gather_first,
    "_reduce_scatter_along_first_dim": _wrap_reduce_scatter_first,
    "dist_all_gather_func": _wrap_dist_all_gather,
}


def _install() -> None:
    if _originals:
        return
    for key, (module, point) in intercept_points().items():
        original = getattr(module, point.attr)
        _originals[key] = (module, original)
        setattr(module, point.attr, _WRAPPERS[point.attr](original))
    # Transformer Engine layer specs communicate inside TE: wrap its collectives too where TE is installed.
    from megatron_tpcomp.megatron import te

    if te.install(_run, _originals):
        logger.info("megatron-tpcomp: Transformer Engine collectives intercepted as well")


def _uninstall() -> None:
    for key, (module, original) in _originals.items():
        setattr(module, key.rsplit(".", 1)[1], original)
    _originals.clear()


def installed() -> bool:
    return bool(_originals)


# ------------------------------------------------------------------------------------------------ model hooks


def _push(site: Site, state: _ModelState) -> Any:
    def pre_hook(module: torch.nn.Module, args: Any) -> None:
        _site_stack.append((site, state))

    return pre_hook


def _pop(module: torch.nn.Module, args: Any, output: Any) -> None:
    if _site_stack:
        _site_stack.pop()


def _sites(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, Site]]:
    """The modules that own TP collectives, with their sites."""
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        yield embedding, Site("embedding")
    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        index = int(layer.layer_number) - 1  # Megatron numbers layers from 1
        yield layer.self_attention, Site("attention", index)
        yield layer.mlp, Site("mlp", index)
    output_layer = getattr(model, "output_layer", None)
    if output_layer is not None:
        yield output_layer, Site("logits")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _check_ranks_agree(config: CompressionConfig) -> None:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    mine = config.describe()
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    if len(set(everyone)) > 1:
        ranks = dist.get_process_group_ranks(group)
        detail = "; ".join(f"rank {r}: {d[:160]}" for r, d in zip(ranks, everyone, strict=True))
        raise RankMismatchError(f"tensor-parallel ranks were given different compression settings: {detail}")


def enable(
    model: torch.nn.Module, spec_or_config: str | CompressionConfig, *, telemetry: bool = False
) -> CompressionConfig:
    """Compress the forward TP collectives of ``model`` (a megatron-core GPTModel) with a spec or a config.

    Call on every rank of the tensor-parallel group (it checks that all ranks agree). Returns the config used.
    """
    from megatron.core import parallel_state

    model = _unwrap(model)
    config = CompressionConfig.from_spec(spec_or_config) if isinstance(spec_or_config, str) else spec_or_config
    if not isinstance(config, CompressionConfig):
        raise ConfigError(f"expected a spec string or CompressionConfig, got {type(spec_or_config).__name__}")
    mc = model.config
    config.check_model(mc.num_layers, mc.hidden_size, parallel_state.get_tensor_model_parallel_world_size())
    _check_ranks_agree(config)
    if id(model) in _state:
        disable(model)
    _install()
    state = _ModelState(config, [], telemetry)
    state.tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if config.policy == "auto":
        from megatron_tpcomp.costmodel import CostModel

        try:
            state.cost = CostModel.load(config.perf_table)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for module, site in _sites(model):
        state.handles.append(module.register_forward_pre_hook(_push(site, state)))
        state.handles.append(module.register_forward_hook(_pop))
    # A forward that raised leaves sites on the stack: clear them when the next forward starts.
    state.handles.append(model.register_forward_pre_hook(lambda m, a: _site_stack.clear()))
    _state[id(model)] = state
    logger.info(
        "megatron-tpcomp: compression is a no-op at TP=1 (nothing is exchanged): default %s, %d per-layer overrides"
        if state.tp_size == 1
        else "megatron-tpcomp: compression enabled: default %s, %d per-layer overrides",
        config.default.spec,
        sum(len(v) for v in config.layers.values()),
    )
    return config


def disable(model: torch.nn.Module) -> None:
    """Remove the hooks from ``model``; restore Megatron's primitives once no model uses them."""
    model = _unwrap(model)
    state = _state.pop(id(model), None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
    if not _state:
        _uninstall()
        _site_stack.clear()


def telemetry_summary() -> dict[str, dict[str, float]]:
    """Per site: calls, bytes sent, baseline bytes and their ratio, over the recorded compressed calls."""
    out: dict[str, dict[str, float]] = {}
    for site, s in telemetry_records:
        row = out.setdefault(site, {"calls": 0, "wire_bytes": 0, "baseline_wire_bytes": 0})
        row["calls"] += 1
        row["wire_bytes"] += s.wire_bytes
        row["baseline_wire_bytes"] += s.baseline_wire_bytes
    for row in out.values():
        row["compression"] = row["baseline_wire_bytes"] / max(row["wire_bytes"], 1)
    return out
