"""Megatron ``torch_dist`` checkpoints that are incomplete, damaged or hostile: each is refused with one line
naming the file and what is wrong, before a tensor is read (and before any pickled code could run).

Every case starts from a copy of a real checkpoint written by megatron-core's own saver (two gloo ranks,
tests/checkpoint/test_torch_dist.py) and breaks one thing, the way an interrupted save, a partial copy or a
crafted file would.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megatron_tpcomp.checkpoint import CheckpointError, export, megatron_args
from megatron_tpcomp.checkpoint.convert import convert
from tests.checkpoint.test_torch_dist import mcore_writes_common_inside_index, tiny_torch_dist

MCORE_WRITES_COMMON_INSIDE_INDEX = mcore_writes_common_inside_index()

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) writer; enable_cpu refuses CUDA machines"),
    pytest.mark.skipif(
        MCORE_WRITES_COMMON_INSIDE_INDEX,
        reason="megatron-core >= 0.17's saver keeps the common state inside the index, which the reader does not "
        "read yet (tests/checkpoint/test_torch_dist_new_layout.py checks that it says so)",
    ),
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_torch_dist(str(tmp_path_factory.getbasetemp() / "tiny-torch-dist"))


@pytest.fixture
def td(tiny: tuple[Path, Path], tmp_path: Path) -> Path:
    """A fresh copy of the tiny torch_dist checkpoint to damage."""
    return Path(shutil.copytree(tiny[1], tmp_path / "td"))


def _refused(td: Path, tmp_path: Path, pattern: str) -> str:
    """``tpcomp convert`` of ``td`` fails with one line matching ``pattern`` and writes nothing."""
    with pytest.raises(CheckpointError, match=pattern) as info:
        convert(td, tmp_path / "out", 1, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    return str(info.value)


def _index(td: Path) -> object:
    with open(td / "release" / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file: plain pickle is fine here


def _write_index(td: Path, index: object) -> None:
    with open(td / "release" / ".metadata", "wb") as f:
        pickle.dump(index, f)


def _edit_args(td: Path, edit: Callable[[argparse.Namespace], object]) -> None:
    path = td / "release" / "common.pt"
    with megatron_args.safe_globals():
        common = torch.load(path, weights_only=True)
    edit(common["args"])
    torch.save(common, path)


def test_missing_index_means_the_save_did_not_finish(td: Path, tmp_path: Path) -> None:
    (td / "release" / ".metadata").unlink()
    _refused(td, tmp_path, r"release/\.metadata is missing: the torch_dist save did not finish")


def test_missing_chunk_file_names_it(td: Path, tmp_path: Path) -> None:
    (td / "release" / "__1_0.distcp").unlink()
    _refused(
        td, tmp_path, r"__1_0\.distcp is missing \(\d+ chunk files listed in \.metadata\): the checkpoint is incomplete"
    )


def test_truncated_chunk_file_is_detected_before_reading(td: Path, tmp_path: Path) -> None:
    f = td / "release" / "__0_1.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _refused(td, tmp_path, r"__0_1\.distcp: \d+ bytes, but \.metadata places chunks up to byte \d+ \(truncated\)")


def test_missing_config_and_common(td: Path, tmp_path: Path) -> None:
    (td / "release" / "metadata.json").unlink()
    _refused(td, tmp_path, r"metadata\.json is missing: the torch_dist save did not finish")
    (td / "release" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    _refused(td, tmp_path, r"sharded_backend is 'zarr'; expected 'torch_dist'")
    # megatron-core <= 0.16 names its common backend and writes common.pt: without the file, the save is incomplete.
    (td / "release" / "metadata.json").write_text('{"sharded_backend": "torch_dist", "common_backend": "torch"}')
    (td / "release" / "common.pt").unlink()
    _refused(td, tmp_path, r"common\.pt is missing: an incomplete torch_dist checkpoint")
    # 0.17+ names none (its common state lives inside the index): said so, not called incomplete.
    (td / "release" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    _refused(td, tmp_path, r"megatron-core 0\.17 or newer keeps Megatron-LM's args inside the index")


def test_tracker_naming_a_missing_or_no_iteration(td: Path, tmp_path: Path) -> None:
    (td / "latest_checkpointed_iteration.txt").write_text("7\n")
    shutil.rmtree(td / "release")
    _refused(td, tmp_path, r"names iter_0000007, but .*iter_0000007 does not exist")
    (td / "latest_checkpointed_iteration.txt").write_text("latest")
    _refused(td, tmp_path, r"holds 'latest'; expected 'release' or an iteration number")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_in_the_index_never_runs(td: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (td / "release" / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    _refused(td, tmp_path, r"\.metadata: refers to (posix|os)\.system, which a torch\.distributed\.checkpoint index")
    assert not (tmp_path / "PWNED").exists()


def test_chunk_outside_the_directory_is_refused(td: Path, tmp_path: Path) -> None:
    index = _index(td)
    where, info = next(iter(index.storage_data.items()))
    shutil.copy(td / "release" / info.relative_path, td / "elsewhere.distcp")  # exists, long enough
    info.relative_path = "../elsewhere.distcp"
    _write_index(td, index)
    _refused(td, tmp_path, r"lies in '\.\./elsewhere\.distcp'; expected a file name inside")


def test_chunks_that_do_not_cover_a_tensor(td: Path, tmp_path: Path) -> None:
    index = _index(td)
    chunks = index.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"].chunks
    assert len(chunks) == 4  # [1, 64, 64] each: one per layer and TP rank
    chunks.append(chunks[0])
    _write_index(td, index)
    _refused(td, tmp_path, r"chunks of decoder\.layers\.mlp\.linear_fc2\.weight at offsets .* overlap")
    chunks.pop()
    chunks.pop()
    _write_index(td, index)
    _refused(td, tmp_path, r"the chunks of decoder\.layers\.mlp\.linear_fc2\.weight hold 12288 of its 16384 values")


def test_a_tensor_the_model_has_no_place_for_is_not_dropped(td: Path, tmp_path: Path) -> None:
    index = _index(td)
    md = index.state_dict_metadata
    md["decoder.layers.self_attention.q_layernorm.weight"] = md["decoder.layers.self_attention.linear_qkv.bias"]
    _write_index(td, index)
    _refused(td, tmp_path, r"holds decoder\.layers\.self_attention\.q_layernorm\.weight, which .* has no place for")


def test_architectures_this_model_cannot_express_are_named(td: Path, tmp_path: Path) -> None:
    _edit_args(td, lambda a: setattr(a, "normalization", "LayerNorm"))
    _refused(
        td, tmp_path, r"common\.pt: args\.normalization is 'LayerNorm'; megatron-tpcomp's GPT model needs 'RMSNorm'"
    )
    _edit_args(td, lambda a: (setattr(a, "normalization", "RMSNorm"), setattr(a, "num_experts", 8)))
    _refused(td, tmp_path, r"args\.num_experts is 8; expected None")


def test_args_that_disagree_with_the_stored_shapes(td: Path, tmp_path: Path) -> None:
    _edit_args(td, lambda a: setattr(a, "ffn_hidden_size", 256))
    _refused(
        td,
        tmp_path,
        r"decoder\.layers\.mlp\.linear_fc1\.weight has shape \(2, 256, 64\), but the args .* imply \(2, 512, 64\)",
    )
    _edit_args(td, lambda a: setattr(a, "ffn_hidden_size", 3e9))
    _refused(td, tmp_path, r"args\.ffn_hidden_size is 3000000000\.0; expected an integer in")


def test_no_args_means_no_architecture(td: Path, tmp_path: Path) -> None:
    path = td / "release" / "common.pt"
    with megatron_args.safe_globals():
        common = torch.load(path, weights_only=True)
    del common["args"]
    torch.save(common, path)
    _refused(td, tmp_path, r"common\.pt: holds no Megatron-LM 'args' \(found NoneType\); the architecture is unknown")


def test_export_without_psutil_fails_at_once_instead_of_hanging(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # megatron-core's saver spawns writer processes that call psutil before their error handling: without it
    # the save waits for them forever (seen with megatron-core 0.16.1).
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psutil" else real(name, *a))
    assert export.main([str(tiny[0]), str(tmp_path / "out")]) == 2
    assert "torch_dist saver needs psutil (pip install psutil)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
