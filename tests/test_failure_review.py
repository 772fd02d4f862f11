"""From a failure-mode review: what an operator or member gets when the disk,
the data directory, the host key, a signal or an unusual listen address goes
wrong.  The project's rule: bad input gets a clear error message and loses
nothing; a crash is never an answer.

Every test here failed on the code it was written against (see each docstring
for what happened instead).  Servers started here listen on loopback only;
forwards bind on 127.0.0.72.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import nekojump
from nekojump.admin import main
from nekojump.hostkey import HOST_KEY_NAME
from nekojump.store import DB_NAME, SQLiteStore
from tests.conftest import Jumphost, tool, wait_for
from tests.test_web_api import BASE, in_memory_site, public_key_text
from tests.test_web_pages import fetch

MESH = "127.0.0.72"
#: The copy of nekojump these tests import: servers started here run the same one.
CODE_ROOT = str(Path(nekojump.__file__).resolve().parent.parent)


# -- helpers -------------------------------------------------------------------------


def host_on(directory: Path) -> Jumphost:
    """A Jumphost (not started) whose forwards bind on MESH."""
    host = Jumphost(directory)
    host.write_config(mesh_address=MESH)
    return host


def twistd_argv(config: Path) -> list[str]:
    return [tool("twistd"), "-n", "--pidfile=", "nekojump", "--config", str(config)]


def run_to_the_end(config: Path, cwd: Path, timeout: float = 20) -> tuple[int, str]:
    """Run ``twistd nekojump`` until it exits on its own (or fail the test)."""
    process = subprocess.Popen(
        twistd_argv(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"twistd did not stop on its own:\n{output}")
    return process.returncode, output


def immutable(path: Path) -> bool:
    """Make ``path`` immutable (works as root, where file modes do not stop writes)."""
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return done.returncode == 0


def mutable(path: Path) -> None:
    if shutil.which("chattr") is not None and path.exists():
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def read_only_database(data_dir: Path) -> Path:
    """Make the database file one this process cannot write; returns it."""
    db = data_dir / DB_NAME
    if os.geteuid() != 0:
        db.chmod(0o400)
    elif not immutable(db):
        pytest.skip("running as root without chattr +i: cannot make a read-only database")
    return db


def damage_last_page(data_dir: Path) -> None:
    """Overwrite the database's last page (audit rows) with junk: the header and
    schema stay readable, so the database opens and fails later."""
    path = data_dir / DB_NAME
    data = bytearray(path.read_bytes())
    pages = len(data) // 4096
    data[(pages - 1) * 4096 :] = b"\xff" * 4096
    path.write_bytes(bytes(data))


# -- 1. the admin CLI on a database it cannot write, or a damaged one -----------------------


@pytest.mark.parametrize("trouble", ["read-only-database", "damaged-page"])
def test_admin_cli_reports_a_failing_database_in_one_line_and_exits_1(tmp_path, capsys, trouble):
    """``nekojump-admin member add bob`` on a database the operator's user may
    read but not write (or one damaged past its first pages) printed a Python
    traceback ending ``sqlite3.OperationalError: attempt to write a readonly
    database`` / ``sqlite3.DatabaseError: database disk image is malformed``:
    ``main`` catches sqlite3 errors only while opening the store, not while a
    command runs."""
    data_dir = tmp_path / "data"
    store = SQLiteStore.open(data_dir)
    store.add_member("alice")
    for i in range(300):  # enough audit rows to fill pages past the schema
        store.audit("filler", member="alice", detail={"i": i, "pad": "x" * 40})
    store.close()
    if trouble == "damaged-page":
        damage_last_page(data_dir)
        db = None
    else:
        db = read_only_database(data_dir)
    try:
        try:
            code = main(["--data-dir", str(data_dir), "member", "add", "bob"], out=io.StringIO())
        except Exception as error:  # noqa: BLE001 - what the operator would see as a traceback
            pytest.fail(f"nekojump-admin let {type(error).__name__} out: {error}")
    finally:
        if db is not None:
            mutable(db)
            db.chmod(0o600)
    assert code == 1
    assert capsys.readouterr().err.startswith("nekojump-admin: ")


# -- 2. a store that cannot write ends every new SSH login ------------------------------------


@pytest.mark.e2e
def test_ssh_logins_keep_working_while_the_database_cannot_be_written(tmp_path, keys):
    """With the disk full (or failing) under the data directory, every SSH login
    was accepted and then ended at once: the member saw ``Received disconnect
    ...: internal error checking the key`` and autossh looped, though the key
    could still be read and checked.  Only recording the login (``confirm_login``
    writes ``last_used_at``, in the same failed commit as the audit event) had
    failed; the log said ``could not re-check the key of alice ...
    sqlite3.OperationalError: disk I/O error``.  Reads still work, so the key
    can be checked; the failed bookkeeping should be logged, not turned into a
    lock-out of everyone who reconnects.

    A full disk is simulated by making the WAL file immutable (chattr +i),
    which fails every write SQLite makes to it."""
    host = host_on(tmp_path)
    host.add_member("alice", keys["alice"])
    host.start()
    wal = host.data_dir / (DB_NAME + "-wal")
    try:
        if not wal.exists() or not immutable(wal):
            pytest.skip("cannot make the WAL file immutable (needs root and chattr)")
        port = host.port_min + 1
        client = host.ssh_background(keys["alice"], "-R", f"{port}:127.0.0.1:9")
        time.sleep(3)
        still_up = client.poll() is None
        stderr = "" if still_up else client.stderr.read().decode()
    finally:
        mutable(wal)
        host.close_clients()
        host.stop()
    assert still_up, f"ssh was disconnected: {stderr.strip()}"


# -- 3. the API and the dashboard when a store write fails ------------------------------------


@pytest.fixture
def failing_writes(tmp_path):
    """An in-memory web site over a store whose writes fail (as on a full disk),
    with a session and a token for alice made before the failure."""
    store = SQLiteStore.open(tmp_path)
    store.add_member("alice")
    _id, token = store.create_token("alice")
    store.token_member(token)  # its hourly "token-used" audit event is written now
    cookie, csrf = store.create_session("alice", 3600)
    treq = in_memory_site(store, {"forwarding": {"port_min": 10000, "port_max": 10999}})

    def fail_writes() -> None:
        store._db.execute("PRAGMA query_only = ON")  # every write: "attempt to write a readonly"

    yield store, treq, token, cookie, csrf, fail_writes
    store.close()


def api_request(
    treq, method: str, path: str, token: str, body: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Status, Content-Type and body of one API request with a bearer token."""
    results: list = []
    treq.request(
        method, BASE + path, data=body, headers={"Authorization": f"Bearer {token}"}
    ).addBoth(results.append)
    treq.flush()
    response = results[0]
    if not hasattr(response, "code"):
        response.raiseException()
    contents: list[bytes] = []
    response.content().addBoth(contents.append)
    treq.flush()
    content_type = response.headers.getRawHeaders(b"Content-Type", [b""])[0]
    return response.code, content_type, contents[0]


