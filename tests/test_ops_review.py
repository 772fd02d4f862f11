"""From an adversarial review of the operator's side: what someone running
nekojump for months meets (bad files, a bad data directory, restarts, backups,
logs, permissions).

The tests that start a server run ``twistd nekojump`` from the same copy of
nekojump these tests import, on 127.0.0.62 (ports 33000-33999), loopback only.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent, globalLogPublisher

import nekojump
from nekojump.admin import main
from nekojump.config import ConfigError, load_config, parse_config
from nekojump.keys import fingerprint_of_blob
from nekojump.store import DB_NAME, SQLiteStore, schema_scripts
from tests.test_ssh_protocol import (
    MSG_GLOBAL_REQUEST,
    MSG_REQUEST_FAILURE,
    MSG_USERAUTH_REQUEST,
    World,
    forward_request,
)

HOST = "127.0.0.62"
#: The copy of nekojump these tests import: the server they start is the same one.
CODE_ROOT = str(Path(nekojump.__file__).resolve().parent.parent)


# -- helpers -------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` free TCP ports on HOST in 33000-33999."""
    found: list[int] = []
    start = 33000 + os.getpid() % 900
    for port in [*range(start, 34000), *range(33000, start)]:
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError("no free ports in 33000-33999")


def write_config(directory: Path, data_dir: Path) -> Path:
    ssh_port, web_port = free_ports(2)
    config = directory / "nekojump.toml"
    config.write_text(
        f"""
[storage]
data_dir = "{data_dir}"
[ssh]
listen = "tcp:{ssh_port}:interface={HOST}"
allowed_sources = ["127.0.0.0/8"]
[forwarding]
bind_address = "{HOST}"
port_min = 34000
port_max = 34999
[web]
listen = "tcp:{web_port}:interface={HOST}"
[metrics]
listen = ""
"""
    )
    return config


def twistd(config: Path, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": CODE_ROOT}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "nekojump",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env=env,
    )


def run_to_the_end(config: Path, cwd: Path) -> tuple[int, str]:
    process = twistd(config, cwd)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"twistd did not stop on its own:\n{output}")
    return process.returncode, output


# -- config files --------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path, capsys):
    """An accented letter saved in Latin-1 in a comment: load_config let
    UnicodeDecodeError out, so ``check-config`` and ``twistd`` printed a
    traceback instead of one line naming the file."""
    config = tmp_path / "nekojump.toml"
    config.write_bytes(b"# caf\xe9 (Latin-1)\n[ssh]\nuser = 'tunnel'\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert str(raised.value).startswith(str(config))
    assert main(["check-config", str(config)], out=io.StringIO()) == 1
    assert capsys.readouterr().err.startswith("nekojump-admin: ")


def test_check_config_refuses_a_listen_port_no_socket_can_have():
    """``tcp:99999`` passed check-config ("OK"); the start then failed with
    "bind(): port must be 0-65535"."""
    with pytest.raises(ConfigError) as raised:
        parse_config({"ssh": {"listen": "tcp:99999:interface=127.0.0.62"}}, "test.toml")
    assert "[ssh] listen" in str(raised.value)


# -- a data directory SQLite cannot use ------------------------------------------------


def damaged_data_dir(tmp_path: Path, damage: str) -> Path:
    """A data directory whose database is a foreign file, or a directory."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if damage == "not-a-database":
        (data_dir / DB_NAME).write_bytes(b"this is a backup tarball, not SQLite\n" * 300)
    else:
        (data_dir / DB_NAME).mkdir()
    return data_dir


@pytest.mark.parametrize("damage", ["not-a-database", "database-path-is-a-directory"])
def test_admin_cli_reports_an_unusable_database_in_one_line(tmp_path, capsys, damage):
    """sqlite3 errors (a corrupt or foreign file, a directory it cannot create
    files in) escaped ``main``: a traceback instead of exit status 1 and a message."""
    data_dir = damaged_data_dir(tmp_path, damage)
    code = main(["--data-dir", str(data_dir), "member", "list"], out=io.StringIO())
    assert code == 1
    assert capsys.readouterr().err.startswith("nekojump-admin: ")


@pytest.mark.parametrize("damage", ["not-a-database", "database-path-is-a-directory"])
def test_server_reports_an_unusable_database_in_one_line(tmp_path, damage):
    """tap.makeService turns OSError into "nekojump: cannot use data directory ...",
    but sqlite3's errors (the same situation: a directory the server user cannot
    write, a damaged file) came out as a traceback."""
    data_dir = damaged_data_dir(tmp_path, damage)
    code, output = run_to_the_end(write_config(tmp_path, data_dir), tmp_path)
    assert code != 0
    assert "Traceback" not in output, output
    assert f"nekojump: cannot use data directory {data_dir}" in output, output


def test_a_database_from_a_newer_release_is_refused(tmp_path, capsys):
    """After an upgrade is rolled back, the old code opened a database a newer
    release had migrated past and ran on it as if nothing were wrong."""
    data_dir = tmp_path / "data"
    SQLiteStore.open(data_dir).close()
    newer = max(version for version, _ in schema_scripts()) + 1
    db = sqlite3.connect(data_dir / DB_NAME)
    db.execute(f"PRAGMA user_version = {newer}")
    db.commit()
    db.close()
    assert main(["--data-dir", str(data_dir), "member", "list"], out=io.StringIO()) == 1
    assert "version" in capsys.readouterr().err


# -- permissions -----------------------------------------------------------------------


def test_a_data_directory_nekojump_creates_keeps_password_hashes_private(tmp_path):
    """Run outside the systemd unit (README's ``twistd -n nekojump``, a custom
    --data-dir), the data directory was made 0755 and the database 0644: every
    local user could read members' password hashes."""
    old = os.umask(0o022)
    try:
        data_dir = tmp_path / "fresh" / "nekojump-data"
        store = SQLiteStore.open(data_dir)
        store.add_member("alice", password_hash="scrypt$16384$8$1$00$00")
        store.close()
    finally:
        os.umask(old)
    dir_mode = data_dir.stat().st_mode
    db_mode = (data_dir / DB_NAME).stat().st_mode
    others_can_reach = dir_mode & 0o001 and db_mode & 0o004
    assert not others_can_reach, f"dir {oct(dir_mode)}, database {oct(db_mode)}"


