"""The forwarded-connection data path in memory: flow control and failures.

A real ``TunnelConnection`` talks to a fake SSH transport that records
packets; the mesh member's socket is a ``StringTransport``.
"""

from __future__ import annotations

import socket as pysocket
import struct

from attrs import define, field
from twisted.conch.ssh import common, connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from nekojump.model import Identity
from nekojump.policy import Holder
from nekojump.ssh import forwarding
from nekojump.ssh.connection import TunnelConnection
from nekojump.ssh.forwarding import (
    CHANNEL_MAX_PACKET,
    CHANNEL_WINDOW,
    LOCAL_SERVICE_REFUSED,
    MAX_CHANNEL_WINDOW,
    STALL_SECONDS,
    ForwardedChannel,
    MeshConnection,
    WindowBudget,
)
from nekojump.ssh.registry import ActiveForward, TunnelRegistry
from nekojump.ssh.sending import Burst


class MeshSocket(StringTransport):
    """A mesh member's TCP socket, as far as MeshConnection uses it."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.9", 40000))

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@define
class PacketLog:
    """Stands in for the SSH transport: keeps (message, payload) pairs."""

    packets: list[tuple[int, bytes]] = field(factory=list)
    burst: Burst = field(factory=Burst)

    def sendPacket(self, message: int, payload: bytes) -> None:
        self.packets.append((message, payload))

    def send_packet_parts(self, message: int, *parts: bytes) -> None:
        self.packets.append((message, b"".join(parts)))

    def send_channel_data(self, recipient: int, data: bytes, max_packet: int) -> None:
        for offset in range(0, len(data), max_packet):
            piece = bytes(data[offset : offset + max_packet])
            head = struct.pack(">2L", recipient, len(piece))
            self.packets.append((connection.MSG_CHANNEL_DATA, head + piece))

    def of(self, message: int) -> list[bytes]:
        return [payload for kind, payload in self.packets if kind == message]


@define
class FakeAvatar:
    conn: TunnelConnection
    failures: list[str] = field(factory=list)
    registry: TunnelRegistry = field(factory=TunnelRegistry)
    identity: Identity = field(factory=lambda: Identity(1, "alice", 1, "SHA256:x", "laptop"))
    clock: Clock = field(factory=Clock)
    holder: Holder = field(factory=lambda: Holder(key_id=1, member_id=1, connection_id=1))

    def forward_failed(self, forward: ActiveForward, message: str) -> None:
        self.failures.append(message)


def setup(remote_window: int = 1_000_000, remote_packet: int = 32768):
    conn = TunnelConnection()
    conn.transport = PacketLog()
    avatar = FakeAvatar(conn)
    forward = ActiveForward(
        port=10080, requested_host="localhost", bind_address="127.0.0.2", avatar=avatar, since=0.0
    )
    mesh = MeshConnection(forward)
    socket = MeshSocket()
    mesh.makeConnection(socket)
    channel = mesh.channel

    def confirm() -> None:
        conn.ssh_CHANNEL_OPEN_CONFIRMATION(
            struct.pack(">4L", channel.id, 77, remote_window, remote_packet)
        )

    return conn, mesh, socket, channel, forward, confirm


def data_packet(channel: ForwardedChannel, data: bytes) -> bytes:
    return struct.pack(">L", channel.id) + common.NS(data)


def test_channel_open_echoes_the_requested_address_and_port():
    """OpenSSH matches forwarded-tcpip opens on the host and port it asked for."""
    conn, _mesh, _socket, _channel, _forward, _confirm = setup()
    (payload,) = conn.transport.of(connection.MSG_CHANNEL_OPEN)
    name, rest = common.getNS(payload)
    assert name == b"forwarded-tcpip"
    host, rest = common.getNS(rest[12:])
    (port,) = struct.unpack(">L", rest[:4])
    origin, rest = common.getNS(rest[4:])
    assert (host, port, origin) == (b"localhost", 10080, b"127.0.0.9")


def test_mesh_socket_is_not_read_until_the_member_accepts():
    _conn, _mesh, socket, _channel, _forward, confirm = setup()
    assert socket.producerState == "paused"
    confirm()
    assert socket.producerState == "producing"


def test_mesh_reading_pauses_when_the_member_window_is_used_up():
    """A fast mesh sender and a slow member: the server stops reading, buffers little."""
    conn, mesh, socket, channel, _forward, confirm = setup(remote_window=1000)
    confirm()
    mesh.dataReceived(b"x" * 5000)
    assert socket.producerState == "paused"
    assert (
        sum(len(common.getNS(p[4:])[0]) for p in conn.transport.of(connection.MSG_CHANNEL_DATA))
        == 1000
    )
    assert len(channel.buf) == 4000
    channel.addWindowBytes(100_000)  # the member caught up
    assert channel.buf == b""
    assert socket.producerState == "producing"


def test_member_gets_no_window_while_the_mesh_socket_is_full():
    """A fast member and a slow mesh reader: window is granted only as the socket drains."""
    conn, _mesh, socket, channel, forward, confirm = setup()
    confirm()
    assert socket.producer is channel
    channel.pauseProducing()  # what the socket does when its write buffer is full
    chunk = b"y" * 32768
    sent = 0
    while channel.localWindowLeft >= len(chunk):
        conn.ssh_CHANNEL_DATA(data_packet(channel, chunk))
        sent += len(chunk)
    assert conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST) == []
    assert sent > CHANNEL_WINDOW // 2
    assert len(socket.value()) == sent  # all of it is the socket's, none buffered by us
    forward.avatar.clock.advance(1)  # a slow mesh client
    channel.resumeProducing()  # drained
    (adjust,) = conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST)
    assert struct.unpack(">2L", adjust) == (77, sent)
    assert channel.localWindowLeft == CHANNEL_WINDOW


def test_refused_open_closes_the_mesh_connection_and_records_why():
    """The member's local service is down: the mesh member is not left hanging."""
    conn, _mesh, socket, channel, forward, _confirm = setup()
    conn.ssh_CHANNEL_OPEN_FAILURE(
        struct.pack(">2L", channel.id, connection.OPEN_CONNECT_FAILED)
        + common.NS(b"Connection refused")
        + common.NS(b"")
    )
    assert socket.disconnecting
    assert forward.last_error == LOCAL_SERVICE_REFUSED
    assert forward.avatar.failures == [LOCAL_SERVICE_REFUSED]
    assert forward.avatar.registry.open_streams == 1
    mesh_lost(_mesh)  # and the later connectionLost does not blow up
    assert forward.open_connections == 0
    assert forward.avatar.registry.open_streams == 0


