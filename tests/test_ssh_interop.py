"""Other SSH clients against nekojump: asyncssh and paramiko hold a forward.

Each forces one cipher, so every AEAD cipher (and CTR + ETM in compat mode)
is shown to interoperate.  Skipped when the library is not installed.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time

import pytest

from tests.conftest import MESH_ADDRESS, SSH_HOST, exchange, fingerprint, wait_for

pytestmark = pytest.mark.e2e

AEAD = ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com"]


# -- asyncssh ------------------------------------------------------------------------


def _asyncssh_forward(host, key, port, target, cipher, mac=None):
    asyncssh = pytest.importorskip("asyncssh")

    async def run() -> tuple[str, str]:
        options = {"encryption_algs": [cipher]}
        if mac:
            options["mac_algs"] = [mac]
        async with asyncssh.connect(
            SSH_HOST,
            host.ssh_port,
            username="tunnel",
            client_keys=[str(key)],
            known_hosts=None,
            agent_path=None,
            **options,
        ) as conn:
            listener = await conn.forward_remote_port("", port, "127.0.0.1", target)
            await asyncio.to_thread(
                wait_for, lambda: host.holder_of(port) == fingerprint(key), 10, "forward"
            )
            payload = os.urandom(256 * 1024)
            echoed = await asyncio.to_thread(exchange, MESH_ADDRESS, port, payload)
            assert echoed == payload
            listener.close()
            return conn.get_extra_info("send_cipher"), conn.get_extra_info("send_mac")

    return asyncio.run(run())


@pytest.mark.parametrize("cipher", AEAD)
def test_asyncssh_forwards_with_each_aead_cipher(request, keys, echo, cipher):
    # chacha20-poly1305 is offered only by the jumphost with compatibility ciphers.
    running = request.getfixturevalue("compat" if cipher.startswith("chacha") else "running")
    port = running.port_min + 40 + AEAD.index(cipher)
    used, _mac = _asyncssh_forward(running, keys["alice"], port, echo.port, cipher)
    assert used == cipher


def test_asyncssh_compat_ctr_etm(compat, keys, echo):
    port = compat.port_min + 45
    used, mac = _asyncssh_forward(
        compat, keys["alice"], port, echo.port, "aes128-ctr", "hmac-sha2-256-etm@openssh.com"
    )
    assert (used, mac) == ("aes128-ctr", "hmac-sha2-256-etm@openssh.com")


# -- paramiko ------------------------------------------------------------------------


def _relay(channel, target: int, stop: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", target), timeout=10) as sock:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([channel, sock], [], [], 0.2)
            if channel in ready:
                data = channel.recv(65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    break
                sock.sendall(data)
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                channel.sendall(data)
        while not stop.is_set() and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            channel.sendall(data)
    channel.close()


def _paramiko_forward(host, key, port, target, cipher, mac=None):
    paramiko = pytest.importorskip("paramiko")
    client = paramiko.Transport((SSH_HOST, host.ssh_port))
    options = client.get_security_options()
    options.ciphers = (cipher,)
    if mac:
        options.digests = (mac,)
    stop = threading.Event()
    try:
        client.connect(username="tunnel", pkey=paramiko.Ed25519Key.from_private_key_file(str(key)))
        assert client.request_port_forward("", port) == port
        wait_for(lambda: host.holder_of(port) == fingerprint(key), what="paramiko forward")
        payload = os.urandom(256 * 1024)
        result: list[bytes] = []
        asker = threading.Thread(
            target=lambda: result.append(exchange(MESH_ADDRESS, port, payload))
        )
        asker.start()
        channel = client.accept(timeout=10)
        assert channel is not None
        _relay(channel, target, stop)
        asker.join(timeout=30)
        assert result == [payload]
        return client.remote_cipher, client.remote_mac, client.agreed_on_strict_kex
    finally:
        stop.set()
        client.close()


@pytest.mark.parametrize("cipher", ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com"])
def test_paramiko_forwards_with_gcm_and_strict_kex(running, keys, echo, cipher):
    port = running.port_min + 50 + AEAD.index(cipher)
    used, _mac, strict = _paramiko_forward(running, keys["alice"], port, echo.port, cipher)
    assert used == cipher
    assert strict


@pytest.mark.parametrize("mac", ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"])
def test_paramiko_compat_ctr_etm(compat, keys, echo, mac):
    port = compat.port_min + 55 + (mac.startswith("hmac-sha2-512"))
    used, used_mac, strict = _paramiko_forward(
        compat, keys["alice"], port, echo.port, "aes256-ctr", mac
    )
    assert (used, used_mac, strict) == ("aes256-ctr", mac, True)


def test_paramiko_logs_in_when_its_first_key_is_not_registered(running, keys):
    """paramiko asks for ssh-userauth again before each key it tries."""
    paramiko = pytest.importorskip("paramiko")
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(
            SSH_HOST,
            running.ssh_port,
            username="tunnel",
            pkey=paramiko.Ed25519Key.from_private_key_file(str(keys["stranger"])),
            key_filename=[str(keys["alice"])],
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
            auth_timeout=10,
        )
        assert client.get_transport().is_authenticated()
    finally:
        client.close()
