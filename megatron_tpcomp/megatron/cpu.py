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

Megatron-LM's ``megatron.training`` (the package its own scripts start through: ``initialize_megatron``,
``get_model``, ``load_checkpoint``) assumes CUDA in a few more places. ``enable_cpu(training=True)`` also
installs these (table :data:`TRAINING_PATCHES`; they need Megatron-LM's ``megatron/training`` importable, which
the megatron-core wheel does not ship):

====  ================================================================  ========================================
 #    megatron.training code that assumes CUDA                          patch
====  ================================================================  ========================================
 T1   ``initialize_megatron`` asserts ``torch.cuda.is_available()``     called with ``allow_no_cuda=True`` (its
      unless ``allow_no_cuda=True`` (scripts never pass it)             documented CPU switch)
 T2   ``validate_args`` reads ``get_device_arch_version()`` (CUDA       the CPU has no CUDA stream-connection
      device properties) when TP > 1                                    limit: answers 10, so Megatron does not
                                                                        demand ``CUDA_DEVICE_MAX_CONNECTIONS=1``
 T3   ``_initialize_distributed`` initialises NCCL and skips the        gloo process group first, then
      model-parallel groups when ``torch.cuda.device_count() == 0``     Megatron's own code sees one device
 T4   ``_set_random_seed`` skips the TP RNG tracker when                Megatron's own code sees one device
      ``device_count() == 0`` (then dropout/init forks fail)            (the tracker itself is patch 1a/1b)
 T5   ``_compile_dependencies`` builds the dataset C++ helper and the   nothing to build for CPU inference
      CUDA fused kernels
 T6   ``checkpointing.read_metadata`` all-reduces the iteration in a    same reading, the tensor on the CPU
      ``device="cuda"`` tensor
 T7   the inference scripts end with ``torch.cuda.memory_stats()        every counter 0 (no CUDA memory was
      ["allocated_bytes.all.peak"]``                                    allocated)
====  ================================================================  ========================================

Two more tables, each installed only when asked for:

====  ================================================================  ========================================
 #    megatron-core code that assumes CUDA                              patch
====  ================================================================  ========================================
 D1   the dynamic inference engine and the ``torch_dist`` saver call    returns at once: no CUDA stream exists,
      ``torch.cuda.synchronize()`` (``enable_cpu(dynamic=True)`` or    nothing is pending
      ``enable_cpu(checkpoint=True)``)
 D2   (dynamic) ``TextGenerationController._init_dynamic_sampling_      Megatron's method, with
      tensors`` allocates the CPU-side request metadata with            ``torch.empty_like(pin_memory=True)``
      ``pin_memory=True``, which torch refuses without a device         making an ordinary CPU tensor while it
                                                                        runs
====  ================================================================  ========================================

