"""send_now and Cork: writes leave at once, in order, and bursts in one send."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import main, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure

from nekojump.ssh.sending import (
    Burst,
    Cork,
    GatheringServer,
    SharedReadServer,
    send_all_now,
    send_now,
    unsent_bytes,
)


def connection() -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor = MemoryReactor()
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = True
    return conn, peer, reactor


def drain(conn: tcp.Connection, peer: socket.socket, expected: int) -> bytes:
    """What the peer reads while the reactor would keep calling doWrite."""
    peer.setblocking(False)
    got = bytearray()
    while len(got) < expected:
        conn.doWrite()
        try:
            got += peer.recv(1 << 20)
        except BlockingIOError:
            pass
    return bytes(got)


def test_a_write_on_an_idle_socket_goes_out_without_waiting_for_the_reactor():
    conn, peer, reactor = connection()
    send_now(conn, b"ping")
    assert peer.recv(16) == b"ping"
    assert conn._tempDataBuffer == [] and conn not in reactor.writers


def test_what_the_socket_cannot_take_is_queued_and_later_writes_stay_behind_it():
    conn, peer, reactor = connection()
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB, more than the socket buffers hold
    send_now(conn, big)
    assert conn in reactor.writers  # the rest waits for the reactor, as with write()
    send_now(conn, b"tail")
    assert drain(conn, peer, len(big) + 4) == big + b"tail"


def test_a_view_of_a_packet_is_sent_and_what_is_queued_is_a_copy():
    conn, peer, reactor = connection()
    packet = bytes(range(256)) * (32 * 1024)
    send_now(conn, memoryview(packet)[100:])  # more than the socket takes at once
    assert conn in reactor.writers
    assert all(type(piece) is bytes for piece in conn._tempDataBuffer)
    send_now(conn, memoryview(b"tail"))  # queued behind: Twisted only takes bytes
    assert drain(conn, peer, len(packet) - 100 + 4) == packet[100:] + b"tail"


def test_a_closing_transport_is_left_to_twisted():
    conn, _peer, _reactor = connection()
    conn.disconnecting = True
    send_now(conn, b"late")
    assert conn._tempDataBuffer == [b"late"]


def test_a_cork_sends_a_burst_in_one_write_and_nested_holds_join_it():
    transport = StringTransport()
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    cork = Cork(transport)
    with cork.held():
        cork.write(b"a")
        with cork.held():
            cork.write(b"b")
        assert writes == []
        cork.write(b"c")
    assert writes == [b"abc"]
    cork.write(b"d")  # not held: at once
    assert writes == [b"abc", b"d"]


def test_releasing_a_cork_sends_what_it_holds_before_the_block_ends():
    transport = StringTransport()
    cork = Cork(transport)
    with cork.held():
        cork.write(b"disconnect")
        cork.release()
        assert transport.value() == b"disconnect"
        cork.write(b"after")
        assert transport.value() == b"disconnectafter"


def test_a_burst_sends_each_socket_its_writes_of_one_read_in_one_system_call():
    """Several packets of one SSH read carry data for two forwarded connections:
    each socket gets one sendmsg, with the pieces in order, at the end of the read."""
    (a, peer_a, _), (b, peer_b, _) = connection(), connection()
    calls: list[str] = []
    for name, conn in (("a", a), ("b", b)):
        real = conn.socket

        class Counting:
            def __getattr__(self, attr, real=real):
                return getattr(real, attr)

            def sendmsg(self, pieces, name=name, real=real):
                calls.append(name)
                return real.sendmsg(pieces)

        conn.socket = Counting()
    burst = Burst()
    cork_a, cork_b = Cork(a), Cork(b)
    with burst:
        for piece in (b"1", memoryview(b"22"), b"333"):
            burst.hold(cork_a).write(piece)
            burst.hold(cork_b).write(piece.upper() if isinstance(piece, bytes) else piece)
        assert calls == [] and cork_a._pieces
    assert sorted(calls) == ["a", "b"]
    assert peer_a.recv(16) == b"122333" and peer_b.recv(16) == b"122333"
    burst.hold(cork_a).write(b"later")  # outside a read: at once
    assert peer_a.recv(16) == b"later"


def test_unsent_bytes_counts_what_the_peer_has_not_read_yet():
    conn, peer, _reactor = connection()
    send_now(conn, b"x" * 50_000)
    assert unsent_bytes(conn) >= 50_000
    got = 0
    while got < 50_000:
        got += len(peer.recv(1 << 20))
    assert unsent_bytes(conn) == 0


def test_a_burst_sends_every_cork_and_runs_every_action_even_if_one_fails():
    burst = Burst()
    good, bad = StringTransport(), StringTransport()

    def broken(data: bytes) -> None:
        raise RuntimeError("transport gone wrong")

    bad.write = broken  # type: ignore[method-assign]
    ran: list[str] = []
    with pytest.raises(RuntimeError):
        with burst:
            burst.hold(Cork(bad)).write(b"lost")
            burst.hold(Cork(good)).write(b"kept")
            burst.after("window", lambda: ran.append("first"))
            burst.after("window", lambda: ran.append("last"))  # the last one per key
    assert good.value() == b"kept" and ran == ["last"]


def gathering() -> tuple[GatheringServer, socket.socket, MemoryReactor]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor = MemoryReactor()
    conn = GatheringServer(ours, Protocol(), ("127.0.0.1", 40000), None, 1, reactor)
    return conn, peer, reactor


def test_a_mesh_connection_queues_views_as_they_are_and_sends_them_in_order():
    """A slow mesh client: what waits is the decrypted packets' data itself,
    never joined into one copy (Twisted's transports copy it two or three times)."""
    conn, peer, reactor = gathering()
    packet = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket takes
    pieces = [memoryview(packet)[10:], b"middle", memoryview(b"--tail--")[2:-2]]
    send_all_now(conn, pieces)
    assert conn in reactor.writers
    assert conn.dataBuffer == b"" and isinstance(conn._tempDataBuffer[0], memoryview)
    assert unsent_bytes(conn) >= len(packet)  # the peer has read nothing yet
    send_now(conn, memoryview(b"later"))  # behind the queue, not before it
    send_all_now(conn, [b"and ", memoryview(b"last")])
    expected = packet[10:] + b"middle" + b"tail" + b"later" + b"and last"
    assert drain(conn, peer, len(expected)) == expected
    assert conn._tempDataBuffer == [] and conn._tempDataLen == 0
    assert conn not in reactor.writers


def test_a_mesh_connection_pauses_its_producer_while_full_and_resumes_it_once_drained():
    conn, peer, _reactor = gathering()

    class Producer:
        paused = resumed = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            self.resumed += 1

        def stopProducing(self) -> None:
            pass

    producer = Producer()
    conn.registerProducer(producer, True)
    big = bytes(4 * 1024 * 1024)
    send_all_now(conn, [memoryview(big), b"x"])
    assert producer.paused == 1 and producer.resumed == 0
    assert drain(conn, peer, len(big) + 1) == big + b"x"
    assert producer.resumed == 1


@pytest.mark.parametrize("close", ["loseConnection", "loseWriteConnection"])
def test_a_mesh_connection_closes_only_after_everything_queued_is_sent(close):
    conn, peer, _reactor = gathering()
    big = bytes(range(256)) * (16 * 1024)
    send_all_now(conn, [b"head", memoryview(big)])
    getattr(conn, close)()
    peer.setblocking(False)
    got = bytearray()
    result = None
    for _ in range(10_000):  # bounded: a socket pair drains in a few dozen rounds
        result = conn.doWrite()
        try:
            got += peer.recv(1 << 20)
        except BlockingIOError:
            pass
        if len(got) == len(big) + 4 and not conn._tempDataBuffer:
            result = conn.doWrite()
            break
    assert bytes(got) == b"head" + big
    if close == "loseConnection":
        assert result is main.CONNECTION_DONE
    else:
        assert conn._writeDisconnected and peer.recv(16) == b""  # FIN after the data


def test_a_flood_of_tiny_writes_to_a_slow_mesh_client_is_queued_compactly():
    """Each queued piece costs memory of its own, and a view keeps its whole
    packet: what one-byte packets queue must stay near the bytes they carry."""
    conn, peer, _reactor = gathering()
    fill = bytes(8 * 1024 * 1024)
    send_now(conn, fill)  # the socket is full from here on
    packets = [bytes([n % 256]) * 300 for n in range(4000)]
    for n in range(0, 2000, 20):  # twenty one-byte data views per read
        send_all_now(conn, [memoryview(p)[:1] for p in packets[n : n + 20]])
    for n in range(2000, 4000):  # one per read
        send_now(conn, memoryview(packets[n])[:1])
    assert len(conn._tempDataBuffer) == 2  # the fill, then every small piece together
    assert type(conn._tempDataBuffer[1]) is bytes
    expected = fill + bytes(n % 256 for n in range(4000))
    assert drain(conn, peer, len(expected)) == expected


def test_unsent_bytes_of_a_lost_connection_is_what_twisted_still_holds():
    conn, _peer, _reactor = connection()
    conn.connectionLost(Failure(ConnectionDone()))  # Twisted drops the socket attribute
    assert not hasattr(conn, "socket")
    assert unsent_bytes(conn) == 0


class ReadsItself(Protocol):
    """A protocol that reads its socket itself while ``answers`` says so."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.received: list[bytes] = []

    def read_socket(self, sock: socket.socket) -> int | None:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer:
            return len(sock.recv(answer))
        return answer

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (3, None),
        (0, main.CONNECTION_DONE),
        (BlockingIOError(), None),
        (ConnectionResetError(), main.CONNECTION_LOST),
    ],
)
def test_a_mesh_connection_lets_its_protocol_read_the_socket(answer, result):
    conn, peer, _reactor = gathering()
    conn.protocol = protocol = ReadsItself(answer)
    peer.sendall(b"abcdef")
    assert conn.doRead() == result
    assert protocol.received == []


def test_a_mesh_connection_reads_as_usual_when_its_protocol_declines():
    conn, peer, _reactor = gathering()
    conn.protocol = protocol = ReadsItself(None)
    peer.sendall(b"abcdef")
    assert conn.doRead() is None
    assert protocol.received == [b"abcdef"]


class Keeps(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(bytes(data))


def shared_reader() -> tuple[SharedReadServer, socket.socket, Keeps]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    protocol = Keeps()
    conn = SharedReadServer(ours, protocol, ("127.0.0.1", 40000), None, 1, MemoryReactor())
    return conn, peer, protocol


def test_ssh_connections_read_into_one_shared_buffer_in_turn():
    first, first_peer, got_first = shared_reader()
    second, second_peer, got_second = shared_reader()
    first_peer.sendall(b"one")
    second_peer.sendall(b"two")
    assert first.doRead() is None and second.doRead() is None
    assert got_first.received == [b"one"] and got_second.received == [b"two"]
    first_peer.close()
    assert first.doRead() == main.CONNECTION_DONE


def test_a_read_while_the_shared_buffer_is_in_use_gets_its_own():
    first, first_peer, _ = shared_reader()
    second, second_peer, got_second = shared_reader()
    seen: list[bytes] = []

    def nested(data: bytes) -> None:
        second.doRead()  # Twisted never does this; if it did, "one" must survive
        seen.append(bytes(data))

    first.protocol.dataReceived = nested
    first_peer.sendall(b"one")
    second_peer.sendall(b"two")
    first.doRead()
    assert seen == [b"one"] and got_second.received == [b"two"]
