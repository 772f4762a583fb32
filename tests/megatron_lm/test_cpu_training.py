"""The CPU patches of Megatron-LM's ``megatron.training`` (cpu.TRAINING_PATCHES): explicit, exact to undo, only
with ``training=True``, and each one doing what its table row says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU enablement refuses to run where CUDA is available"),
]

# Written out, so a patch silently dropped from cpu.TRAINING_PATCHES fails here.
EXPECTED = {
    "megatron.training.initialize.initialize_megatron",
    "megatron.training.initialize_megatron",
    "megatron.training.arguments.get_device_arch_version",
    "megatron.training.initialize._initialize_distributed",
    "megatron.training.initialize._set_random_seed",
    "megatron.training.initialize._compile_dependencies",
    "megatron.training.checkpointing.read_metadata",
    "torch.cuda.memory_stats",
}


def _entries(table) -> dict[str, object]:
    from megatron_tpcomp.megatron import cpu

    out = {}
    for spec in table:
        owner, name, _ = cpu._resolve(spec)
        out[spec.qualname] = vars(owner).get(name, "<absent>")
    return out


def test_installed_only_when_asked_and_restored_exactly(megatron_training: Path) -> None:
    from megatron_tpcomp.megatron import cpu

    assert {s.qualname for s in cpu.TRAINING_PATCHES} == EXPECTED
    before = _entries(cpu.TRAINING_PATCHES)
    with cpu.cpu_megatron() as plain:
        assert not set(plain.patched) & EXPECTED  # the default leaves megatron.training alone
        assert _entries(cpu.TRAINING_PATCHES) == before
    with cpu.cpu_megatron(training=True) as handle:
        assert EXPECTED <= set(handle.installed_now)
        assert all(v is not before[k] for k, v in _entries(cpu.TRAINING_PATCHES).items())
    assert not cpu.cpu_enabled()
    assert all(v is before[k] for k, v in _entries(cpu.TRAINING_PATCHES).items())


def test_each_patch_does_what_its_row_says(megatron_training: Path, tmp_path: Path) -> None:
    import megatron.training.arguments as arguments
    import megatron.training.checkpointing as checkpointing
    import megatron.training.initialize as initialize

    from megatron_tpcomp.megatron import cpu

    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    with cpu.cpu_megatron(training=True):
        assert arguments.get_device_arch_version() == cpu.CPU_DEVICE_ARCH  # T2
        assert initialize._compile_dependencies() is None  # T5
        tracker.write_text("release\n")
        assert checkpointing.read_metadata(str(tracker)) == (0, True)  # T6 (no process group: no all-reduce)
        tracker.write_text("1200")
        assert checkpointing.read_metadata(str(tracker)) == (1200, False)
        stats = torch.cuda.memory_stats()  # T7
        assert stats["allocated_bytes.all.peak"] == 0 and stats["reserved_bytes.all.peak"] == 0
        # T1: the wrapper passes everything through and adds allow_no_cuda=True.
        seen = {}
        inner = initialize.initialize_megatron.__wrapped__
        assert inner is not initialize.initialize_megatron
        wrapper = cpu._make_initialize_megatron(lambda *a, **kw: seen.update(kw, args=a))
        wrapper("provider", args_defaults={"x": 1})
        assert seen == {"args": ("provider",), "args_defaults": {"x": 1}, "allow_no_cuda": True}
        # T3/T4: one device only while Megatron's function runs.
        counts = []
        with cpu._one_device():
            counts.append(torch.cuda.device_count())
        counts.append(torch.cuda.device_count())
        assert counts == [1, 0]