def mesh_lost(mesh: MeshConnection) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    mesh.connectionLost(Failure(ConnectionDone()))


def test_mesh_gone_before_the_open_is_confirmed_closes_the_channel():
    conn, mesh, _socket, channel, _forward, confirm = setup()
    mesh_lost(mesh)
    confirm()
    assert conn.transport.of(connection.MSG_CHANNEL_CLOSE) == [struct.pack(">L", 77)]
    assert channel.localClosed


def test_half_close_from_the_mesh_sends_eof_and_keeps_the_reply_path():
    conn, mesh, socket, channel, _forward, confirm = setup()
    confirm()
    mesh.readConnectionLost()
    assert conn.transport.of(connection.MSG_CHANNEL_EOF) == [struct.pack(">L", 77)]
    conn.ssh_CHANNEL_DATA(data_packet(channel, b"reply"))
    assert socket.value() == b"reply"
    assert not socket.disconnecting


def test_eof_from_the_member_half_closes_even_while_the_socket_is_full():
    """A paused producer must not keep the FIN from going out."""
    conn, _mesh, socket, channel, _forward, confirm = setup()
    confirm()
    channel.pauseProducing()
    conn.ssh_CHANNEL_EOF(struct.pack(">L", channel.id))
    assert socket.producer is None
    assert socket.write_closed


