"""Transformer Engine layer specs: intercept TE's own TP collectives (GPU only; guarded).

With TE layer specs, Megatron's linears are TE modules whose autograd Functions call TE's collectives from
``transformer_engine.pytorch.distributed`` (``allreduce``, ``reduce_scatter_along_first_dim``,
``gather_along_first_dim``, each returning ``(output, handle)``). The modules import them by name, so the wrappers
are installed in every consumer module listed in ``TE_CONSUMERS``. Sites come from the same forward hooks as the
local spec (``intercept.py``): calls outside a hooked module (backward, other code) run TE's own collective.

Only the plain forms are compressed: a call with extra arguments (an FP8 quantizer for the all-gather, userbuffer
overlap) keeps TE's path. Tested only where TE and at least two GPUs are available
(tests/backends/test_te_intercept.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from megatron_tpcomp import collectives

TE_DISTRIBUTED = "transformer_engine.pytorch.distributed"
TE_CONSUMERS = (
    TE_DISTRIBUTED,
    "transformer_engine.pytorch.module.linear",
    "transformer_engine.pytorch.module.layernorm_linear",
    "transformer_engine.pytorch.module.layernorm_mlp",
)
TE_FUNCTIONS = {
    "allreduce": "te_all_reduce",
    "reduce_scatter_along_first_dim": "te_reduce_scatter",
    "gather_along_first_dim": "te_all_gather",
}


def have_te() -> tuple[bool, str]:
    """(True, "") when Transformer Engine's PyTorch distributed module imports, else (False, why)."""
    try:
        importlib.import_module(TE_DISTRIBUTED)
    except Exception as exc:  # ImportError, or TE's own errors without CUDA
        return False, f"Transformer Engine is not importable ({type(exc).__name__}: {exc})"
    return True, ""


def wrap_te_collective(name: str, original: Callable[..., Any], run: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper with TE's calling convention ``f(inp, group, async_op=False, *extra) -> (out, handle)``.

    ``run(op, stock, compressed)`` is intercept._run: it counts the call and picks stock or compressed.
    """
    op = TE_FUNCTIONS[name]

    def wrapper(inp: Any, group: Any = None, async_op: bool = False, *args: Any, **kwargs: Any) -> Any:
        def stock() -> Any:
            return original(inp, group, async_op, *args, **kwargs)

        extra = args or any(v is not None for v in kwargs.values())
        if group is None or group.size() == 1 or extra:
            return stock()

        def compressed(codec: Any, cfg: Any, stats: Any, check: bool) -> Any:
            kw = {"min_bytes": cfg.min_bytes, "stats": stats, "check_ranks": check}
            if name == "allreduce":
                out = collectives.all_reduce(inp, codec, group, algo=cfg.algo, **kw)
            elif name == "reduce_scatter_along_first_dim":
                out = collectives.reduce_scatter(inp, codec, group, dim=0, **kw)
            else:
                out = collectives.all_gather(inp, codec, group, dim=0, **kw)
            return out, None  # completed synchronously: no handle to wait on

        return run(op, stock, compressed, inp)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def install(run: Callable[..., Any], originals: dict[str, tuple[Any, Any]]) -> int:
    """Wrap TE's collectives in every consumer module that has them; record originals. Returns the count."""
    ok, _ = have_te()
    if not ok:
        return 0
    count = 0
    for module_name in TE_CONSUMERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in TE_FUNCTIONS:
            original = getattr(module, name, None)
            if original is None:
                continue
            originals[f"{module_name}.{name}"] = (module, original)
            setattr(module, name, wrap_te_collective(name, original, run))
            count += 1
    return count