With D1/D2 megatron-core 0.16.1's dynamic engine builds its context, controller and engine on CPU and starts its
warm-up steps; it then stops for good in attention: under dynamic batching ``Attention.forward`` requires
flash-attn (>= 2.7.3, or FA3) and computes attention over the paged KV cache only with flash-attn's CUDA kernels
(``flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` with a block table), which have no CPU
implementation. Megatron-LM's ``StaticInferenceEngine`` then falls back to the legacy static engine (its own
``try``/``except``, with a warning naming the missing module).

"One device" in T3/T4 is scoped: ``torch.cuda.device_count`` answers 1 only while that one Megatron function
runs (after the gloo group exists, so nothing calls ``torch.cuda.set_device``), and answers 0 again after.

Known difference from the GPU (patch 1b): inside ``fork()`` the tracked state *is* the CPU generator, so a random
draw there (dropout > 0 in training) makes Megatron log "CPU RNG state changed within GPU RNG context". The
draws themselves are right (per-TP-rank tracked stream, outer stream restored); inference and dropout 0 draw
nothing.

A megatron-core release that moved one of these attributes makes :func:`enable_cpu` raise
:class:`~megatron_tpcomp.megatron.compat.MegatronCompatError` naming the attribute and the version, before
anything is patched.
"""

from __future__ import annotations

import collections
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


# ------------------------------------------------------------------------------- megatron.training (T1-T7)

#: What :func:`_cpu_device_arch_version` answers (patch T2): Megatron's "Blackwell or later", the first
#: architecture without the ``CUDA_DEVICE_MAX_CONNECTIONS=1`` requirement, which is a CUDA stream-scheduling
#: matter with no CPU meaning.
CPU_DEVICE_ARCH = 10


def _make_initialize_megatron(original: Callable[..., Any]) -> Callable[..., Any]:
    """``initialize_megatron`` with ``allow_no_cuda=True`` (patch T1); every other argument passes through."""

    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    initialize_megatron.__wrapped__ = original  # type: ignore[attr-defined]
    return initialize_megatron


def _cpu_device_arch_version() -> int:
    """``megatron.training.utils.get_device_arch_version`` without a CUDA device (patch T2)."""
    return CPU_DEVICE_ARCH


@contextlib.contextmanager
def _one_device() -> Iterator[None]:
    """``torch.cuda.device_count()`` answers 1 inside the block (patches T3/T4), 0 again after."""
    original = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = original


def _make_initialize_distributed(original: Callable[..., Any]) -> Callable[..., Any]:
    """``megatron.training.initialize._initialize_distributed`` on CPU (patch T3).

    The default process group is created here with gloo (NCCL needs CUDA) from Megatron's own ``args.rank``,
    ``args.world_size`` and ``args.distributed_timeout_minutes``; Megatron's function then finds it initialised
    and, seeing one device, builds every model-parallel group itself (with all of its arguments).
    """

    def _initialize_distributed(*args: Any, **kwargs: Any) -> Any:
        import datetime

        import torch.distributed as dist
        from megatron.training import get_args

        margs = get_args()
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                rank=margs.rank,
                world_size=margs.world_size,
                timeout=datetime.timedelta(minutes=margs.distributed_timeout_minutes),
            )
        with _one_device():
            return original(*args, **kwargs)

    _initialize_distributed.__wrapped__ = original  # type: ignore[attr-defined]
    return _initialize_distributed


def _make_set_random_seed(original: Callable[..., Any]) -> Callable[..., Any]:
    """``megatron.training.initialize._set_random_seed`` that also seeds the TP RNG tracker on CPU (patch T4)."""

    def _set_random_seed(*args: Any, **kwargs: Any) -> Any:
        with _one_device():
            return original(*args, **kwargs)

    _set_random_seed.__wrapped__ = original  # type: ignore[attr-defined]
    return _set_random_seed


def _cpu_compile_dependencies() -> None:
    """``megatron.training.initialize._compile_dependencies`` on CPU (patch T5): nothing to build. The dataset
    index helper serves training data loaders and the fused kernels are CUDA; inference uses neither."""
    return None


def _make_read_metadata(original: Callable[..., Any]) -> Callable[..., Any]:
    """``megatron.training.checkpointing.read_metadata`` on CPU (patch T6).

    The tracker file holds an iteration number or ``release`` (then iteration 0); the result is
    ``(max iteration over the ranks, release)``, with the all-reduce in a CPU tensor (gloo) instead of
    ``device="cuda"``. Anything else in the file is Megatron's own error: the original is called for it.
    """

    def read_metadata(tracker_filename: Any) -> tuple[int, bool]:
        import torch.distributed as dist

        with open(tracker_filename) as f:
            text = f.read().strip()
        if text == "release":
            iteration, release = 0, True
        else:
            try:
                iteration, release = int(text), False
            except ValueError:
                return original(tracker_filename)  # Megatron reports a bad file its own way
            if iteration < 0:
                return original(tracker_filename)
        if dist.is_initialized():
            t = torch.tensor([iteration], dtype=torch.long)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t[0]) != iteration:
                logger.warning(
                    "megatron-tpcomp: rank %d read iteration %d from %s, the others up to %d: using %d",
                    dist.get_rank(),
                    iteration,
                    tracker_filename,
                    int(t[0]),
                    int(t[0]),
                )
            iteration = int(t[0])
        return iteration, release

    read_metadata.__wrapped__ = original  # type: ignore[attr-defined]
    return read_metadata


def _cpu_memory_stats(device: Any = None) -> collections.defaultdict[str, int]:
    """``torch.cuda.memory_stats`` without CUDA (patch T7): no CUDA memory was ever allocated, so every
    counter (any key) is 0."""
    return collections.defaultdict(int)


# ------------------------------------------------------------------- dynamic engine and torch_dist saver (D1-D2)


def _cpu_synchronize(device: Any = None) -> None:
    """``torch.cuda.synchronize`` without CUDA (patch D1): no CUDA stream exists, so there is nothing to wait
    for. megatron-core calls it around the dynamic engine's steps and after its checkpoint saver's
    device-to-host copies (``non_blocking=True``, which on CPU tensors are ordinary copies)."""
    return None


@contextlib.contextmanager
def _unpinned_empty_like() -> Iterator[None]:
    """``torch.empty_like(..., pin_memory=True)`` returns an ordinary CPU tensor inside the block (patch D2).

    Pinned (page-locked) host memory exists only to speed up copies to a device; torch has no allocator for it
    without one and raises. The tensor's device, dtype, shape and contents are the same either way.
    """
    original = torch.empty_like

    def empty_like(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        return original(*args, **kwargs)

    torch.empty_like = empty_like
    try:
        yield
    finally:
        torch.empty_like = original


def _make_init_dynamic_sampling_tensors(original: Callable[..., Any]) -> Callable[..., Any]:
    """``TextGenerationController._init_dynamic_sampling_tensors`` on CPU (patch D2): Megatron's own method, with
    its CPU-side request metadata (temperature, top-k, top-p, ...) in ordinary instead of pinned host memory."""

    def _init_dynamic_sampling_tensors(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _unpinned_empty_like():
            return original(self, *args, **kwargs)

    _init_dynamic_sampling_tensors.__wrapped__ = original  # type: ignore[attr-defined]
    return _init_dynamic_sampling_tensors


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


#: megatron.training's CUDA assumptions (patches T1-T7), installed by ``enable_cpu(training=True)``.
TRAINING_PATCHES: tuple[PatchSpec, ...] = (
    PatchSpec("megatron.training.initialize", "initialize_megatron", _make_initialize_megatron),
    # ``megatron/training/__init__.py`` re-exports it: scripts import it from either place.
    PatchSpec("megatron.training", "initialize_megatron", _make_initialize_megatron),
    PatchSpec("megatron.training.arguments", "get_device_arch_version", lambda _: _cpu_device_arch_version),
    PatchSpec("megatron.training.initialize", "_initialize_distributed", _make_initialize_distributed),
    PatchSpec("megatron.training.initialize", "_set_random_seed", _make_set_random_seed),
    PatchSpec("megatron.training.initialize", "_compile_dependencies", lambda _: _cpu_compile_dependencies),
    PatchSpec("megatron.training.checkpointing", "read_metadata", _make_read_metadata),
    PatchSpec("torch.cuda", "memory_stats", lambda _: _cpu_memory_stats),
)


_SYNCHRONIZE = PatchSpec("torch.cuda", "synchronize", lambda _: _cpu_synchronize)

#: megatron-core's dynamic inference engine (``DynamicInferenceEngine``; also what Megatron-LM 0.16's
#: ``StaticInferenceEngine`` runs unless ``--use-legacy-static-engine``), installed by ``enable_cpu(dynamic=True)``.
DYNAMIC_PATCHES: tuple[PatchSpec, ...] = (
    _SYNCHRONIZE,
    PatchSpec(
        "megatron.core.inference.text_generation_controllers.text_generation_controller",
        "TextGenerationController._init_dynamic_sampling_tensors",
        _make_init_dynamic_sampling_tensors,
    ),
)

#: megatron-core's ``torch_dist`` checkpoint saver (``dist_checkpointing.save``), ``enable_cpu(checkpoint=True)``.
CHECKPOINT_PATCHES: tuple[PatchSpec, ...] = (_SYNCHRONIZE,)


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


def enable_cpu(
    *, inference: bool = True, training: bool = False, dynamic: bool = False, checkpoint: bool = False
) -> CpuPatches:
    """Install the CPU patches (idempotent: what is already installed stays as it is).

    Args:
        inference: also patch the two CUDA calls of the static inference engine (``Tensor.cuda``,
            ``torch.cuda.Event``); these touch torch itself, so leave them out when only building and running
            models.
        training: also patch Megatron-LM's ``megatron.training`` (:data:`TRAINING_PATCHES`), for its own
            scripts (``python -m megatron_tpcomp.megatron_lm``); needs Megatron-LM's source importable.
        dynamic: also patch megatron-core's dynamic inference engine (:data:`DYNAMIC_PATCHES`).
        checkpoint: also patch megatron-core's ``torch_dist`` saver (:data:`CHECKPOINT_PATCHES`).

    Returns:
        A :class:`CpuPatches` handle listing every installed patch.

    Raises:
        RuntimeError: CUDA is available (these patches would send CUDA code to the CPU).
        MegatronCompatError: an attribute to patch is missing in this megatron-core (nothing is patched then).
    """
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu() is for machines without CUDA; this one has CUDA: run on the GPU")
    table = PATCHES + (TRAINING_PATCHES if training else ())
    table += (DYNAMIC_PATCHES if dynamic else ()) + (CHECKPOINT_PATCHES if checkpoint else ())
    todo = [s for s in table if s.qualname not in _installed and (inference or not s.inference_only)]
    todo = list({s.qualname: s for s in todo}.values())  # one attribute shared by two tables: patched once
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
def cpu_megatron(
    *, inference: bool = True, training: bool = False, dynamic: bool = False, checkpoint: bool = False
) -> Iterator[CpuPatches]:
    """``with cpu_megatron(): ...``: the block runs with the CPU patches; on exit only the patches this block
    installed are removed (an enclosing ``enable_cpu()`` stays in force)."""
    handle = enable_cpu(inference=inference, training=training, dynamic=dynamic, checkpoint=checkpoint)
    try:
        yield handle
    finally:
        _restore(handle.installed_now)