# -- stopping --------------------------------------------------------------------------


def test_after_a_clean_stop_the_database_file_alone_holds_everything(tmp_path):
    """The server never closed its SQLite connection, so a clean SIGTERM left
    every change since the last checkpoint in nekojump.sqlite3-wal: a copy of
    nekojump.sqlite3 taken after ``systemctl stop`` lacked the newest members,
    and a backup copied back over it had the stale WAL replayed on top."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path, data_dir)
    process = twistd(config, tmp_path)
    try:
        deadline = time.monotonic() + 15
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "SSH on" in line:
                break
        assert process.poll() is None, "".join(lines)
        for name in ("ann", "bob", "cy"):
            assert main(["--config", str(config), "member", "add", name], out=io.StringIO()) == 0
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(data_dir / DB_NAME, copy / DB_NAME)
    db = sqlite3.connect(copy / DB_NAME)
    try:
        names = {row[0] for row in db.execute("SELECT name FROM members")}
    finally:
        db.close()
    assert names == {"ann", "bob", "cy"}


# -- logs ------------------------------------------------------------------------------


@pytest.fixture
def log_text():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: "\n".join(formatEvent(e) for e in events)
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def test_a_refused_ssh_login_leaves_a_log_line(world, log_text):
    """A member's "Permission denied (publickey)" left nothing in the log (only
    a metrics counter): the operator could not see who tried which key from where."""
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    recorder, pump, server = world.connect()
    for _ in range(world.config.ssh.max_auth_tries):
        recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(stranger))
        pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected
    fingerprint = fingerprint_of_blob(stranger.public().blob())
    assert any("127.0.0.1" in line and fingerprint in line for line in log_text().splitlines()), (
        log_text()
    )


def test_a_login_as_another_user_leaves_a_log_line(world, log_text):
    recorder, pump, server = world.connect()
    for _ in range(world.config.ssh.max_auth_tries):
        recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(world.key, user=b"root"))
        pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected
    assert any("127.0.0.1" in line and "root" in line for line in log_text().splitlines()), (
        log_text()
    )


def test_a_forward_the_os_cannot_bind_logs_the_os_reason(world, log_text):
    """With the mesh address missing (WireGuard down, a typo in bind_address)
    every forward was logged as "refused: port-unavailable" ("port N is in use on
    the jumphost"), hiding "Cannot assign requested address"."""
    reason = os.strerror(errno.EADDRNOTAVAIL)

    def cannot_bind(port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(errno.EADDRNOTAVAIL, reason))

    world.reactor.listenTCP = cannot_bind
    recorder, pump, _server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20080))
    pump.flush()
    assert recorder.count(MSG_REQUEST_FAILURE) == 1
    assert reason in log_text(), log_text()
