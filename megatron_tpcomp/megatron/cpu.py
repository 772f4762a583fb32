"""Run megatron-core's local-spec GPT models and its static inference engine on CPU over gloo.

Explicit and reversible, never an import side effect: :func:`enable_cpu` installs the patches below (idempotent)
and returns a :class:`CpuPatches` handle; :func:`disable_cpu` puts back every original attribute exactly (the
same object in the owner's ``__dict__``, or no entry where the owner only inherited it);
``with cpu_megatron(): ...`` does both around a block.

Every patch redirects a hard-coded CUDA device to the CPU; none rewrites a Megatron algorithm. They are only
installed on a machine without CUDA (enable_cpu refuses otherwise), where each original call can only raise
("Torch not compiled with CUDA enabled"): so a patch changes nothing that worked before it.

====  ================================================================  ========================================
 #    megatron-core code that assumes CUDA                              patch (smallest redirect)
====  ================================================================  ========================================
 1a   ``tensor_parallel.random.CudaRNGStatesTracker.add`` seeds a        CPU twin of ``add`` (same bookkeeping):
      state with ``torch.cuda.manual_seed/get_rng_state``                the state is a CPU generator state
 1b   ``CudaRNGStatesTracker.fork`` swaps states through the module      both helpers read/write the CPU
      helpers ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``          generator; Megatron's ``fork`` is kept
 2    ``torch.cuda.current_device()`` is the allocation device of        returns ``"cpu"``
      mappings, layers, rotary embedding, attention, inference code
 3    ``transformer.utils.get_default_causal_mask`` allocates on         same mask on the CPU, in the defining
      ``device="cuda"``; ``fusions.fused_softmax`` imported it by name   module and in fused_softmax
 4    ``transformer.torch_norm.WrappedTorchNorm`` asserts                built from a copy of the config with SP
      ``not config.sequence_parallel``                                   off, params tagged ``sequence_parallel``
 5    (inference) ``TextGenerationController.generate_all_output_        ``Tensor.cuda()`` returns the tensor
      tokens_static_batch`` calls ``Tensor.cuda()``                     itself
 6    (inference) the controller times steps with ``torch.cuda.Event``  a wall-clock event with the same methods
====  ================================================================  ========================================

Known difference from the GPU (patch 1b): inside ``fork()`` the tracked state *is* the CPU generator, so a random
draw there (dropout > 0 in training) makes Megatron log "CPU RNG state changed within GPU RNG context". The
draws themselves are right (per-TP-rank tracked stream, outer stream restored); inference and dropout 0 draw
nothing.

A megatron-core release that moved one of these attributes makes :func:`enable_cpu` raise
:class:`~megatron_tpcomp.megatron.compat.MegatronCompatError` naming the attribute and the version, before
anything is patched.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_tpcomp.megatron.compat import MegatronCompatError, megatron_version

logger = logging.getLogger("megatron_tpcomp")

_MISSING = object()


# ---------------------------------------------------------------------------------------------- replacements


def _cpu_tracker_add(self: Any, name: str, seed: int) -> None:
    """CPU twin of ``CudaRNGStatesTracker.add`` (patch 1a).

    Megatron's ``add`` seeds the *CUDA* generator (``torch.cuda.manual_seed`` + ``torch.cuda.get_rng_state``).
    Same checks and bookkeeping here, with the CPU generator, whose state is restored afterwards so adding a
    tracker state does not disturb the caller's RNG stream (as on GPU). The ``use_cudagraphable_rng`` branch is
    CUDA-graph only and has no CPU meaning: refuse it instead of silently ignoring it.
    """
    if getattr(self, "use_cudagraphable_rng", False):
        raise RuntimeError("CUDA-graph-safe RNG tracking (use_cudagraphable_rng) does not exist on CPU")
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    outer = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(outer)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """``random._get_cuda_rng_state`` on CPU (patch 1b): the CPU generator's state (a fresh ByteTensor).

    Args mirror Megatron's helper; ``device`` is ignored (one CPU generator), ``graph_safe`` is CUDA-graph only.
    """
    if graph_safe:
        raise RuntimeError("graph-safe RNG states (CUDA graphs) do not exist on CPU")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """``random._set_cuda_rng_state`` on CPU (patch 1b): load ``new_state`` into the CPU generator."""
    if graph_safe:
        raise RuntimeError("graph-safe RNG states (CUDA graphs) do not exist on CPU")
    torch.set_rng_state(new_state)


def _cpu_current_device() -> str:
    """``torch.cuda.current_device`` on a machine without CUDA (patch 2).

    Megatron passes the result as ``device=`` to ``torch.empty/zeros/tensor/Generator`` and ``.to()``; ``"cpu"``
    is valid in all of them. The original can only raise here.
    """
    return "cpu"


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """``transformer.utils.get_default_causal_mask`` on the CPU (patch 3): ``[sq, sq]`` bool, True above the
    diagonal (= masked), exactly Megatron's ``torch.triu(ones, diagonal=1).bool()`` but without
    ``device="cuda"``."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _make_norm_new(original_new: Callable[..., Any]) -> Callable[..., Any]:
    """``WrappedTorchNorm.__new__`` that accepts ``config.sequence_parallel`` (patch 4).

    The assert exists because torch's norms do not tag their parameters: with sequence parallelism each TP rank
    sees ``s/TP`` tokens, so norm-weight gradients are partial and ``finalize_model_grads`` must all-reduce
    them over TP; it does so for parameters with ``param.sequence_parallel = True`` (Megatron's
    ``FusedLayerNorm`` sets that attribute). This builds the same torch norm from a shallow copy of the config
    with SP off (nothing else in the norm reads SP) and sets the tag, so forward and training gradients are
    those of Megatron's own SP norms.
    """

    def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = original_new(cls, config, *args, **kwargs)
        if sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm

    return new


