"""Run a function on N local processes joined in a real ``torch.distributed`` group, with a hang guard.

Used by the tests, the demo and the benchmarks::

    from megatron_tpcomp.launch import run_distributed

    def work(rank: int, world_size: int, n: int) -> float:   # module level: it is pickled
        t = torch.full((n,), float(rank))
        dist.all_reduce(t)
        return float(t[0])

    run_distributed(work, 3, 8)  # -> [3.0, 3.0, 3.0], in rank order

How it works:

- Rendezvous: the parent binds a listening socket on ``127.0.0.1`` port 0 (the kernel picks a free port) and
  hosts the ``TCPStore`` on it; the ranks connect to it. Nothing listens on another address and there is no
  window in which another process could take the port. gloo's own connections use the loopback interface.
- Processes are started with the ``forkserver`` method by default: like ``spawn``, every rank is a fresh
  process that shares no state (threads, CUDA context, process groups) with the caller, but it is forked
  from a server that imported torch once, so a launch costs ~0.1 s instead of a torch import per rank (~2 s
  of CPU each on the 2-core CI machines). The caller's current environment is applied in each rank, and each
  rank gets ``cpus // world_size`` torch threads so that N ranks do not oversubscribe a small machine.
- Hang guard: if a rank raises, dies or the run exceeds ``timeout_s``, every rank is terminated (then
  killed) and :class:`DistributedRunError` names the ranks and carries the failing ranks' tracebacks.
- Blame: the error tells the ranks that failed by themselves (raised, died, stalled outside any collective)
  from those that were only waiting on them (a communication error after a peer failed, or blocked in a
  collective). A rank still running at the deadline is asked for its Python stack (``faulthandler`` on
  ``SIGUSR1``) before it is stopped: that is how a stalled rank is told from one blocked in a collective.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing
import os
import pickle
import queue
import re
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

#: How long the peers of a failed rank get to report their own errors before they are terminated: they are
#: usually blocked in a collective that waits on the failed rank.
FAILURE_GRACE_S = 3.0


#: Phrases of the errors a rank gets when a peer died or stalled under it (gloo, NCCL, the TCP store): such a
#: rank was waiting on the peer, it did not fail by itself.
_PEER_ERROR_PATTERNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "DistBackendError",
    "DistNetworkError",
    "Timed out waiting",
    "timed out",
    "Socket Timeout",
    "NCCL communicator was aborted",
    "ncclRemoteError",
    "Connection refused",
)


def _is_peer_error(text: str) -> bool:
    return any(p in text for p in _PEER_ERROR_PATTERNS)


def _last_line(text: str) -> str:
    """The last non-empty line of a traceback (its exception), with the exception's module path left out."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text.strip()
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*:)", "", last)


