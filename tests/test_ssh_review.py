"""Review of the SSH side's authorization and revocation, with the real OpenSSH client
against a real ``twistd nekojump`` on loopback (mesh address 127.0.0.72, ports 42000-42999).

Reviewed: where ``tcpip-forward`` may bind (port range, bind address, port 0, ports of
other members), what else the ``tunnel`` account may ask for (session requests,
channel types, streamlocal, ``cancel-tcpip-forward`` of another member's port),
same-key takeover, and revocation (Remove Key on the dashboard API and in the admin
CLI, disabling a member, two keys of one member, during transfers and rekeys).

Failed on the code reviewed (0e3c5e2), a real defect each, and pass since the fixes
that came with them:

- ``test_cli_key_removal_ends_the_session_even_if_another_key_is_added_meanwhile`` and
  ``test_another_members_new_key_never_takes_over_a_port``: revocation and same-key
  takeover are keyed on the ``keys`` row id, which SQLite hands out again.
- ``test_member_busy_uploading_is_told_the_key_was_removed``: a member killed while
  their ssh is sending sees "Broken pipe", not "key removed".  A race with the client's
  loop: failed in most runs (up to 8 rounds), not in every one.  The server now
  half-closes after DISCONNECT and reads until the client closes.
- The first two come down to ``keys.id`` without AUTOINCREMENT (schema 4 fixes it):
  the last two tests check that in the store.

Every other test passes and guards a promise that is plausible to break.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    SSH_HOST,
    Jumphost,
    _Echo,
    exited_within,
    fingerprint,
    tool,
    wait_for,
)

pytestmark = pytest.mark.e2e

MESH = "127.0.0.72"
SSH_PORT = 42000
WEB_PORT = 42001
METRICS_PORT = 42002
ECHO_PORT = 42003
STREAM_PORT = 42004
PORT_MIN = 42100
PORT_MAX = 42199
RESERVED = 42122


class _Stream(socketserver.BaseRequestHandler):
    """A local service that sends without end (a download in progress)."""

    def handle(self) -> None:
        chunk = b"x" * 65536
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                self.request.sendall(chunk)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def services() -> Iterator[None]:
    """The member's local services: an echo on ECHO_PORT, a stream on STREAM_PORT."""
    servers = [
        _Server(("127.0.0.1", ECHO_PORT), _Echo),
        _Server(("127.0.0.1", STREAM_PORT), _Stream),
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def host(tmp_path: Path, keys: dict[str, Path], services: None) -> Iterator[Jumphost]:
    """nekojump with members bob (key bob) and alice (keys alice, alice2), in that order."""
    jump = Jumphost(tmp_path, ssh_port=SSH_PORT)
    text = jump.config.read_text()
    text = text.replace('bind_address = "127.0.0.2"', f'bind_address = "{MESH}"')
    text = re.sub(r"port_min = \d+", f"port_min = {PORT_MIN}", text)
    text = re.sub(r"port_max = \d+", f"port_max = {PORT_MAX}", text)
    text = re.sub(r"reserved_ports = \[\d+\]", f"reserved_ports = [{RESERVED}]", text)
    text = text.replace('[web]\nlisten = "tcp:0:', f'[web]\nlisten = "tcp:{WEB_PORT}:').replace(
        '[metrics]\nlisten = "tcp:0:', f'[metrics]\nlisten = "tcp:{METRICS_PORT}:'
    )
    jump.config.write_text(text)
    jump.port_min, jump.port_max, jump.reserved = PORT_MIN, PORT_MAX, RESERVED
    jump.add_member("bob", keys["bob"])
    jump.add_member("alice", keys["alice"], keys["alice2"])
    jump.start()
    yield jump
    jump.close_clients()
    if jump.process is not None and jump.process.poll() is None:
        jump.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
    jump.stop()


# -- helpers ---------------------------------------------------------------------------


def exchange(port: int, payload: bytes, host: str = MESH) -> bytes:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def works(port: int) -> bool:
    try:
        return exchange(port, b"ping") == b"ping"
    except OSError:
        return False


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stderr_of(process: subprocess.Popen[bytes]) -> str:
    assert exited_within(process, 10)
    return process.stderr.read().decode(errors="replace")


def api_delete_key(jump: Jumphost, token: str, key: Path) -> int:
    quoted = urllib.parse.quote(fingerprint(key), safe="")
    request = urllib.request.Request(
        jump.web_url + "api/v1/keys/" + quoted,
        method="DELETE",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def token_for(jump: Jumphost, name: str) -> str:
    made = jump.admin("token", "create", name)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().split()[-1]


def allocated_ports(process: subprocess.Popen[bytes], count: int) -> list[int]:
    """The ports ssh reports as "Allocated port N", waiting at most 10 s."""
    ports: list[int] = []
    text = b""
    deadline = time.monotonic() + 10
    while len(ports) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.2)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, f"ssh ended: {text!r}"
            text += chunk
            ports = [int(p) for p in re.findall(rb"Allocated port (\d+) for remote forward", text)]
    assert len(ports) == count, text
    return ports


class Download:
    """A mesh member reading a download through a forward, in a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((MESH, port), timeout=10)
        self.received = 0
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline and self.sock.recv(65536):
                self.received += 65536
        except OSError:
            pass
        self.ended_at = time.monotonic()

    def close(self) -> None:
        self.sock.close()


# -- FAILING: revocation keyed on a reusable row id ---------------------------------------


def test_cli_key_removal_ends_the_session_even_if_another_key_is_added_meanwhile(host, keys):
    """The operator removes alice's (compromised) key with the admin CLI; before the
    server's next look at the store (every 0.2 s, longer when it is busy; simulated here by
    stopping the process for a moment) some key is added: here bob's new key.  SQLite
    gives the new key the removed key's row id, the watcher compares row ids only, and
    alice's session with the removed key lives on, forwarding, for as long as she likes.
    (Through the same id bob's new key could even "take over" alice's port: same-key
    takeover compares key ids too.)"""
    port = PORT_MIN + 1
    alice = host.forward(keys["alice2"], port, ECHO_PORT)  # alice2: the newest key, highest id
    assert works(port)
    host.process.send_signal(signal.SIGSTOP)
    try:
        assert host.admin("key", "remove", fingerprint(keys["alice2"])).returncode == 0
        added = host.admin("key", "add", "bob", f"{keys['stranger']}.pub")
        assert added.returncode == 0, added.stderr
    finally:
        host.process.send_signal(signal.SIGCONT)
    # "Existing tunnel sessions are killed immediately" (seed), within 1 s (SPEC).
    assert exited_within(alice, 3), "the session of the removed key is still up"
    assert not works(port)


def test_another_members_new_key_never_takes_over_a_port(host, keys):
    """Same root cause, the other symptom: after the race above, bob's new key has the
    removed key's row id, so bob's bind of alice's port counts as a same-key reconnect:
    bob takes the port and alice's ssh is told "port taken over by a newer connection of
    the same key".  SPEC: "A port held by another member is never taken"."""
    port = PORT_MIN + 14
    alice = host.forward(keys["alice2"], port, ECHO_PORT)
    host.process.send_signal(signal.SIGSTOP)
    try:
        assert host.admin("key", "remove", fingerprint(keys["alice2"])).returncode == 0
        assert host.admin("key", "add", "bob", f"{keys['stranger']}.pub").returncode == 0
    finally:
        host.process.send_signal(signal.SIGCONT)
    exited_within(alice, 2)  # what should happen; the assertion is about bob
    bob = host.ssh_background(keys["stranger"], "-R", f"{port}:127.0.0.1:{ECHO_PORT}")
    wait_for(
        lambda: bob.poll() is not None or host.holder_of(port) == fingerprint(keys["stranger"]),
        what="bob's bind",
    )
    if alice.poll() is None:
        alice.terminate()
    assert "taken over" not in stderr_of(alice)


