"""Limits a hostile or broken client runs into, against a real server on loopback."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.conftest import (
    MESH_ADDRESS,
    SSH_HOST,
    Jumphost,
    alice_on_host,
    exchange,
    exited_within,
    tool,
    wait_for,
)

pytestmark = pytest.mark.e2e


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


@pytest.fixture
def strict_host(tmp_path, keys):
    yield from alice_on_host(
        tmp_path, keys, "login_grace_time = 1\nmax_startups = 6\nmax_startups_per_source = 3"
    )


def test_clients_that_never_authenticate_are_dropped_after_the_grace_time(strict_host):
    silent = socket.create_connection((SSH_HOST, strict_host.ssh_port))
    version_only = socket.create_connection((SSH_HOST, strict_host.ssh_port))
    version_only.sendall(b"SSH-2.0-stuck\r\n")
    started = time.monotonic()
    for s in (silent, version_only):
        assert closed_by_server(s, within=5)
        s.close()
    assert time.monotonic() - started < 5


def test_unauthenticated_connections_are_capped_per_source_and_in_total(strict_host, keys, echo):
    held = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.5", 0))
        s.connect((SSH_HOST, strict_host.ssh_port))
        held.append(s)
    wait_for(lambda: all(s.recv(4, socket.MSG_PEEK) for s in held), what="banners")
    extra = socket.socket()
    extra.bind(("127.0.0.5", 0))
    extra.connect((SSH_HOST, strict_host.ssh_port))
    assert closed_by_server(extra, within=2)  # a 4th from the same source: refused
    # Another source still gets in, and a real member can log in and forward.
    port = strict_host.port_min + 1
    strict_host.forward(keys["alice"], port, echo.port)
    assert exchange(MESH_ADDRESS, port, b"still works") == b"still works"
    for s in held:
        s.close()


def test_oversized_packets_before_auth_are_refused(strict_host):
    s = socket.create_connection((SSH_HOST, strict_host.ssh_port))
    s.sendall(b"SSH-2.0-x\r\n" + (1_000_000).to_bytes(4, "big") + b"\x04" + b"\x00" * 200_000)
    assert closed_by_server(s, within=3)


def test_a_taken_ssh_port_stops_the_start_with_one_message(tmp_path):
    blocker = socket.create_server((SSH_HOST, 0))
    host = Jumphost(tmp_path, ssh_port=blocker.getsockname()[1])
    result = subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "nekojump", "--config", str(host.config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    blocker.close()
    assert result.returncode != 0
    assert f"cannot listen for SSH on tcp:{host.ssh_port}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_of_unauthenticated_connections_leaves_members_working(tmp_path, keys, echo):
    """2,000 connections that never log in: members still connect and forward; memory bounded."""
    host = Jumphost(tmp_path)
    host.add_member("alice", keys["alice"])
    host.start()
    flood: list[socket.socket] = []
    try:
        before = rss_kib(host.process.pid)
        for _ in range(2000):
            s = socket.socket()
            s.setblocking(False)
            s.bind(("127.0.0.5", 0))
            s.connect_ex((SSH_HOST, host.ssh_port))
            flood.append(s)
        port = host.port_min + 2
        host.forward(keys["alice"], port, echo.port)
        assert exchange(MESH_ADDRESS, port, b"through the flood") == b"through the flood"
        assert rss_kib(host.process.pid) - before < 64 * 1024
        samples = host.metrics()
        # The server holds no more than max_startups_per_source of them; the rest are
        # turned away as they arrive (many still wait in the kernel's accept queue).
        assert samples['nekojump_ssh_connections{state="authenticating"}'] <= 10
        refused = sum(
            v for k, v in samples.items() if k.startswith("nekojump_refused_connections_total")
        )
        assert refused >= 100
    finally:
        for s in flood:
            s.close()
        host.close_clients()
        host.stop()


def test_back_after_a_blip_at_the_connection_cap_the_port_comes_back_within_seconds(
    tmp_path, keys, echo
):
    """A member whose tier allows one connection: the laptop's network went away
    (its ssh answers nothing, and no FIN came), and autossh connects again.
    The new connection is refused at the cap, but the old one is asked at once
    and ended when it does not answer: the next try gets the port back."""
    import signal

    host = Jumphost(tmp_path, forwarding_extra="[limits]\nbasic = { connections = 1 }")
    host.add_member("alice", keys["alice"])
    host.start()
    old = None
    try:
        port = host.port_min + 5
        old = host.forward(keys["alice"], port, echo.port)
        old.send_signal(signal.SIGSTOP)
        retry = host.ssh_background(keys["alice"], "-R", f"{port}:127.0.0.1:{echo.port}")
        assert exited_within(retry, 10)  # refused: one connection is the cap
        wait_for(lambda: host.holder_of(port) is None, what="the vanished connection to end")
        host.forward(keys["alice"], port, echo.port)
        assert exchange(MESH_ADDRESS, port, b"back") == b"back"
    finally:
        if old is not None:
            old.send_signal(signal.SIGCONT)
        host.close_clients()
        host.stop()
