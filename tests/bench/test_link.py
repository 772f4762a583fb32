"""The link harness: namespaces joined by veth (or a bridge), tbf shaping that really slows a transfer to about
bytes / rate, and cleanup that leaves nothing behind (normal exit, an exception, SIGTERM, SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_tpcomp.bench import link as linkmod
from megatron_tpcomp.bench.link import LinkUnavailable, ShapedLink, format_rate, parse_rate

NO_LINK = linkmod.unavailable_reason()
needs_root = pytest.mark.skipif(NO_LINK is not None, reason=f"shaped link unavailable: {NO_LINK}")

# A timed TCP transfer between two namespaces: the server (rank 1) receives NBYTES and answers one byte; the
# client (rank 0) prints the seconds of each repetition as JSON. Plain sockets: no torch import, fast to start.
XFER = textwrap.dedent(
    """
    import json, socket, sys, time
    role, addr, nbytes, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if role == "server":
        s = socket.create_server((addr, 29555))
        c, _ = s.accept()
        buf = bytearray(1 << 20)
        for _ in range(reps):
            got = 0
            while got < nbytes:
                got += c.recv_into(buf)
            c.sendall(b"k")
    else:
        for _ in range(100):
            try:
                c = socket.create_connection((addr, 29555))
                break
            except OSError:
                time.sleep(0.05)
        data, times = b"x" * nbytes, []
        for _ in range(reps):
            time.sleep(0.05)  # idle: the token bucket refills, as between collectives
            t0 = time.perf_counter()
            c.sendall(data)
            c.recv(1)
            times.append(time.perf_counter() - t0)
        print(json.dumps(times))
    """
)


def _transfer(link: ShapedLink, nbytes: int, reps: int = 3, src: int = 0, dst: int = 1) -> list[float]:
    """Seconds per transfer of ``nbytes`` from rank ``src`` to rank ``dst`` over ``link``."""
    args = [link.address(dst), str(nbytes), str(reps)]
    server = subprocess.Popen(link.prefix(dst) + [sys.executable, "-c", XFER, "server", *args])
    try:
        out = subprocess.run(
            link.prefix(src) + [sys.executable, "-c", XFER, "client", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return json.loads(out)


def _ours(names: list[str]) -> set[str]:
    return set(names) & set(linkmod.list_namespaces())


def test_parse_and_format_rate() -> None:
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("500Mbit") == 5 * 10**8
    assert parse_rate("2.5gbit") == 25 * 10**8
    assert parse_rate("none") is None and parse_rate(None) is None
    assert format_rate(10**9) == "1gbit" and format_rate(5 * 10**8) == "500mbit" and format_rate(None) == "none"
    for bad in ("1gbps", "fast", "0mbit", "-1gbit", "1 gigabit"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)
    assert linkmod.default_burst(10**10) == 1_250_000  # 1 ms at 10 Gbit/s
    assert linkmod.default_burst(10**9) == linkmod.MIN_BURST == 128 * 1024  # 125 kB < two 64 KiB GSO packets


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        ShapedLink(1, "1gbit")
    with pytest.raises(ValueError, match="burst"):
        ShapedLink(2, "1gbit", burst=100)
    with pytest.raises(ValueError, match="rate"):
        ShapedLink(2, "1gbps")


def test_not_root_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(LinkUnavailable, match="not root") as info:
        with ShapedLink(2, "1gbit"):
            pass
    assert "not root" in info.value.reason
    assert signal.getsignal(signal.SIGINT) is before  # nothing installed


@needs_root
def test_shaped_transfer_is_near_bytes_over_rate_and_cleanup() -> None:
    nbytes = 2 << 20  # 2 MiB: 84 ms at 200 Mbit/s, a few ms unshaped
    sigint_before = signal.getsignal(signal.SIGINT)
    with ShapedLink(2, None) as free:
        names = free.describe()["namespaces"]
        assert _ours(names) == set(names)
        unshaped = min(_transfer(free, nbytes))
    assert not _ours(names)
    with ShapedLink(2, "200mbit") as link:
        info = link.describe()
        names = info["namespaces"]
        assert info["shaped"] and info["mode"] == "veth-pair" and info["rate"] == "200mbit"
        assert info["burst"] == linkmod.MIN_BURST and info["limit"] >= linkmod.MIN_LIMIT
        assert "tbf" in link.qdisc_stats(0) and "tbf" in link.qdisc_stats(1)
        # Installed, unless the test runner was started with SIGINT ignored (nohup-style): then it stays ignored.
        expected = signal.SIG_IGN if sigint_before == signal.SIG_IGN else link._on_signal
        assert signal.getsignal(signal.SIGINT) == expected
        shaped = _transfer(link, nbytes)
    assert not _ours(names)
    assert signal.getsignal(signal.SIGINT) is sigint_before
    ideal = nbytes * 8 / 200e6
    # Framing adds ~5% and the 32 KiB burst saves ~1.3 ms; a loaded machine only adds time.
    assert min(shaped) >= 0.9 * ideal, (shaped, ideal)
    assert min(shaped) <= 3.0 * ideal, (shaped, ideal)
    assert min(shaped) > 2 * unshaped, (shaped, unshaped)


@needs_root
def test_bridge_for_three_ranks_and_cleanup_on_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShapedLink(3, "200mbit") as link:
            info = link.describe()
            names = info["namespaces"]
            assert info["mode"] == "bridge" and len(names) == 4 and _ours(names) == set(names)
            assert link.master_addr == "10.213.0.1" and link.address(2) == "10.213.0.3"
            # rank 0 -> rank 2 through the hub's bridge: shaped on rank 0's uplink and on rank 2's downlink
            nbytes = 1 << 20
            times = _transfer(link, nbytes, reps=2, src=0, dst=2)
            assert 0.9 * nbytes * 8 / 200e6 <= min(times) <= 3 * nbytes * 8 / 200e6, times
            raise RuntimeError("boom")
    assert not _ours(names)


# A process that builds a link, prints its namespaces and waits to be signalled. It loads link.py by file path
# (argv[1]; the module needs only the standard library): importing the package would import torch, which takes
# tens of seconds on a loaded 2-core machine.
HOLDER = textwrap.dedent(
    """
    import importlib.util, json, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the runner ignores it
    spec = importlib.util.spec_from_file_location("tpcomp_link", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with mod.ShapedLink(2, "1gbit") as link:
        print(json.dumps(link.describe()["namespaces"]), flush=True)
        time.sleep(60)
    """
)


@needs_root
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)])
def test_cleanup_on_signal(sig: int, code: int) -> None:
    cmd = [sys.executable, "-c", HOLDER, linkmod.__file__]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        names = json.loads(proc.stdout.readline())
        assert _ours(names) == set(names)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    assert not _ours(names)


@needs_root
def test_cleanup_stale_only_removes_dead_owners() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{linkmod.NS_PREFIX}{dead.pid}-0-r0"
    alive = f"{linkmod.NS_PREFIX}{os.getpid()}-999-r0"
    for name in (stale, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        deadline = time.monotonic() + 5
        while linkmod._pid_alive(dead.pid) and time.monotonic() < deadline:  # pid reuse is unlikely but possible
            time.sleep(0.1)
        removed = linkmod.cleanup_stale()
        assert stale in removed or linkmod._pid_alive(dead.pid)
        assert alive not in removed and alive in linkmod.list_namespaces()
    finally:
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert not _ours([stale, alive])