def test_data_after_the_members_eof_is_dropped_and_earns_no_window():
    """A member that sends EOF and then more data (which SSH forbids) must not get
    the server to queue it for a mesh client that is not reading: it is dropped, and
    no window comes back, so the member soon cannot send at all."""
    conn, _mesh, socket, channel, forward, confirm = setup()
    confirm()
    conn.ssh_CHANNEL_DATA(data_packet(channel, b"before eof"))
    conn.ssh_CHANNEL_EOF(struct.pack(">L", channel.id))
    adjusts = len(conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST))
    sent = len(b"before eof")
    for _ in range(4 * CHANNEL_WINDOW // CHANNEL_MAX_PACKET):  # bounded, whatever happens
        if member_window(conn, sent) < CHANNEL_MAX_PACKET:
            break
        sent += send_from_member(conn, channel, CHANNEL_MAX_PACKET)
    assert socket.value() == b"before eof"
    assert forward.bytes_from_member == len(b"before eof")
    assert len(conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST)) == adjusts
    assert sent <= CHANNEL_WINDOW


def test_data_for_a_mesh_client_that_left_earns_no_window():
    """Until the channel's close is through, what the member sends goes nowhere:
    no window comes back for it."""
    conn, mesh, _socket, channel, _forward, confirm = setup()
    confirm()
    channel.write(b"waiting for window" * 100_000)  # more than the member's window
    mesh.connectionLost(None)
    assert channel.mesh_closed and not channel.localClosed
    adjusts = len(conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST))
    sent = 0
    for _ in range(4 * CHANNEL_WINDOW // CHANNEL_MAX_PACKET):  # bounded, whatever happens
        if member_window(conn, sent) < CHANNEL_MAX_PACKET:
            break
        sent += send_from_member(conn, channel, CHANNEL_MAX_PACKET)
    assert len(conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST)) == adjusts
    assert sent <= CHANNEL_WINDOW


def test_a_full_member_socket_pauses_the_mesh_readers_once_however_often_twisted_says_so():
    """Twisted calls pauseProducing on every write while the socket is full; with
    thousands of streams, walking them all each time would stall the reactor."""
    conn, _mesh, _socket, _channel, _forward, confirm = setup()
    confirm()
    walks = []
    conn.forwarded_channels = lambda: walks.append(1) or []  # type: ignore[method-assign]
    for _ in range(100):
        conn.pauseProducing()
    conn.resumeProducing()
    assert len(walks) == 2  # one pause, one resume


def test_a_full_member_socket_pauses_every_mesh_reader_of_that_connection():
    """However large the window the member grants, the server's SSH socket buffer stays bounded."""
    conn, _mesh, socket, _channel, _forward, confirm = setup(remote_window=2**32 - 1)
    confirm()
    assert socket.producerState == "producing"
    conn.pauseProducing()  # the member's SSH socket buffer is full
    assert socket.producerState == "paused"
    conn.resumeProducing()
    assert socket.producerState == "producing"


def test_resuming_the_member_socket_keeps_window_blocked_readers_paused():
    conn, mesh, socket, channel, _forward, confirm = setup(remote_window=100)
    confirm()
    mesh.dataReceived(b"z" * 500)  # uses up the member's window
    conn.pauseProducing()
    conn.resumeProducing()
    assert socket.producerState == "paused"
    channel.addWindowBytes(10_000)
    assert socket.producerState == "producing"


def window_adjust(channel: ForwardedChannel, added: int) -> bytes:
    return struct.pack(">2L", channel.id, added)


def test_window_adjusts_never_push_the_window_past_two_to_the_32():
    """A misbehaving member cannot make the window overflow, however often it adjusts."""
    conn, _mesh, _socket, channel, _forward, confirm = setup(remote_window=2**32 - 10)
    confirm()
    for _ in range(3):
        conn.ssh_CHANNEL_WINDOW_ADJUST(window_adjust(channel, 2**32 - 1))
    assert channel.remoteWindowLeft == 2**32 - 1


def test_window_accounting_stays_within_bounds_under_a_flood_of_data():
    """Local window never goes negative: data past it closes the channel instead."""
    conn, _mesh, _socket, channel, _forward, confirm = setup()
    confirm()
    channel.pauseProducing()  # the mesh reader is slow: no window comes back
    chunk = b"d" * 32768
    for _ in range(CHANNEL_WINDOW // len(chunk) + 5):
        if channel.localClosed:
            break
        conn.ssh_CHANNEL_DATA(data_packet(channel, chunk))
        assert channel.localWindowLeft >= 0
    assert channel.localClosed  # the overrun closed the channel
    assert conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST) == []


