"""Make megatron-core's local-spec GPT models run on CPU over gloo. Explicit, reversible, never on import.

megatron-core assumes CUDA in a few places that a CPU forward reaches (FACTS.md). ``enable_cpu()`` patches
exactly those, recording every original; ``disable_cpu()`` puts each one back (identity-equal).

==  ===========================================================  ==============================================
#   megatron-core code that assumes CUDA                         patch
==  ===========================================================  ==============================================
1   ``CudaRNGStatesTracker.add/fork`` call torch.cuda RNG APIs   the tracker keeps CPU generator states
2   ``torch.cuda.current_device()`` as an allocation device      returns ``"cpu"`` (only while CUDA is absent)
    (mappings, layers, rotary embedding)
3   ``get_default_causal_mask`` hard-codes ``device="cuda"``;    CPU masks, in both modules
    ``fused_softmax`` imported it by name
4   ``WrappedTorchNorm`` asserts ``not sequence_parallel``       built from a copy of the config with SP off:
                                                                 norms are replicated either way; in inference
                                                                 no gradient needs SP's all-reduce
==  ===========================================================  ==============================================

The static inference engine's two CUDA calls are patched by :func:`enable_cpu_inference` (same rules).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_tpcomp.megatron.compat import MegatronCompatError, megatron_version

logger = logging.getLogger("megatron_tpcomp")

_originals: dict[tuple[Any, str], Any] = {}


def _patch(owner: Any, name: str, value: Any) -> None:
    if not hasattr(owner, name):
        raise MegatronCompatError(
            f"megatron-core {megatron_version()}: {getattr(owner, '__name__', owner)}.{name} not found; "
            "the CPU enablement needs updating for this version"
        )
    key = (owner, name)
    if key not in _originals:
        _originals[key] = getattr(owner, name)
    setattr(owner, name, value)


def _module(path: str) -> Any:
    return importlib.import_module(path)


# ----------------------------------------------------------------------------------------------------- patches


def _rng_add(self: Any, name: str, seed: int) -> None:
    """CPU twin of CudaRNGStatesTracker.add: store the CPU generator state seeded with ``seed``."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _rng_fork(self: Any, name: str = "model-parallel-rng") -> Iterator[None]:
    """CPU twin of CudaRNGStatesTracker.fork: run the block under state ``name``, then restore."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_current_device() -> str:
    return "cpu"


def _make_norm_new(original_new: Callable[..., Any]) -> Callable[..., Any]:
    def new(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "sequence_parallel", False):
            config = copy.copy(config)
            config.sequence_parallel = False
        return original_new(cls, config, *args, **kwargs)

    return new


def enable_cpu() -> None:
    """Install the CPU patches (idempotent). Refuses when CUDA is available: use the GPU there."""
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu() is for machines without CUDA; CUDA is available here")
    if _originals:
        return
    random = _module("megatron.core.tensor_parallel.random")
    tracker = random.CudaRNGStatesTracker
    _patch(tracker, "add", _rng_add)
    _patch(tracker, "fork", _rng_fork)
    _patch(torch.cuda, "current_device", _cpu_current_device)
    _patch(_module("megatron.core.transformer.utils"), "get_default_causal_mask", _cpu_causal_mask)
    _patch(_module("megatron.core.fusions.fused_softmax"), "get_default_causal_mask", _cpu_causal_mask)
    norm = _module("megatron.core.transformer.torch_norm").WrappedTorchNorm
    _patch(norm, "__new__", staticmethod(_make_norm_new(norm.__new__)))
    logger.info(
        "megatron-tpcomp: CPU enablement on (megatron-core %s): %d attributes patched",
        megatron_version(),
        len(_originals),
    )


class _CpuEvent:
    """Stand-in for torch.cuda.Event on CPU: records wall time so the engine's timing code still works."""

    def __init__(self, enable_timing: bool = False, **kwargs: Any):
        self.t: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        return None

    def elapsed_time(self, end: _CpuEvent) -> float:
        return ((end.t or 0.0) - (self.t or 0.0)) * 1e3


def _tensor_cuda_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def enable_cpu_inference() -> None:
    """enable_cpu() plus the static inference engine's CUDA calls: ``Tensor.cuda()`` in the text generation
    controller (returns the tensor itself) and ``torch.cuda.Event`` timing (a wall-clock stand-in)."""
    enable_cpu()
    if (torch.Tensor, "cuda") not in _originals:
        _patch(torch.Tensor, "cuda", _tensor_cuda_on_cpu)
        _patch(torch.cuda, "Event", _CpuEvent)


def disable_cpu() -> None:
    """Restore every attribute that enable_cpu() (and enable_cpu_inference()) replaced."""
    for (owner, name), value in reversed(list(_originals.items())):
        setattr(owner, name, value)
    _originals.clear()


def cpu_enabled() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """``with cpu_megatron(): ...`` runs the block with the CPU patches installed."""
    enable_cpu()
    try:
        yield
    finally:
        disable_cpu()