def test_an_api_write_that_the_store_refuses_answers_json_not_an_html_page(failing_writes):
    """``POST /api/v1/keys`` while the database cannot be written answered
    ``500 text/html`` ``<html><head><title>Processing Failed</title>...`` — a
    script expecting the documented ``{"error": code, "message": text}`` could
    not tell what happened.  It should be a JSON error (5xx, e.g. 503
    ``storage-unavailable``) saying the change was not saved."""
    _store, treq, token, _cookie, _csrf, fail_writes = failing_writes
    fail_writes()
    body = json.dumps({"public_key": public_key_text(), "description": "pi"}).encode()
    code, content_type, content = api_request(treq, "POST", "/keys", token, body)
    assert code >= 500
    assert content_type.startswith(b"application/json"), (code, content_type, content[:200])
    problem = json.loads(content)
    assert problem.get("error") and problem.get("message")


def test_api_reads_with_a_token_still_work_while_the_store_cannot_write(failing_writes):
    """``GET /api/v1/keys`` with a bearer token failed (HTML 500) while the
    database could not be written: looking a token up also writes its
    ``last_used_at`` (``token_member``), and that write's failure failed the
    request.  Reading keys, ports and tunnels needs no write; the bookkeeping
    should be best-effort."""
    _store, treq, token, _cookie, _csrf, fail_writes = failing_writes
    fail_writes()
    code, content_type, content = api_request(treq, "GET", "/keys", token)
    assert code == 200, (code, content_type, content[:200])
    assert json.loads(content)["keys"] == []


