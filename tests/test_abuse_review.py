"""Abuse review: what ONE member (or one client on the mesh) can do to degrade the
jumphost for every other member or for the operator.

Each test here failed on the reviewed code (0b692a7) because of the problem its
docstring describes, with numbers measured against a real ``twistd nekojump`` on
loopback, and passes since the fix; the tests use the defaults of the limits
(``[limits] max_keys_per_member``, ``max_registered_ports_per_member``, ``[web]
max_connections_per_source``).
"""

from __future__ import annotations

import functools
import json
import resource
import socket
import subprocess
import time
from urllib.parse import urlsplit

import pytest

from nekojump.store import MAX_SESSIONS_PER_MEMBER as SESSIONS_PER_MEMBER
from tests.conftest import Jumphost, wait_for
from tests.test_ssh_protocol import MSG_GLOBAL_REQUEST, forward_request
from tests.test_ssh_protocol import World as SSHWorld
from tests.test_web_api import public_key_text
from tests.test_web_review import PASSWORDS, World, world  # noqa: F401 - a fixture

#: The default of ``[limits] max_registered_ports_per_member``.
PORTS_PER_MEMBER = 100
#: The default of ``[limits] max_keys_per_member``.
KEYS_PER_MEMBER = 100


def json_error(code: int, body: object) -> bool:
    """A refusal as the API promises it: a 4xx with ``{"error", "message"}``."""
    return (
        400 <= code < 500
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("message"), str)
    )


