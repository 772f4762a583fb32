"""The local process-group launcher: results in rank order, failures and hangs reported by rank, never a hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp.launch import FAILURE_GRACE_S, DistributedRunError, run_distributed


def _sum_ranks(rank: int, world_size: int, offset: int, *, scale: float = 1.0) -> tuple[int, float, torch.Tensor]:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank + offset, float(t) * scale, torch.full((2,), rank, dtype=torch.bfloat16)


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 waits on the failed peer: the launcher must still return
    return rank


def _hang_on_rank_zero(rank: int, world_size: int) -> int:
    if rank == 0:
        time.sleep(600)
    return rank


def _exit_without_result(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def _float8_result(rank: int, world_size: int) -> torch.Tensor:
    return torch.zeros(4, dtype=torch.float8_e4m3fn)


def _env_and_threads(rank: int, world_size: int) -> tuple[str | None, int, str | None]:
    return os.environ.get("TPCOMP_LAUNCH_TEST"), torch.get_num_threads(), os.environ.get("GLOO_SOCKET_IFNAME")


@pytest.mark.timeout(60)
def test_results_come_back_in_rank_order() -> None:
    results = run_distributed(_sum_ranks, 3, 10, scale=2.0, timeout_s=45)
    assert [r[:2] for r in results] == [(10, 6.0), (11, 6.0), (12, 6.0)]
    for rank, (_, _, t) in enumerate(results):
        assert t.dtype == torch.bfloat16 and t.tolist() == [rank, rank]


@pytest.mark.timeout(60)
def test_spawn_start_method_works_too() -> None:
    results = run_distributed(_sum_ranks, 2, 0, timeout_s=45, start_method="spawn")
    assert [r[:2] for r in results] == [(0, 1.0), (1, 1.0)]


@pytest.mark.timeout(60)
def test_the_callers_current_environment_reaches_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    run_distributed(_env_and_threads, 1, timeout_s=45)  # make sure the forkserver already runs
    monkeypatch.setenv("TPCOMP_LAUNCH_TEST", "fresh")
    results = run_distributed(_env_and_threads, 2, timeout_s=45, threads_per_rank=1)
    assert [r[:2] for r in results] == [("fresh", 1), ("fresh", 1)]
    if os.environ.get("GLOO_SOCKET_IFNAME") is None and os.path.exists("/sys/class/net/lo"):
        assert [r[2] for r in results] == ["lo", "lo"]  # gloo stays on loopback


@pytest.mark.timeout(60)
def test_a_result_that_cannot_be_unpickled_is_a_clear_error() -> None:
    with pytest.raises(DistributedRunError, match="the result of rank 0 could not be unpickled"):
        run_distributed(_float8_result, 1, timeout_s=45)


@pytest.mark.timeout(60)
def test_a_failing_rank_is_named_with_its_traceback() -> None:
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout_s=45, pg_timeout_s=30)
    message = str(info.value)
    assert "failed on ranks [" in message
    assert "rank 1: Traceback" in message and "boom on purpose" in message and "_fail_on_rank_one" in message
    assert "ValueError: boom on purpose" in info.value.failures[1]
    # Rank 0 either saw the closed connection itself or was stopped after the grace period; never a hang.
    assert time.monotonic() - t0 < FAILURE_GRACE_S + 15


@pytest.mark.timeout(60)
def test_a_hung_rank_fails_within_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"rank 0: did not finish within 3 s \(hung\)") as info:
        run_distributed(_hang_on_rank_zero, 2, timeout_s=3)
    assert sorted(info.value.failures) == [0]  # rank 1 returned
    assert time.monotonic() - t0 < 20


@pytest.mark.timeout(60)
def test_a_dead_rank_is_reported() -> None:
    with pytest.raises(DistributedRunError, match="rank 1: process exited with code 3 without a result"):
        run_distributed(_exit_without_result, 2, timeout_s=45)


def test_bad_arguments_are_rejected_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_distributed(_sum_ranks, 0, 0)
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda rank, world_size: rank, 2)


def test_ranks_still_running_at_the_deadline_are_told_apart() -> None:
    from megatron_tpcomp.launch import _deadline_failures

    # No rank failed before: the one outside any collective stalled, the one in a collective waited on it.
    where = {0: (False, 'File "work.py", line 3 in _stalls'), 1: (True, 'File "work.py", line 5 in _stalls')}
    texts, kinds = _deadline_failures([0, 1], [], where, 7.0)
    assert kinds == {0: "stalled", 1: "in-collective"}
    assert texts[0] == 'did not finish within 7 s (hung) outside any collective; at File "work.py", line 3 in _stalls'
    assert texts[1].startswith("blocked in a collective waiting on rank(s) [0]; at ")
    # Rank 2 failed before: the others were waiting on it or were stopped after it; a rank that did not answer
    # (left out of ``where``) is called stopped, without a frame.
    texts, kinds = _deadline_failures([0, 1], [2], {1: (True, "")}, 7.0)
    assert kinds == {0: "stopped", 1: "in-collective"}
    assert texts == {
        0: f"stopped: still running {FAILURE_GRACE_S:g} s after rank(s) [2] failed",
        1: "blocked in a collective waiting on rank(s) [2]",
    }
    # All blocked in collectives and nobody failed: no one to name.
    texts, _ = _deadline_failures([0, 1], [], {0: (True, ""), 1: (True, "")}, 7.0)
    assert texts == {r: "blocked in a collective waiting on a peer" for r in (0, 1)}


def test_gloo_ranks_stay_on_loopback_unless_the_caller_chose_an_interface() -> None:
    from megatron_tpcomp.launch import _rank_environ

    env = {"PATH": "/bin"}
    assert _rank_environ(env, "gloo", "lo") == {"PATH": "/bin", "GLOO_SOCKET_IFNAME": "lo"}
    assert env == {"PATH": "/bin"}  # the caller's mapping is left alone
    assert _rank_environ({"GLOO_SOCKET_IFNAME": "eth0"}, "gloo", "lo") == {"GLOO_SOCKET_IFNAME": "eth0"}
    assert _rank_environ(env, "nccl", "lo") == env
    assert _rank_environ(env, "gloo", None) == env