def _tensor_cuda_stays_on_cpu(
    self: torch.Tensor,
    device: Any = None,
    non_blocking: bool = False,
    memory_format: torch.memory_format = torch.preserve_format,
) -> torch.Tensor:
    """``Tensor.cuda`` on a machine without CUDA (patch 5): the tensor stays where it is (the CPU).

    The static-batch generation loop allocates on ``torch.cuda.current_device()`` (patched to ``"cpu"``) and
    then calls ``.cuda()`` on the result; without CUDA the original can only raise.
    """
    if memory_format is torch.preserve_format:
        return self
    return self.contiguous(memory_format=memory_format)


class _CpuTimingEvent:
    """Stand-in for ``torch.cuda.Event`` (patch 6): records wall-clock time, so the controller's per-token
    latency (``elapsed_time`` in ms between consecutive events) stays meaningful on CPU."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: _CpuTimingEvent) -> float:
        if self._t is None or end_event._t is None:
            raise RuntimeError("elapsed_time() needs both events recorded")
        return (end_event._t - self._t) * 1e3


# ------------------------------------------------------------------------------------------------ patch table


@dataclass(frozen=True)
class PatchSpec:
    """One attribute :func:`enable_cpu` replaces.

    ``module`` is imported, then ``attr`` (dotted, e.g. ``"CudaRNGStatesTracker.add"``) is walked; the last
    name is replaced on the object before it. ``make`` builds the replacement from the original attribute.
    """

    module: str
    attr: str
    make: Callable[[Any], Any]
    inference_only: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.attr}"


PATCHES: tuple[PatchSpec, ...] = (
    PatchSpec("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", lambda _: _cpu_tracker_add),
    PatchSpec("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", lambda _: _cpu_get_rng_state),
    PatchSpec("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", lambda _: _cpu_set_rng_state),
    PatchSpec("torch.cuda", "current_device", lambda _: _cpu_current_device),
    PatchSpec("megatron.core.transformer.utils", "get_default_causal_mask", lambda _: _cpu_default_causal_mask),
    # fused_softmax did ``from megatron.core.transformer.utils import get_default_causal_mask``: its own binding.
    PatchSpec("megatron.core.fusions.fused_softmax", "get_default_causal_mask", lambda _: _cpu_default_causal_mask),
    # ``__new__`` is implicitly a staticmethod; assigned later it must be wrapped explicitly.
    PatchSpec(
        "megatron.core.transformer.torch_norm",
        "WrappedTorchNorm.__new__",
        lambda original: staticmethod(_make_norm_new(original)),
    ),
    PatchSpec("torch", "Tensor.cuda", lambda _: _tensor_cuda_stays_on_cpu, inference_only=True),
    PatchSpec("torch.cuda", "Event", lambda _: _CpuTimingEvent, inference_only=True),
)


@dataclass
class _Installed:
    """An installed patch and what restores it: the owner's own ``__dict__`` entry, or ``_MISSING`` when the
    owner only inherited the attribute (``torch.Tensor.cuda`` lives on ``torch._C.TensorBase``): then restoring
    deletes our entry instead of pinning the inherited method onto the subclass."""

    spec: PatchSpec
    owner: Any
    name: str
    own_entry: Any
    replacement: Any


_installed: dict[str, _Installed] = {}


@dataclass(frozen=True)
class CpuPatches:
    """What :func:`enable_cpu` has patched (qualified names). Also a context manager: leaving it undoes the
    patches this call installed (not those an earlier, enclosing call installed)."""

    patched: tuple[str, ...]
    installed_now: tuple[str, ...]
    megatron_version: str

    def __enter__(self) -> CpuPatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        _restore(self.installed_now)


def _version_text() -> str:
    try:
        return str(megatron_version())
    except MegatronCompatError:
        return "(not importable)"


def _resolve(spec: PatchSpec) -> tuple[Any, str, Any]:
    """(owner, name, original attribute) for ``spec``; a clear MegatronCompatError if the path moved."""
    where = f"megatron-core {_version_text()}, torch {torch.__version__}"
    try:
        obj: Any = importlib.import_module(spec.module)
    except ImportError as exc:
        raise MegatronCompatError(
            f"CPU enablement: module {spec.module} not importable ({exc}) [{where}]; cpu.py needs updating for "
            "this version"
        ) from exc
    *path, name = spec.attr.split(".")
    for part in path:
        if not hasattr(obj, part):
            raise MegatronCompatError(
                f"CPU enablement: {spec.module}.{'.'.join(path)} not found (looking for {spec.qualname}) "
                f"[{where}]; cpu.py needs updating for this version"
            )
        obj = getattr(obj, part)
    if not hasattr(obj, name):
        raise MegatronCompatError(
            f"CPU enablement: {spec.qualname} not found [{where}]; cpu.py needs updating for this version"
        )
    return obj, name, getattr(obj, name)


def _restore(qualnames: tuple[str, ...] | list[str]) -> None:
    for qualname in reversed(list(qualnames)):
        entry = _installed.pop(qualname, None)
        if entry is None:
            continue
        if entry.own_entry is _MISSING:
            delattr(entry.owner, entry.name)
        else:
            setattr(entry.owner, entry.name, entry.own_entry)


def enable_cpu(*, inference: bool = True) -> CpuPatches:
    """Install the CPU patches (idempotent: what is already installed stays as it is).

    Args:
        inference: also patch the two CUDA calls of the static inference engine (``Tensor.cuda``,
            ``torch.cuda.Event``); these touch torch itself, so leave them out when only building and running
            models.

    Returns:
        A :class:`CpuPatches` handle listing every installed patch.

    Raises:
        RuntimeError: CUDA is available (these patches would send CUDA code to the CPU).
        MegatronCompatError: an attribute to patch is missing in this megatron-core (nothing is patched then).
    """
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu() is for machines without CUDA; this one has CUDA: run on the GPU")
    todo = [s for s in PATCHES if s.qualname not in _installed and (inference or not s.inference_only)]
    # Resolve everything before touching anything: a moved attribute must not leave half the patches on.
    resolved = [(spec, *_resolve(spec)) for spec in todo]
    for spec, owner, name, original in resolved:
        own_entry = vars(owner).get(name, _MISSING)
        replacement = spec.make(original)
        setattr(owner, name, replacement)
        _installed[spec.qualname] = _Installed(spec, owner, name, own_entry, replacement)
    now = tuple(spec.qualname for spec, *_ in resolved)
    if now:
        logger.info(
            "megatron-tpcomp: megatron-core %s runs on CPU; patched %s",
            _version_text(),
            ", ".join(now),
        )
    return CpuPatches(tuple(_installed), now, _version_text())


def enable_cpu_inference() -> CpuPatches:
    """Same as ``enable_cpu(inference=True)`` (kept for existing callers)."""
    return enable_cpu(inference=True)


def disable_cpu() -> None:
    """Restore every attribute :func:`enable_cpu` replaced, in reverse order (no-op when none is installed)."""
    _restore(list(_installed))


def cpu_enabled() -> bool:
    """True while any CPU patch is installed."""
    return bool(_installed)


def patched_attributes() -> tuple[str, ...]:
    """Qualified names of the installed patches, in installation order."""
    return tuple(_installed)


@contextlib.contextmanager
def cpu_megatron(*, inference: bool = True) -> Iterator[CpuPatches]:
    """``with cpu_megatron(): ...``: the block runs with the CPU patches; on exit only the patches this block
    installed are removed (an enclosing ``enable_cpu()`` stays in force)."""
    handle = enable_cpu(inference=inference)
    try:
        yield handle
    finally:
        _restore(handle.installed_now)