def api(site: World, name: str):
    """A bearer-token client for ``name`` with JSON helpers."""
    browser = site.token(name)

    def call(method: str, path: str, body: object = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        code, _headers, text = browser.request(
            method, "/api/v1" + path, data=data, headers={"Content-Type": "application/json"}
        )
        return code, json.loads(text) if text else None

    return call


# -- registered ports ----------------------------------------------------------------------


def test_one_member_cannot_register_the_whole_port_range(world):  # noqa: F811
    """A member can register every port in the range: registration has no cap
    (store.py add_port, backend.py add_port). Measured on a real server with the
    production range 10000-60000: 604 registrations/s over one keep-alive
    connection, so the whole range (50,000 ports) in under 90 s. Then:

    - every other member's ``POST /api/v1/ports`` is a 409 "port N is already
      registered", for every port: nobody else can use the inventory at all;
    - ``GET /api/v1/directory`` every member loads is 17.3 MB (823 ms), the
      ``/directory`` page 23.5 MB (777 ms), against 2.6 KB for the dashboard;
    - while 4 clients fetch the directory, an unrelated ``GET /api/v1/keys``
      takes 2.6-4.0 s instead of ~10 ms (the reactor serialises 17 MB each time);
    - the How to Connect card suggests no free port to anyone any more.

    Expected: past ``[limits] max_registered_ports_per_member`` (proposed 100) the
    API refuses with a JSON 4xx, and the directory lists at most that many of
    one member's ports."""
    alice, bob = api(world, "alice"), api(world, "bob")
    answers = []
    for port in range(10000, 10000 + PORTS_PER_MEMBER + 20):
        answers.append(alice("POST", "/ports", {"port": port, "description": "mine"}))
    refused = [(code, body) for code, body in answers if code != 201]
    assert refused, f"alice registered {len(answers)} ports; nothing bounds it"
    assert all(json_error(code, body) for code, body in refused), refused[:1]
    code, directory = bob("GET", "/directory")
    assert code == 200
    alices = [row for row in directory["ports"] if row["member"] == "alice"]
    assert len(alices) <= PORTS_PER_MEMBER
    # Another member can still register.
    assert bob("POST", "/ports", {"port": 10999, "description": "bob's"})[0] == 201


# -- keys ------------------------------------------------------------------------------------


def test_one_member_cannot_store_unlimited_keys(world):  # noqa: F811
    """A member can add any number of keys (store.py add_key, backend.py
    add_key): a fresh ed25519 key costs the client ~50 us. Every key is a row
    and an audit event, and the admin page lists all keys of all members
    (app.py _admin_page, ``list_keys`` without limit), so one member with
    thousands of keys makes the operator's page huge; "one key per machine"
    needs nowhere near that.

    Expected: past ``[limits] max_keys_per_member`` (proposed 100) adding a key
    is refused with a JSON 4xx that says so."""
    alice = api(world, "alice")
    answers = [
        alice("POST", "/keys", {"public_key": public_key_text(f"m{i}"), "description": f"m{i}"})
        for i in range(KEYS_PER_MEMBER + 10)
    ]
    refused = [(code, body) for code, body in answers if code != 201]
    assert refused, f"alice stored {len(answers)} keys; nothing bounds it"
    assert all(json_error(code, body) for code, body in refused), refused[:1]
    assert len(world.store.list_keys("alice")) <= KEYS_PER_MEMBER


# -- the audit trail -----------------------------------------------------------------------


def test_register_unregister_churn_does_not_grow_the_audit_trail_without_bound(world):  # noqa: F811
    """Each ``POST /api/v1/ports`` and ``DELETE /api/v1/ports/N`` writes an audit
    row (store.py add_port/remove_port ``_audit``); nothing limits how often a
    member may change things, and retention is 400 days. Measured: 113 changes/s
    from one client with one keep-alive connection (4,003 audit rows from 1,000
    requests plus 3,000 registrations), ~75 bytes each: ~9.8 M rows, ~0.7 GB a
    day, kept for 400 days. The admin page shows the newest 100 events, so 100
    requests push every other member's key removals, takeovers and kills out of
    the operator's view. (Keys add/remove churns the same way.)

    Fixed: a per-member budget of changes (``[limits]
    max_changes_per_member_per_hour``, 300) past which the API answers 429 with a
    JSON error, so a loop writes a bounded number of audit rows."""
    alice = api(world, "alice")
    before = len(world.store.audit_events(100_000, member="alice"))
    codes = []
    for _ in range(400):
        codes.append(alice("POST", "/ports", {"port": 10080, "description": "x"}))
        codes.append(alice("DELETE", "/ports/10080"))
    written = len(world.store.audit_events(100_000, member="alice")) - before
    throttled = [(code, body) for code, body in codes if code == 429]
    assert throttled, f"800 changes in a burst, none refused; {written} audit rows written"
    assert all(json_error(code, body) for code, body in throttled)
    assert written <= 400


# -- SSH forwards ----------------------------------------------------------------------------


def test_reconnecting_does_not_reset_the_cap_on_bind_and_cancel_loops(tmp_path, monkeypatch):
    """``MAX_FORWARD_CHANGES`` (avatar.py:44, checked in ``_count_change``,
    avatar.py:433) is counted per connection: a loop that reconnects gets a
    fresh 1,000 bind/unbind audit rows every time, and nothing limits how often
    a member reconnects (the penalty box counts failed logins only). So the cap
    bounds one connection, not the member: each SSH handshake buys ~1,000 audit
    rows and 1,000 listen()/close() calls on the mesh address. Measured on a real
    server with paramiko: 3 connections, 3,000 bind/cancel requests in 1.3 s,
    3,003 bind/unbind audit rows (~2,300 rows/s from one client, ~200 M a day,
    kept 400 days), each connection ended at the cap and the next one let in.

    Fixed: the count belongs to the member (``TunnelRegistry.forward_changes``,
    over an hour), so reconnecting does not start it again."""
    monkeypatch.setattr("nekojump.ssh.avatar.MAX_FORWARD_CHANGES", 40)
    ssh = SSHWorld(tmp_path)
    try:
        for _connection in range(4):
            recorder, pump, server = ssh.logged_in()
            for _ in range(30):
                recorder.send(MSG_GLOBAL_REQUEST, forward_request(20086))
                recorder.send(MSG_GLOBAL_REQUEST, forward_request(20086, b"cancel-tcpip-forward"))
                pump.flush()
                if server.transport.disconnecting or server.transport.disconnected:
                    break
            server.transport.loseConnection()
            pump.flush()
        binds = [e for e in ssh.store.audit_events(10_000) if e["event"] in ("bind", "unbind")]
        assert len(binds) <= 45, f"{len(binds)} bind/unbind rows over 4 connections (cap 40)"
    finally:
        ssh.store.close()


# -- dashboard logins ----------------------------------------------------------------------


def test_logins_with_the_right_password_are_bounded_too(world):  # noqa: F811
    """``LoginThrottle`` counts only failures (``succeeded`` takes the attempt
    back, backend.py login): a member may log in with their own password as
    often as they like. Each login is a 32 MiB scrypt on the server
    (passwords.py) and a web_sessions row kept 14 days (store.py
    create_session), plus a ``login`` audit row. Measured on a real server: one
    client with 12 threads made 45 logins in 5 s (45 sessions stored; ~780,000
    a day, all live for 14 days); bob's login from another address took
    0.76-1.18 s instead of 0.14-0.17 s meanwhile, with both cores busy.

    Fixed: a member holds at most ``MAX_SESSIONS_PER_MEMBER`` (20) sessions (a
    new login ends the oldest), and an account makes at most 20 successful
    logins in five minutes (then 429, as for failures)."""
    browser = world.client()
    codes = []
    for _ in range(30):
        code, _headers, _body = browser.request(
            "POST", "/login", form={"name": "alice", "password": PASSWORDS["alice"]}
        )
        codes.append(code)
    sessions = world.store._db.execute(
        "SELECT count(*) FROM web_sessions s JOIN members m ON m.id = s.member_id"
        " WHERE m.name = 'alice'"
    ).fetchone()[0]
    assert sessions <= SESSIONS_PER_MEMBER, f"30 logins, {sessions} sessions live for 14 days"
    assert 429 in codes, "30 logins in a burst, each one a 32 MiB scrypt, none throttled"


# -- slow web clients ----------------------------------------------------------------------


def _limited_descriptors(limit: int):
    """``subprocess.Popen`` whose children run with RLIMIT_NOFILE = ``limit``."""
    real = subprocess.Popen

    def popen(*args, **kwargs):
        return real(
            *args,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
            **kwargs,
        )

    return functools.wraps(real)(popen)


@pytest.mark.e2e
def test_slow_web_clients_cannot_lock_members_out_of_ssh(tmp_path, keys, echo, monkeypatch):
    """The dashboard's port accepts any number of connections from one client
    and keeps each one as long as a byte arrives every 60 s (Twisted's
    HTTPChannel idle timeout, reset by every byte; headers may be 16 KiB, so a
    trickle holds a socket for days). Web connections are not counted in the
    descriptor budget (service.py:51-54 counts SSH connections, listeners and
    mesh streams only), so the SSH side believes it has room while the process
    has none left, and no login is needed to do this.

    Measured with the server at 256 descriptors: 300 idle connections from one
    mesh address took it from 15 to 256 open descriptors; member bob's
    ``ssh -R`` then failed ("kex_exchange_identification: read: Connection
    reset by peer") and the dashboard reset every other client, until the
    client let go. In production (LimitNOFILE=65536) one address can open
    ~28,000 connections to one port: 43% of the budget the SSH side counts on.

    Fixed: a per-source cap on concurrent web connections (``[web]
    max_connections_per_source``, 32: beyond it new ones are closed at once), a
    deadline for a whole request (``[web] request_timeout``, 30 s), and web
    connections counted in the descriptor budget."""
    host = Jumphost(tmp_path)
    host.add_member("bob", keys["bob"])
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", _limited_descriptors(256))
        host.start()
    held: list[socket.socket] = []
    try:
        web = urlsplit(host.web_url)
        for _ in range(300):
            try:
                s = socket.create_connection(
                    (web.hostname, web.port), timeout=5, source_address=("127.0.0.71", 0)
                )
                s.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest
            except OSError:
                break
            held.append(s)
        time.sleep(0.5)  # the server accepts what it can
        port = host.port_min + 5
        client = host.ssh_background(
            keys["bob"], "-o", "ConnectTimeout=5", "-R", f"{port}:127.0.0.1:{echo.port}"
        )
        wait_for(
            lambda: client.poll() is not None or host.holder_of(port) is not None,
            timeout=15,
            what="bob's forward or his ssh giving up",
        )
        stderr = client.stderr.read().decode() if client.poll() is not None else ""
        assert client.poll() is None, f"bob was locked out of SSH by one web client: {stderr}"
        assert host.holder_of(port) is not None
    finally:
        for s in held:
            s.close()
        host.close_clients()
        host.stop()
