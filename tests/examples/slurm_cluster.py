"""A throwaway two-node Slurm cluster on this machine, for testing sbatch scripts for real.

Debian's Slurm is built with MULTIPLE_SLURMD, so several ``slurmd -N <node>`` can serve nodes ``n1, n2, ...`` on
one host. Jobs look their nodes up by name (``scontrol show hostnames`` gives ``n1``, torchrun connects to it),
so the names must resolve; rather than editing the machine's ``/etc/hosts``, every daemon runs inside a private
mount namespace in which a copy of it with ``127.0.0.1 n1 n2`` is bind-mounted over ``/etc/hosts``. Job steps are
children of slurmd and inherit that namespace. Commands that need the names (sbatch, squeue, ...) enter the
namespace with ``nsenter``.

Everything else lives under one scratch directory: ``slurm.conf`` (``SLURM_CONF`` points at it), state, spool
and log directories, and munge's key and socket. Ports are picked free at start-up, so clusters of concurrent
test runs do not collide. Requires root (daemons, ``unshare``, ``mount``) and the packages ``slurmctld slurmd
slurm-client munge``.

    with local_slurm_cluster(tmp_path, nodes=2) as cluster:
        job = cluster.submit(script, ["--flag"], env={"X": "1"}, sbatch_args=["--nodes=2"])
        result = cluster.wait(job, timeout=300)
        assert result.state == "COMPLETED", result.describe()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Debian package names of the daemons and client commands used here.
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: Commands that must be on PATH.
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel", "munged", "unshare", "nsenter")
#: Job states after which a job never runs again (squeue/scontrol names).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
#: unix socket paths are limited to 108 bytes; munge's socket must fit.
_MAX_SOCKET_PATH = 100


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, packages missing and not installable, no mount namespaces); says why."""


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def ensure_slurm_installed(timeout_s: float = 600.0) -> None:
    """Install the Slurm and munge packages with apt-get when they are missing (root only).

    Raises:
        SlurmUnavailable: not root, or the packages are missing and apt-get could not install them.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local Slurm cluster needs root (daemons, mount namespaces)")
    if not missing_commands():
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {missing_commands()} and no apt-get to install {' '.join(PACKAGES)}")
    # The daemons are not started by the packages here (no systemd); noninteractive avoids debconf prompts.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from exc
    if proc.returncode != 0 or missing_commands():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SlurmUnavailable(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); still missing {missing_commands()}: {tail}"
        )


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now (all sockets held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class JobResult:
    """Final state of a batch job, from ``scontrol show job``."""

    job_id: str
    state: str
    exit_code: str
    info: dict[str, str]
    log: str

    def describe(self) -> str:
        """State, exit code and the tail of the job's output file: what a failing assertion should show."""
        return f"job {self.job_id}: {self.state} (exit {self.exit_code})\n--- job log (tail) ---\n{self.log[-6000:]}"


@dataclass
class LocalSlurmCluster:
    """A running cluster: the namespace holder, the daemons, and the files under ``root``."""

    root: Path
    nodes: list[str]
    conf: Path
    holder: subprocess.Popen
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm commands: this cluster's config, never the machine's."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _nsenter(self, cmd: Sequence[str], cwd: str | Path | None = None) -> list[str]:
        # nsenter execs the command after joining the holder's mount namespace, so a Popen of this list has the
        # command's own pid (what cleanup signals). Joining a mount namespace resets the working directory to
        # "/", hence --wd (sbatch records it as the job's submit directory).
        wd = Path(cwd) if cwd is not None else Path.cwd()
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"--wd={wd.resolve()}", "--", *cmd]

    def run(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        check: bool = True,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the cluster's namespace (node names resolve) with ``SLURM_CONF`` set.

        Raises:
            subprocess.CalledProcessError: ``check`` and a non-zero exit; its message includes stderr.
        """
        full_env = {**self.env, **(env or {})}
        proc = subprocess.run(self._nsenter(cmd, cwd), env=full_env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(cmd), proc.stdout, proc.stderr)
        return proc

    def _start_daemon(self, name: str, cmd: Sequence[str]) -> None:
        # Foreground daemons: stdout/stderr (start-up errors before their log file opens) go to <name>.console.
        with open(self.root / "log" / f"{name}.console", "wb") as log:
            self.daemons[name] = subprocess.Popen(
                self._nsenter(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _check_daemons(self) -> None:
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during start-up\n{self.logs(name)}")

    def logs(self, name: str | None = None, tail: int = 4000) -> str:
        """Tail of the daemons' log files (or of one daemon's), for failure messages."""
        out = []
        for f in sorted((self.root / "log").iterdir()):
            if name is None or f.name.startswith(name):
                out.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def wait_until_idle(self, timeout: float = 120.0) -> None:
        """Block until every node has registered and is idle.

        Raises:
            TimeoutError: a node did not come up within ``timeout`` seconds (with the daemon logs).
        """
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_daemons()
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            if proc.returncode == 0:
                states = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
                if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")

    def submit(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        sbatch_args: Sequence[str] = (),
        cwd: str | Path | None = None,
    ) -> str:
        """``sbatch`` ``script`` (with ``args`` after it) from ``cwd``; returns the job id.

        ``env`` is added to the submitting environment, which sbatch exports to the job (``--export=ALL``).
        The job's output goes to ``<root>/jobs/slurm-<id>.out`` unless ``sbatch_args`` set ``--output``.
        """
        (self.root / "jobs").mkdir(exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--output={self.root / 'jobs' / 'slurm-%j.out'}", *sbatch_args]
        proc = self.run([*cmd, str(script), *args], env=env, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (empty once Slurm has forgotten the job)."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        info = {}
        for item in proc.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                info[key] = value
        return info

    def wait(self, job_id: str, timeout: float) -> JobResult:
        """Poll until the job reaches a terminal state (``scontrol``: ``sacct`` needs slurmdbd, absent here).

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds; the job is cancelled first.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                break
            time.sleep(1.0)
        else:
            self.run(["scancel", job_id], check=False)
            raise TimeoutError(
                f"job {job_id} not finished after {timeout:.0f} s: {info.get('JobState')}\n{self.logs()}"
            )
        out = Path(info.get("StdOut", ""))
        log = out.read_text(errors="replace") if out.is_file() else f"(no job log at {out})"
        return JobResult(job_id, info["JobState"], info.get("ExitCode", "?"), info, log)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, kill whatever is left in the namespace, release the namespace."""
        if self.holder.poll() is None and "slurmctld" in self.daemons:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run(["scancel", "--full", "--user", str(os.geteuid())], check=False, timeout=20)
        for proc in reversed(list(self.daemons.values())):  # slurmd before slurmctld before munged
            _terminate(proc)
        # Job steps (slurmstepd and the ranks) outlive a killed slurmd; they are all in our namespace.
        for pid in _pids_in_mount_namespace(self.holder.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _terminate(self.holder)


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


def _pids_in_mount_namespace(holder_pid: int) -> list[int]:
    """Processes (other than the holder) in the holder's mount namespace: only things this cluster started."""
    try:
        ns = os.readlink(f"/proc/{holder_pid}/ns/mnt")
    except OSError:
        return []
    if ns == os.readlink("/proc/self/ns/mnt"):  # never sweep our own namespace
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != holder_pid:
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == ns:
                    pids.append(int(entry.name))
    return pids


