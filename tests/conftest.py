"""Fixtures for end-to-end tests: a real ``twistd nekojump`` and the real OpenSSH client.

Everything listens on loopback.  The SSH listener is on 127.0.0.1 and the
"mesh address" where forwards bind is 127.0.0.2, so a test can tell them apart.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from twisted.logger import globalLogPublisher

T = TypeVar("T")

MESH_ADDRESS = "127.0.0.2"
SSH_HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """An installed command: next to this Python first, then on PATH."""
    beside = BIN / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "it") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def exchange(host: str, port: int, payload: bytes, source: str | None = None) -> bytes:
    """Send ``payload`` to an echo service through ``host:port``, half-close, read all."""
    with socket.create_connection(
        (host, port), timeout=10, source_address=(source, 0) if source else None
    ) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        sender.join()
        return b"".join(chunks)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class EchoServer(socketserver.ThreadingTCPServer):
    """The member's "local service": echoes whatever it receives."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def logged() -> Iterator[list[dict]]:
    """Every log event published while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Private key paths, made with the real ssh-keygen (mode 0600)."""
    directory = tmp_path_factory.mktemp("keys")
    made = {}
    for name, kind in [
        ("alice", "ed25519"),
        ("alice2", "ed25519"),
        ("bob", "ed25519"),
        ("stranger", "ed25519"),
        ("carol_rsa", "rsa"),
        ("dave_ecdsa", "ecdsa"),
    ]:
        path = directory / name
        subprocess.run(
            [tool("ssh-keygen"), "-q", "-t", kind, "-N", "", "-C", f"{name}@test", "-f", str(path)],
            check=True,
        )
        made[name] = path
    return made


