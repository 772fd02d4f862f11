"""Compatibility review: the member guide's tunnel with the clients members' routers and
Windows boxes run, dropbear's ``dbclient`` and PuTTY's ``plink``.

Needs the Debian packages ``dropbear-bin`` (dbclient, dropbearconvert; 2022.83) and
``putty-tools`` (plink, puttygen; 0.78); each test skips when its client is missing.

* Debian 12's dbclient offers chacha20-poly1305, aes128-ctr and aes256-ctr with
  hmac-sha1 and hmac-sha2-256 (no ETM, no AES-GCM); the shipped ``etc/nekojump.toml``
  offers AES-GCM only (what OpenSSH clients are fastest with), so dbclient stops at
  "No matching algo enc c->s".  Kept as the operator's choice; the server's log now
  names the setting that serves it (``test_dbclient_without_a_common_cipher_...``).
* With ``chacha20_poly1305 = true``, dbclient failed: it sends a KEX_ECDH_INIT guess
  with ``first_kex_packet_follows``; by RFC 4253 section 7 (both sides' first kex and
  host key algorithms) the guess is wrong here, so dbclient sends it again, and nekojump
  refused the second one ("strict KEX violation: unexpected key exchange message 30").
  Fixed; ``test_dbclient_holds_a_forward_when_chacha20_is_offered`` failed before.
* ``test_plink_member_guide_flow`` passed from the start: plink does everything the
  guide promises.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import (
    MESH_ADDRESS,
    SSH_HOST,
    Jumphost,
    alice_on_host,
    can_connect,
    exchange,
    exited_within,
    fingerprint,
    tool,
    wait_for,
)

pytestmark = pytest.mark.e2e

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "nekojump.toml"


def hermetic_env(home: Path) -> dict[str, str]:
    """No agent, no user config or known hosts: only what the test passes."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)
    return env


def host_key_fingerprint(host: Jumphost) -> str:
    return re.search(r"host key (SHA256:\S+)", host.log_text()).group(1)


def output(process: subprocess.Popen[bytes]) -> str:
    """What a finished (or just ended) client printed."""
    if process.poll() is None:
        process.terminate()
    stdout, stderr = process.communicate(timeout=10)
    return (stdout + stderr).decode(errors="replace")


def port_free(host: Jumphost, port: int) -> bool:
    return host.holder_of(port) is None and not can_connect(MESH_ADDRESS, port)


# -- dropbear's dbclient ---------------------------------------------------------------


def dropbear_key(key: Path, directory: Path) -> Path:
    converted = directory / f"{key.name}.dropbear"
    subprocess.run(
        [tool("dropbearconvert"), "openssh", "dropbear", str(key), str(converted)],
        check=True,
        capture_output=True,
    )
    return converted


def dbclient(host: Jumphost, key: Path, home: Path, *args: str) -> subprocess.Popen[bytes]:
    """``dbclient -N`` as a router would run it, without host key checks (``-y -y``)."""
    argv = [tool("dbclient"), "-y", "-y", "-i", str(key), "-p", str(host.ssh_port), "-N"]
    return started_client(host, [*argv, *args, f"tunnel@{SSH_HOST}"], home)


