"""Review of the upload fast path (fc54414, 85a40ac), the shared SSH read
buffer (a9f2aaf) and closeReceived (0bfe3fa).

No defect in those commits was reproduced, so nothing here fails.  These
are the checks the review ran, kept as regression tests (each was checked
to fail against a deliberately broken copy where it applies):

* every read of the SSH socket handed over as a view of one buffer that is
  overwritten right after (version exchange, kex, rekeys, packets split at
  random points);
* an upload with the sealed path and the usual path mixed, random windows,
  packet sizes and window adjusts, a member socket that backs up: bytes
  arrive whole and in order, never beyond the window, EOF after the data;
* rekeys started by the sealed path during an upload lose nothing.
"""

from __future__ import annotations

import os
import random
import socket as pysocket
import struct

import pytest
from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactor

from tests.test_forwarding import setup
from tests.test_transport_crypto import Client, _world, closed, connect


def _upload_world(tmp_path, remote_window: int, remote_packet: int):
    """A forwarded channel on a real key-exchanged server transport writing to a
    socketpair, a client that opens what arrives, and a real mesh socket."""
    _store, factory = _world(tmp_path, chacha20_poly1305=True)
    client = Client()
    client.supportedCiphers = [b"aes128-gcm@openssh.com"]
    client, server, pump = connect(factory, client)
    conn, mesh, mesh_transport, channel, _forward, confirm = setup(remote_window, remote_packet)
    confirm()
    conn.transport = server
    server.service = conn  # key exchanges pause the mesh readers, as in the server
    ours, member_end = pysocket.socketpair()
    ours.setblocking(False)
    member_end.setblocking(False)
    server.transport = tcp.Connection(ours, server, MemoryReactor())
    server.transport.connected = True
    mesh_end, mesh_peer = pysocket.socketpair()
    mesh_end.setblocking(False)
    mesh_peer.setblocking(False)
    got: list[tuple[int, bytes]] = []
    dispatch = client.dispatchMessage

    def record(number: int, payload: bytes) -> None:
        if number >= 50:
            got.append((number, bytes(payload)))
        else:
            dispatch(number, payload)

    client.dispatchMessage = record  # type: ignore[method-assign]

    def member_side() -> None:
        """Send what the server queued, let the client open it, answer kex."""
        sock = server.transport
        if sock._tempDataBuffer or len(sock.dataBuffer) > sock.offset:
            sock.doWrite()
        while True:
            try:
                chunk = member_end.recv(1 << 20)
            except BlockingIOError:
                break
            client.dataReceived(chunk)
        pump.flush()

    def mesh_read(stale: bool = False) -> None:
        """What GatheringServer.doRead does with a readable mesh socket (``stale``:
        also while paused, as for an epoll event reported before the pause)."""
        paused = mesh_transport.producerState != "producing"
        if (paused and not stale) or mesh.read_closed:
            return
        try:
            result = mesh.read_socket(mesh_end)
        except BlockingIOError:
            return
        if result is None:
            try:
                data = mesh_end.recv(256 * 1024)
            except BlockingIOError:
                return
            if data:
                mesh.dataReceived(data)
                return
            result = 0
        if result == 0:
            mesh.readConnectionLost()

    return server, channel, mesh_peer, got, member_side, mesh_read


@pytest.mark.parametrize("cipher", [b"aes128-gcm@openssh.com", b"chacha20-poly1305@openssh.com"])
def test_ssh_reads_as_views_of_one_overwritten_buffer_keep_every_packet_intact(tmp_path, cipher):
    rng = random.Random(7)
    _store, factory = _world(tmp_path, chacha20_poly1305=True)
    client = Client()
    client.supportedCiphers = [cipher]
    client, server, pump = connect(factory, client, flush=False)
    shared = bytearray(1 << 16)
    receive = server.dataReceived

    def via_shared(data: bytes) -> None:  # what SharedReadServer.doRead hands over
        data = bytes(data)
        for start in range(0, len(data), step := rng.randint(1, 3000)):
            chunk = data[start : start + step]
            shared[: len(chunk)] = chunk
            receive(memoryview(shared)[: len(chunk)])
            shared[: len(chunk)] = os.urandom(len(chunk))  # the next read

    server.dataReceived = via_shared  # type: ignore[method-assign]
    got: list[bytes] = []
    ignore = server.ssh_IGNORE
    server.ssh_IGNORE = lambda packet: (got.append(bytes(packet)), ignore(packet))  # type: ignore[method-assign]
    server.rekey_packets, client.rekey_packets = 6, 9
    pump.flush()
    payloads = [os.urandom(rng.randint(0, 5000)) for _ in range(40)]
    for payload in payloads:
        client.sendIgnore(payload)
        server.sendIgnore(b"x")
        pump.flush()
    assert not closed(server) and server.isEncrypted("both")
    assert got == [NS(payload) for payload in payloads]


@pytest.mark.parametrize("seed", range(4))
def test_sealed_and_usual_mesh_reads_mixed_arrive_in_order_within_the_window(tmp_path, seed):
    rng = random.Random(seed)
    window = rng.choice([1, 5000, 40_000, 300_000])
    max_packet = rng.choice([512, 16_384, 32_768, 255 * 1024])
    _server, channel, mesh_peer, got, member_side, mesh_read = _upload_world(
        tmp_path, window, max_packet
    )
    data = os.urandom(rng.randint(100_000, 600_000))
    sent = 0
    granted = window
    fin = False
    for _ in range(5000):
        if sent < len(data):
            try:
                sent += mesh_peer.send(data[sent : sent + rng.randint(1, 200_000)])
            except BlockingIOError:
                pass
        elif not fin:
            mesh_peer.shutdown(pysocket.SHUT_WR)
            fin = True
        mesh_read()
        if rng.random() < 0.3:  # the member's socket backs up now and then
            member_side()
        received = sum(len(p) - 8 for n, p in got if n == connection.MSG_CHANNEL_DATA)
        assert received <= granted and channel.remoteWindowLeft >= 0
        if received >= granted - window // 2:
            added = rng.randint(1, max(window, 60_000))
            granted += added
            channel.conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", channel.id, added))
        if any(n == connection.MSG_CHANNEL_EOF for n, _ in got):
            break
    member_side()
    numbers = [n for n, _ in got]
    assert connection.MSG_CHANNEL_EOF in numbers
    assert connection.MSG_CHANNEL_DATA not in numbers[numbers.index(connection.MSG_CHANNEL_EOF) :]
    pieces = [p[8:] for n, p in got if n == connection.MSG_CHANNEL_DATA]
    assert all(len(p) <= max_packet for p in pieces)
    assert b"".join(pieces) == data


@pytest.mark.parametrize("seed", range(3))
def test_rekeys_started_by_sealed_reads_lose_nothing(tmp_path, seed):
    rng = random.Random(seed)
    server, _channel, mesh_peer, got, member_side, mesh_read = _upload_world(
        tmp_path, 50_000_000, rng.choice([512, 32_768, 255 * 1024])
    )
    server.rekey_packets = rng.choice([3, 4, 5])
    data = os.urandom(rng.randint(200_000, 1_500_000))
    sent = 0
    keys = set()
    for _ in range(3000):
        if sent < len(data):
            try:
                sent += mesh_peer.send(data[sent : sent + rng.randint(1, 300_000)])
            except BlockingIOError:
                pass
        mesh_read()
        keys.add(id(server._tx))
        member_side()
        if sum(len(p) - 8 for _n, p in got) == len(data):
            break
    assert len(keys) > 1 and not closed(server)
    assert b"".join(p[8:] for n, p in got if n == connection.MSG_CHANNEL_DATA) == data