@functools.cache
def fingerprint(key: Path) -> str:
    out = subprocess.run(
        [tool("ssh-keygen"), "-lf", f"{key}.pub"], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[1]


class Jumphost:
    """A ``twistd -n nekojump`` process with its own config and data directory."""

    def __init__(
        self,
        directory: Path,
        ssh_extra: str = "",
        forwarding_extra: str = "",
        ssh_port: int | None = None,
    ) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.ssh_port = ssh_port or free_port(SSH_HOST)
        self.port_min = random.randrange(20000, 50000, 100)
        self.port_max = self.port_min + 99
        self.reserved = self.port_min + 22
        self.config = directory / "nekojump.toml"
        self.write_config(ssh_extra, forwarding_extra)
        self.log = directory / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.clients: list[subprocess.Popen[bytes]] = []

    def write_config(
        self,
        ssh_extra: str = "",
        forwarding_extra: str = "",
        mesh_address: str = MESH_ADDRESS,
        web_port: int = 0,
        metrics_port: int = 0,
    ) -> None:
        """The server's config file: loopback only, forwards in this host's port range."""
        self.config.write_text(
            f"""
[storage]
data_dir = "{self.data_dir}"
[ssh]
listen = "tcp:{self.ssh_port}:interface={SSH_HOST}"
allowed_sources = ["127.0.0.0/8"]
{ssh_extra or "login_grace_time = 5"}
[forwarding]
bind_address = "{mesh_address}"
port_min = {self.port_min}
port_max = {self.port_max}
reserved_ports = [{self.reserved}]
{forwarding_extra}
[web]
listen = "tcp:{web_port}:interface=127.0.0.1"
public_hostname = "jump.test"
[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"
"""
        )

    def start(self, *twistd_options: str) -> Jumphost:
        self.log.write_text("")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    tool("twistd"),
                    "-n",
                    "--pidfile=",
                    *twistd_options,
                    "nekojump",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        wait_for(
            lambda: "SSH on" in self.log_text() or self.process.poll() is not None,
            what="nekojump to listen",
        )
        assert self.process.poll() is None, self.log_text()
        self.web_url = wait_for(
            lambda: self._logged_url("dashboard on"), what="the dashboard to listen"
        )
        self.metrics_url = (
            wait_for(lambda: self._logged_url("metrics on"), what="the metrics endpoint to listen")
            + "metrics"
        )
        # The lines above are logged before the reactor runs; an answer comes only
        # once it does, after its own start-up (the SIGCHLD pipe), so descriptors
        # counted from here on are the running server's.
        self.metrics()
        return self

    def _logged_url(self, what: str) -> str | None:
        """``http://host:port/`` from the start log, in text or JSON form."""
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("log_format", "").startswith(what):
                    return f"http://{event['host']}:{event['port']}/"
            elif match := re.search(what + r" (http://[^/\s]+/)", line):
                return match.group(1)
        return None

    def metrics(self) -> dict[str, float]:
        """The Prometheus endpoint's samples, as {'name{labels}': value}."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    # -- the admin CLI -------------------------------------------------------------

    def admin(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("nekojump-admin"), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=30,
        )

    def add_member(self, name: str, *keys: Path, password: str | None = None) -> None:
        if password is None:
            assert self.admin("member", "add", name).returncode == 0
        else:
            added = self.admin("member", "add", name, "--password-stdin", stdin=password + "\n")
            assert added.returncode == 0, added.stderr
        for key in keys:
            result = self.admin("key", "add", name, f"{key}.pub", "--description", key.name)
            assert result.returncode == 0, result.stderr

    # -- the OpenSSH client ----------------------------------------------------------

    def ssh_argv(
        self,
        key: Path,
        *args: str,
        user: str = "tunnel",
        command: tuple[str, ...] = (),
        port: int | None = None,
        program: str = "ssh",
    ) -> list[str]:
        return [
            tool(program),
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
            "-o",
            "LogLevel=INFO",
            "-i",
            str(key),
            "-p",
            str(port or self.ssh_port),
            *args,
            f"{user}@{SSH_HOST}",
            *command,
        ]

    def ssh(
        self,
        key: Path,
        *args: str,
        user: str = "tunnel",
        timeout: float = 20,
        stdin: bytes = b"",
        command: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ssh to completion."""
        return subprocess.run(
            self.ssh_argv(key, *args, user=user, command=command),
            input=stdin,
            capture_output=True,
            timeout=timeout,
        )

    def ssh_background(
        self, key: Path, *args: str, port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``ssh -N`` holding forwards (to ``port``, e.g. a proxy); stopped after the test."""
        process = subprocess.Popen(
            self.ssh_argv(key, "-N", "-o", "ExitOnForwardFailure=yes", *args, port=port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.clients.append(process)
        return process

    def forward(self, key: Path, port: int, target_port: int) -> subprocess.Popen[bytes]:
        """``ssh -N -R port:127.0.0.1:target_port``, waiting until this key holds the port.

        Whether the port accepts connections is no proof: a listener that was
        just released may still be closing.  The server's live-forwards table is.
        """
        process = self.ssh_background(key, "-R", f"{port}:127.0.0.1:{target_port}")
        expected = fingerprint(key)
        wait_for(
            lambda: process.poll() is not None or self.holder_of(port) == expected,
            what=f"forward on {port}",
        )
        assert process.poll() is None, process.stderr.read().decode()
        return process

    def holder_of(self, port: int) -> str | None:
        """The key fingerprint the running server says holds ``port``."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.data_dir / 'nekojump.sqlite3'}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT key_fingerprint FROM live_forwards WHERE port = ?", (port,)
            ).fetchone()
        finally:
            db.close()
        return row[0] if row else None

    def autossh(self, key: Path, port: int, target_port: int, via: int | None = None):
        """The seed's systemd-unit autossh line, optionally through a proxy port."""
        argv = self.ssh_argv(
            key,
            "-M",
            "0",
            "-N",
            "-o",
            "ServerAliveInterval=30",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"{port}:127.0.0.1:{target_port}",
            port=via,
            program="autossh",
        )
        # Without GATETIME=0 autossh gives up if the first ssh dies within 30 s.
        env = {**os.environ, "AUTOSSH_GATETIME": "0"}
        process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.clients.append(process)
        return process

    def close_clients(self) -> None:
        for process in self.clients:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    # Seen once under heavy load: ssh stuck after SIGTERM. The test's
                    # assertions are done; don't let cleanup fail it.
                    print(f"ssh {process.pid} ignored SIGTERM for 5 s; killing it")
                    process.kill()
                    process.wait(timeout=5)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def jumphost(tmp_path: Path) -> Iterator[Jumphost]:
    """A running nekojump on loopback; members alice (two keys) and bob."""
    host = Jumphost(tmp_path)
    yield host
    host.close_clients()
    host.stop()


@pytest.fixture
def running(jumphost: Jumphost, keys: dict[str, Path]) -> Jumphost:
    jumphost.add_member("alice", keys["alice"], keys["alice2"])
    jumphost.add_member("bob", keys["bob"])
    # Logging as etc/nekojump.service does (other fixtures keep twistd's default).
    return jumphost.start("--logger=nekojump.logs.text_observer")


@pytest.fixture
def compat(tmp_path: Path, keys: dict[str, Path]) -> Iterator[Jumphost]:
    """A running nekojump that also offers the compatibility ciphers (AES-CTR with ETM
    MACs, chacha20-poly1305); member alice."""
    yield from alice_on_host(
        tmp_path, keys, "login_grace_time = 5\ncompat_ctr_ciphers = true\nchacha20_poly1305 = true"
    )


def alice_on_host(tmp_path: Path, keys: dict[str, Path], ssh_extra: str) -> Iterator[Jumphost]:
    """For fixtures: a running nekojump with these extra [ssh] lines and member alice."""
    host = Jumphost(tmp_path, ssh_extra=ssh_extra)
    host.add_member("alice", keys["alice"])
    host.start()
    yield host
    host.close_clients()
    host.stop()


def exited_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


os.environ.setdefault("LC_ALL", "C.UTF-8")
