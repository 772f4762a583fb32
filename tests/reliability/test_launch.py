"""Reliability of the local launcher: a failed run names the rank that died or stalled and the ranks that were
only waiting on it.

Before the fix the error named the ranks in the order the parent learned of them: a rank blocked in a collective
on a dead peer usually reported its "Connection closed by peer" first and was called "first reported", and a
stalled rank and the ranks waiting on it all read "did not finish (hung)".
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp.launch import DistributedRunError, run_distributed


def _dies_in_the_middle(rank: int, world_size: int) -> int:
    t = torch.ones(4)
    dist.all_reduce(t)  # everyone connected
    if rank == 1:
        os._exit(3)  # e.g. killed by the OOM killer
    dist.all_reduce(t)  # rank 0 waits on the dead peer
    return rank


def _stalls(rank: int, world_size: int) -> int:
    t = torch.ones(4)
    if rank == 0:
        time.sleep(600)  # stalled: a deadlock of its own, a slow disk...
    dist.all_reduce(t)  # the others wait on rank 0
    return rank


def _mismatched(rank: int, world_size: int) -> int:
    t = torch.ones(4)
    if rank == 0:
        dist.all_reduce(t)
    else:
        dist.broadcast(t, 0)
        dist.barrier()
    return rank


@pytest.mark.timeout(60)
def test_a_dead_rank_is_blamed_not_the_rank_waiting_on_it() -> None:
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_dies_in_the_middle, 2, timeout_s=45)
    err = info.value
    assert err.culprits == [1] and err.waiting == [0]
    line = err.one_line()
    assert line.startswith("distributed run of _dies_in_the_middle failed: rank 1: process exited with code 3")
    assert "rank(s) [0] were waiting on it" in line
    assert str(err).splitlines()[0].startswith(line)  # the message starts with the same summary
    assert "rank 0: Traceback" in str(err)  # and still carries the waiting rank's traceback


@pytest.mark.timeout(60)
def test_a_stalled_rank_is_named_with_where_it_stalled_and_who_waited() -> None:
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_stalls, 3, timeout_s=4)
    err = info.value
    assert err.culprits == [0] and err.waiting == [1, 2]
    # The stalled rank's own frame (from its stack, dumped on request before it was stopped).
    assert "(hung) outside any collective" in err.failures[0] and "in _stalls" in err.failures[0]
    assert "time.sleep" not in err.failures[1]
    for r in (1, 2):
        assert err.failures[r].startswith("blocked in a collective waiting on rank(s) [0]"), err.failures[r]
    assert "rank 0: did not finish within 4 s" in err.one_line() and "[1, 2] were waiting on it" in err.one_line()


@pytest.mark.timeout(60)
def test_ranks_all_blocked_in_collectives_are_called_a_deadlock() -> None:
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_mismatched, 3, timeout_s=4)
    err = info.value
    assert err.culprits == [] and err.waiting == [0, 1, 2]
    assert "were all blocked in collectives" in err.one_line()
