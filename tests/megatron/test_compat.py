"""The megatron-core internals the plug-in attaches to exist, at both ends of the supported range."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.megatron

from megatron_tpcomp.megatron import compat  # noqa: E402


def test_installed_version_is_in_supported_range() -> None:
    version = compat.check_version()
    # Compare releases: wheels carry a local build tag (0.19.2+554fed6 sorts above 0.19.2).
    assert compat.MIN_VERSION.release <= version.release <= compat.MAX_TESTED_VERSION.release, version


def test_every_intercept_point_resolves_to_a_callable() -> None:
    found = compat.intercept_points()
    assert len(found) == len(compat.INTERCEPT_POINTS)
    for module, point in found.values():
        assert callable(getattr(module, point.attr))


def test_a_moved_internal_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates a megatron-core release that moved the all-reduce primitive: the error must name it.
    from megatron.core.tensor_parallel import mappings

    monkeypatch.delattr(mappings, "_reduce")
    with pytest.raises(compat.MegatronCompatError, match=r"mappings\._reduce .*all-reduce"):
        compat.intercept_points()


def test_autograd_classes_look_up_the_primitives_at_call_time() -> None:
    # The install point is only valid if the Function classes resolve `_reduce` & co. through the module's
    # globals when called (not bound at import). Check the bytecode names of their forward methods.
    from megatron.core.tensor_parallel import mappings

    expected = {
        "_ReduceFromModelParallelRegion": "_reduce",
        "_GatherFromModelParallelRegion": "_gather_along_last_dim",
        "_GatherFromSequenceParallelRegion": "_gather_along_first_dim",
        "_ReduceScatterToSequenceParallelRegion": "_reduce_scatter_along_first_dim",
    }
    for cls_name, primitive in expected.items():
        forward = getattr(mappings, cls_name).forward
        assert primitive in forward.__code__.co_names, f"{cls_name}.forward no longer calls {primitive} by name"
