"""A slow link on one machine: ranks in their own network namespaces, joined by veth pairs, shaped with tc tbf.

::

    from megatron_tpcomp.bench.link import LinkUnavailable, ShapedLink

    try:
        with ShapedLink(2, "1gbit") as link:          # two namespaces joined by one veth pair
            cmd = link.prefix(rank) + [sys.executable, "-m", "my.worker"]   # ip netns exec NS python ...
            env = {"MASTER_ADDR": link.master_addr, "GLOO_SOCKET_IFNAME": link.ifname}
            print(link.describe())                       # rate, burst, limit, mode, namespaces
    except LinkUnavailable as exc:                       # not root, no ip/tc, namespaces refused: run unshaped
        print(f"unshaped: {exc.reason}")

Topology:

- 2 ranks (``mode="veth-pair"``): namespaces ``<prefix>r0`` and ``<prefix>r1`` joined by one veth pair, one end
  in each namespace, both named :data:`IFNAME`, addresses ``10.213.0.1/24`` and ``10.213.0.2/24``.
- more ranks (``mode="bridge"``): each rank namespace holds one veth end (:data:`IFNAME`); the other ends are
  ports of a bridge in a separate hub namespace ``<prefix>hub``. The hub has no address.
- Shaping: a ``tbf`` qdisc on the egress of every veth end, so every direction of every hop is limited to the
  rate: a rank's uplink (its own end) and its downlink (the hub's port towards it, or the peer's end for a
  pair). That is a switched full-duplex link of ``rate`` per rank, like a NIC per GPU. tbf is used because it
  is what this machine has (no netem: no delay or loss emulation); ``latency`` is therefore not offered.
- Every interface is created directly inside a namespace this object created (``ip link add ... netns``), and
  every address is in ``10.213.0.0/24`` inside those namespaces: nothing is added to, or changed in, the
  caller's namespace, so closing is deleting the namespaces (their interfaces go with them).

Burst and queue: tbf lets ``burst`` bytes pass at once after an idle period, so too large a burst lets small
messages skip the shaping; the default, :data:`DEFAULT_BURST_S` worth of bytes at the rate (at least
:data:`MIN_BURST`), keeps that share small. ``limit`` (the queue, bytes) is large (:data:`DEFAULT_LIMIT_S` at the
rate, at least :data:`MIN_LIMIT`) because a drop costs a TCP retransmission timeout that a real NIC queue would
not cause. Both are reported by :meth:`ShapedLink.describe`; compare timings against bytes / rate (framing and
two-way traffic add to it: docs/results.md, Benchmarks).

Cleanup: :meth:`ShapedLink.close` (called by ``__exit__``, also when the body raises), an ``atexit`` hook, and
SIGINT/SIGTERM handlers that clean up, restore the previous handlers and then behave like them (SIGINT raises
KeyboardInterrupt; a default SIGTERM raises ``SystemExit(143)`` so that ``finally`` blocks, e.g. the ones
stopping rank processes, still run; a signal the process ignores, like SIGINT in a background job, stays
ignored). Namespaces left by a run killed with SIGKILL are removed by
:func:`cleanup_stale` (only those whose creating process is gone).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for ``ip netns``) and iproute2's ``ip`` and ``tc``; otherwise
entering raises :class:`LinkUnavailable` with the reason, and callers run unshaped on loopback and say so.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

#: Every namespace this module creates starts with this, then the creating process id: ``tpcomp-<pid>-<n>-``.
NS_PREFIX = "tpcomp-"
#: Name of each rank's interface inside its namespace (same name in every namespace: names are per namespace).
IFNAME = "tpc0"
#: Rank r has address ``SUBNET.(r+1)``; the subnet exists only inside the namespaces created here.
SUBNET = "10.213.0"
#: Default burst: this many seconds worth of bytes at the rate (1 Gbit/s: 125 kB) ...
DEFAULT_BURST_S = 0.001
#: ... but never below this (bytes): veth hands tbf GSO packets of up to 64 KiB, and a bucket smaller than
#: one of them stalls the flow (measured: a 512-token TP=3 prefill at 500 Mbit/s took 10.2 s with a 62.5 kB
#: bucket and 3.4 s with 256 KiB). Two such packets fit.
MIN_BURST = 128 * 1024
#: Default queue limit: this many seconds worth of bytes at the rate ...
DEFAULT_LIMIT_S = 0.25
#: ... but at least this (bytes): more than a TCP socket may queue locally (TCP small queues), so no drops.
MIN_LIMIT = 8 * 1024 * 1024
#: Cap on world sizes (the address plan has 253 host numbers; beyond a handful the cores are the limit anyway).
MAX_WORLD_SIZE = 64

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)\s*$", re.IGNORECASE)
_UNSHAPED = ("none", "unshaped", "off", "")
_counter = itertools.count()
_CMD_TIMEOUT_S = 30.0


class LinkUnavailable(RuntimeError):
    """The shaped link cannot be set up here; :attr:`reason` says why (not root, ip/tc missing, ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_rate(text: str | None) -> int | None:
    """Bits per second from a tc-style rate (``"1gbit"``, ``"500mbit"``, ``"2.5gbit"``); None for ``"none"``.

    Units are decimal (``gbit`` = 10^9 bit/s) as in tc. Byte units (tc's ``gbps`` means gigaBYTES per second)
    are refused on purpose: they are too easy to misread.

    Raises:
        ValueError: anything else, or a rate of zero.
    """
    if text is None or text.strip().lower() in _UNSHAPED:
        return None
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"bad link rate {text!r}; expected e.g. 1gbit, 500mbit, 2.5gbit or none")
    bps = int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if bps <= 0:
        raise ValueError(f"bad link rate {text!r}: must be positive")
    return bps


