"""bench/ranks.launch_workers with a real worker process per rank: what rank 0 writes comes back; a failing rank
is named and no rank outlives the call."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from megatron_tpcomp.bench.ranks import BenchError, launch_workers, package_root

WORKER = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    p = argparse.ArgumentParser()
    for a in ("--rank", "--world-size", "--master-port"):
        p.add_argument(a, type=int)
    p.add_argument("--master-addr"); p.add_argument("--plan"); p.add_argument("--out")
    a = p.parse_args()
    plan = json.load(open(a.plan))
    with open(os.path.join(os.path.dirname(a.out), f"pid{a.rank}"), "w") as f:
        f.write(str(os.getpid()))
    if a.rank == plan.get("fail_rank"):
        sys.exit(3)
    if plan.get("hang"):
        time.sleep(60)
    if a.rank == 0:
        json.dump({"world_size": a.world_size, "label": plan["label"], "ifname": os.environ["GLOO_SOCKET_IFNAME"],
                   "mine": os.environ.get("MY_VAR")}, open(a.out, "w"))
    """
)


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "toy_rank_worker.py").write_text(WORKER)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), package_root()]), "MY_VAR": "x"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_rank_zero_result_comes_back(tmp_path: Path, worker_env: dict[str, str]) -> None:
    plan = {"label": "toy"}
    got = launch_workers("toy_rank_worker", 3, None, plan, str(tmp_path), 60, plan_flag="--plan", env=worker_env)
    assert got == {"world_size": 3, "label": "toy", "ifname": "lo", "mine": "x"}  # loopback only without a link


def test_a_failing_rank_is_named_and_none_survives(tmp_path: Path, worker_env: dict[str, str]) -> None:
    plan = {"label": "toy", "fail_rank": 1, "hang": True}  # rank 1 exits 3, ranks 0 and 2 would wait 60 s
    with pytest.raises(BenchError, match=r"\[toy\] rank 1 exited with code 3"):
        launch_workers("toy_rank_worker", 3, None, plan, str(tmp_path), 60, plan_flag="--plan", env=worker_env)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(3)]
    assert not any(_alive(pid) for pid in pids)


def test_the_deadline_stops_hung_ranks(tmp_path: Path, worker_env: dict[str, str]) -> None:
    plan = {"label": "toy", "hang": True}
    with pytest.raises(BenchError, match=r"ranks \[0, 1\] did not finish within 2 s"):
        launch_workers("toy_rank_worker", 2, None, plan, str(tmp_path), 2, plan_flag="--plan", env=worker_env)
    assert not any(_alive(int((tmp_path / f"pid{r}").read_text())) for r in range(2))