# -- passing guards: revocation -------------------------------------------------------------


def test_api_key_removal_mid_download_ends_stream_and_frees_the_port(host, keys):
    """Remove Key on the API while mesh members download through the tunnel: alice's
    ssh exits, the downloads end within a second, and bob can bind the port at once."""
    port = PORT_MIN + 2
    alice = host.forward(keys["alice"], port, STREAM_PORT)
    downloads = [Download(port) for _ in range(3)]
    wait_for(lambda: all(d.received > 1 << 20 for d in downloads), what="the downloads")
    removed_at = time.monotonic()
    assert api_delete_key(host, token_for(host, "alice"), keys["alice"]) == 200
    assert exited_within(alice, 2)
    for download in downloads:
        wait_for(lambda d=download: d.ended_at is not None, timeout=2, what="a download to end")
        assert download.ended_at - removed_at < 1.5
        download.close()
    bob = host.forward(keys["bob"], port, ECHO_PORT)
    assert bob.poll() is None and works(port)


def test_member_busy_uploading_is_told_the_key_was_removed(host, keys):
    """Failed before the fix: a member whose key is removed while their tunnel carries data (their
    ssh sending) sees "client_loop: ssh_packet_write_poll: Connection to ... Broken
    pipe" (a network error: autossh just retries) instead of "Received disconnect
    from ...: 11: key removed", which an idle tunnel gets.  The server stops reading
    and closes with the member's data unread, so the kernel answers with a reset that
    overtakes the DISCONNECT message."""
    port = PORT_MIN + 9
    token = token_for(host, "alice")
    messages = []
    for _ in range(8):  # a race in the client's loop: usually lost within 1-3 rounds
        alice = host.forward(keys["alice"], port, STREAM_PORT)
        downloads = [Download(port) for _ in range(4)]
        wait_for(lambda ds=downloads: all(d.received > 1 << 20 for d in ds), what="downloads")
        assert api_delete_key(host, token, keys["alice"]) == 200
        messages.append(stderr_of(alice))
        for download in downloads:
            download.close()
        if "key removed" not in messages[-1]:
            break
        assert host.admin("key", "add", "alice", f"{keys['alice']}.pub").returncode == 0
    assert all("key removed" in message for message in messages), messages[-1]


