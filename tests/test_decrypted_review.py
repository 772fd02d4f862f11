"""Review of the shared decrypt buffer (``packets.DECRYPTED``, ``sending.Borrowed``).

No defect reproduced.  Regression checks: channel data passed on as views of
the buffer reaches a slow mesh client intact and in order whatever its
transport (``GatheringServer``, a plain ``tcp.Server``, a test
``StringTransport``), when EOF and CLOSE follow in the same read and another
connection's read reuses the buffer before the mesh socket drains, with
small and large packets on one read, and when a read holds more than the
buffer; an exception escaping a read leaves the counters at zero.
"""

from __future__ import annotations

import struct

import pytest
from twisted.conch.ssh import connection

from nekojump.ssh.packets import DECRYPTED
from nekojump.ssh.sending import Borrowed
from tests.test_forwarding import mesh_world


@pytest.mark.parametrize("kind", ["string", "gather", "plain"])
@pytest.mark.parametrize("packet", [1000, 5000, 32 * 1024])
def test_views_reach_a_slow_mesh_client_of_any_transport_intact(tmp_path, kind, packet):
    client, channel, read, mesh_receives = mesh_world(tmp_path, kind)
    expected = b""
    for round_ in range(4):
        chunk = bytes([65 + round_]) * (200 * 1024 + 7)
        read(lambda chunk=chunk: client.send_channel_data(channel.id, chunk, packet))
        expected += chunk
    assert mesh_receives(len(expected)) == expected


@pytest.mark.parametrize("kind", ["gather", "plain"])
def test_data_then_eof_and_close_in_one_read_survive_another_connections_read(tmp_path, kind):
    client, channel, read, mesh_receives = mesh_world(tmp_path, kind)
    first, second = b"A" * (200 * 1024), b"B" * (200 * 1024)
    read(lambda: client.send_channel_data(channel.id, first, 32768))
    read(
        lambda: client.send_channel_data(channel.id, second, 32768),
        lambda: client.sendPacket(connection.MSG_CHANNEL_EOF, struct.pack(">L", channel.id)),
        lambda: client.sendPacket(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", channel.id)),
    )
    other_client, other_channel, other_read, _ = mesh_world(tmp_path / "other", "gather")
    other_read(lambda: other_client.send_channel_data(other_channel.id, b"Z" * 300_000, 32768))
    assert mesh_receives(len(first + second)) == first + second


def test_small_and_large_packets_of_each_read_arrive_in_order(tmp_path):
    client, channel, read, mesh_receives = mesh_world(tmp_path, "gather")
    expected = b""
    for round_ in range(4):
        pieces = [bytes([65 + round_]) * 1000 + bytes([97 + i]) * 40000 for i in range(8)]

        def send(pieces=pieces) -> None:
            for piece in pieces:
                client.send_channel_data(channel.id, piece, 7000)

        read(send)
        expected += b"".join(pieces)
    assert mesh_receives(len(expected)) == expected


def test_a_read_bigger_than_the_buffer_is_decrypted_the_usual_way_past_it(tmp_path):
    client, channel, read, mesh_receives = mesh_world(tmp_path, "gather")
    expected = b""
    for round_ in range(3):
        chunk = b"".join(bytes([65 + round_ + i]) * (255 * 1024) for i in range(6))
        read(lambda chunk=chunk: client.send_channel_data(channel.id, chunk, 255 * 1024))
        expected += chunk
    assert mesh_receives(len(expected)) == expected


def test_an_exception_escaping_a_read_leaves_the_counters_at_zero(tmp_path):
    client, channel, read, _mesh_receives = mesh_world(tmp_path, "gather")

    def boom(data: memoryview) -> None:
        raise RuntimeError("handler failed")

    channel.receive_data = boom
    with pytest.raises(RuntimeError):
        read(lambda: client.send_channel_data(channel.id, b"Q" * 100_000, 32768))
    assert DECRYPTED.depth == 0 and Borrowed.depth == 0