class DistributedRunError(RuntimeError):
    """A rank failed, died or hung; the message names the ranks and includes the tracebacks.

    The first line of the message is :meth:`one_line`: the rank(s) that failed by themselves (``culprits``)
    with their last exception line, and the ranks that were waiting on them (``waiting``).

    Attributes:
        failures: rank -> traceback text or a one-line reason, for every rank that did not return.
        culprits: ranks that raised an error of their own, died, or stalled outside any collective (in the order
            the launcher learned of them).
        waiting: ranks that failed only because of a peer: a communication error after a peer failed, blocked in
            a collective at the deadline, or stopped after the grace period.
        world_size: ranks of the run.
    """

    def __init__(
        self,
        message: str,
        failures: dict[int, str] | None = None,
        *,
        culprits: list[int] | None = None,
        waiting: list[int] | None = None,
        world_size: int | None = None,
        what: str = "distributed run",
    ):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.culprits = list(culprits if culprits is not None else list(self.failures)[:1])
        self.waiting = list(waiting or [])
        self.world_size = world_size
        self.what = what

    @property
    def first_rank(self) -> int | None:
        """The rank to look at first: the first culprit, else the first rank reported."""
        if self.culprits:
            return self.culprits[0]
        return next(iter(self.failures), None)

    def one_line(self) -> str:
        """One line: who failed first and how (its last exception line), and who was waiting on whom."""
        first = self.first_rank
        if first is None:
            return _last_line(str(self))
        reason = _last_line(self.failures.get(first, ""))
        if self.culprits:
            head = f"{self.what} failed: rank {first}: {reason}"
            others = [r for r in self.culprits if r != first]
            if others:
                head += f"; also failed: rank(s) {others}"
        else:
            return (
                f"{self.what} failed: ranks {sorted(self.failures)} were all blocked in collectives (a deadlock, or "
                f"ranks calling collectives in different orders); rank {first}: {reason}"
            )
        if self.waiting:
            head += f"; rank(s) {self.waiting} were waiting on {'it' if len(self.culprits) == 1 else 'them'}"
        return head


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).

    :func:`run_distributed` does not need it (it keeps its socket open); for callers that must pass a port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback_ifname() -> str | None:
    """Name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS), or None if unknown."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    environ: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: Any,
    stack_file: str,
) -> None:
    # A forkserver child inherits the server's environment, which may be older than the caller's.
    os.environ.clear()
    os.environ.update(environ)
    # Before anything imports megatron-core: its missing-TE/apex notices would print ~10 lines per rank.
    from megatron_tpcomp.rankwarnings import quiet_rank_warnings

    quiet_rank_warnings()
    import torch
    import torch.distributed as dist

    # On SIGUSR1 the launcher gets this rank's Python stacks: where a rank that did not finish was (in a collective
    # waiting on a peer, or elsewhere). faulthandler writes from its C signal handler, so it works while the rank
    # is blocked in C++ (a gloo wait) too.
    dump = open(stack_file, "w")  # noqa: SIM115 - open for the life of the process
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    try:
        # N ranks on a few cores: one intra-op thread each, or they fight over the cores (4 ranks x 2 threads on
        # 2 cores made the collective tests 2x slower).
        torch.set_num_threads(threads)
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        value = fn(rank, world_size, *args, **kwargs)
        # Plain pickle to bytes: a torch queue would share tensor storage through file descriptors that die
        # with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, KeyboardInterrupt and SystemExit in a rank included
        results.put((rank, False, traceback.format_exc()))
    finally:
        # megatron.core.inference registers a stack dump on SIGTERM at import; a rank stopped in its teardown
        # by the launcher should exit quietly.
        faulthandler.unregister(signal.SIGTERM)
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_picklable_function(fn: Callable[..., Any]) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(
            f"run_distributed needs a module-level function (it is pickled by name into each rank), got {fn!r}"
        )


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    pg_timeout_s: float | None = None,
    start_method: str | None = None,
    threads_per_rank: int | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` local processes in one process group.

    Each rank initialises ``torch.distributed`` (default group: all ranks) before calling ``fn`` and destroys
    the group after it, also when ``fn`` raises.

    Args:
        fn: a module-level (picklable) function; its return value must be picklable (tensors are fine).
        world_size: number of processes (>= 1).
        *args, **kwargs: passed to ``fn`` after ``rank, world_size`` (keyword names used by this function
            itself, such as ``timeout_s``, cannot reach ``fn``).
        timeout_s: wall-clock limit for the whole run; past it every rank is killed.
        backend: torch.distributed backend (``"gloo"`` on CPU, ``"nccl"`` with one GPU per rank).
        pg_timeout_s: process-group timeout (a collective waiting on a dead peer fails after this);
            defaults to ``timeout_s``.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``. Use ``"spawn"`` if the
            ranks need environment variables that torch reads at import time and that were changed after the
            first launch (the forkserver imported torch then).
        threads_per_rank: torch intra-op threads per rank; default ``max(1, cpus // world_size)``.

    Returns:
        The return values of ``fn``, in rank order.

    Raises:
        TypeError: ``fn`` is a lambda or a nested function.
        ValueError: ``world_size < 1``.
        DistributedRunError: a rank raised, exited without a result, or the run timed out. Raised only after
            every rank process has been terminated.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    _check_picklable_function(fn)
    ctx = _context(start_method)
    threads = threads_per_rank if threads_per_rank is not None else default_threads(world_size)
    environ = _rank_environ(dict(os.environ), backend, _loopback_ifname())
    pg_timeout = pg_timeout_s or timeout_s
    values, failures, kinds = _run_ranks(
        ctx, fn, world_size, args, kwargs, timeout_s, backend, pg_timeout, threads, environ
    )
    if failures:
        raise _run_error(getattr(fn, "__qualname__", str(fn)), world_size, failures, kinds)
    return _unpickle_results(values, world_size)


def _run_ranks(
    ctx: Any,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    kwargs: dict,
    timeout_s: float,
    backend: str,
    pg_timeout: float,
    threads: int,
    environ: dict[str, str],
) -> tuple[dict[int, bytes], dict[int, str], dict[int, str]]:
    """Host the rendezvous store, start one :func:`_worker` process per rank, gather their reports
    (:func:`_collect`) and stop them all, also on an error or Ctrl-C. Returns rank -> pickled value, rank -> failure
    text and rank -> failure kind."""
    store, port = _host_store(pg_timeout)
    results = ctx.Queue()
    stacks = tempfile.TemporaryDirectory(prefix="tpcomp-stacks-")
    stacks_dir = stacks.name
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                rank,
                world_size,
                port,
                backend,
                pg_timeout,
                threads,
                environ,
                fn,
                args,
                kwargs,
                results,
                os.path.join(stacks_dir, f"rank{rank}.txt"),
            ),
            daemon=True,
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    values: dict[int, bytes] = {}
    failures: dict[int, str] = {}
    kinds: dict[int, str] = {}
    try:
        for p in procs:
            p.start()
        _collect(procs, results, values, failures, timeout_s, kinds, stacks_dir)
    finally:
        _stop(procs)
        results.close()
        del store  # stops the store's server
        stacks.cleanup()
    return values, failures, kinds


def _context(start_method: str | None) -> Any:
    """The multiprocessing context: ``start_method``, else forkserver where available (torch preloaded), else
    spawn."""
    if start_method is None:
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Import torch once in the server (only takes effect when the server starts).
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def default_threads(world_size: int) -> int:
    """Torch threads per rank: the CPUs this process may use, shared by the ranks (at least one each)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world_size)