def test_a_dashboard_save_the_store_refuses_says_so_and_keeps_what_was_typed(failing_writes):
    """A member pressing Save in the SSH Public Key card while the database could
    not be written got a bare ``Processing Failed`` page (500): no word that the
    key was not saved, and the key they pasted was gone.  A refused key (bad
    format) comes back in the card with the reason; a store failure should too,
    saying nothing was saved and to try again later."""
    _store, treq, _token, cookie, csrf, fail_writes = failing_writes
    fail_writes()
    text = public_key_text("me@laptop")
    code, _headers, body = fetch(
        treq,
        "POST",
        "/keys",
        {"Cookie": f"nekojump_session={cookie}"},
        {"csrf": csrf, "public_key": text, "description": "laptop"},
    )
    assert code >= 500
    assert "Processing Failed" not in body, body
    assert text.split()[1] in body, "the pasted key was not given back"


# -- 4. a damaged host key ------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a key\n"])
def test_a_damaged_host_key_stops_the_start_with_one_line(tmp_path, content):
    """An empty or garbled ``ssh_host_ed25519_key`` (a botched restore, a
    config-management template) stopped the start with a traceback ending
    ``twisted.conch.ssh.keys.BadKeyError: cannot guess the type of b''``:
    ``tap.makeService`` turns OSError and UnusableDatabase into one line, not
    BadKeyError.  The operator should read which file is bad (and must not get
    a new key silently: members' known_hosts pin the old one)."""
    host = host_on(tmp_path)
    SQLiteStore.open(host.data_dir).close()
    key = host.data_dir / HOST_KEY_NAME
    key.write_bytes(content)
    code, output = run_to_the_end(host.config, tmp_path)
    assert code != 0
    assert "Traceback" not in output, output
    assert "nekojump: " in output and HOST_KEY_NAME in output, output
    assert key.read_bytes() == content  # left for the operator to restore


# -- 5. SIGHUP ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sighup_does_not_kill_the_server_without_a_word(tmp_path, keys):
    """``kill -HUP`` (what sshd and most daemons take as "reload"; also what a
    closed terminal sends to ``twistd -n``) killed nekojump at once: exit by
    signal 1, not one log line, members' tunnels cut without the "server
    shutting down" message, and the stopped server's pid and live forwards left
    in the database.  twistd installs no SIGHUP handler when it logs to stdout,
    as the systemd unit does.  Either keep running (and say a restart applies
    config changes) or stop as cleanly as on SIGTERM, saying why."""
    host = host_on(tmp_path)
    host.add_member("alice", keys["alice"])
    host.start()
    try:
        host.process.send_signal(signal.SIGHUP)
        try:
            host.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # still running: acceptable
        code = host.process.poll()
        log = host.log_text()
    finally:
        host.stop()
    if code is None:  # still running: fine, if it says why
        assert "SIGHUP" in log and "restart" in log, log[-1500:]
        return
    assert code != -signal.SIGHUP, "killed by SIGHUP without a word:\n" + log[-1500:]
    assert "SIGHUP" in log
    db = sqlite3.connect(host.data_dir / DB_NAME)
    try:
        assert db.execute("SELECT * FROM server_state WHERE name = 'pid'").fetchall() == []
    finally:
        db.close()


# -- 6. two servers on one data directory ----------------------------------------------------