def test_cli_key_removal_during_rekeys_ends_the_session(host, keys):
    """A key exchange in progress does not delay the kill (RekeyLimit makes ssh rekey
    every 256 KiB of a running download)."""
    port = PORT_MIN + 3
    alice = host.ssh_background(
        keys["alice"], "-o", "RekeyLimit=256K", "-R", f"{port}:127.0.0.1:{STREAM_PORT}"
    )
    wait_for(lambda: host.holder_of(port) == fingerprint(keys["alice"]), what="forward")
    download = Download(port)
    wait_for(lambda: download.received > 4 << 20, what="the download to run")
    assert host.admin("key", "remove", fingerprint(keys["alice"])).returncode == 0
    assert exited_within(alice, 2)
    wait_for(lambda: download.ended_at is not None, timeout=2, what="the download to end")
    download.close()


def test_removing_one_key_leaves_the_members_other_key_alone(host, keys):
    first, second = PORT_MIN + 4, PORT_MIN + 5
    one = host.forward(keys["alice"], first, ECHO_PORT)
    two = host.forward(keys["alice2"], second, ECHO_PORT)
    assert host.admin("key", "remove", fingerprint(keys["alice"])).returncode == 0
    assert exited_within(one, 2)
    assert "key removed" in stderr_of(one)  # idle: the member is told why
    time.sleep(0.5)
    assert two.poll() is None and works(second)
    # The removed key can log in no more; the same key added again can, at once.
    again = host.ssh(
        keys["alice"], "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{first}:127.0.0.1:9"
    )
    assert again.returncode == 255 and b"Permission denied (publickey)" in again.stderr
    assert host.admin("key", "add", "alice", f"{keys['alice']}.pub").returncode == 0
    assert host.forward(keys["alice"], first, ECHO_PORT).poll() is None


def test_disabling_a_member_ends_all_their_sessions(host, keys):
    one = host.forward(keys["alice"], PORT_MIN + 6, ECHO_PORT)
    two = host.forward(keys["alice2"], PORT_MIN + 7, ECHO_PORT)
    bob = host.forward(keys["bob"], PORT_MIN + 8, ECHO_PORT)
    assert host.admin("member", "disable", "alice").returncode == 0
    assert exited_within(one, 2) and exited_within(two, 2)
    assert bob.poll() is None and works(PORT_MIN + 8)


# -- passing guards: what may be bound ------------------------------------------------------


@pytest.mark.parametrize(
    "bind", ["", "0.0.0.0", "[::]", "127.0.0.1", "localhost", "jump.invalid", MESH, "*"]
)
def test_any_bind_address_binds_the_mesh_address_only(host, keys, bind):
    port = PORT_MIN + 10
    spec = f"{bind}:{port}:127.0.0.1:{ECHO_PORT}" if bind else f"{port}:127.0.0.1:{ECHO_PORT}"
    process = host.ssh_background(keys["alice"], "-R", spec)
    wait_for(lambda: process.poll() is not None or works(port), what="the forward")
    assert process.poll() is None, stderr_of(process)
    for elsewhere in ("127.0.0.1", "127.0.0.2"):
        assert not accepts(elsewhere, port)


def test_port_zero_allocates_inside_the_range_for_each_forward(host, keys):
    """ssh -R 0:... twice (two different targets: OpenSSH drops identical -R options)."""
    process = host.ssh_background(
        keys["alice"], "-R", f"0:127.0.0.1:{ECHO_PORT}", "-R", f"0:127.0.0.1:{STREAM_PORT}"
    )
    ports = allocated_ports(process, 2)
    assert len(set(ports)) == 2
    for port in ports:
        assert PORT_MIN <= port <= PORT_MAX and port != RESERVED
    assert works(ports[0]) and accepts(MESH, ports[1])


def test_other_members_port_cannot_be_bound(host, keys):
    """bob cannot bind alice's port; alice's tunnel is untouched."""
    port = PORT_MIN + 11
    host.forward(keys["alice"], port, ECHO_PORT)
    taken = host.ssh(
        keys["bob"], "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:9"
    )
    assert taken.returncode == 255
    assert f"remote port forwarding failed for listen port {port}".encode() in taken.stderr
    assert host.holder_of(port) == fingerprint(keys["alice"]) and works(port)


