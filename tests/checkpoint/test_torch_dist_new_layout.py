"""A torch_dist checkpoint written by megatron-core 0.17 or newer (common state inside the DCP index, no
``common.pt``) is refused with the reason, not called "incomplete". Runs where such a megatron-core is installed
(CI's megatron-core 0.19.2 environment)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_tpcomp.checkpoint import CheckpointError
from megatron_tpcomp.checkpoint.convert import convert
from tests.checkpoint.test_torch_dist import PSUTIL, mcore_writes_common_inside_index, tiny_torch_dist

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) writer; enable_cpu refuses CUDA machines"),
    pytest.mark.skipif(
        not mcore_writes_common_inside_index(), reason="the installed megatron-core (<= 0.16) writes common.pt"
    ),
]


def test_a_checkpoint_of_the_newer_layout_is_refused_with_the_reason(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    if importlib.util.find_spec("psutil") is None:
        pytest.skip(PSUTIL)
    _, td = tiny_torch_dist(str(tmp_path_factory.getbasetemp() / "tiny-torch-dist-new"))
    release = Path(td) / "release"
    assert (release / ".metadata").is_file() and not (release / "common.pt").exists()
    with pytest.raises(
        CheckpointError, match=r"megatron-core 0\.17 or newer keeps Megatron-LM's args inside the index"
    ):
        convert(td, tmp_path / "out", 1, progress=False)
    assert not (tmp_path / "out").exists()
