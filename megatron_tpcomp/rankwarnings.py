"""Silence the known, harmless warnings every rank would otherwise print (and only those).

Importing megatron-core without Transformer Engine or apex (every CPU run, and any GPU run without them) warns
about each fallback from several modules, and megatron-core's own collectives call torch APIs that torch 2.5+
marks as deprecated (``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``_all_gather_base``,
``_reduce_scatter_base``). With N ranks that is about ten lines per rank before the output the user asked for.
Our own code calls the non-deprecated ``all_gather_single``/``reduce_scatter_single`` where torch has them.

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
)

#: torch's deprecation notices for the flat collectives megatron-core still calls (the replacement is named in
#: the message; our own code already uses it where the installed torch has it).
TORCH_COLLECTIVE_DEPRECATIONS: tuple[tuple[str, type[Warning]], ...] = tuple(
    (rf"`torch\.distributed\.{name}` is deprecated\. ", FutureWarning)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base")
)


def quiet_rank_warnings() -> None:
    """Ignore exactly the warnings in :data:`MEGATRON_FALLBACK_WARNINGS` and :data:`TORCH_COLLECTIVE_DEPRECATIONS`.

    Idempotent (``warnings.filterwarnings`` moves an identical filter to the front instead of adding it twice).
    Call it before megatron-core is imported: its fallback warnings are raised at import time.
    """
    for message, category in MEGATRON_FALLBACK_WARNINGS + TORCH_COLLECTIVE_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
