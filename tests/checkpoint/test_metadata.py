"""The checkpoint metadata checks that need no checkpoint: the header and the shard list."""

from __future__ import annotations

import re
from typing import Any

import pytest

from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.metadata import FORMAT, VERSION, _check_file_list, _check_header, shard_relpath

_SHA = "0" * 64


def _files(tp: int) -> dict[str, dict[str, Any]]:
    return {shard_relpath(r): {"bytes": 10, "sha256": _SHA} for r in range(tp)}


def test_a_shard_list_of_one_entry_per_rank_passes() -> None:
    _check_file_list(_files(3), 3, "meta.json")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (_files(2), "meta.json: tp_size is 3, but 'files' lists 2 shard(s); expected one per TP rank"),
        ([], "meta.json: tp_size is 3, but 'files' lists list shard(s)"),
        (
            {**{k: v for k, v in _files(3).items() if "mp_rank_02" not in k}, "release/x.pt": {}},
            "meta.json: tp_size 3 does not match the listed shards",
        ),
        ({**_files(3), shard_relpath(1): {"bytes": -1, "sha256": _SHA}}, "files['release/mp_rank_01/"),
        ({**_files(3), shard_relpath(2): {"bytes": 1, "sha256": "ABC"}}, "sha256 is 'ABC'; expected 64 hex digits"),
    ],
)
def test_a_bad_shard_list_is_refused_naming_the_entry(files: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _check_file_list(files, 3, "meta.json")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "meta.json: 'format' must be"),
        ({"format": FORMAT, "version": VERSION + 1}, f"version {VERSION + 1} is not supported; expected {VERSION}"),
        ({"format": FORMAT, "version": VERSION, "extra": 1}, "unknown key(s) ['extra']"),
        ({"format": FORMAT, "version": VERSION, "model_config": {}}, "field 'tp_size' is missing"),
    ],
)
def test_a_bad_header_is_refused(data: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _check_header(data, "meta.json")
