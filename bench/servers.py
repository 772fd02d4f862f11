"""The two jumphosts under test, and OpenSSH client tunnels into them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Processes, wait_until

BIN = Path(sys.executable).parent
SSH_HOST = "127.0.0.1"
KEX = "curve25519-sha256"
#: What an AEAD cipher reports as its MAC in ``ssh -v``.
IMPLICIT_MAC = "<implicit>"
#: twistd's log observer, as etc/nekojump.service gives it.
LOGGER = "--logger=nekojump.logs.text_observer"


def tool(name: str) -> str | None:
    beside = BIN / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def free_port(host: str = SSH_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """What the measurements need to know about a running jumphost."""

    name: str
    directory: Path
    procs: Processes
    user: str
    bind: str  # where forwards listen (the "mesh address")
    port_min: int
    port_max: int
    ssh_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    _next_port: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def take_port(self) -> int:
        """A forward port from the first 100 of the range (the rest is for the load generator)."""
        port = self.port_min + self._next_port
        self._next_port += 1
        assert self._next_port < 100
        return port

    @property
    def load_base_port(self) -> int:
        return self.port_min + 100

    def stop(self) -> None:
        if self.process is not None:
            self.procs.stop(self.process)

    def launch(self) -> None:
        raise NotImplementedError

    @property
    def host_key(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    def _make_host_key(self) -> Path:
        """A fresh ed25519 host key for a throwaway server (OpenSSH format)."""
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
            check=True,
            timeout=30,
        )
        return self.host_key

    def _wait_listening(self, what: str, log: Path) -> None:
        """Until the SSH port takes connections; if the process exits first, its log's end."""
        wait_until(
            lambda: can_connect(SSH_HOST, self.ssh_port) or self.process.poll() is not None,
            30,
            f"{what} to listen",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")

    def restart(self) -> None:
        """A fresh process (same config, keys and data), e.g. for clean memory baselines."""
        self.stop()
        self.launch()


class Nekojump(Server):
    def start(self, public_key: Path) -> None:
        data_dir = self.directory / "data"
        config = self.directory / "nekojump.toml"
        config.write_text(
            f"""\
[storage]
data_dir = "{data_dir}"
[ssh]
listen = "tcp:{self.ssh_port}:interface={SSH_HOST}"
allowed_sources = ["127.0.0.0/8"]
max_startups = 100
max_startups_per_source = 100
[forwarding]
bind_address = "{self.bind}"
port_min = {self.port_min}
port_max = {self.port_max}
max_forwards_per_member = 10000
[limits]
# One member holds every benchmark tunnel.
max_connections_per_member = 10000
[web]
listen = "tcp:0:interface=127.0.0.1"
[metrics]
listen = "tcp:0:interface=127.0.0.1"
"""
        )
        admin = tool("nekojump-admin")
        twistd = tool("twistd")
        if admin is None or twistd is None:
            raise RuntimeError("nekojump is not installed (no twistd / nekojump-admin)")
        for argv in (
            [admin, "--config", str(config), "member", "add", "bench"],
            [admin, "--config", str(config), "key", "add", "bench", str(public_key)],
        ):
            done = subprocess.run(
                argv, cwd=self.directory, capture_output=True, text=True, timeout=60
            )
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[2:])} failed: {done.stderr.strip()}")
        self.launch()

    def launch(self) -> None:
        config = self.directory / "nekojump.toml"
        twistd = tool("twistd")
        assert twistd is not None
        log = self.directory / "twistd.log"
        with open(log, "ab") as out:
            self.process = self.procs.spawn(
                [twistd, "-n", "--pidfile=", LOGGER, "nekojump", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        starts = log.read_text(errors="replace").count("SSH on")
        wait_until(
            lambda: (
                log.read_text(errors="replace").count("SSH on") > starts
                or self.process.poll() is not None
            ),
            60,
            "nekojump to listen",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"nekojump exited:\n{log.read_text(errors='replace')[-2000:]}")


class ConchReference(Server):
    """Bare Twisted Conch holding remote forwards (``bench/conch_reference.py``)."""

    #: Conch has no AES-GCM: the reference uses CTR with HMAC-SHA2-256.
    cipher = ("aes128-ctr", "hmac-sha2-256")

    def start(self, public_key: Path) -> None:
        self._make_host_key()
        self.public_key = public_key
        self.launch()

    def launch(self) -> None:
        log = self.directory / "conch.log"
        with open(log, "ab") as out:
            self.process = self.procs.spawn(
                [
                    sys.executable, "-m", "bench.conch_reference",
                    "--port", str(self.ssh_port), "--host", SSH_HOST,
                    "--host-key", str(self.host_key),
                    "--authorized-key", str(self.public_key),
                    "--user", self.user, "--bind", self.bind,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
        self._wait_listening("the Conch reference", log)


SSHD_CONFIG = """\
Port {port}
ListenAddress {host}
HostKey {host_key}
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
AllowTcpForwarding remote
GatewayPorts clientspecified
PermitListen {bind}:*
PermitOpen none
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTunnel no
PermitTTY no
PermitUserRC no
PermitUserEnvironment no
ForceCommand /bin/false
PrintMotd no
ClientAliveInterval 15
ClientAliveCountMax 3
LoginGraceTime 30
MaxAuthTries 6
MaxStartups 100
PerSourceMaxStartups 100
LogLevel INFO
"""

PRIVSEP_DIR = Path("/run/sshd")


class Sshd(Server):
    """A throwaway OpenSSH sshd, set up as a tunnel-only jumphost like nekojump."""

    made_privsep_dir = False

    @staticmethod
    def unavailable() -> str | None:
        """Why the sshd column cannot run, or None."""
        if not Path("/usr/sbin/sshd").exists():
            return "/usr/sbin/sshd is not installed (apt-get install openssh-server)"
        if os.geteuid() != 0:
            return "sshd needs root to run with privilege separation"
        return None

    def start(self, public_key: Path) -> None:
        host_key = self._make_host_key()
        authorized_keys = self.directory / "authorized_keys"
        authorized_keys.write_text(public_key.read_text())
        config = self.directory / "sshd_config"
        config.write_text(
            SSHD_CONFIG.format(
                port=self.ssh_port,
                host=SSH_HOST,
                host_key=host_key,
                authorized_keys=authorized_keys,
                user=self.user,
                bind=self.bind,
            )
        )
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            Sshd.made_privsep_dir = True
        check = subprocess.run(
            ["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t rejected the config: {check.stderr.strip()}")
        self.launch()

    def launch(self) -> None:
        config = self.directory / "sshd_config"
        log = self.directory / "sshd.log"
        self.process = self.procs.spawn(
            ["/usr/sbin/sshd", "-D", "-E", str(log), "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_listening("sshd", log)

    @classmethod
    def cleanup_privsep_dir(cls) -> None:
        if cls.made_privsep_dir:
            try:
                PRIVSEP_DIR.rmdir()
            except OSError:
                pass


class Tunnel:
    """``ssh -N -R ...`` (the real OpenSSH client) holding forwards for the benchmark.

    ``forwards`` maps a name to the local service port; each gets a remote port
    from the server's range.  ``via`` connects through a proxy port instead.
    """

    def __init__(
        self,
        server: Server,
        key: Path,
        forwards: dict[str, int],
        *,
        label: str,
        via: int | None = None,
        cipher: tuple[str, str] | None = None,
    ) -> None:
        self.server = server
        self.ports = {name: server.take_port() for name in forwards}
        self.log = server.directory / f"ssh-{label}.log"
        argv = [
            "/usr/bin/ssh",
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes",
            "-o", f"KexAlgorithms={KEX}",
            "-v",
            "-i", str(key),
            "-p", str(via or server.ssh_port),
            "-N",
        ]  # fmt: skip
        if cipher is not None:
            argv += ["-c", cipher[0]]
            if cipher[1] != IMPLICIT_MAC:
                argv += ["-m", cipher[1]]
        for name, local in forwards.items():
            argv += ["-R", f"{server.bind}:{self.ports[name]}:127.0.0.1:{local}"]
        argv.append(f"{server.user}@{SSH_HOST}")
        with open(self.log, "wb") as out:
            self.process = server.procs.spawn(argv, stdout=out, stderr=subprocess.STDOUT)
        wait_until(
            lambda: (
                self._log().count("remote forward success") >= len(forwards)
                or self.process.poll() is not None
            ),
            30,
            f"ssh {label} to hold its forwards",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"ssh {label} exited:\n{self._log()[-2000:]}")

    def _log(self) -> str:
        return self.log.read_text(errors="replace")

    def negotiated(self) -> dict[str, str]:
        """Kex, cipher and MAC the client reports for this connection (``ssh -v``)."""
        text = self._log()
        found = {}
        kex = re.search(r"kex: algorithm: (\S+)", text)
        if kex:
            found["kex"] = kex.group(1)
        sc = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", text)
        if sc:
            found["cipher"] = sc.group(1)
            found["mac"] = sc.group(2)
        version = re.search(r"Remote protocol version [^,]+, remote software version (\S+)", text)
        if version:
            found["server_software"] = version.group(1)
        return found

    def stop(self) -> None:
        self.server.procs.stop(self.process)
