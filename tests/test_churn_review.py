"""Churn review: state that must be given back after every connection, stream and login.

The product holds thousands of tunnels for months in one process, so anything
left behind per cycle adds up.  Each test runs a cycle many times in memory
and counts what is left: channels, mesh sockets, stream counts, entries.
"""

from __future__ import annotations

import struct

from twisted.conch.ssh import connection
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from nekojump.ssh.forwarding import (
    WINDOW_GROWTH_BUDGET,
    ForwardedChannel,
    MeshConnection,
    WindowBudget,
)
from tests.test_forwarding import MeshSocket, send_from_member, setup

CYCLES = 20


def _open_stream(conn, forward, remote_id: int, remote_window: int):
    """A mesh member connects to the forward and the member's ssh accepts the channel."""
    mesh = MeshConnection(forward)
    socket = MeshSocket()
    mesh.makeConnection(socket)
    channel = mesh.channel
    conn.ssh_CHANNEL_OPEN_CONFIRMATION(
        struct.pack(">4L", channel.id, remote_id, remote_window, 32768)
    )
    return mesh, socket, channel


def _reactor_reports_closed(mesh: MeshConnection, socket: MeshSocket) -> None:
    """What the reactor does for a socket the server asked to close."""
    if socket.disconnecting:
        mesh.connectionLost(Failure(ConnectionDone()))


def test_a_member_closing_a_channel_while_data_waits_for_its_window_frees_everything():
    """A mesh client uploads more than the member's window; the member's local
    service goes away and its ssh sends EOF and CLOSE (OpenSSH sends no window
    after its CLOSE).  The data waiting in the channel can never be delivered:
    the channel must answer CLOSE and the mesh socket be closed.

    Today ``SSHChannel.loseConnection`` waits for ``buf`` to drain first, so
    each such stream leaves its channel (with up to 256 KiB buffered), its
    mesh socket (reading paused, so the mesh client's FIN is never seen) and
    one count in the member's open streams for as long as the SSH connection
    lives: a member's autossh tunnel reaches ``max_streams_per_member``.
    Measured with OpenSSH 9.2 against a running server: +1 fd, +1
    open_streams, +1 ForwardedChannel per such upload."""
    conn, first_mesh, first_socket, first_channel, forward, _confirm = setup(remote_window=1000)
    registry = forward.avatar.registry
    # The stream setup() opened is the first of the cycles.
    first_mesh.transport.loseConnection()
    conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", first_channel.id, 2) + b"\0\0\0\0\0\0\0\0")
    _reactor_reports_closed(first_mesh, first_socket)
    assert registry.open_streams == 0

    sockets = []
    for cycle in range(CYCLES):
        mesh, socket, channel = _open_stream(conn, forward, 100 + cycle, remote_window=1000)
        mesh.dataReceived(b"u" * 5000)  # more than the member's window: 4000 wait in buf
        conn.ssh_CHANNEL_EOF(struct.pack(">L", channel.id))
        conn.ssh_CHANNEL_CLOSE(struct.pack(">L", channel.id))
        _reactor_reports_closed(mesh, socket)
        sockets.append(socket)

    closes_sent = len(conn.transport.of(connection.MSG_CHANNEL_CLOSE))
    assert closes_sent == CYCLES, f"{closes_sent} of {CYCLES} CLOSEs answered"
    assert conn.channels == {}, f"{len(conn.channels)} dead channels still held"
    assert sum(not s.disconnecting for s in sockets) == 0
    assert registry.open_streams == 0
    assert registry.streams_of(1) == 0


def test_a_channel_closed_by_the_member_with_data_waiting_gives_its_window_growth_back(
    monkeypatch,
):
    """The same stuck channel also keeps the window growth it earned on a fast
    download: up to 14 MiB of the process-wide 128 MiB budget each, until the
    SSH connection ends (for an autossh tunnel: months).  Nine such streams
    and no forwarded connection in the process can grow its window again."""
    budget = WindowBudget(limit=WINDOW_GROWTH_BUDGET)
    monkeypatch.setattr(ForwardedChannel, "budget", budget)
    held = []
    for _ in range(3):
        conn, mesh, socket, channel, _forward, confirm = setup(remote_window=1000)
        confirm()
        send_from_member(conn, channel, 16 << 20)  # a fast download: the window grows
        assert channel.growth > 0
        mesh.dataReceived(b"u" * 5000)  # an upload beyond the member's window
        conn.ssh_CHANNEL_EOF(struct.pack(">L", channel.id))
        conn.ssh_CHANNEL_CLOSE(struct.pack(">L", channel.id))
        _reactor_reports_closed(mesh, socket)
        held.append(conn)  # the SSH connections stay up
    assert budget.used == 0, f"{budget.used >> 20} MiB of window growth still held"


def test_bytes_on_a_connection_that_outlives_its_forward_still_count():
    """A mesh connection may outlive its forward (cancel-tcpip-forward, or the
    port handed on): the totals were taken when the forward was released, and
    what went through it afterwards was never counted."""
    from twisted.internet.error import ConnectionDone as Done

    from nekojump.ssh.registry import Totals
    from tests.test_forwarding import data_packet

    conn, mesh, _socket, channel, forward, confirm = setup()
    registry = forward.avatar.registry
    registry.add_forward(forward)
    confirm()
    mesh.dataReceived(b"a" * 1000)
    registry.remove_forward(forward)  # the forward goes; its connection stays
    mesh.dataReceived(b"b" * 500)
    conn.ssh_CHANNEL_DATA(data_packet(channel, b"c" * 300))
    assert registry.totals() == Totals(1, 1500, 300)
    mesh.connectionLost(Failure(Done()))
    assert registry.totals() == Totals(1, 1500, 300)
    assert registry.open_streams == 0
