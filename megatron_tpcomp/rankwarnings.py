"""Silence the known, harmless warnings every rank would otherwise print (and only those).

Importing megatron-core without Transformer Engine or apex (every CPU run, and any GPU run without them) warns
about each fallback from several modules; megatron-core 0.19 warns about its own default ``cuda_graph_scope`` for
every model config and about the static inference engine we use on purpose; without CUDA, every column-parallel
layer suggests ``CUDA_DEVICE_MAX_CONNECTIONS`` (a GPU tuning hint); and megatron-core's own collectives call torch
APIs that torch 2.5+ marks as deprecated (``all_gather_into_tensor``, ``reduce_scatter_tensor``,
``_all_gather_base``, ``_reduce_scatter_base``). With N ranks that is about ten lines per rank before the output
the user asked for. Our own code calls the non-deprecated ``all_gather_single``/``reduce_scatter_single`` where
torch has them.

:func:`quiet_rank_warnings` is called at the start of every rank (``launch.run_distributed``'s workers, the
``torchrun`` text-generation launcher, ``python -m megatron_tpcomp.megatron_lm``). Each filter names one message
(matched from its start) and its category, so any other warning, and every error, still shows.
"""

from __future__ import annotations

import warnings

#: (message regex, category): the fallbacks megatron-core announces when Transformer Engine / apex are missing.
#: They describe the environment, not a problem of the run.
MEGATRON_FALLBACK_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Transformer Engine and Apex are not installed\. Falling back to ", UserWarning),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning),
    # megatron-core 0.19's own TransformerConfig default (cuda_graph_scope="full") warns that "full" is
    # deprecated on every config it builds, whatever the caller passed: nothing a user can act on.
    (r"full scope is deprecated\. Use empty cuda_graph_scope", UserWarning),
    # Our generation goes through the static engine on purpose (deterministic batches); the notice is once per
    # engine per rank.
    (r"The static engine will be deprecated and removed in the future version of megatron-core", UserWarning),
)

#: Only without CUDA: a tuning hint for async gradient all-reduce on GPUs (CUDA_DEVICE_MAX_CONNECTIONS), printed by
#: every column-parallel layer's first forward; meaningless on CPU, useful advice on a GPU, so kept there.
CPU_ONLY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (
        r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONN",
        UserWarning,
    ),
)

#: torch's deprecation notices for the flat collectives megatron-core still calls (the replacement is named in
#: the message; our own code already uses it where the installed torch has it).
TORCH_COLLECTIVE_DEPRECATIONS: tuple[tuple[str, type[Warning]], ...] = tuple(
    (rf"`torch\.distributed\.{name}` is deprecated\. ", FutureWarning)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base")
)


def quiet_rank_warnings() -> None:
    """Ignore exactly the warnings in :data:`MEGATRON_FALLBACK_WARNINGS` and :data:`TORCH_COLLECTIVE_DEPRECATIONS`
    (and :data:`CPU_ONLY_WARNINGS` where CUDA is not available).

    Idempotent (``warnings.filterwarnings`` moves an identical filter to the front instead of adding it twice).
    Call it before megatron-core is imported: its fallback warnings are raised at import time.
    """
    import torch

    names = MEGATRON_FALLBACK_WARNINGS + TORCH_COLLECTIVE_DEPRECATIONS
    if not torch.cuda.is_available():
        names += CPU_ONLY_WARNINGS
    for message, category in names:
        warnings.filterwarnings("ignore", message=message, category=category)