def _rank_environ(environ: dict[str, str], backend: str, ifname: str | None) -> dict[str, str]:
    """The environment each rank starts with: ``environ``, plus gloo pinned to the loopback interface ``ifname``
    unless the caller chose an interface (``GLOO_SOCKET_IFNAME``)."""
    environ = dict(environ)
    if backend == "gloo" and ifname and "GLOO_SOCKET_IFNAME" not in environ:
        environ["GLOO_SOCKET_IFNAME"] = ifname  # gloo's pair connections stay on loopback too
    return environ


def _host_store(pg_timeout: float) -> tuple[Any, int]:
    """The rendezvous ``TCPStore`` hosted by this process on a loopback port it bound itself, and that port."""
    import torch.distributed as dist

    # The parent hosts the store on a socket it bound itself: loopback only, and no window in which another
    # test run on the same machine could take the port. The store owns (and closes) the socket.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = int(listener.getsockname()[1])
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            world_size=None,
            is_master=True,
            timeout=datetime.timedelta(seconds=pg_timeout),
            wait_for_workers=False,
            master_listen_fd=listener.fileno(),
        )
        listener.detach()
    return store, port


def _unpickle_results(values: dict[int, bytes], world_size: int) -> list[Any]:
    """The ranks' pickled return values, in rank order; a value that cannot be unpickled is a
    :class:`DistributedRunError` naming its rank."""
    out = []
    for r in range(world_size):
        try:
            out.append(pickle.loads(values[r]))
        except Exception as exc:  # e.g. float8 tensors, which torch 2.13 pickles but cannot unpickle
            raise DistributedRunError(
                f"the result of rank {r} could not be unpickled ({type(exc).__name__}: {exc}); return plain "
                "Python values or tensors of other dtypes (view float8 tensors as uint8)",
                {r: traceback.format_exc()},
            ) from exc
    return out


#: Failure kinds of a rank that failed by itself; the others (peer-error, in-collective, stopped) were waiting on a
#: peer.
_OWN = ("raised", "died", "stalled")


def _run_error(what: str, world_size: int, failures: dict[int, str], kinds: dict[int, str]) -> DistributedRunError:
    """The error of a failed run: culprits and waiting ranks told apart (see :class:`DistributedRunError`)."""
    culprits = [r for r in failures if kinds.get(r, "raised") in _OWN]
    if not culprits:
        # Only communication errors: with nobody else to blame, the first to report one failed by itself (e.g. a
        # store it could not reach), unless every rank was blocked in a collective (a deadlock: no culprit).
        errors = [r for r in failures if kinds.get(r) == "peer-error"]
        culprits = errors[:1]
    waiting = sorted(r for r in failures if r not in culprits)
    parts = [f"rank {r}: {failures[r].rstrip()}" for r in sorted(failures)]
    err = DistributedRunError(
        "",
        failures,
        culprits=culprits,
        waiting=waiting,
        world_size=world_size,
        what=f"distributed run of {what}",
    )
    header = (
        f"{err.one_line()} (world size {world_size}; failed on ranks {sorted(failures)}; "
        f"first reported: rank {next(iter(failures))})"
    )
    err.args = (header + ":\n" + "\n".join(parts),)
    return err