def test_same_key_reconnect_takes_the_port_over_and_tells_the_old_ssh(host, keys):
    """autossh restarting ssh: the new connection gets the port at once; the old ssh
    is told why it was ended."""
    port = PORT_MIN + 12
    old = host.forward(keys["alice"], port, ECHO_PORT)
    new = host.forward(keys["alice"], port, ECHO_PORT)
    assert exited_within(old, 2)
    assert "taken over by a newer connection" in stderr_of(old)
    assert new.poll() is None and works(port)
    # Another key of the same member takes nothing (takeover = same-key by default).
    other = host.ssh(
        keys["alice2"], "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:9"
    )
    assert other.returncode == 255 and new.poll() is None


# -- passing guards: nothing but remote forwards ---------------------------------------------


def test_streamlocal_forwards_are_refused(host, keys, tmp_path):
    remote = host.ssh(
        keys["alice"], "-N", "-o", "ExitOnForwardFailure=yes",
        "-R", f"{tmp_path}/r.sock:127.0.0.1:{ECHO_PORT}",
    )  # fmt: skip
    assert remote.returncode == 255
    assert b"remote port forwarding failed for listen path" in remote.stderr
    local = tmp_path / "l.sock"
    process = host.ssh_background(keys["alice"], "-L", f"{local}:/run/some.sock")
    wait_for(lambda: process.poll() is not None or local.exists(), what="local socket")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(local))
        assert s.recv(10) == b""
    process.terminate()
    if not exited_within(process, 10):  # seen once under load: its exit is not the point
        process.kill()
    assert "administratively prohibited" in stderr_of(process)


def test_agent_x11_and_subsystem_requests_keep_the_tunnel_up(host, keys):
    """-A and -X are refused without ending the connection; the forward still works."""
    port = PORT_MIN + 13
    process = subprocess.Popen(
        host.ssh_argv(
            keys["alice"],
            "-T",
            "-A",
            "-X",
            "-o",
            "ForwardX11Trusted=no",
            "-R",
            f"{port}:127.0.0.1:{ECHO_PORT}",
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "DISPLAY": ":99", "SSH_AUTH_SOCK": "/nonexistent"},
    )
    host.clients.append(process)
    wait_for(process.stdout.readline, what="banner")
    assert works(port)
    process.stdin.close()
    assert exited_within(process, 5)
    sftp = subprocess.run(
        [tool("sftp"), "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
         "-i", str(keys["alice"]), "-P", str(SSH_PORT), f"tunnel@{SSH_HOST}"],
        capture_output=True, timeout=20, input=b"",
    )  # fmt: skip
    assert sftp.returncode != 0
    assert b"subsystem request failed" in sftp.stderr


# -- the cause of the first two defects, in the store ----------------------------------


def _new_key():
    from nekojump.keys import parse_public_key
    from tests.test_web_api import public_key_text

    return parse_public_key(public_key_text())


def test_a_removed_keys_id_is_never_given_to_a_new_key(tmp_path):
    from nekojump.store import SQLiteStore

    store = SQLiteStore.open(tmp_path)
    try:
        store.add_member("alice")
        store.add_member("bob")
        first = store.add_key("alice", _new_key(), "laptop")
        newest = store.add_key("alice", _new_key(), "pi")
        store.remove_key(newest.fingerprint)
        added = store.add_key("bob", _new_key(), "desktop")
        assert added.id not in (first.id, newest.id)
    finally:
        store.close()


def test_a_database_from_before_keeps_its_keys_and_stops_reusing_ids(tmp_path):
    """A data directory made by a release with schema 3 is migrated: every key
    keeps its id and fields, and a removed key's id is not given out again."""
    import sqlite3

    from nekojump.store import DB_NAME, SQLiteStore, schema_scripts

    db = sqlite3.connect(tmp_path / DB_NAME)
    for version, script in schema_scripts():
        if version <= 3:
            db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
    db.execute("INSERT INTO members (id, name, created_at) VALUES (1, 'alice', 1.0)")
    for key_id, text in ((1, "laptop"), (7, "pi")):
        db.execute(
            "INSERT INTO keys (id, member_id, fingerprint, key_type, public_key, description,"
            " created_at) VALUES (?, 1, ?, 'ssh-ed25519', 'AAAA', ?, 2.0)",
            (key_id, f"SHA256:{text}", text),
        )
    db.commit()
    db.close()

    store = SQLiteStore.open(tmp_path)
    try:
        assert [(k.id, k.fingerprint, k.description) for k in store.list_keys("alice")] == [
            (1, "SHA256:laptop", "laptop"),
            (7, "SHA256:pi", "pi"),
        ]
        store.remove_key("SHA256:pi")
        assert store.add_key("alice", _new_key(), "new").id > 7
    finally:
        store.close()