def member_window(conn: TunnelConnection, sent: int) -> int:
    """The window the member may still use: what we announced and granted, minus its data."""
    granted = sum(
        struct.unpack(">2L", p)[1] for p in conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST)
    )
    return CHANNEL_WINDOW + granted - sent


def send_from_member(conn: TunnelConnection, channel: ForwardedChannel, total: int) -> int:
    sent = 0
    while sent < total:
        chunk = b"z" * min(CHANNEL_MAX_PACKET, total - sent)
        conn.ssh_CHANNEL_DATA(data_packet(channel, chunk))
        sent += len(chunk)
    return sent


def test_window_grows_while_the_mesh_client_keeps_up_and_never_past_the_maximum():
    """A fast mesh client: the member's window grows to MAX_CHANNEL_WINDOW for long links."""
    conn, _mesh, socket, channel, _forward, confirm = setup()
    confirm()
    sent = 0
    for _ in range(40):
        sent += send_from_member(conn, channel, 1 << 20)
        assert member_window(conn, sent) <= MAX_CHANNEL_WINDOW
        assert channel.localWindowLeft == member_window(conn, sent)
    assert channel.localWindowSize == MAX_CHANNEL_WINDOW
    assert member_window(conn, sent) > MAX_CHANNEL_WINDOW // 2
    assert len(socket.value()) == sent


def test_a_stalled_mesh_client_gives_the_growth_back_and_buffers_at_most_the_window():
    """The mesh client stops reading: after STALL_SECONDS the window is 2 MiB again, and
    the budget is released only as the member uses up what it was already granted."""
    conn, _mesh, socket, channel, forward, confirm = setup()
    confirm()
    budget = ForwardedChannel.budget
    before = budget.used
    sent = send_from_member(conn, channel, 16 << 20)
    assert channel.localWindowSize == MAX_CHANNEL_WINDOW
    assert budget.used == before + MAX_CHANNEL_WINDOW - CHANNEL_WINDOW
    clock = forward.avatar.clock
    # The mesh socket backs up and stays backed up; Twisted repeats the pause
    # on every write, which must not restart the stall clock.
    channel.pauseProducing()
    for _ in range(4):
        clock.advance(STALL_SECONDS / 4)
        channel.pauseProducing()
    assert channel.localWindowSize == CHANNEL_WINDOW
    outstanding = channel.localWindowLeft
    assert budget.used == before + max(0, outstanding - CHANNEL_WINDOW)
    # The member may use up what it was granted, and gets nothing more.
    buffered_from = len(socket.value())
    sent += send_from_member(conn, channel, outstanding)
    assert member_window(conn, sent) == 0
    assert not channel.localClosed
    assert budget.used == before
    assert len(socket.value()) - buffered_from <= MAX_CHANNEL_WINDOW
    channel.resumeProducing()  # the slow client finally drained it all
    assert member_window(conn, sent) == CHANNEL_WINDOW


def test_after_a_stall_even_a_little_data_returns_its_growth_to_the_budget():
    """The budget shrinks with every byte of the old, larger window the member
    uses, however little at a time; it is not held until a big chunk arrives."""
    conn, _mesh, _socket, channel, forward, confirm = setup()
    confirm()
    budget = ForwardedChannel.budget
    before = budget.used
    send_from_member(conn, channel, 16 << 20)
    channel.pauseProducing()
    forward.avatar.clock.advance(STALL_SECONDS)
    assert channel.localWindowSize == CHANNEL_WINDOW
    outstanding = channel.localWindowLeft
    assert outstanding > CHANNEL_WINDOW + 1024
    channel.resumeProducing()  # drained; the member sends a little
    send_from_member(conn, channel, 1024)
    assert budget.used == before + outstanding - 1024 - CHANNEL_WINDOW