@pytest.mark.e2e
def test_a_second_server_on_a_data_directory_in_use_is_refused(tmp_path, keys, echo):
    """A second ``twistd nekojump`` with other listen ports but the same data
    directory (a copied config whose data_dir was not changed, the container
    and the host unit both running) started without a word.  It wiped the first
    server's live-forwards table and put its own pid in its place; once stopped,
    it removed the pid, so ``nekojump-admin tunnels`` said "the server is not
    running" and ``tunnels kill`` refused, while the first server ran on.  The
    second start should stop with one line naming the data directory and the
    pid of the server using it."""
    (tmp_path / "first").mkdir()
    first = host_on(tmp_path / "first")
    first.add_member("alice", keys["alice"])
    first.start()
    port = first.port_min + 3
    first.forward(keys["alice"], port, echo.port)
    (tmp_path / "second").mkdir()
    second = Jumphost(tmp_path / "second")
    second.data_dir = first.data_dir
    second.write_config(mesh_address=MESH)
    try:
        with open(second.log, "wb") as log:
            second.process = subprocess.Popen(
                twistd_argv(second.config), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
            )
        wait_for(
            lambda: second.process.poll() is not None or "SSH on" in second.log_text(),
            what="the second server to start or stop",
        )
        started = "SSH on" in second.log_text()
        time.sleep(0.5)
        tunnels = first.admin("tunnels").stdout
    finally:
        second.stop()
        first.close_clients()
        first.stop()
    assert not started, (
        f"the second server started; with alice's forward on {port} still up, "
        f"nekojump-admin tunnels said: {tunnels.strip()!r}"
    )
    assert second.process.returncode != 0
    output = second.log_text()
    assert "Traceback" not in output
    assert str(first.data_dir) in output and str(first.process.pid) in output, output


# -- 7. a stop while the database cannot be written -----------------------------------------


@pytest.mark.e2e
def test_a_stop_whose_last_writes_fail_says_so(tmp_path):
    """SIGTERM while the database could not be written (disk full): the log said
    only ``Received SIGTERM, shutting down`` ... ``Server Shut Down.``  The last
    writes (the stop itself: clearing the pid and live forwards; audit events
    still waiting for their commit) failed, and nothing said so — the operator
    learns nothing of what was lost, and the stopped server's pid stays in the
    database.  The failure should be logged."""
    host = host_on(tmp_path)
    host.start()
    wal = host.data_dir / (DB_NAME + "-wal")
    try:
        if not wal.exists() or not immutable(wal):
            pytest.skip("cannot make the WAL file immutable (needs root and chattr)")
        host.stop()
    finally:
        mutable(wal)
        host.stop()
    log = host.log_text()
    stop = log[log.index("Received SIGTERM") :]
    assert any(word in stop for word in ("could not", "cannot", "failed", "error")), stop


# -- 8. a unix-socket listen address -------------------------------------------------------


@pytest.mark.e2e
def test_a_unix_socket_dashboard_either_works_or_is_refused_by_check_config():
    """``[web] listen = "unix:/run/nekojump/web.sock"`` (a Twisted endpoint
    string, as the docs ask; the usual way behind nginx) passed
    ``check-config`` ("OK"), then the server logged
    ``cannot listen for the dashboard on unix:...: 'UNIXAddress' object has no
    attribute 'host'`` (it did listen: the log line's address lookup failed), a
    ``ReactorNotRunning`` traceback when metrics failed the same way, and exited
    with status 0, as after a clean stop.  Either serve the dashboard there, or
    have check-config (and the start) refuse the key with a clear reason."""
    directory = Path(tempfile.mkdtemp(prefix="nj-fr-", dir="/tmp"))  # short socket paths
    try:
        sock = directory / "web.sock"
        config = directory / "c.toml"
        config.write_text(
            f"""
[storage]
data_dir = "{directory / "data"}"
[ssh]
listen = "tcp:0:interface=127.0.0.1"
[forwarding]
bind_address = "{MESH}"
[web]
listen = "unix:{sock}"
[metrics]
listen = ""
"""
        )
        checked = io.StringIO()
        if main(["check-config", str(config)], out=checked) == 1:
            return  # refused before any start: fine, if the message names the key
        with open(directory / "log", "wb") as log:
            process = subprocess.Popen(
                twistd_argv(config), stdout=log, stderr=subprocess.STDOUT, cwd=directory
            )
        try:
            wait_for(
                lambda: process.poll() is not None or "No members yet" in _text(directory / "log"),
                what="the server to start or stop",
            )
            time.sleep(0.5)
            alive = process.poll() is None
            answer = _get_over_unix_socket(sock, "/login") if alive else None
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=15)
        output = _text(directory / "log")
        assert alive, (
            f"check-config said OK, then the server exited {process.returncode}:\n"
            + (output[-1500:])
        )
        assert answer is not None and answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _get_over_unix_socket(path: Path, url: str) -> bytes | None:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(
                f"GET {url} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return None