def _write_config(root: Path, nodes: list[str], ctld_port: int, node_ports: list[int], munge_socket: Path) -> Path:
    host = socket.gethostname()
    node_lines = [
        # Every node is this machine (NodeHostname) reached over loopback; MULTIPLE_SLURMD tells them apart by
        # name (-N) and port.
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 State=UNKNOWN"
        for n, p in zip(nodes, node_ports, strict=True)
    ]
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=tpcomp-test",
                f"SlurmctldHost={host}(127.0.0.1)",
                f"SlurmctldPort={ctld_port}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={munge_socket}",
                # No cgroups here: track processes by parentage, no task binding or containment.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                # Nodes declare 1 CPU each, fewer than the hardware has: let the config win over detection.
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "MailProg=/bin/true",
                # Keep finished jobs visible to scontrol long enough for wait() to read their state.
                "MinJobAge=600",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=60",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool' / '%n'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
                *node_lines,
                f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _start_namespace_holder(root: Path, nodes: list[str]) -> subprocess.Popen:
    """A process in a new private mount namespace whose ``/etc/hosts`` also maps the node names to 127.0.0.1."""
    hosts = root / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(nodes)}\n")
    # Private propagation keeps the bind mount out of the machine's namespace. The holder reports readiness
    # after the mount, then sleeps until stop(); its pid is the namespace's handle for nsenter.
    script = 'mount --bind "$1" /etc/hosts && echo ready && exec sleep infinity'
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script, "holder", str(hosts)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    line = holder.stdout.readline() if holder.stdout else ""
    if line.strip() != "ready":
        _terminate(holder)
        err = holder.stderr.read() if holder.stderr else ""
        raise SlurmUnavailable(f"cannot create a private mount namespace with its own /etc/hosts: {err.strip()}")
    return holder


@contextlib.contextmanager
def local_slurm_cluster(
    tmpdir: str | Path, nodes: int = 2, start_timeout: float = 120.0
) -> Iterator[LocalSlurmCluster]:
    """Start munged, slurmctld and ``nodes`` slurmd (``n1``..``nN``) under ``tmpdir``; stop them all on exit.

    Raises:
        SlurmUnavailable: not root, the packages are missing and cannot be installed, or no mount namespaces.
        TimeoutError / RuntimeError: a daemon did not come up (message has the daemon logs).
    """
    ensure_slurm_installed()
    root = Path(tmpdir)
    names = [f"n{i + 1}" for i in range(nodes)]
    for sub in ("state", "run", "log", "munge", *(f"spool/{n}" for n in names)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_dir = root / "munge"
    munge_socket = munge_dir / "munge.socket"
    if len(str(munge_socket)) > _MAX_SOCKET_PATH:
        raise ValueError(f"{munge_socket} is too long for a unix socket; use a shorter tmpdir")
    # munged refuses a key that others can read, and clients must be able to reach its socket directory.
    munge_dir.chmod(0o755)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld_port, *node_ports = _free_ports(1 + nodes)
    conf = _write_config(root, names, ctld_port, node_ports, munge_socket)

    holder = _start_namespace_holder(root, names)
    cluster = LocalSlurmCluster(root=root, nodes=names, conf=conf, holder=holder)
    try:
        cluster._start_daemon(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",  # parent directories of pytest's tmp dirs are not root-only-writable everywhere
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 30
        while not munge_socket.exists():
            cluster._check_daemons()
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged did not create {munge_socket}\n{cluster.logs()}")
            time.sleep(0.1)
        # -c: start from a clean state, never a previous run's jobs; -D: foreground, so Popen owns the daemon.
        cluster._start_daemon("slurmctld", ["slurmctld", "-D", "-c", "-f", str(conf)])
        for n in names:
            cluster._start_daemon(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(conf)])
        cluster.wait_until_idle(start_timeout)
        yield cluster
    finally:
        cluster.stop()
