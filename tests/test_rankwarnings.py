"""Multi-rank runs print what the user needs: megatron-core's missing-TE/apex notices and torch's deprecation of
the collectives megatron-core calls are filtered in every rank, nothing else is."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_tpcomp.rankwarnings import quiet_rank_warnings

ROOT = Path(__file__).resolve().parents[1]

#: Substrings of the lines the unfiltered run prints (checked below to be present without the filter, so the
#: test cannot pass by a run that simply never triggers them).
NOISE = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed. Falling back to Torch Norm",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
)


def _megatron_rank(rank: int, world_size: int, fail: bool, loud: bool) -> list[int]:
    """Imports megatron-core's GPT specs and optimizer (the modules that warn about TE/apex) and runs one of
    megatron-core's sequence-parallel all-gathers (which calls ``all_gather_into_tensor``); then warns with an
    unrelated ``UserWarning`` and, if ``fail``, raises on rank 1. ``loud``: first drop every warning filter (the
    launcher's included), the baseline that shows what the filter hides."""
    if loud:
        warnings.resetwarnings()
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401 - warns "Apex is not installed" without apex
    import megatron.core.optimizer  # noqa: F401 - warns "Transformer Engine and Apex are not installed"
    import torch
    from megatron.core.tensor_parallel import mappings

    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()  # megatron-core's gather allocates on torch.cuda.current_device() otherwise
    M.init_parallel(world_size)
    try:
        out = mappings.gather_from_sequence_parallel_region(torch.full((2, 3), float(rank)))
    finally:
        M.destroy_parallel()
    warnings.warn(f"unrelated warning from rank {rank}", UserWarning, stacklevel=1)
    if fail and rank == 1:
        raise ValueError("rank 1 has a real problem: bad value 7")
    return list(out.shape)


def _run(fail: bool, loud: bool) -> subprocess.CompletedProcess[str]:
    """A 2-rank ``run_distributed`` in a fresh interpreter (so its stderr, the ranks' included, is captured)."""
    code = (
        "from megatron_tpcomp.launch import run_distributed\n"
        "from tests.test_rankwarnings import _megatron_rank\n"
        f"print(run_distributed(_megatron_rank, 2, {fail}, {loud}, timeout_s=300))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=400, check=False
    )


@pytest.mark.megatron
def test_two_megatron_ranks_print_no_te_apex_or_deprecation_warnings_but_other_warnings_and_errors_show() -> None:
    loud = _run(fail=False, loud=True)
    assert loud.returncode == 0, loud.stderr
    assert "[[4, 3], [4, 3]]" in loud.stdout
    # The baseline without any filter prints every NOISE line: the test is about warnings that really occur.
    for line in NOISE:
        assert line in loud.stderr, f"unfiltered run did not print {line!r}:\n{loud.stderr}"
    quiet = _run(fail=True, loud=False)
    for line in NOISE:
        assert line not in quiet.stderr, f"{line!r} still printed:\n{quiet.stderr}"
    # Warnings we did not name still show, once per rank, and a real error is reported with its message.
    assert quiet.stderr.count("UserWarning: unrelated warning from rank") == 2, quiet.stderr
    assert quiet.returncode != 0
    assert "ValueError: rank 1 has a real problem: bad value 7" in quiet.stderr, quiet.stderr


def test_only_the_named_messages_and_categories_are_ignored() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_rank_warnings()
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
        warnings.warn(
            "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `reduce_scatter_single`.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", stacklevel=1)
        warnings.warn(
            "The static engine will be deprecated and removed in the future version of megatron-core. Switch to "
            "DynamicInferenceEngine.",
            stacklevel=1,
        )
        # Same words, another category or another message: still shown.
        warnings.warn("Apex is not installed. Falling back to Torch Norm", RuntimeWarning, stacklevel=1)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. ", UserWarning, stacklevel=1)
        warnings.warn("Transformer Engine is too old for fp8", UserWarning, stacklevel=1)
        warnings.warn("`torch.distributed.broadcast_object_list` is deprecated. ", FutureWarning, stacklevel=1)
    # The CUDA_DEVICE_MAX_CONNECTIONS hint is dropped only on machines without CUDA (advice that matters on GPUs).
    import torch

    with warnings.catch_warnings(record=True) as hint:
        warnings.simplefilter("always")
        quiet_rank_warnings()
        warnings.warn(
            "When using async grad allreduce it is recommended to set the environment variable "
            "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
            UserWarning,
            stacklevel=1,
        )
    assert len(hint) == (1 if torch.cuda.is_available() else 0)
    assert [str(w.message)[:30] for w in caught] == [
        "Apex is not installed. Falling",
        "`torch.distributed.all_gather_",
        "Transformer Engine is too old ",
        "`torch.distributed.broadcast_o",
    ]