def _main_stack(text: str) -> list[str]:
    """The ``File ...`` lines (innermost first) of the thread that runs :func:`_worker` in a faulthandler dump."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x", "Stack (most recent call first)")):
            blocks.append([])
        elif line.strip().startswith("File ") and blocks:
            blocks[-1].append(line.strip())
    for frames in blocks:
        if any(f.endswith(" in _worker") and "launch.py" in f for f in frames):
            return frames
    return blocks[0] if blocks else []


def _where(procs: list[Any], ranks: list[int], stacks_dir: str | None) -> dict[int, tuple[bool, str]]:
    """Ask ``ranks`` for their Python stacks: rank -> (blocked in a torch.distributed call, innermost frame of
    the user's code). Ranks that do not answer within a second are left out."""
    if not stacks_dir or not ranks:
        return {}
    for r in ranks:
        if procs[r].is_alive() and procs[r].pid is not None:
            try:
                os.kill(procs[r].pid, signal.SIGUSR1)
            except OSError:
                pass
    out: dict[int, tuple[bool, str]] = {}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and len(out) < len(ranks):
        time.sleep(0.05)
        for r in ranks:
            if r in out:
                continue
            try:
                with open(os.path.join(stacks_dir, f"rank{r}.txt")) as f:
                    text = f.read()
            except OSError:
                continue
            if "File " not in text:
                continue
            frames = _main_stack(text)
            in_dist = any("torch/distributed/" in f or "torch\\distributed\\" in f for f in frames)
            mine = [f for f in frames if "site-packages" not in f and "/torch/" not in f and "/lib/python" not in f]
            out[r] = (in_dist, (mine or frames or ["?"])[0])
    return out


def _deadline_failures(
    left: list[int], failed: list[int], where: dict[int, tuple[bool, str]], timeout_s: float
) -> tuple[dict[int, str], dict[int, str]]:
    """Failure text and kind of each rank in ``left``, still running at the deadline, in ``left``'s order.

    ``failed``: the ranks that failed before; ``where``: :func:`_where`'s answer. A rank blocked in a collective
    was waiting (on the failed ranks, else on the stalled ones); one outside any collective was stopped after a
    peer failed, or stalled by itself when none had."""
    texts: dict[int, str] = {}
    kinds: dict[int, str] = {}
    for r in left:
        in_dist, frame = where.get(r, (False, ""))
        at = f"; at {frame}" if frame else ""
        if in_dist:
            kinds[r] = "in-collective"
            waited = f"on rank(s) {failed}" if failed else "on a peer"
            texts[r] = f"blocked in a collective waiting {waited}{at}"
        elif failed:
            kinds[r] = "stopped"
            texts[r] = f"stopped: still running {FAILURE_GRACE_S:g} s after rank(s) {sorted(failed)} failed{at}"
        else:
            kinds[r] = "stalled"
            texts[r] = f"did not finish within {timeout_s:g} s (hung) outside any collective{at}"
    stalled = [r for r in left if kinds[r] == "stalled"]
    if stalled and not failed:  # those blocked in a collective were waiting on the stalled ones
        for r in left:
            if kinds[r] == "in-collective":
                texts[r] = texts[r].replace("waiting on a peer", f"waiting on rank(s) {stalled}")
    return texts, kinds


def _collect(
    procs: list[Any],
    results: Any,
    values: dict[int, bytes],
    failures: dict[int, str],
    timeout_s: float,
    kinds: dict[int, str] | None = None,
    stacks_dir: str | None = None,
) -> None:
    """Gather ``(rank, ok, payload)`` messages until every rank reported, one died, or time ran out.

    ``kinds`` gets, per failed rank, how it failed: raised, died, stalled (running at the deadline outside any
    collective), peer-error (a communication error), in-collective (blocked in one at the deadline) or stopped
    (running, not in a collective, after a peer failed)."""
    world_size = len(procs)
    kinds = {} if kinds is None else kinds
    deadline = time.monotonic() + timeout_s
    dead_since: dict[int, float] = {}

    def pending() -> list[int]:
        return [r for r in range(world_size) if r not in values and r not in failures]

    while pending():
        now = time.monotonic()
        if now > deadline:
            left = pending()
            texts, how = _deadline_failures(left, list(failures), _where(procs, left, stacks_dir), timeout_s)
            failures.update(texts)
            kinds.update(how)
            return
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue.Empty:
            # A process may exit right after putting its result: wait a moment before calling it dead.
            for r in pending():
                if not procs[r].is_alive():
                    since = dead_since.setdefault(r, now)
                    if now - since > 1.0:
                        failures[r] = f"process exited with code {procs[r].exitcode} without a result"
                        kinds[r] = "died"
            if failures:
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            continue
        if ok:
            values[rank] = payload
        else:
            failures[rank] = payload
            kinds[rank] = "peer-error" if _is_peer_error(_last_line(payload)) else "raised"
            # Its peers are probably blocked in a collective: give them a moment to report, then stop.
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)


def _stop(procs: list[Any], grace_s: float = 2.0) -> None:
    """Give the rank processes ``grace_s`` to exit by themselves (they may still be tearing down their process
    group after reporting), then terminate (SIGTERM), then kill (SIGKILL) those still alive, and reap them all."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.pid is not None:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is None:
            continue  # never started
        p.join(timeout=3)
        if p.is_alive():
            p.kill()
            p.join(timeout=3)
