"""``tpcomp bench kernels`` on a GPU: every available backend gives records with positive bandwidth, the device's
name and, for a device in the table, its nominal bandwidth. Tiny sizes and repetitions: the records are checked,
not the speed (the target is printed by the benchmark)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_tpcomp.backends import available as backend_available
from megatron_tpcomp.bench import kernels as bench

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def test_cuda_harness_records(tmp_path) -> None:
    available = [b for b in ("cuda", "te") if backend_available(b)[0]]
    if not available:
        pytest.skip(f"no GPU kernel backend here: {backend_available('cuda')[1]}")
    out = tmp_path / "kernels.json"
    argv = ["--sizes", "64KiB,8MiB", "--reps", "3", "--warmup", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    records = json.loads(out.read_text())
    backends = {r["backend"] for r in records}
    assert set(available) | {"torch", "reference"} == backends
    name = torch.cuda.get_device_name()
    for r in records:
        assert r["device"] == "cuda" and r["device_name"] == name and r["l2_flush"]
        assert r["gbps"] > 0 and r["pct_copy"] > 0
        assert r["nominal_gbps"] == bench.nominal_bandwidth(name)[1]