def test_a_short_pause_keeps_the_window_growing():
    """Twisted pauses on every full write buffer; a fast client resumes within a turn."""
    conn, _mesh, _socket, channel, forward, confirm = setup()
    confirm()
    send_from_member(conn, channel, 4 << 20)
    grown = channel.localWindowSize
    assert grown > CHANNEL_WINDOW
    channel.pauseProducing()
    forward.avatar.clock.advance(STALL_SECONDS / 10)
    channel.resumeProducing()
    forward.avatar.clock.advance(STALL_SECONDS * 2)
    assert channel.localWindowSize >= grown


def test_growth_comes_from_one_budget_for_the_process(monkeypatch):
    """Many fast connections together get at most WINDOW_GROWTH_BUDGET beyond 2 MiB each."""
    budget = WindowBudget(limit=3 << 20)
    monkeypatch.setattr(ForwardedChannel, "budget", budget)
    channels = []
    for _ in range(3):
        conn, _mesh, _socket, channel, _forward, confirm = setup()
        confirm()
        send_from_member(conn, channel, 24 << 20)
        channels.append((conn, channel))
    assert budget.used == 3 << 20
    assert sum(c.localWindowSize - CHANNEL_WINDOW for _, c in channels) == 3 << 20
    conn, channel = channels[0]
    conn.ssh_CHANNEL_CLOSE(struct.pack(">L", channel.id))
    assert channel.growth == 0
    assert budget.used == sum(c.growth for _, c in channels[1:])


def test_packets_to_the_member_stay_within_256_kib_whatever_it_announces():
    conn, mesh, _socket, channel, _forward, confirm = setup(remote_packet=2**20)
    confirm()
    assert channel.remoteMaxPacket == CHANNEL_MAX_PACKET
    mesh.dataReceived(b"m" * (600 * 1024))
    sizes = [len(p) - 8 for p in conn.transport.of(connection.MSG_CHANNEL_DATA)]
    assert sum(sizes) == 600 * 1024 and max(sizes) <= CHANNEL_MAX_PACKET


def test_data_and_eof_in_one_read_reach_the_mesh_client_in_one_write_before_the_fin():
    conn, _mesh, socket, channel, _forward, confirm = setup()
    confirm()
    events: list[bytes | str] = []
    socket.write = lambda data: events.append(bytes(data))
    socket.loseWriteConnection = lambda: events.append("FIN")
    with conn.transport.burst:  # one read of the member's SSH socket
        conn.ssh_CHANNEL_DATA(data_packet(channel, b"hello"))
        conn.ssh_CHANNEL_DATA(data_packet(channel, b", world"))
        assert events == []
        conn.ssh_CHANNEL_EOF(struct.pack(">L", channel.id))
    assert events == [b"hello, world", "FIN"]


def test_data_waiting_for_window_still_reaches_the_member_after_the_mesh_client_left():
    conn, mesh, _socket, channel, _forward, confirm = setup(remote_window=1000)
    confirm()
    mesh.dataReceived(b"a" * 3000)  # 1000 go now, 2000 wait for window
    mesh.connectionLost(None)
    assert not conn.transport.of(connection.MSG_CHANNEL_CLOSE)  # not before the rest
    conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", channel.id, 100_000))
    sent = [common.getNS(p[4:])[0] for p in conn.transport.of(connection.MSG_CHANNEL_DATA)]
    assert b"".join(sent) == b"a" * 3000
    assert conn.transport.of(connection.MSG_CHANNEL_CLOSE)


def test_a_mesh_client_that_reads_nothing_gets_no_window_growth_within_one_read(monkeypatch):
    """The data of one SSH read leaves at its end; the window is given back
    only then, when the socket shows the mesh client is not keeping up."""
    conn, _mesh, socket, channel, _forward, confirm = setup()
    confirm()
    # Nothing the server writes is ever read.
    monkeypatch.setattr(forwarding, "unsent_bytes", lambda transport: len(socket.value()))
    adjusts_before = len(conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST))
    with conn.transport.burst:
        for _ in range(8):
            conn.ssh_CHANNEL_DATA(data_packet(channel, b"d" * 32768))
        assert socket.value() == b""
    assert len(socket.value()) == 8 * 32768
    assert channel.localWindowSize == CHANNEL_WINDOW and channel.growth == 0
    # The used window itself is given back: the data is on its way.
    assert len(conn.transport.of(connection.MSG_CHANNEL_WINDOW_ADJUST)) == adjusts_before + 1
    assert channel.localWindowLeft == CHANNEL_WINDOW


