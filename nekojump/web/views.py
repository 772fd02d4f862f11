"""Pure builders for what the dashboard and API show: commands, rows, suggestions."""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

from attrs import frozen

from nekojump.model import KeyRecord, RegisteredPort
from nekojump.policy import ForwardRules
from nekojump.ssh.registry import ActiveForward

DEFAULT_KEY_PATH = "~/.ssh/nekotopia_jump"
DEFAULT_LOCAL_PORT = 8000


@frozen
class ConnectInfo:
    """Everything a member needs to copy: filled-in ssh, autossh, systemd, config."""

    hostname: str
    ssh_port: int
    user: str
    port: int
    mesh_address: str
    host_key: str  # "ssh-ed25519 AAAA..."
    key_path: str = DEFAULT_KEY_PATH
    local_port: int = DEFAULT_LOCAL_PORT

    @property
    def forward(self) -> str:
        return f"{self.port}:localhost:{self.local_port}"

    @property
    def target(self) -> str:
        return f"{self.user}@{self.hostname}"

    def ssh_command(self) -> str:
        return f"ssh -N -p {self.ssh_port} -R {self.forward} -i {self.key_path} {self.target}"

    def autossh_command(self) -> str:
        # autossh gives up if ssh fails within its first 30 s (AUTOSSH_GATETIME):
        # a port still held by the member's old session, or by someone else,
        # would end it for good instead of being retried.
        return (
            "AUTOSSH_GATETIME=0 autossh -M 0 -N \\\n"
            '  -o "ServerAliveInterval 30" \\\n'
            '  -o "ServerAliveCountMax 3" \\\n'
            "  -o ExitOnForwardFailure=yes \\\n"
            f"  -p {self.ssh_port} -R {self.forward} \\\n"
            f"  -i {self.key_path} \\\n"
            f"  {self.target}"
        )

    def systemd_unit(self) -> str:
        key = self.key_path.replace("~", "/home/youruser", 1)
        return (
            "# /etc/systemd/system/nekotopia-tunnel.service\n"
            "[Unit]\n"
            "Description=Nekotopia jumphost tunnel\n"
            "After=network-online.target\n"
            "Wants=network-online.target\n"
            "\n"
            "[Service]\n"
            "ExecStart=/usr/bin/autossh -M 0 -N \\\n"
            "    -o ServerAliveInterval=30 \\\n"
            "    -o ServerAliveCountMax=3 \\\n"
            "    -o ExitOnForwardFailure=yes \\\n"
            f"    -p {self.ssh_port} -R {self.forward} \\\n"
            f"    -i {key} \\\n"
            f"    {self.target}\n"
            "Restart=always\n"
            "RestartSec=10\n"
            "User=youruser\n"
            "\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n"
        )

    def ssh_config(self) -> str:
        return (
            "Host nekotopia-tunnel\n"
            f"    HostName {self.hostname}\n"
            f"    Port {self.ssh_port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.key_path}\n"
            "    IdentitiesOnly yes\n"
            f"    RemoteForward {self.port} localhost:{self.local_port}\n"
            "    ExitOnForwardFailure yes\n"
            "    ServerAliveInterval 30\n"
            "    ServerAliveCountMax 3\n"
            "    SessionType none\n"
        )

    def known_hosts(self) -> str:
        host = self.hostname if self.ssh_port == 22 else f"[{self.hostname}]:{self.ssh_port}"
        return f"{host} {self.host_key}"

    def reach(self) -> str:
        return f"{self.mesh_address}:{self.port}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "ssh_port": self.ssh_port,
            "user": self.user,
            "port": self.port,
            "mesh_address": self.mesh_address,
            "reach": self.reach(),
            "ssh": self.ssh_command(),
            "autossh": self.autossh_command(),
            "systemd_unit": self.systemd_unit(),
            "ssh_config": self.ssh_config(),
            "known_hosts": self.known_hosts(),
        }


def suggest_port(
    mine: list[RegisteredPort],
    taken: Container[int],
    rules: ForwardRules,
    live: list[int] = (),
) -> int:
    """The member's first registered port, else the port their first live
    tunnel holds (the commands they come back for must name the port they
    use), else the first free one from port_min + 80."""
    if mine:
        return mine[0].port
    if live:
        return min(live)
    span = rules.port_max - rules.port_min + 1
    start = min(80, span - 1)
    for offset in range(span):
        port = rules.port_min + (start + offset) % span
        if port not in taken and port not in rules.reserved_ports:
            return port
    return rules.port_min


def key_row(key: KeyRecord) -> dict[str, Any]:
    return {
        "fingerprint": key.fingerprint,
        "type": key.key_type,
        "description": key.description,
        "member": key.member_name,
        "added_at": key.created_at,
        "last_used_at": key.last_used_at,
    }


#: A registered port's state: its member's tunnel holds it, nobody's, or another member's.
PORT_UP, PORT_DOWN, PORT_HELD_BY_OTHER = "up", "down", "held-by-other"


def port_state(port: RegisteredPort, holder: str | None) -> str:
    """Up only while the member who registered ``port`` holds it; someone else's
    tunnel on it is not that member's service, so it is never shown as theirs."""
    if holder is None:
        return PORT_DOWN
    return PORT_UP if holder == port.member_name else PORT_HELD_BY_OTHER


def port_row(port: RegisteredPort, state: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "port": port.port,
        "member": port.member_name,
        "description": port.description,
        "registered_at": port.created_at,
    }
    if state is not None:
        row["live"] = state == PORT_UP
        row["state"] = state
    return row


def tunnel_rows(forwards: Iterable[ActiveForward]) -> list[dict[str, Any]]:
    return [
        {
            "port": f.port,
            "bind_address": f.bind_address,
            "member": f.avatar.identity.member_name,
            "key": f.avatar.identity.key_description,
            "key_fingerprint": f.avatar.identity.fingerprint,
            "source": f.avatar.source,
            "since": f.since,
            "open_connections": f.open_connections,
            "connections_total": f.connections_total,
            "bytes_in": f.bytes_from_member,
            "bytes_out": f.bytes_to_member,
            "last_error": f.last_error,
        }
        for f in forwards
    ]