def started_client(host: Jumphost, argv: list[str], home: Path) -> subprocess.Popen[bytes]:
    """``argv`` running with ``home`` as its home, stopped after the test."""
    process = subprocess.Popen(
        argv,
        env=hermetic_env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    host.clients.append(process)
    return process


@pytest.fixture
def chacha(tmp_path, keys):
    """nekojump offering chacha20-poly1305 (the only cipher dbclient shares); member alice."""
    yield from alice_on_host(tmp_path, keys, "login_grace_time = 5\nchacha20_poly1305 = true")


def test_dbclient_without_a_common_cipher_is_refused_and_the_log_names_the_fix(
    tmp_path, keys, echo
):
    """With the shipped cipher settings (AES-GCM only) dbclient finds no cipher in
    common and says so; the operator's log says what it offered and which setting
    serves it, instead of a bare "couldn't match all kex parts"."""
    tool("dbclient")
    shipped = tomllib.loads(SHIPPED_CONFIG.read_text()).get("ssh", {})
    flags = {name: shipped.get(name, False) for name in ("chacha20_poly1305", "compat_ctr_ciphers")}
    assert flags == {"chacha20_poly1305": False, "compat_ctr_ciphers": False}
    host = Jumphost(tmp_path, ssh_extra="login_grace_time = 5\n")
    host.add_member("alice", keys["alice"])
    host.start()
    try:
        key = dropbear_key(keys["alice"], tmp_path)
        process = dbclient(host, key, tmp_path, "-R", f"{host.port_min + 1}:127.0.0.1:{echo.port}")
        assert exited_within(process, 10)
        assert "No matching algo enc" in output(process)
        said = wait_for(
            lambda: "no cipher in common" in host.log_text() and host.log_text(),
            what="the server's log line",
        )
        assert "dropbear" in said and "chacha20-poly1305@openssh.com" in said
        assert "[ssh] chacha20_poly1305 = true serves it" in said
    finally:
        host.close_clients()
        host.stop()


def test_dbclient_holds_a_forward_when_chacha20_is_offered(chacha, keys, echo, tmp_path):
    """Failed before the fix: dbclient's wrongly guessed key exchange packet was not ignored.

    dbclient sets ``first_kex_packet_follows`` and sends KEX_ECDH_INIT for its first
    choice, curve25519-sha256.  nekojump's first is mlkem768x25519-sha256, so by RFC 4253
    section 7 the guess is wrong: dbclient sends KEX_ECDH_INIT again after nekojump's
    KEXINIT, and nekojump must drop the guessed one.  nekojump instead judges the guess
    by the negotiated algorithm (right, to it), answers the guess, and ends the
    connection at the second packet.
    """
    host = chacha
    key = dropbear_key(keys["alice"], tmp_path)
    port = host.port_min + 2
    process = dbclient(
        host, key, tmp_path, "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:{echo.port}"
    )
    wait_for(
        lambda: process.poll() is not None or host.holder_of(port) == fingerprint(keys["alice"]),
        what="dbclient's forward",
    )
    if process.poll() is not None:
        violations = re.findall(r"reason: (b'[^']*')", host.log_text())
        pytest.fail(
            f"dbclient exited ({process.returncode}): {output(process).strip()!r}; "
            f"nekojump disconnected it with {violations}"
        )
    payload = os.urandom(512 * 1024)
    assert exchange(MESH_ADDRESS, port, payload) == payload
    process.terminate()
    process.wait(timeout=5)
    wait_for(lambda: port_free(host, port), timeout=2, what="the port to be freed")


# -- PuTTY's plink ---------------------------------------------------------------------


def putty_key(key: Path, directory: Path) -> Path:
    converted = directory / f"{key.name}.ppk"
    subprocess.run(
        [tool("puttygen"), str(key), "-O", "private", "-o", str(converted)],
        check=True,
        capture_output=True,
    )
    return converted


def plink(host: Jumphost, key: Path, home: Path, *args: str) -> subprocess.Popen[bytes]:
    """``plink -batch -N`` accepting the jumphost's key by fingerprint, with PuTTY's own
    keepalives every second (a saved session: plink has no command-line option)."""
    sessions = home / ".putty" / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    (sessions / "tunnel").write_text("PingIntervalSecs\\1\\\nPingInterval\\0\\\n")
    argv = [tool("plink"), "-load", "tunnel", "-batch", "-v", "-N", "-noagent"]
    argv += ["-hostkey", host_key_fingerprint(host), "-i", str(key), "-P", str(host.ssh_port)]
    return started_client(host, [*argv, *args, f"tunnel@{SSH_HOST}"], home)


@pytest.fixture
def short_keepalives(tmp_path, keys):
    """Server keepalives every second, a client silent for 3 s is dropped; alice has an
    ed25519 and an RSA key."""
    host = Jumphost(
        tmp_path,
        ssh_extra="login_grace_time = 5\nclient_alive_interval = 1\nclient_alive_count_max = 2",
    )
    host.add_member("alice", keys["alice"], keys["carol_rsa"])
    host.start()
    yield host
    host.close_clients()
    host.stop()


def test_plink_member_guide_flow(short_keepalives, keys, echo, tmp_path):
    """PASSES: plink 0.78 with ed25519 and RSA keys does what the member guide promises."""
    host = short_keepalives
    ed25519, rsa = putty_key(keys["alice"], tmp_path), putty_key(keys["carol_rsa"], tmp_path)
    port, outside = host.port_min + 3, host.port_min - 1
    target = f"127.0.0.1:{echo.port}"

    # A forward held and reachable, a refused one reported; the session stays up
    # past the server's keepalive deadline (plink answers keepalive@openssh.com).
    first = plink(host, ed25519, tmp_path, "-R", f"{port}:{target}", "-R", f"{outside}:{target}")
    wait_for(
        lambda: first.poll() is not None or host.holder_of(port) == fingerprint(keys["alice"]),
        what="plink's forward",
    )
    assert first.poll() is None, output(first)
    payload = os.urandom(512 * 1024)
    assert exchange(MESH_ADDRESS, port, payload) == payload
    time.sleep(4)
    assert first.poll() is None and host.holder_of(port) == fingerprint(keys["alice"])

    # Reconnecting while the jumphost still sees the old (frozen) connection gets the
    # port back at once.
    first.send_signal(signal.SIGSTOP)  # a laptop whose network went away
    second = plink(host, ed25519, tmp_path, "-R", f"{port}:{target}")
    wait_for(
        lambda: second.poll() is not None or "taken over" in host.log_text(),
        what="the reconnect to take the port over",
    )
    assert second.poll() is None, output(second)
    assert exchange(MESH_ADDRESS, port, b"back") == b"back"
    first.send_signal(signal.SIGCONT)
    said = output(first)
    assert f"Forward refused: port {outside} is outside the allowed range" in said, said

    # Closing the client frees the port at once.
    second.terminate()
    second.wait(timeout=5)
    wait_for(lambda: port_free(host, port), timeout=2, what="the port to be freed")

    # An RSA key works too (rsa-sha2-*); a key nekojump does not know is refused cleanly.
    with_rsa = plink(host, rsa, tmp_path, "-R", f"{port}:{target}")
    wait_for(
        lambda: (
            with_rsa.poll() is not None or host.holder_of(port) == fingerprint(keys["carol_rsa"])
        ),
        what="plink's forward with the RSA key",
    )
    assert with_rsa.poll() is None, output(with_rsa)
    assert exchange(MESH_ADDRESS, port, b"rsa") == b"rsa"
    stranger = plink(
        host, putty_key(keys["stranger"], tmp_path), tmp_path, "-R", f"{port}:{target}"
    )
    assert exited_within(stranger, 10)
    said = output(stranger)
    assert stranger.returncode == 1
    assert "Server refused our key" in said and "No supported authentication methods" in said, said
