"""Run a function on N local processes joined in a real ``torch.distributed`` group, with a hang guard.

Used by the tests, the demo and the benchmarks. Every rank runs ``fn(rank, world_size, *args, **kwargs)``
inside an initialised process group (gloo by default) on loopback; results come back in rank order. If a rank
raises, dies or the run exceeds ``timeout_s``, every rank is terminated and :class:`DistributedRunError` names
the ranks and carries the failing rank's traceback: a stuck group never hangs the caller.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


class DistributedRunError(RuntimeError):
    """A rank failed, died or hung; the message names the ranks and includes the tracebacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: Any,
) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        value = fn(rank, world_size, *args, **kwargs)
        # Plain pickle to bytes: torch's queue would share tensor storage through file descriptors that die
        # with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    pg_timeout_s: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of processes (>= 1).
        timeout_s: wall-clock limit for the whole run; past it every rank is killed.
        backend: torch.distributed backend ("gloo" on CPU, "nccl" with one GPU per rank).
        pg_timeout_s: process-group timeout (a collective waiting on a dead peer fails after this);
            defaults to ``timeout_s``.

    Returns:
        The return values of ``fn``, in rank order (they must be picklable).

    Raises:
        DistributedRunError: a rank raised, exited without a result, or the run timed out.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, backend, pg_timeout_s or timeout_s, fn, args, kwargs, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        while len(values) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in values and r not in failures]
                # A process may have exited right after putting its result: drain once more before judging.
                if dead:
                    time.sleep(0.5)
                    while True:
                        try:
                            rank, ok, value = results.get_nowait()
                        except queue.Empty:
                            break
                        (values if ok else failures)[rank] = value
                    for r in dead:
                        if r not in values and r not in failures:
                            failures[r] = f"process exited with code {procs[r].exitcode} without a result"
                if time.monotonic() > deadline:
                    hung = [r for r in range(world_size) if r not in values and r not in failures]
                    for r in hung:
                        failures[r] = f"did not finish within {timeout_s:.0f} s (hung, or waiting on a failed peer)"
                    break
                continue
            (values if ok else failures)[rank] = value
            if failures:
                # One rank failed: its peers are probably stuck in a collective; give them a moment, then stop.
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failures:
        parts = [f"rank {r}: {failures[r]}" for r in sorted(failures)]
        raise DistributedRunError(
            f"distributed run of {getattr(fn, '__name__', fn)} failed on ranks {sorted(failures)} "
            f"(world size {world_size}):\n" + "\n".join(parts)
        )
    return [pickle.loads(values[r]) for r in range(world_size)]
