"""Tunnels that stay up: keepalive reaping, same-key takeover, restarts (real ssh/autossh)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import (
    MESH_ADDRESS,
    SSH_HOST,
    Jumphost,
    can_connect,
    exchange,
    exited_within,
    tool,
    wait_for,
)
from tests.proxy import FaultProxy

pytestmark = pytest.mark.e2e

FAST_KEEPALIVE = "client_alive_interval = 0.5\nclient_alive_count_max = 2"


def works(port: int, payload: bytes = b"ping") -> bool:
    try:
        return exchange(MESH_ADDRESS, port, payload) == payload
    except OSError:
        return False


@pytest.fixture
def host_factory(tmp_path, keys):
    hosts: list[Jumphost] = []
    proxies: list[FaultProxy] = []

    def make(ssh_extra: str = "", forwarding_extra: str = "") -> tuple[Jumphost, FaultProxy]:
        directory = tmp_path / f"host{len(hosts)}"
        directory.mkdir()
        host = Jumphost(directory, ssh_extra=ssh_extra, forwarding_extra=forwarding_extra)
        host.add_member("alice", keys["alice"], keys["alice2"])
        host.add_member("bob", keys["bob"])
        host.start()
        proxy = FaultProxy((SSH_HOST, host.ssh_port))
        hosts.append(host)
        proxies.append(proxy)
        return host, proxy

    yield make
    for host in hosts:
        host.close_clients()
        host.stop()
    for proxy in proxies:
        proxy.close()


def test_stalled_client_is_reaped_and_its_port_freed(host_factory, keys, echo):
    host, proxy = host_factory(ssh_extra=FAST_KEEPALIVE)
    port = host.port_min + 10
    process = host.ssh_background(
        keys["alice"], "-R", f"{port}:127.0.0.1:{echo.port}", port=proxy.port
    )
    wait_for(lambda: works(port), what="tunnel up")
    proxy.stall()  # the laptop went to sleep: no FIN, no bytes
    wait_for(
        lambda: not can_connect(MESH_ADDRESS, port),
        timeout=0.5 * 3 + 5,
        what="the stalled tunnel's port to be freed",
    )
    assert "client stopped answering keepalives" in host.log_text()
    # bob can have the port now
    host.forward(keys["bob"], port, echo.port)
    assert works(port)
    process.terminate()


def test_autossh_gets_the_same_port_back_on_its_first_retry(host_factory, keys, echo):
    """The old session still holds the port (the server never saw a FIN): takeover."""
    host, proxy = host_factory()
    port = host.port_min + 20
    autossh = host.autossh(keys["alice"], port, echo.port, via=proxy.port)
    wait_for(lambda: works(port), what="tunnel up")
    proxy.cut_clients()  # client side gone; the server's connection lingers
    wait_for(lambda: host.log_text().count("alice connected") == 2, what="autossh reconnect")
    wait_for(lambda: works(port, b"back"), timeout=5, what="tunnel back on the same port")
    log = host.log_text()
    assert f"port {port} taken over by alice" in log
    assert "port taken over by a newer connection of the same key" in log
    assert autossh.poll() is None
    assert proxy.connections == 2  # the first try and exactly one retry


def test_without_takeover_autossh_retry_fails_while_the_old_session_lingers(
    host_factory, keys, echo
):
    host, proxy = host_factory(forwarding_extra='takeover = "never"')
    port = host.port_min + 30
    autossh = host.autossh(keys["alice"], port, echo.port, via=proxy.port)
    wait_for(lambda: works(port), what="tunnel up")
    proxy.cut_clients()
    wait_for(lambda: "refused: port-in-use" in host.log_text(), what="the retry to be refused")
    assert f"bind {port} for alice refused: port-in-use" in host.log_text()
    # ssh prints the failure a moment after the server refused: read as it comes.
    os.set_blocking(autossh.stderr.fileno(), False)
    said = bytearray()

    def retry_reported_failure() -> bool:
        said.extend(autossh.stderr.read() or b"")
        return b"remote port forwarding failed" in said

    wait_for(retry_reported_failure, what="ssh to report the refused forward")


def test_same_member_takeover_lets_another_key_of_the_member_in(host_factory, keys, echo):
    host, _proxy = host_factory(forwarding_extra='takeover = "same-member"')
    port = host.port_min + 40
    first = host.forward(keys["alice"], port, echo.port)
    refused = host.ssh(
        keys["bob"], "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:{echo.port}"
    )
    assert refused.returncode == 255  # never another member's port
    host.forward(keys["alice2"], port, echo.port)
    assert exited_within(first, 5)  # the older session held nothing else
    assert works(port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_tunnel_comes_back_after_a_server_restart(host_factory, keys, echo, sig):
    host, _proxy = host_factory()
    port = host.port_min + 50
    autossh = host.autossh(keys["alice"], port, echo.port)
    wait_for(lambda: works(port), what="tunnel up")
    host.stop(sig)
    host.start()
    wait_for(lambda: works(port, b"after restart"), timeout=20, what="tunnel back")
    assert autossh.poll() is None
    listing = host.admin("key", "list", "alice").stdout
    assert "alice" in listing and "alice2" in listing  # nothing lost
    assert f":{port}" in host.admin("tunnels").stdout


def test_autossh_is_installed():
    assert tool("autossh")


def test_check_reports_a_member_that_stopped_answering(host_factory, keys, echo):
    """Tunnel held but the member's machine is silent: the check says timeout, not 'refused'."""
    import json
    import urllib.request

    host, proxy = host_factory()
    port = host.port_min + 60
    host.ssh_background(keys["alice"], "-R", f"{port}:127.0.0.1:{echo.port}", port=proxy.port)
    wait_for(lambda: works(port), what="tunnel up")
    token = host.admin("token", "create", "alice").stdout.strip()
    proxy.stall()
    request = urllib.request.Request(
        f"{host.web_url}api/v1/check/{port}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        result = json.load(response)
    assert result["case"] == "timeout"
    assert "did not answer" in result["message"]
