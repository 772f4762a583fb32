"""Rank processes of the benchmarks: start one worker per rank (on loopback, or inside a shaped link's network
namespaces), wait for all of them with a deadline, and never leave one running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import megatron_tpcomp
from megatron_tpcomp.bench import link as linkmod
from megatron_tpcomp.launch import free_port

#: Rendezvous port inside rank 0's namespace: the namespace is ours alone, so a fixed port cannot collide.
NS_MASTER_PORT = 29500


class BenchError(RuntimeError):
    """A rank failed or the run timed out; the message says which rank and how."""


def package_root() -> str:
    # The rank processes must import this very package, also when it is not installed (a source checkout).
    return str(Path(megatron_tpcomp.__file__).resolve().parents[1])


def stop_ranks(procs: list[subprocess.Popen], grace_s: float = 3.0) -> None:
    """Terminate (then kill) every rank process still running and reap them all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=grace_s)


def wait_ranks(procs: list[subprocess.Popen], timeout_s: float, label: str) -> None:
    """Wait for every rank to exit 0. A failed rank's peers get a few seconds (they are usually blocked in a
    collective with it), then :class:`BenchError` names the first failure."""
    deadline = time.monotonic() + timeout_s
    failed: tuple[int, int] | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad and failed is None:
            failed = bad[0]
            deadline = min(deadline, time.monotonic() + 3.0)
        if all(c is not None for c in codes) or time.monotonic() > deadline:
            if failed is not None:
                raise BenchError(f"[{label}] rank {failed[0]} exited with code {failed[1]} (its stderr is above)")
            running = [r for r, c in enumerate(codes) if c is None]
            raise BenchError(f"[{label}] ranks {running} did not finish within {timeout_s:g} s")
        time.sleep(0.1)


def launch_workers(
    worker: str,
    world_size: int,
    link: linkmod.ShapedLink | None,
    plan: dict,
    workdir: str,
    timeout_s: float,
    *,
    plan_flag: str,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``python -m worker`` once per rank and return what rank 0 wrote.

    Each rank gets ``--rank R --world-size N --master-addr A --master-port P <plan_flag> PLAN --out OUT``: the
    plan is written to ``workdir`` as JSON, rank 0 writes its result as JSON to ``OUT``. With a ``link`` the ranks
    run in its namespaces and gloo talks over its veth ends; without one, on loopback only. ``env`` is added to
    this process's environment. Raises :class:`BenchError` when a rank fails or the deadline passes; no rank
    outlives the call (Ctrl-C included).
    """
    plan_path = os.path.join(workdir, "plan.json")
    out_path = os.path.join(workdir, "result.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), environ.get("PYTHONPATH", "")) if p)
    environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's "hostname cannot be retrieved" in namespaces, x N
    environ.update(env or {})
    if link is not None:
        addr, port = link.master_addr, NS_MASTER_PORT
        environ["GLOO_SOCKET_IFNAME"] = link.ifname  # gloo's connections over the shaped veth, not the namespace lo
    else:
        addr, port = "127.0.0.1", free_port()
        environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, never the machine's other interfaces
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world_size):
            cmd = (link.prefix(rank) if link is not None else []) + [sys.executable, "-m", worker]
            cmd += ["--rank", str(rank), "--world-size", str(world_size), "--master-addr", addr]
            cmd += ["--master-port", str(port), plan_flag, plan_path, "--out", out_path]
            procs.append(subprocess.Popen(cmd, env=environ, stdin=subprocess.DEVNULL))
        wait_ranks(procs, timeout_s, plan["label"])
    finally:
        stop_ranks(procs)  # also on Ctrl-C or an error: no rank outlives the run (or keeps a namespace alive)
    with open(out_path) as f:
        return json.load(f)
