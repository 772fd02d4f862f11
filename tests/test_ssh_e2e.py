"""The seed's member flow with the real OpenSSH client against a real nekojump."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import (
    MESH_ADDRESS,
    SSH_HOST,
    can_connect,
    exchange,
    exited_within,
    fingerprint,
    free_port,
    tool,
    wait_for,
)

pytestmark = pytest.mark.e2e


def test_forward_carries_data_both_ways_on_the_mesh_address(running, keys, echo):
    """ssh -R PORT:localhost:LOCAL publishes LOCAL at <mesh address>:PORT."""
    port = running.port_min + 80
    running.forward(keys["alice"], port, echo.port)
    payload = os.urandom(3 * 1024 * 1024)
    assert exchange(MESH_ADDRESS, port, payload) == payload
    # Bound on the mesh address only, whatever the client asked for.
    assert not can_connect(SSH_HOST, port)


def test_many_connections_through_one_forward(running, keys, echo):
    port = running.port_min + 81
    running.forward(keys["alice"], port, echo.port)
    for index in range(20):
        payload = f"request {index}\n".encode() * 100
        assert exchange(MESH_ADDRESS, port, payload) == payload


def test_port_zero_allocates_a_port_in_range(running, keys, echo):
    """ssh -R 0:... prints "Allocated port N" and N works."""
    process = running.ssh_background(keys["alice"], "-R", f"0:127.0.0.1:{echo.port}")
    match = None
    while match is None:
        line = process.stderr.readline()
        assert line, "ssh ended without printing the allocated port"
        match = re.search(rb"Allocated port (\d+) for remote forward", line)
    port = int(match.group(1))
    assert running.port_min <= port <= running.port_max
    assert port != running.reserved
    assert exchange(MESH_ADDRESS, port, b"hello") == b"hello"


@pytest.mark.parametrize("which", ["below", "above", "reserved", "privileged"])
def test_refused_binds_make_exit_on_forward_failure_exit(running, keys, which):
    port = {
        "below": running.port_min - 1,
        "above": running.port_max + 1,
        "reserved": running.reserved,
        "privileged": 80,
    }[which]
    result = running.ssh(
        keys["alice"], "-v", "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:9"
    )
    assert result.returncode == 255
    assert f"remote port forwarding failed for listen port {port}".encode() in result.stderr
    # ssh -v shows why (the SSH reply to a forward request has no room for a reason).
    why = (
        "reserved by the operator"
        if which == "reserved"
        else f"outside the allowed range {running.port_min}-{running.port_max}"
    )
    assert f"debug1: Remote: Forward refused: port {port} is {why}".encode() in result.stderr


def test_the_banner_lists_the_forwards_refused_on_its_connection(running, keys):
    """Without -N the session's banner says what was refused and why."""
    process = subprocess.Popen(
        running.ssh_argv(
            keys["alice"],
            "-T",
            "-R",
            f"{running.port_min + 87}:127.0.0.1:9",
            "-R",
            f"{running.port_max + 1}:127.0.0.1:9",
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running.clients.append(process)
    lines = [wait_for(process.stdout.readline, what="banner line") for _ in range(5)]
    banner = b"".join(lines).decode()
    assert f"port {running.port_min + 87}: mesh members reach it" in banner
    assert (
        f"Forward refused: port {running.port_max + 1} is outside the allowed range "
        f"{running.port_min}-{running.port_max}\r\n"
    ) in banner
    assert "There is no shell here" in banner
    process.stdin.close()
    assert exited_within(process, 5)


def test_port_held_by_another_member_is_refused(running, keys, echo):
    port = running.port_min + 82
    running.forward(keys["alice"], port, echo.port)
    result = running.ssh(
        keys["bob"], "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:9"
    )
    assert result.returncode == 255
    assert b"remote port forwarding failed" in result.stderr
    # alice's tunnel is untouched.
    assert exchange(MESH_ADDRESS, port, b"still mine") == b"still mine"


def test_closing_the_client_frees_the_port_at_once(running, keys, echo):
    port = running.port_min + 83
    alice = running.forward(keys["alice"], port, echo.port)
    alice.terminate()
    assert exited_within(alice, 5)
    # Another member binds the same port on the first try.
    bob = running.forward(keys["bob"], port, echo.port)
    assert bob.poll() is None
    assert exchange(MESH_ADDRESS, port, b"bob now") == b"bob now"


def test_cancel_and_rebind_within_one_connection(running, keys, echo):
    """Two -R on one connection: both work, and closing frees both."""
    first, second = running.port_min + 84, running.port_min + 85
    process = running.ssh_background(
        keys["alice"],
        "-R",
        f"{first}:127.0.0.1:{echo.port}",
        "-R",
        f"{second}:127.0.0.1:{echo.port}",
    )
    wait_for(
        lambda: can_connect(MESH_ADDRESS, first) and can_connect(MESH_ADDRESS, second),
        what="both forwards",
    )
    process.terminate()
    process.wait(timeout=5)
    wait_for(
        lambda: not can_connect(MESH_ADDRESS, first) and not can_connect(MESH_ADDRESS, second),
        what="both ports to close",
    )


def test_exec_is_refused(running, keys):
    result = running.ssh(keys["alice"], command=("echo", "pwned"))
    assert result.returncode == 1
    assert b"pwned" not in result.stdout
    assert b"cannot run commands" in result.stderr


def test_shell_shows_the_banner_and_nothing_else(running, keys):
    """ssh tunnel@host prints the status banner and stays until the client closes."""
    process = subprocess.Popen(
        running.ssh_argv(keys["alice"], "-T", "-R", f"{running.port_min + 86}:127.0.0.1:9"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running.clients.append(process)
    lines = [wait_for(process.stdout.readline, what="banner line") for _ in range(4)]
    banner = b"".join(lines).decode()
    assert banner.startswith("nekojump: tunnel-only session for alice")
    assert f"port {running.port_min + 86}: mesh members reach it at {MESH_ADDRESS}" in banner
    assert "There is no shell here" in banner
    assert process.poll() is None  # idle, holding the tunnel
    process.stdin.close()  # Ctrl-D / EOF closes it
    assert exited_within(process, 5)
    assert process.returncode == 0
    assert process.stdout.read() == b""


def test_shell_with_a_pty_closes_on_ctrl_c(running, keys):
    process = subprocess.Popen(
        running.ssh_argv(keys["alice"], "-tt"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running.clients.append(process)
    first = wait_for(process.stdout.readline, what="banner")
    assert b"tunnel-only session" in first
    process.stdin.write(b"ls\r\x03")
    process.stdin.flush()
    assert exited_within(process, 5)


def test_local_and_dynamic_and_stdio_forwarding_are_refused(running, keys, echo):
    # -W (ProxyJump's mechanism)
    result = running.ssh(keys["alice"], "-W", f"127.0.0.1:{echo.port}")
    assert result.returncode == 255
    assert b"administratively prohibited" in result.stderr
    # -L: the local listener opens, but the jumphost refuses each channel.
    local_port = running.port_min + 90  # any free local port will do
    process = running.ssh_background(keys["alice"], "-L", f"{local_port}:127.0.0.1:{echo.port}")
    wait_for(lambda: can_connect("127.0.0.1", local_port), what="ssh -L listener")
    with socket.create_connection(("127.0.0.1", local_port), timeout=5) as s:
        s.sendall(b"hello")
        assert _closed_without_data(s)
    # -D: a SOCKS CONNECT through the jumphost is refused too.
    socks_port = running.port_min + 91
    running.ssh_background(keys["alice"], "-D", str(socks_port))
    wait_for(lambda: can_connect("127.0.0.1", socks_port), what="ssh -D listener")
    with socket.create_connection(("127.0.0.1", socks_port), timeout=5) as s:
        s.sendall(b"\x04\x01" + echo.port.to_bytes(2, "big") + bytes([127, 0, 0, 1]) + b"x\x00")
        reply = s.recv(8)
        assert reply[:2] != b"\x00\x5a"  # not "request granted"
    process.terminate()
    assert b"administratively prohibited" in process.communicate(timeout=10)[1]


def _closed_without_data(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_sftp_and_scp_are_refused(running, keys, tmp_path):
    source = tmp_path / "secret.txt"
    source.write_text("data")
    common = [
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-i",
        str(keys["alice"]),
        "-P",
        str(running.ssh_port),
    ]
    sftp = subprocess.run(
        [tool("sftp"), *common, "-b", "-", f"tunnel@{SSH_HOST}"],
        input=b"ls /\n",
        capture_output=True,
        timeout=20,
    )
    assert sftp.returncode != 0
    assert b"subsystem request failed" in sftp.stderr
    for legacy in ([], ["-O"]):  # SFTP-based scp, and the old scp protocol (exec)
        scp = subprocess.run(
            [
                tool("scp"),
                *legacy,
                *common,
                str(source),
                f"tunnel@{SSH_HOST}:/tmp/nekojump-scp-test",
            ],
            capture_output=True,
            timeout=20,
        )
        assert scp.returncode != 0, legacy
    assert not os.path.exists("/tmp/nekojump-scp-test")


def test_wrong_user_and_unknown_key_are_denied_alike(running, keys):
    wrong_user = running.ssh(keys["alice"], "-N", user="root")
    unknown_key = running.ssh(keys["stranger"], "-N")
    for result in (wrong_user, unknown_key):
        assert result.returncode == 255
        assert b"Permission denied (publickey)." in result.stderr


def test_removing_a_key_ends_its_session_within_a_second(running, keys, echo):
    port = running.port_min + 87
    process = running.forward(keys["alice"], port, echo.port)
    other = running.forward(keys["alice2"], port + 1, echo.port)
    result = running.admin("key", "remove", fingerprint(keys["alice"]))
    assert result.returncode == 0, result.stderr
    removed_at = time.monotonic()
    assert exited_within(process, 1.0), "ssh still running 1 s after key removal"
    assert time.monotonic() - removed_at < 1.0
    assert not can_connect(MESH_ADDRESS, port)
    # The member's other key keeps its tunnel; the removed key can't come back.
    assert other.poll() is None
    assert exchange(MESH_ADDRESS, port + 1, b"ok") == b"ok"
    again = running.ssh(keys["alice"], "-N")
    assert b"Permission denied (publickey)." in again.stderr


def test_disabling_a_member_ends_their_sessions(running, keys, echo):
    process = running.forward(keys["bob"], running.port_min + 89, echo.port)
    assert running.admin("member", "disable", "bob").returncode == 0
    assert exited_within(process, 1.0)


def test_tunnels_lists_live_forwards(running, keys, echo):
    port = running.port_min + 88
    running.forward(keys["alice"], port, echo.port)
    listing = running.admin("tunnels")
    assert listing.returncode == 0
    line = next(line for line in listing.stdout.splitlines() if f":{port}" in line)
    assert "alice" in line
    assert fingerprint(keys["alice"]) in line
    assert f"{MESH_ADDRESS}:{port}" in line


def test_host_key_is_stable_across_restart(running):
    def scan() -> str:
        return subprocess.run(
            [tool("ssh-keyscan"), "-t", "ed25519", "-p", str(running.ssh_port), SSH_HOST],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.split()[-1]

    before = scan()
    running.stop()
    running.start()
    assert scan() == before
    key_file = running.data_dir / "ssh_host_ed25519_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert before in (running.data_dir / "ssh_host_ed25519_key.pub").read_text()


def test_start_log_tells_what_a_newcomer_needs(jumphost):
    jumphost.start()
    log = wait_for(
        lambda: "member add NAME" in (text := jumphost.log_text()) and text,
        what="the first-start hint",
    )
    assert f"SSH on {SSH_HOST}:{jumphost.ssh_port}" in log
    assert f"forwards bind on {MESH_ADDRESS}" in log
    assert re.search(r"host key SHA256:[A-Za-z0-9+/]{43} \(ED25519\)", log)
    assert "nekojump-admin --config" in log and "member add NAME" in log
    assert "reactor class: nekojump.reactor.TunnelReactor" in log


def test_sources_outside_the_allowlist_get_no_byte(tmp_path, keys, echo):
    from tests.conftest import Jumphost

    host = Jumphost(tmp_path)
    host.config.write_text(
        host.config.read_text().replace(
            'allowed_sources = ["127.0.0.0/8"]',
            'allowed_sources = ["127.0.0.1/32", "127.0.0.2/32"]',
        )
    )
    host.add_member("alice", keys["alice"])
    host.start()
    try:
        port = host.port_min + 80
        host.forward(keys["alice"], port, echo.port)
        for target in [(SSH_HOST, host.ssh_port), (MESH_ADDRESS, port)]:
            with socket.socket() as s:
                s.bind(("127.0.0.3", 0))
                s.settimeout(5)
                s.connect(target)
                assert s.recv(100) == b"", target  # closed before any protocol byte
        assert exchange(MESH_ADDRESS, port, b"allowed") == b"allowed"
    finally:
        host.close_clients()
        host.stop()


def test_bad_config_stops_start_with_one_message(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[forwarding]\nport_min = 50000\nport_max = 40000\n")
    result = subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "nekojump", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "port_min (50000) is greater than port_max (40000)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_sigterm_disconnects_clients_cleanly(running, keys, echo):
    process = running.forward(keys["alice"], running.port_min + 92, echo.port)
    running.stop(signal.SIGTERM)
    assert exited_within(process, 5)
    # twistd ends by re-raising the signal it was stopped with.
    assert running.process.returncode in (0, -signal.SIGTERM)
    assert "Server Shut Down." in running.log_text()
    assert "Traceback" not in running.log_text()


def test_rsa_user_keys_log_in_with_sha2_signatures(running, keys, echo):
    """server-sig-algs names rsa-sha2-*, so OpenSSH offers RSA keys at all."""
    running.add_member("carol", keys["carol_rsa"])
    port = running.port_min + 93
    running.forward(keys["carol_rsa"], port, echo.port)
    assert exchange(MESH_ADDRESS, port, b"rsa") == b"rsa"


def test_ecdsa_user_keys_log_in(running, keys, echo):
    running.add_member("dave", keys["dave_ecdsa"])
    port = running.port_min + 64
    running.forward(keys["dave_ecdsa"], port, echo.port)
    assert exchange(MESH_ADDRESS, port, b"ecdsa") == b"ecdsa"


def test_local_service_down_closes_the_mesh_side_and_says_why(running, keys):
    """Tunnel up but nothing on localhost:LOCAL: the mesh member sees a close, not a hang."""
    port = running.port_min + 94
    dead_port = free_port()
    running.forward(keys["alice"], port, dead_port)
    with socket.create_connection((MESH_ADDRESS, port), timeout=5) as s:
        started = time.monotonic()
        assert _closed_without_data(s)
        assert time.monotonic() - started < 2
    listing = wait_for(
        lambda: (out := running.admin("tunnels").stdout) and "refused" in out and out,
        what="the reason in the tunnels listing",
    )
    assert "your local service refused the connection" in listing


def test_operator_kills_a_tunnel_by_port_and_by_member(running, keys, echo):
    by_port = running.forward(keys["alice"], running.port_min + 95, echo.port)
    spared = running.forward(keys["alice2"], running.port_min + 96, echo.port)
    bob = running.forward(keys["bob"], running.port_min + 97, echo.port)
    result = running.admin("tunnels", "kill", str(running.port_min + 95))
    assert result.returncode == 0, result.stderr
    assert exited_within(by_port, 1.5)
    assert spared.poll() is None
    assert running.admin("tunnels", "kill", "bob").returncode == 0
    assert exited_within(bob, 1.5)
    assert spared.poll() is None
    audit = running.admin("audit", "--member", "bob").stdout
    for event in ("ssh-login", "bind", "disconnect"):
        assert event in audit
    assert "ended by the operator" in audit


def test_metrics_follow_a_real_tunnel(running, keys, echo):
    before = running.metrics()
    assert before["nekojump_forwards"] == 0
    port = running.port_min + 98
    process = running.forward(keys["alice"], port, echo.port)
    payload = os.urandom(100_000)
    assert exchange(MESH_ADDRESS, port, payload) == payload
    during = running.metrics()
    assert during["nekojump_forwards"] == 1
    assert during['nekojump_ssh_connections{state="authenticated"}'] == 1
    assert during['nekojump_forwarded_bytes_total{direction="to_member"}'] >= 100_000
    assert during['nekojump_forwarded_bytes_total{direction="from_member"}'] >= 100_000
    assert during['nekojump_ssh_auth_total{result="success"}'] >= 1
    running.ssh(keys["bob"], "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:9")
    process.terminate()
    process.wait(timeout=5)
    after = wait_for(
        lambda: (m := running.metrics())["nekojump_forwards"] == 0 and m, what="the forward to go"
    )
    assert after['nekojump_refused_binds_total{reason="port-in-use"}'] == 1
    assert after['nekojump_forwarded_bytes_total{direction="to_member"}'] >= 100_000  # kept
    assert after['nekojump_ssh_connections{state="authenticated"}'] == 0


def test_check_tells_each_troubleshooting_case(running, keys, echo):
    """The seed's Troubleshooting section, answered by the jumphost for the member."""
    import http.server
    import json
    import threading
    import urllib.request

    token = running.admin("token", "create", "alice").stdout.strip()

    def check(port: int) -> dict:
        request = urllib.request.Request(
            f"{running.web_url}api/v1/check/{port}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.load(response)

    registered = running.port_min + 60
    request = urllib.request.Request(
        f"{running.web_url}api/v1/ports",
        data=json.dumps({"port": registered}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).read()
    assert check(registered)["case"] == "no-tunnel"

    dead = running.port_min + 61
    running.forward(keys["alice"], dead, free_port())
    result = check(dead)
    assert result["case"] == "local-service-refused"
    assert "nothing listens" in result["message"]

    class Hello(http.server.BaseHTTPRequestHandler):
        seen_hosts: list[str] = []

        def do_HEAD(self) -> None:
            Hello.seen_hosts.append(self.headers["Host"])
            self.send_response(502)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    web = http.server.HTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        http_port = running.port_min + 62
        running.forward(keys["alice"], http_port, web.server_address[1])
        result = check(http_port)
    finally:
        web.shutdown()
        web.server_close()
    assert result["case"] == "reachable"
    assert result["http_status"].startswith("HTTP/1.0 502")
    assert result["rtt_ms"] is not None and result["rtt_ms"] >= 0
    assert Hello.seen_hosts == [f"{MESH_ADDRESS}:{http_port}"]
    assert "own hostname" in result["message"]
    assert result["viewer_allowed"] is True  # we browse from 127.0.0.1, inside the sources

    tcp_port = running.port_min + 63
    running.forward(keys["alice"], tcp_port, echo.port)
    assert check(tcp_port)["case"] == "reachable"


def test_concurrent_large_bursts_arrive_intact_and_in_order(running, keys, echo):
    """Many 2 MiB streams at once through one tunnel, both ways, byte for byte."""
    from concurrent.futures import ThreadPoolExecutor

    port = running.port_min + 99
    running.forward(keys["alice"], port, echo.port)
    payloads = [os.urandom(2 * 1024 * 1024) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda p: exchange(MESH_ADDRESS, port, p), payloads))
    assert all(got == sent for got, sent in zip(results, payloads, strict=True))


def test_the_log_says_whose_forward_opened_and_who_disconnected_after_how_long(running, keys, echo):
    port = running.port_min + 91
    process = running.forward(keys["bob"], port, echo.port)
    process.terminate()
    process.wait(10)
    line = wait_for(
        lambda: next(
            (line for line in running.log_text().splitlines() if "bob disconnected" in line),
            None,
        ),
        what="the disconnect line",
    )
    assert re.search(r"bob disconnected from 127\.0\.0\.1 after \d+ s$", line), line
    assert "connection lost" not in running.log_text()
    # The port's own line says whose it is (Twisted's says the factory's class).
    assert f"bob's forward starting on {port}" in running.log_text()


def test_a_new_tier_applies_to_a_live_connection(jumphost, keys, echo, tmp_path):
    """`member set-tier` acts on the running server at once: the next forward a
    connected member asks for counts against the new tier (held ones stay)."""
    with open(jumphost.config, "a") as config:
        config.write("[limits]\nbasic = { forwards = 1 }\npro = { forwards = 5 }\n")
    jumphost.add_member("alice", keys["alice"])
    assert jumphost.admin("member", "set-tier", "alice", "pro").returncode == 0
    jumphost.start()
    control = str(tmp_path / "control")
    first = jumphost.port_min + 11
    master = jumphost.ssh_background(
        keys["alice"], "-M", "-S", control, "-R", f"{first}:127.0.0.1:{echo.port}"
    )
    wait_for(lambda: jumphost.holder_of(first) is not None, what="the first forward")

    def add_forward(port: int) -> subprocess.CompletedProcess[bytes]:
        argv = jumphost.ssh_argv(keys["alice"], "-S", control, "-O", "forward")
        return subprocess.run(
            [*argv[:-1], "-R", f"{port}:127.0.0.1:{echo.port}", argv[-1]],
            capture_output=True,
            timeout=30,
        )

    assert add_forward(first + 1).returncode == 0  # pro: a second one is fine
    wait_for(lambda: jumphost.holder_of(first + 1) is not None, what="the second forward")
    assert jumphost.admin("member", "set-tier", "alice", "basic").returncode == 0
    time.sleep(0.6)  # the server looks for changes every 0.2 s
    refused = add_forward(first + 2)
    assert refused.returncode != 0
    assert jumphost.holder_of(first + 2) is None
    # What alice held before the change stays up.
    assert exchange(MESH_ADDRESS, first, b"one") == b"one"
    assert exchange(MESH_ADDRESS, first + 1, b"two") == b"two"
    assert master.poll() is None
