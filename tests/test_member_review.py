"""A member's acceptance walk-through: what the dashboard tells a member to do must work
as the page says (each test failed before its fix).

In memory: the How to Connect card and key pasting.  End to end (real OpenSSH client,
real autossh, a real nekojump): the copied autossh command and the Live tunnels card.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import (
    MESH_ADDRESS,
    SSH_HOST,
    EchoServer,
    Jumphost,
    _Echo,
    exchange,
    fingerprint,
    free_port,
    wait_for,
)
from tests.test_web_api import (  # noqa: F401
    hold_port,
    public_key_text,
    registry,
    site,
)

# -- How to Connect ----------------------------------------------------------------------


def test_how_to_connect_keeps_the_port_of_the_members_own_live_tunnel(site, registry):  # noqa: F811
    """A member runs the one-off command from How to Connect, sees it work, and comes
    back for the autossh line or the systemd unit (the seed's "Keeping the tunnel alive").
    The card must still show the port their tunnel holds: before, it moved on to the next
    free port as soon as the member's own tunnel held the suggested one, so the autossh
    line, the unit and "Members then reach it at ..." all named a port nobody serves."""
    store, client = site
    alice = client("alice")
    assert alice.post("/keys", {"public_key": public_key_text()})[0] == 201
    code, before = alice.get("/connect")
    assert code == 200
    port = before["port"]

    hold_port(registry, store, "alice", port)  # alice runs the one-off command

    code, after = alice.get("/connect")
    assert code == 200
    assert after["port"] == port, (
        f"How to Connect now says port {after['port']} ({after['autossh']!r}), "
        f"but the member's tunnel holds {port}"
    )
    assert after["reach"].endswith(f":{port}")


# -- pasting a key -----------------------------------------------------------------------


def rfc4716(openssh_line: str, comment: str = "eddsa-key-20250101") -> str:
    """The key as PuTTYgen's "Save public key" (and ``ssh-keygen -e``) writes it:
    RFC 4716, base64 wrapped at 64 columns between BEGIN/END lines."""
    data = openssh_line.split()[1]
    lines = [data[i : i + 64] for i in range(0, len(data), 64)]
    return "\r\n".join(
        [
            "---- BEGIN SSH2 PUBLIC KEY ----",
            f'Comment: "{comment}"',
            *lines,
            "---- END SSH2 PUBLIC KEY ----",
            "",
        ]
    )


def test_a_putty_public_key_file_is_not_refused_as_two_keys(site):  # noqa: F811
    """A Windows member pastes the public key file PuTTYgen saved (RFC 4716). That is
    one public key; before, it was refused with "paste exactly one public key, on one
    line", which sends the member looking for a second key that is not there. Either
    take the key, or say what the format is and how to get the OpenSSH line."""
    _store, client = site
    alice = client("alice")
    line = public_key_text("alice@windows")
    code, body = alice.post("/keys", {"public_key": rfc4716(line), "description": "pc"})
    if code == 201:
        from nekojump.keys import parse_public_key

        assert body["fingerprint"] == parse_public_key(line).fingerprint
        return
    assert code == 400, body
    message = body["message"]
    assert "exactly one" not in message, message
    assert any(word in message for word in ("PuTTY", "SSH2", "RFC 4716", "ssh-keygen -i")), message


# -- end to end: the copied commands and the Live tunnels card --------------------------


def api(host: Jumphost, token: str, path: str, body: object | None = None) -> object:
    request = urllib.request.Request(
        host.web_url + "api/v1" + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def token_for(host: Jumphost, name: str) -> str:
    made = host.admin("token", "create", name)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().split()[-1]


HERMETIC = (
    " -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
)


def as_member_runs_it(command: str, key: Path, local_port: int) -> str:
    """The page's command with what a member substitutes: their key file and the local
    port of their service; plus options that keep the test away from ~/.ssh."""
    return (
        command.replace("~/.ssh/nekotopia_jump", str(key)).replace(
            "localhost:8000", f"127.0.0.1:{local_port}"
        )
        + HERMETIC
    )


def end_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the process group this test started (the shell, autossh, its ssh)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def loopback_host(tmp_path: Path, keys: dict[str, Path]):
    """A running nekojump whose public host name is the SSH listener's loopback address,
    so the commands of How to Connect run as shown; members alice and bob."""
    host = Jumphost(tmp_path)
    host.config.write_text(
        host.config.read_text().replace(
            'public_hostname = "jump.test"', f'public_hostname = "{SSH_HOST}"'
        )
    )
    host.add_member("alice", keys["alice"])
    host.add_member("bob", keys["bob"])
    host.start()
    yield host
    host.close_clients()
    host.stop()


@pytest.mark.e2e
def test_the_autossh_command_from_how_to_connect_retries_a_refused_port(
    loopback_host: Jumphost,
    keys: dict[str, Path],
    echo: EchoServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
):
    """How to Connect: "with ExitOnForwardFailure=yes ssh exits and autossh retries" (and
    docs/member.md: "a refused port makes ssh exit and autossh retry"). Run the autossh
    line as shown while another member holds the port: before, autossh gave up at once
    ("ssh exited prematurely with status 255; autossh exiting": autossh's first-run gate,
    AUTOSSH_GATETIME, is 30 s) and the member's tunnel never came up."""
    host = loopback_host
    token = token_for(host, "alice")
    port = host.port_min + 40
    api(host, token, "/ports", {"port": port, "description": "web"})
    command = api(host, token, "/connect")["autossh"]
    assert f"-R {port}:" in command and f"@{SSH_HOST}" in command, command

    bob = host.forward(keys["bob"], port, echo.port)  # someone else holds it for now

    home = tmp_path / "member-home"
    home.mkdir()
    autossh = subprocess.Popen(
        ["bash", "-c", as_member_runs_it(command, keys["alice"], echo.port)],
        env={"PATH": os.environ["PATH"], "HOME": str(home), "LC_ALL": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: autossh and its ssh end with it
    )
    request.addfinalizer(lambda: end_group(autossh))
    time.sleep(4)  # ssh is refused within a second; autossh must still be there
    assert autossh.poll() is None, (
        "autossh gave up instead of retrying: " + autossh.stderr.read().decode(errors="replace")
    )

    bob.terminate()
    bob.wait(timeout=10)
    wait_for(
        lambda: host.holder_of(port) == fingerprint(keys["alice"]),
        timeout=20,
        what="autossh to get the port once it was free",
    )


@pytest.mark.e2e
def test_live_tunnels_stops_reporting_refused_once_the_local_service_answers(
    loopback_host: Jumphost, keys: dict[str, Path]
):
    """docs/member.md: Live tunnels' "your local service refused the connection" means
    nothing listens on the local port. The member starts the service; connections now
    get through (Check says REACHABLE), yet before, the row kept saying, undated, that
    the local service refused, for the life of the tunnel."""
    host = loopback_host
    token = token_for(host, "alice")
    port = host.port_min + 41
    local = free_port()
    host.forward(keys["alice"], port, local)

    with socket.create_connection((MESH_ADDRESS, port), timeout=5) as mesh:
        assert mesh.recv(10) == b""  # the local service is down: closed promptly

    def row() -> dict:
        (tunnel,) = api(host, token, "/tunnels")["tunnels"]
        return tunnel

    wait_for(lambda: row()["last_error"], what="the refusal to be reported")

    # The member starts the service on the port the tunnel forwards to.
    service = socketserver.ThreadingTCPServer(("127.0.0.1", local), _Echo)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    try:
        assert exchange(MESH_ADDRESS, port, b"hello") == b"hello"
        time.sleep(0.2)
        tunnel = row()
        assert tunnel["connections_total"] >= 2
        assert tunnel["last_error"] is None, (
            f"Live tunnels still says {tunnel['last_error']!r} after a connection got "
            "through to the local service"
        )
    finally:
        service.shutdown()
        service.server_close()
