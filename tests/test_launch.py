"""The local process-group launcher: results in rank order, failures and hangs reported by rank, never a hang."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp.launch import DistributedRunError, run_distributed


def _sum_ranks(rank: int, world_size: int, offset: int) -> tuple[int, float]:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank + offset, float(t)


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
        import os

        os._exit(3)
    return rank


def test_results_come_back_in_rank_order() -> None:
    assert run_distributed(_sum_ranks, 3, 10, timeout_s=60) == [(10, 3.0), (11, 3.0), (12, 3.0)]


def test_a_failing_rank_is_named_with_its_traceback() -> None:
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout_s=60, pg_timeout_s=10)
    message = str(info.value)
    assert "rank 1: Traceback" in message and "boom on purpose" in message
    assert time.monotonic() - t0 < 40


def test_a_hung_rank_fails_within_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"rank 0: did not finish within 5 s"):
        run_distributed(_hang_on_rank_zero, 2, timeout_s=5)
    assert time.monotonic() - t0 < 30


def test_a_dead_rank_is_reported() -> None:
    with pytest.raises(DistributedRunError, match="rank 1: process exited with code 3"):
        run_distributed(_exit_without_result, 2, timeout_s=60)


def test_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_distributed(_sum_ranks, 0, 0)