def test_a_member_announcing_tiny_packets_gets_an_error_not_a_crash():
    conn, mesh, socket, _channel, forward, confirm = setup(remote_packet=0)
    confirm()
    mesh.dataReceived(b"m" * 1000)
    assert socket.disconnecting
    assert not conn.transport.of(connection.MSG_CHANNEL_DATA)
    assert conn.transport.of(connection.MSG_CHANNEL_CLOSE)
    assert "packets of only 0 bytes" in forward.last_error
    assert forward.avatar.failures == [forward.last_error]


def test_the_window_does_not_grow_while_the_kernel_holds_what_the_client_has_not_read(
    monkeypatch,
):
    """A mesh client that reads slowly from the start: its socket buffers fill, and
    the member keeps the starting window however fast it sends."""
    monkeypatch.setattr(forwarding, "unsent_bytes", lambda transport: 1 << 30)
    conn, _mesh, _socket, channel, _forward, confirm = setup()
    confirm()
    sent = send_from_member(conn, channel, 8 << 20)
    assert channel.localWindowSize == CHANNEL_WINDOW
    assert member_window(conn, sent) <= CHANNEL_WINDOW


def test_a_large_read_from_the_mesh_is_cut_into_packets_that_add_up_to_it():
    conn, mesh, _socket, channel, _forward, confirm = setup(remote_window=4 << 20)
    confirm()
    burst = bytes(range(251)) * 4200  # ~1 MiB, not a multiple of the packet size
    mesh.dataReceived(burst)
    payloads = [common.getNS(p[4:])[0] for p in conn.transport.of(connection.MSG_CHANNEL_DATA)]
    assert all(len(p) <= 32768 for p in payloads)
    assert b"".join(payloads) == burst
    assert channel.remoteWindowLeft == (4 << 20) - len(burst)


class RecordingChannel(SSHChannel):
    name = b"session"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.received: list[object] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


def test_channel_data_reaches_channels_as_views_only_if_they_take_them():
    conn, _mesh, socket, channel, _forward, confirm = setup()
    confirm()
    conn.ssh_CHANNEL_DATA(memoryview(data_packet(channel, b"to the mesh")))
    assert socket.value() == b"to the mesh"

    session = RecordingChannel(conn=conn)
    session.id = 99
    conn.channels[session.id] = session
    conn.ssh_CHANNEL_DATA(memoryview(struct.pack(">L", session.id) + common.NS(b"typed")))
    assert session.received == [b"typed"] and type(session.received[0]) is bytes


def test_a_mesh_read_bigger_than_the_window_leaves_in_one_send(tmp_path):
    """The member's window takes only part of a read: the packets that fit are
    still sealed and sent to the member's ssh in one write, not one per packet."""
    from tests.test_transport_crypto import Client, _world, connect

    _store, factory = _world(tmp_path)
    client = Client()
    client.supportedCiphers = [b"aes128-gcm@openssh.com"]
    client, server, _pump = connect(factory, client)
    conn, mesh, _socket, channel, _forward, confirm = setup(
        remote_window=40_000, remote_packet=16_384
    )
    confirm()
    conn.transport = server
    writes: list[bytes] = []
    server.transport.write = writes.append
    mesh.dataReceived(b"x" * 100_000)
    assert len(writes) == 1
    # Three packets (16384 + 16384 + 7232 bytes of data), each 4 + 12 + data + padding + tag.
    assert 40_000 < len(writes[0]) < 40_000 + 3 * (4 + 13 + 255 + 16)
    assert len(channel.buf) == 60_000