def format_rate(bps: int | None) -> str:
    """``1000000000 -> "1gbit"``, ``500000000 -> "500mbit"``, None -> ``"none"`` (the inverse of parse_rate)."""
    if bps is None:
        return "none"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        mult = _RATE_UNITS[unit]
        if bps >= mult:
            value = bps / mult
            return f"{value:g}{unit}"
    return f"{bps}bit"


def default_burst(bps: int) -> int:
    """Default tbf burst in bytes for ``bps``: :data:`DEFAULT_BURST_S` of traffic, at least :data:`MIN_BURST`."""
    return max(MIN_BURST, int(bps * DEFAULT_BURST_S / 8))


def default_limit(bps: int) -> int:
    """Default tbf queue limit in bytes for ``bps``: :data:`DEFAULT_LIMIT_S` of traffic, at least MIN_LIMIT."""
    return max(MIN_LIMIT, int(bps * DEFAULT_LIMIT_S / 8))


def unavailable_reason() -> str | None:
    """Why a :class:`ShapedLink` cannot be built here (not root, ``ip``/``tc`` missing), or None if it may be.

    A None is not a promise: namespace creation can still be refused (e.g. in a container without
    CAP_SYS_ADMIN); entering the link then raises :class:`LinkUnavailable`.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (network namespaces and tc need CAP_NET_ADMIN/CAP_SYS_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ip/tc command, capturing output; raise RuntimeError with its stderr when ``check`` and it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names of the network namespaces ``ip netns list`` shows (empty when ``ip`` is missing or refuses)."""
    if shutil.which("ip") is None:
        return []
    try:
        proc = _run(["ip", "netns", "list"], check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def cleanup_stale(prefix: str = NS_PREFIX) -> list[str]:
    """Delete namespaces left behind by killed earlier runs; return the names deleted.

    Only names of the form ``<prefix><pid>-...`` whose ``pid`` no longer exists are touched: a concurrent run
    (its process alive) and every namespace not made by this module are left alone. Deleting a namespace
    deletes the veth ends and the bridge inside it. Never raises for a namespace that vanished meanwhile.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    deleted = []
    for name in list_namespaces():
        m = pattern.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if _run(["ip", "netns", "del", name], check=False).returncode == 0:
            deleted.append(name)
    return deleted


class ShapedLink:
    """Context manager: ``world_size`` rank namespaces joined by veth pairs (or a bridge), shaped with tbf.

    Args:
        world_size: number of ranks (2 or more).
        rate: tc rate per direction per rank, e.g. ``"1gbit"``, ``"500mbit"``; ``None``/``"none"`` builds the
            same namespaces without shaping (a reference for shaped runs).
        burst: tbf bucket in bytes; default :func:`default_burst` of the rate.
        limit: tbf queue in bytes; default :func:`default_limit` of the rate.
        mtu: interface MTU in bytes (1500, an Ethernet NIC's, by default).
        sysctls: set in every rank namespace after creation, e.g.
            ``{"net.ipv4.tcp_slow_start_after_idle": "0"}`` (namespaces start from the kernel's defaults for
            most keys and inherit a few, such as the TCP congestion control, from the host; none is changed
            by default). A key the kernel refuses makes entering raise :class:`LinkUnavailable`.

    Attributes (valid inside the ``with``):
        namespaces: the rank namespaces, index = rank.
        hub: the bridge namespace, or None for a veth pair.
    """

    def __init__(
        self,
        world_size: int,
        rate: str | None = "1gbit",
        *,
        burst: int | None = None,
        limit: int | None = None,
        mtu: int = 1500,
        sysctls: dict[str, str] | None = None,
    ):
        if not 2 <= world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"world_size must be in 2..{MAX_WORLD_SIZE}, got {world_size}")
        self.world_size = world_size
        self.rate_bps = parse_rate(rate)
        self.rate = format_rate(self.rate_bps)
        if self.rate_bps is None:
            self.burst = self.limit = None
        else:
            self.burst = int(burst) if burst is not None else default_burst(self.rate_bps)
            self.limit = int(limit) if limit is not None else default_limit(self.rate_bps)
            if self.burst < mtu + 64:
                raise ValueError(f"burst {self.burst} B is below one packet (mtu {mtu} + headers): tbf drops all")
            if self.limit < self.burst:
                raise ValueError(f"limit {self.limit} B must be at least the burst {self.burst} B")
        self.mtu = mtu
        self.sysctls = {str(k): str(v) for k, v in (sysctls or {}).items()}
        self.tcp_congestion_control: str | None = None  # read from rank 0's namespace once built
        self.mode = "veth-pair" if world_size == 2 else "bridge"
        base = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}-"
        self.namespaces = [f"{base}r{r}" for r in range(world_size)]
        self.hub = f"{base}hub" if self.mode == "bridge" else None
        self._created: list[str] = []
        self._lock = threading.Lock()
        self._prev_handlers: dict[int, Any] = {}
        self._active = False

    # ------------------------------------------------------------------------------------------- public API

    @property
    def ifname(self) -> str:
        """The interface every rank uses (set ``GLOO_SOCKET_IFNAME`` to it)."""
        return IFNAME

    def address(self, rank: int) -> str:
        """IPv4 address of ``rank`` inside its namespace."""
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range for world size {self.world_size}")
        return f"{SUBNET}.{rank + 1}"

    @property
    def master_addr(self) -> str:
        """Rank 0's address: where the torch.distributed rendezvous listens."""
        return self.address(0)

    def prefix(self, rank: int) -> list[str]:
        """Command prefix that runs a program inside ``rank``'s namespace: ``["ip", "netns", "exec", NS]``."""
        if not self._active:
            raise RuntimeError("ShapedLink.prefix() is only valid inside the with block")
        return ["ip", "netns", "exec", self.namespaces[rank]]

    def describe(self) -> dict:
        """What the ranks get: ``rate`` (tc string or "none"), ``rate_bps``, ``burst`` and ``limit`` (bytes or
        None), ``mtu``, ``mode`` (``veth-pair`` | ``bridge``), ``shaped``, ``qdisc``, ``tcp_congestion_control``
        (in the rank namespaces), ``sysctls`` (the ones set) and ``namespaces``."""
        return dict(
            rate=self.rate,
            rate_bps=self.rate_bps,
            burst=self.burst,
            limit=self.limit,
            mtu=self.mtu,
            mode=self.mode,
            shaped=self.rate_bps is not None,
            qdisc="tbf" if self.rate_bps is not None else None,
            tcp_congestion_control=self.tcp_congestion_control,
            sysctls=dict(self.sysctls),
            namespaces=list(self.namespaces) + ([self.hub] if self.hub else []),
        )

    def qdisc_stats(self, rank: int) -> str:
        """``tc -s qdisc show`` of ``rank``'s interface (sent bytes, drops, overlimits), for diagnostics."""
        return _run(["tc", "-n", self.namespaces[rank], "-s", "qdisc", "show", "dev", IFNAME], check=False).stdout

    def __enter__(self) -> ShapedLink:
        reason = unavailable_reason()
        if reason is not None:
            raise LinkUnavailable(reason)
        self._install_handlers()
        atexit.register(self.close)
        self._active = True
        try:
            self._build()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.close()
            raise LinkUnavailable(f"setting up the namespaces failed: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace created (their interfaces and qdiscs go with them); restore signal handlers.

        Idempotent, safe from a signal handler or atexit. Processes still running inside a namespace keep it
        alive, unnamed, until they exit: stop them first.
        """
        with self._lock:
            created, self._created = self._created, []
            self._active = False
        # A second Ctrl-C (or `timeout` signalling twice) must not cut the deletions short: hold SIGINT/SIGTERM
        # until they are done; a pending one is delivered when the mask is restored.
        held = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for name in reversed(created):
                try:
                    _run(["ip", "netns", "del", name], check=False)
                except (OSError, subprocess.TimeoutExpired):
                    pass  # best effort: cleanup_stale() removes it later (the name carries our pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._restore_handlers()
        atexit.unregister(self.close)

    # ------------------------------------------------------------------------------------------- internals

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        with self._lock:
            self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])  # local traffic (a rank to its own address) needs lo

    def _shape(self, ns: str, dev: str) -> None:
        if self.rate_bps is None:
            return
        _run(
            ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf"]
            + ["rate", f"{self.rate_bps}bit", "burst", str(self.burst), "limit", str(self.limit)]
        )

    def _build(self) -> None:
        for ns in self.namespaces:
            self._add_ns(ns)
        if self.hub is None:
            a, b = self.namespaces
            _run(["ip", "link", "add", IFNAME, "netns", a, "type", "veth", "peer", "name", IFNAME, "netns", b])
            ends = [(a, IFNAME), (b, IFNAME)]
        else:
            self._add_ns(self.hub)
            _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
            ends = []
            for r, ns in enumerate(self.namespaces):
                port = f"p{r}"
                peer = ["peer", "name", port, "netns", self.hub]
                _run(["ip", "link", "add", IFNAME, "netns", ns, "type", "veth", *peer])
                _run(["ip", "-n", self.hub, "link", "set", port, "master", "br0"])
                ends += [(ns, IFNAME), (self.hub, port)]
            _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for r, ns in enumerate(self.namespaces):
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(r)}/24", "dev", IFNAME])
            for key, value in self.sysctls.items():
                _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])
        for ns, dev in ends:
            _run(["ip", "-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up"])
            self._shape(ns, dev)
        cc = _run(["ip", "netns", "exec", self.namespaces[0], "sysctl", "-n", "net.ipv4.tcp_congestion_control"], False)
        self.tcp_congestion_control = cc.stdout.strip() or None

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread; atexit and __exit__ still clean up
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if prev == signal.SIG_IGN:
                continue  # the process ignores it (e.g. SIGINT in a background job): so do we
            self._prev_handlers[sig] = prev
            signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        prev, self._prev_handlers = self._prev_handlers, {}
        if threading.current_thread() is not threading.main_thread():
            if prev:  # cannot restore from here; keep them for a later close() on the main thread
                self._prev_handlers = prev
            return
        for sig, handler in prev.items():
            # Only put back what we replaced: a handler installed after ours stays.
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        self.close()  # also restores the previous handlers
        if callable(prev):
            prev(signum, frame)  # e.g. signal.default_int_handler raises KeyboardInterrupt
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            # Default SIGTERM would end the process without running finally blocks (rank processes would be
            # left running): exit through the interpreter instead, with the shell's status for SIGTERM.
            raise SystemExit(128 + signum)


def each_link(
    world_size: int,
    links: Sequence[str],
    *,
    burst: int | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
    tag: str = "",
) -> Iterator[tuple[str, dict, ShapedLink | None]]:
    """Set up each link of ``links`` in turn (``"none"`` or a rate such as ``"1gbit"``) for ``world_size`` ranks
    and yield ``(label, info, shaped)``: the label for records (``"none"`` when unshaped), the link description
    (:meth:`ShapedLink.describe`, or the loopback one with ``requested``/``reason`` when shaping was impossible)
    and the :class:`ShapedLink` (None on loopback). The link is torn down before the next one is built, also when
    the caller's loop body raises (use ``contextlib.closing`` around the generator for that). Unshaped runs happen
    once: a second ``none``, or a fallback after one, is skipped. Leftover namespaces of killed runs are removed
    first. Raises ValueError for a malformed rate before anything is set up.
    """
    rates = {lk: parse_rate(lk) for lk in links}
    tag = tag or f"{world_size} ranks"
    if unavailable_reason() is None:
        stale = cleanup_stale()
        if stale:
            log(f"removed {len(stale)} namespace(s) left by killed earlier runs: {', '.join(stale)}")
    unshaped_done = False
    for lk in links:
        bps = rates[lk]
        info: dict = {"rate": "none", "rate_bps": None, "shaped": False, "mode": "loopback"}
        with contextlib.ExitStack() as stack:  # closes the link (deletes the namespaces) on any exit
            shaped: ShapedLink | None = None
            if bps is not None:
                try:
                    shaped = stack.enter_context(ShapedLink(world_size, lk, burst=burst, limit=limit))
                except LinkUnavailable as exc:
                    info.update(requested=format_rate(bps), reason=exc.reason)
                    what = "unshaped already measured, skipped" if unshaped_done else "measuring UNSHAPED instead"
                    log(f"link {lk}: cannot shape ({exc.reason}); {what}")
            if shaped is not None:
                info = shaped.describe()
                label = shaped.rate
                log(
                    f"[{tag}, {label}] tbf rate {label}, burst {info['burst']} B, limit {info['limit']} B, "
                    f"{info['mode']}, namespaces {', '.join(info['namespaces'])}"
                )
            else:
                if unshaped_done:
                    continue  # "none" listed twice, or a fallback after "none" ran
                unshaped_done = True
                label = "none"
                log(f"[{tag}, none] unshaped, 127.0.0.1")
            yield label, info, shaped