def sealing_world(tmp_path, remote_window: int, remote_packet: int = 32768, cipher: bytes = b""):
    """A forwarded channel whose SSH connection has done a real key exchange
    with an in-memory client and now writes to a real socket, and a real mesh
    socket: what ``read_socket`` reads, seals and sends, the client opens."""
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    from tests.test_transport_crypto import Client, _world, connect

    _store, factory = _world(tmp_path, chacha20_poly1305=True)
    client = Client()
    client.supportedCiphers = [cipher or b"aes128-gcm@openssh.com"]
    client, server, _pump = connect(factory, client)
    conn, mesh, mesh_transport, channel, forward, confirm = setup(remote_window, remote_packet)
    confirm()
    conn.transport = server
    ours, member_end = pysocket.socketpair()
    ours.setblocking(False)
    server.transport = tcp.Connection(ours, server, MemoryReactor())
    server.transport.connected = True
    mesh_end, mesh_peer = pysocket.socketpair()
    mesh_end.setblocking(False)

    def member_receives() -> list[bytes]:
        """The CHANNEL_DATA payloads the member's client opens from what it got."""
        member_end.setblocking(False)
        wire = bytearray()
        while True:
            try:
                wire += member_end.recv(1 << 20)
            except BlockingIOError:
                break
        client.buf = wire
        pieces = []
        while (packet := client.getPacket()) is not None:
            assert packet[0] == connection.MSG_CHANNEL_DATA
            recipient, length = struct.unpack(">2L", packet[1:9])
            assert recipient == 77 and length == len(packet) - 9
            pieces.append(bytes(packet[9:]))
        assert not client.buf  # nothing left over: whole packets only
        return pieces

    return mesh, mesh_transport, channel, forward, mesh_end, mesh_peer, member_receives


def test_a_mesh_read_is_sealed_straight_into_packets_the_member_opens(tmp_path):
    mesh, _transport, channel, forward, mesh_end, mesh_peer, member_receives = sealing_world(
        tmp_path, remote_window=300_000
    )
    burst = bytes(range(251)) * 400  # 100,400 bytes: three whole packets and a short one
    mesh_peer.sendall(burst)
    assert mesh.read_socket(mesh_end) == len(burst)
    pieces = member_receives()
    assert [len(p) for p in pieces] == [32768, 32768, 32768, len(burst) - 3 * 32768]
    assert b"".join(pieces) == burst
    assert channel.remoteWindowLeft == 300_000 - len(burst)
    assert forward.bytes_to_member == len(burst)
    # Again: the buffers are reused, and the packets go on in sequence.
    mesh_peer.sendall(burst[::-1])
    assert mesh.read_socket(mesh_end) == len(burst)
    assert b"".join(member_receives()) == burst[::-1]


def test_a_sealed_read_takes_no_more_than_the_window_and_then_stops_reading(tmp_path):
    mesh, transport, channel, _forward, mesh_end, mesh_peer, member_receives = sealing_world(
        tmp_path, remote_window=50_000, remote_packet=16_384
    )
    mesh_peer.sendall(b"a" * 80_000)
    assert mesh.read_socket(mesh_end) == 50_000
    assert b"".join(member_receives()) == b"a" * 50_000
    assert channel.remoteWindowLeft == 0 and channel.buf == b""
    assert transport.producerState == "paused"  # the rest stays in the mesh socket
    channel.addWindowBytes(100_000)  # the member's window adjust
    assert transport.producerState == "producing"
    assert mesh.read_socket(mesh_end) == 30_000
    assert b"".join(member_receives()) == b"a" * 30_000


def test_a_sealed_read_reports_the_end_of_the_mesh_stream(tmp_path):
    mesh, _transport, _channel, _forward, mesh_end, mesh_peer, member_receives = sealing_world(
        tmp_path, remote_window=50_000
    )
    mesh_peer.shutdown(pysocket.SHUT_WR)
    assert mesh.read_socket(mesh_end) == 0
    assert member_receives() == []


def test_a_cipher_that_cannot_seal_in_place_reads_as_usual(tmp_path):
    mesh, *_rest, mesh_end, mesh_peer, member_receives = sealing_world(
        tmp_path, remote_window=50_000, cipher=b"chacha20-poly1305@openssh.com"
    )
    mesh_peer.sendall(b"hello")
    assert mesh.read_socket(mesh_end) is None
    mesh.dataReceived(mesh_end.recv(100))  # what Twisted then does
    assert member_receives() == [b"hello"]


def mesh_world(tmp_path, kind: str):
    """A forwarded channel on a server that did a real AES-GCM key exchange,
    its mesh transport of ``kind`` ("string", "gather" or "plain", the last
    two over a socket with a small send buffer), and ``read`` and
    ``mesh_receives`` to drive it."""
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    from nekojump.ssh.sending import Cork, GatheringServer
    from tests.test_transport_crypto import Client, _world, connect

    _store, factory = _world(tmp_path)
    client = Client()
    client.supportedCiphers = [b"aes128-gcm@openssh.com"]
    client, server, _pump = connect(factory, client)
    conn, mesh, fake, channel, _forward, confirm = setup()
    confirm()
    conn.transport = server
    server.service = conn
    channel._burst = server.burst
    peer = mesh_transport = None
    if kind != "string":
        ours, peer = pysocket.socketpair()
        ours.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 16384)
        ours.setblocking(False)
        peer.setblocking(False)
        kind_class = GatheringServer if kind == "gather" else tcp.Server
        mesh_transport = kind_class(ours, mesh, ("127.0.0.9", 40000), None, 1, MemoryReactor())
        mesh.transport = mesh_transport
        mesh.output = Cork(mesh_transport)
    sent: list[bytes] = []
    client.transport.write = sent.append
    server.transport.write = lambda data: None  # window adjusts to the member

    def read(*actions) -> None:
        """What the client's ``actions`` send, as one read of the server."""
        sent.clear()
        for action in actions:
            action()
        server.dataReceived(b"".join(bytes(s) for s in sent))
        channel.localWindowLeft = channel.localWindowSize

    def mesh_receives(size: int) -> bytes:
        if kind == "string":
            return fake.value()
        got = bytearray()
        for _ in range(100_000):
            if len(got) >= size:
                break
            if mesh_transport.connected:
                mesh_transport.doWrite()
            try:
                piece = peer.recv(1 << 20)
            except BlockingIOError:
                continue
            if not piece:
                break
            got += piece
        return bytes(got)

    return client, channel, read, mesh_receives


def test_what_a_slow_mesh_client_has_not_taken_survives_the_next_reads(tmp_path):
    """Packets from the member are decrypted into one buffer reused by every
    read: what the mesh socket cannot take at once must wait as a copy, not as
    a view of that buffer (the next read would overwrite it)."""
    client, channel, read, mesh_receives = mesh_world(tmp_path, "gather")
    expected = b""
    for n in range(6):  # each read: 8 packets of 32 KiB, far more than the socket takes
        chunk = bytes([65 + n]) * (256 * 1024)
        read(lambda chunk=chunk: client.send_channel_data(channel.id, chunk, 32 * 1024))
        expected += chunk
    assert mesh_receives(len(expected)) == expected


def test_a_released_port_is_free_to_bind_again_as_soon_as_its_listener_closes():
    """A member cancels a forward and asks for the port again: the released
    listener is parked for a turn, then closed.  Twisted's ``stopListening``
    closed the socket one more turn later, and a request arriving in between
    was refused ("port N is in use on the jumphost")."""
    from twisted.internet import tcp
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    listener = tcp.Port(0, Factory(), interface="127.0.0.73", reactor=clock)
    listener.startListening()
    number = listener.getHost().port
    parked = ActiveForward(
        port=number,
        requested_host="localhost",
        bind_address="127.0.0.73",
        avatar=None,  # type: ignore[arg-type]
        since=0.0,
        listener=listener,
        factory=forwarding.ForwardListenerFactory.__new__(forwarding.ForwardListenerFactory),
    )
    registry = TunnelRegistry()
    registry.park(parked, clock)
    # One reactor pass runs the parked listener's close (nobody claimed it); what
    # that schedules runs in the next pass only (``Clock.advance`` would run it
    # at once, unlike the reactor).
    (close,) = clock.getDelayedCalls()
    run, args = close.func, close.args
    close.cancel()
    run(*args)
    with pysocket.socket() as again:
        again.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.73", number))  # refused while the old socket lingered
        again.listen()
