"""The data path of one remote forward: mesh socket <-> ``forwarded-tcpip`` channel.

Flow control runs both ways, so a forwarded connection never buffers much
more than one SSH window in the server:

- mesh -> member: when the member's channel window is used up, Conch calls
  ``stopWriting`` on the channel and we stop reading the mesh socket until
  the window opens again (``startWriting``).
- member -> mesh: the channel is a push producer for the mesh socket; while
  the socket's write buffer is full we grant the member no more window.

Windows start at OpenSSH's 2 MiB and are given back in steps of an eighth as
the data goes out to the mesh socket.  While the mesh client keeps up, each
step also grows the window, up to 16 MiB, so one connection over a long link
is not window-bound; the growth comes from one budget for the whole process
and goes back to it when the mesh socket stays backed up for
``STALL_SECONDS`` (or the channel closes).  A slow reader therefore holds
at most 2 MiB of the member's data, and all fast ones together at most
``WINDOW_GROWTH_BUDGET`` more.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from functools import partial

from attrs import define
from twisted.conch.error import ConchError
from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.forwarding import packOpen_forwarded_tcpip
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from nekojump.logs import conch_logger
from nekojump.metrics import Metrics
from nekojump.policy import IPNetwork, source_allowed
from nekojump.ssh.registry import ActiveForward
from nekojump.ssh.sending import Burst, Cork, unsent_bytes

#: The window a forwarded connection starts with (OpenSSH's), and the most
#: it grows to while the mesh client reads as fast as the member sends.
CHANNEL_WINDOW = 2 * 1024 * 1024
MAX_CHANNEL_WINDOW = 16 * 1024 * 1024
#: Window beyond CHANNEL_WINDOW that all forwarded connections together may hold.
WINDOW_GROWTH_BUDGET = 128 * 1024 * 1024
#: Each step grows the window by this many times the data it gives back:
#: from 2 MiB to the maximum within the first round trip of a fast transfer.
GROWTH_FACTOR = 7
#: A mesh socket backed up this long (seconds) means a slow mesh client.
STALL_SECONDS = 0.1
#: The largest data packet the member may send: a CHANNEL_DATA packet of this
#: size still fits OpenSSH's 256 KiB packet limit.  Bigger packets mean fewer
#: per-packet steps in the server (OpenSSH sends them when its buffer backs up).
CHANNEL_MAX_PACKET = 255 * 1024
#: The smallest packets a member may ask for (OpenSSH asks for 32 KiB): data
#: cut into tinier ones would cost a packet per few bytes.
MIN_MEMBER_PACKET = 512

#: Bytes read from a socket at once, and queued for writing before its
#: producer is paused (Twisted's default is 64 KiB for both).  Reads this big
#: halve the per-read work of a bulk transfer against 256 KiB ones: 0.85-0.88x
#: the server CPU per GiB uploaded, 0.88-0.95x downloaded (paired rounds).
#: The reads themselves go into buffers shared by the process.
SOCKET_BUFFER = 1024 * 1024


def tune_socket(transport: object) -> None:
    """No Nagle (we write whole messages once per reactor turn) and big reads."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)
    transport.bufferSize = SOCKET_BUFFER


LOCAL_SERVICE_REFUSED = "your local service refused the connection"


@define
class WindowBudget:
    """Channel window granted beyond the starting window, for the whole process."""

    limit: int
    used: int = 0

    def take(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of growth, whatever is left of the budget."""
        granted = max(0, min(wanted, self.limit - self.used))
        self.used += granted
        return granted

    def give_back(self, amount: int) -> None:
        self.used -= amount


class ForwardListenerFactory(Factory):
    """Accepts mesh members on a forwarded port, from allowed sources only."""

    noisy = False
    log = Logger()

    def __init__(
        self,
        forward: ActiveForward,
        allowed_sources: Iterable[IPNetwork],
        metrics: Metrics | None = None,
    ):
        #: None while the listener is released and about to close.
        self.forward: ActiveForward | None = forward
        self.allowed_sources = tuple(allowed_sources)
        self.metrics = metrics

    def logPrefix(self) -> str:
        """Who the port is for, in Twisted's "... starting on PORT" line."""
        if self.forward is None:
            return "a released forward"
        return f"{self.forward.avatar.identity.member_name}'s forward"

    def buildProtocol(self, addr: IAddress) -> MeshConnection | None:
        if self.forward is None:
            return None
        host = getattr(addr, "host", "")
        avatar = self.forward.avatar
        full = avatar.limits.refusal(
            "streams",
            avatar.registry.streams_of(avatar.identity.member_id),
            avatar.config.limits.max_streams_per_member,
        )
        if full is not None:
            self.log.info(
                "refused a connection to port {port}: {reason}",
                port=self.forward.port,
                reason=full.reason,
            )
            return None
        if not source_allowed(host, self.allowed_sources):
            self.log.info(
                "refused {source} on forwarded port {port}: not an allowed source",
                source=host,
                port=self.forward.port,
            )
            if self.metrics is not None:
                self.metrics.refused_connections.labels("forward", "source").inc()
            return None
        return MeshConnection(self.forward)


@implementer(IHalfCloseableProtocol)
class MeshConnection(Protocol):
    """A mesh member's TCP connection to a forwarded port."""

    log = Logger()

    def __init__(self, forward: ActiveForward):
        self.forward = forward
        self.channel: ForwardedChannel | None = None
        self.read_closed = False

    def connectionMade(self) -> None:
        # Read nothing until the member's ssh has accepted the channel.
        self.transport.pauseProducing()
        #: What the member sends, gathered over one read of its SSH socket.
        self.output = Cork(self.transport)
        tune_socket(self.transport)
        forward = self.forward
        conn = forward.avatar.conn
        peer = self.transport.getPeer()
        self.channel = ForwardedChannel(
            self, conn=conn, localWindow=CHANNEL_WINDOW, localMaxPacket=CHANNEL_MAX_PACKET
        )
        forward.open_connections += 1
        forward.connections_total += 1
        self.member_id = forward.avatar.identity.member_id
        forward.avatar.registry.stream_opened(self.member_id)
        conn.openChannel(
            self.channel,
            packOpen_forwarded_tcpip(
                (forward.requested_host, forward.port), (peer.host, peer.port)
            ),
        )

    def dataReceived(self, data: bytes) -> None:
        self.forward.bytes_to_member += len(data)
        assert self.channel is not None
        self.channel.write(data)

    def read_socket(self, sock: socket.socket) -> int | None:
        """Read the mesh socket straight into packets for the member, if the
        channel can (``ForwardedChannel.forward_from``); None: read as usual."""
        channel = self.channel
        if channel is None or self.read_closed:
            return None
        got = channel.forward_from(sock)
        if got:
            self.forward.bytes_to_member += got
        return got

    def readConnectionLost(self) -> None:
        """The mesh member sent FIN: pass EOF on, keep the other direction."""
        self.read_closed = True
        if self.channel is not None:
            self.channel.send_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.forward.open_connections -= 1
        self.forward.avatar.registry.stream_closed(self.member_id, self.forward)
        if self.channel is not None:
            self.channel.mesh_gone()

    def resume_reading(self) -> None:
        if not self.read_closed:
            self.transport.resumeProducing()

    def pause_reading(self) -> None:
        if not self.read_closed:
            self.transport.pauseProducing()


@implementer(IPushProducer)
class ForwardedChannel(SSHChannel):
    """The member side of one forwarded connection."""

    name = b"forwarded-tcpip"
    log = Logger()
    _log = conch_logger("nekojump.ssh.forwarding", LogLevel.warn)

    def __init__(self, mesh: MeshConnection, **kwargs: object):
        super().__init__(**kwargs)
        self.mesh = mesh
        self.is_open = False
        self.mesh_closed = False
        self.eof_sent = False
        self.window_blocked = False
        #: True while the mesh socket cannot take more: grant no window then.
        self.reading_paused = False
        #: True if the member's client cannot take our packets (see channelOpen).
        self.refused = False
        #: Where writes to the mesh socket wait for the end of a read of the SSH socket.
        self._burst: Burst = self.conn.transport.burst

    # -- channel events ----------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self.is_open = True
        # Whatever the member announces, our packets stay within 256 KiB.
        self.remoteMaxPacket = min(self.remoteMaxPacket, CHANNEL_MAX_PACKET)
        if self.remoteMaxPacket < MIN_MEMBER_PACKET:
            message = (
                f"your ssh client accepts packets of only {self.remoteMaxPacket} bytes "
                f"(at least {MIN_MEMBER_PACKET} needed)"
            )
            self.forward.last_error = message
            self.forward.avatar.forward_failed(self.forward, message)
            self.refused = True
            self.mesh_closed = True
            self.mesh.transport.loseConnection()
        if self.mesh_closed:
            self.loseConnection()
            return
        forward = self.forward
        if forward.last_error is not None:
            # A connection got through: what went wrong before is over.
            forward.last_error = None
            forward.avatar.registry.forward_changed(forward)
        self.mesh.transport.registerProducer(self, True)
        self.update_reading()

    def openFailed(self, reason: Failure | Exception) -> None:
        error = reason.value if isinstance(reason, Failure) else reason
        if isinstance(error, ConchError):
            code = error.data
            text = error.value
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            if code == connection.OPEN_CONNECT_FAILED:
                message = LOCAL_SERVICE_REFUSED
            else:
                message = f"your ssh client refused the connection: {text}"
            self.forward.last_error = message
            self.forward.avatar.forward_failed(self.forward, message)
        self.mesh.transport.loseConnection()

    def receive_data(self, data: memoryview) -> None:
        """Data from the member, a view of its packet (the connection counted it
        against the window): on to the mesh client, and the window given back
        once it has left.  ``dataReceived`` and ``replenish`` in one call: this
        runs for every packet of a download."""
        if self.member_eof:
            self.dataReceived(data)
            return
        mesh = self.mesh
        mesh.forward.bytes_from_member += len(data)
        self._burst.hold(mesh.output).write(data)
        self.replenish()

    def dataReceived(self, data: bytes | memoryview) -> None:
        if self.member_eof:
            # The member promised no more: what it sends anyway is dropped, and
            # ``replenish`` gives no window back, so it cannot pile up here.
            if not self._said_data_after_eof:
                self._said_data_after_eof = True
                self.log.info(
                    "{member}'s ssh sent data after EOF on port {port}; dropped",
                    member=self.forward.avatar.identity.member_name,
                    port=self.forward.port,
                )
            return
        mesh = self.mesh
        mesh.forward.bytes_from_member += len(data)
        self._burst.hold(mesh.output).write(data)

    def forward_from(self, sock: socket.socket) -> int | None:
        """Read the mesh socket into sealed packets for the member, no more
        than its window takes (``PacketLayerMixin.forward_from_socket``);
        returns the bytes read, or None if the socket is to be read as usual."""
        window = self.remoteWindowLeft
        if (
            window <= 0
            or self.buf
            or self.refused
            or self.closing
            or self.localClosed
            or not self.is_open
        ):
            return None
        forward_from_socket = getattr(self.conn.transport, "forward_from_socket", None)
        if forward_from_socket is None:
            return None
        got = forward_from_socket(
            sock,
            self.conn.channelsToRemoteChannel[self],
            min(window, SOCKET_BUFFER),
            self.remoteMaxPacket,
        )
        if got:
            self.remoteWindowLeft = window - got
            if got == window:
                # Used up: Conch's write would stop here; the member's next
                # window adjust starts reading again (``addWindowBytes``).
                self.areWriting = False
                self.stopWriting()
        return got

    def write(self, data: bytes) -> None:
        """Conch's ``write``; what the window allows now is sealed in one pass."""
        if self.refused:  # nothing goes to this member's client
            return
        size = len(data)
        if not size or self.buf or size > self.remoteWindowLeft or self.closing:
            # Conch's write: as many packets as the window takes, one send.
            output = getattr(self.conn.transport, "output", None)
            if output is None:
                super().write(data)
                return
            with output.held():
                super().write(data)
            return
        # All of it fits: one pass seals every packet and sends them together.
        self.conn.send_data_packets(self, data, self.remoteMaxPacket)
        self.remoteWindowLeft -= size

    #: True once the member sent EOF: it may send no more data.
    member_eof = False
    _said_data_after_eof = False

    def eofReceived(self) -> None:
        # The member sends no more: stop being the socket's producer (a paused
        # producer would keep Twisted from ever sending the FIN), then FIN.
        self.member_eof = True
        self._stop_producing_for_mesh()
        self.mesh.transport.loseWriteConnection()

    def closeReceived(self) -> None:
        # The member closed: what still waits for its window can never go
        # (OpenSSH grants none after its CLOSE), and Conch would answer CLOSE
        # only once it had, leaving the channel, the mesh socket, the stream
        # count and the window growth behind for the life of the connection.
        self.buf = b""
        self.extBuf = []
        self.loseConnection()

    def closed(self) -> None:
        self.is_open = False
        self._release_window()
        self._stop_producing_for_mesh()
        self.mesh.transport.loseConnection()

    def _stop_producing_for_mesh(self) -> None:
        # What this read gathered goes before the FIN.
        self.mesh.output.release()
        if self.mesh.transport.producer is self:
            self.mesh.transport.unregisterProducer()

    # -- towards the member --------------------------------------------------------

    def send_eof(self) -> None:
        if self.is_open and not self.eof_sent and not self.closing:
            self.eof_sent = True
            self.conn.sendEOF(self)

    def mesh_gone(self) -> None:
        """The mesh socket is closed: close the channel once it is open."""
        self.mesh_closed = True
        if self.is_open:
            self.loseConnection()

    # Conch calls these when the member's window is used up / open again.
    def stopWriting(self) -> None:
        self.window_blocked = True
        self.update_reading()

    def startWriting(self) -> None:
        self.window_blocked = False
        self.update_reading()

    def update_reading(self) -> None:
        """Read the mesh socket only while the member has window and the SSH socket room."""
        if self.is_open and not self.window_blocked and not self.conn.reading_blocked:
            self.mesh.resume_reading()
        else:
            self.mesh.pause_reading()

    # -- window towards the member -------------------------------------------------

    #: Shared by every forwarded connection in the process.
    budget = WindowBudget(WINDOW_GROWTH_BUDGET)
    #: This channel's window beyond CHANNEL_WINDOW, taken from ``budget``.
    growth = 0

    def replenish(self, grow: bool = True) -> None:
        """Give the member back the window its data used, once that data is on
        its way to the mesh client; grow the window while the client keeps up."""
        if not self.growth and (
            self.localWindowSize - self.localWindowLeft < self.localWindowSize // 8
        ):
            return  # too little used to give back, and no growth to settle
        burst = self._burst
        if burst.holds(self.mesh.output):
            # This read's data is still gathered: decide once it has left.
            burst.after(self, self.replenish if grow else partial(self.replenish, grow))
            return
        self._settle_growth()
        if (
            self.reading_paused
            or self.member_eof
            or self.mesh_closed  # what the member sends now goes nowhere
            or not self.is_open
            or self.localClosed
        ):
            return
        consumed = self.localWindowSize - self.localWindowLeft
        if consumed < self.localWindowSize // 8:
            return
        room = MAX_CHANNEL_WINDOW - self.localWindowSize
        # Grow only while the mesh client really keeps up: what we wrote has
        # left the socket, not just moved into the kernel's send buffer.
        if grow and room > 0 and unsent_bytes(self.mesh.transport) < consumed // 2:
            extra = self.budget.take(min(GROWTH_FACTOR * consumed, room))
            self.growth += extra
            self.localWindowSize += extra
            consumed += extra
        self.conn.adjustWindow(self, consumed)

    def _settle_growth(self) -> None:
        """Hold budget for what the member may still send beyond CHANNEL_WINDOW
        (the window, or more if it was granted before a shrink), not more."""
        held = max(self.localWindowSize, self.localWindowLeft) - CHANNEL_WINDOW
        excess = self.growth - max(0, held)
        if excess > 0:
            self.budget.give_back(excess)
            self.growth -= excess

    def _shrink_window(self) -> None:
        """Back to the starting window; the growth goes back to the budget as
        the member uses up what it was already granted."""
        self.localWindowSize = CHANNEL_WINDOW
        self._settle_growth()

    # -- IPushProducer, for the mesh socket's write buffer ------------------------
    #
    # Twisted pauses us whenever more than SOCKET_BUFFER waits to be written and
    # resumes us when all of it is in the kernel: with a fast mesh client that
    # happens many times a second.  Only a pause that lasts STALL_SECONDS means
    # the client is slower than the member; then the growth goes back.

    _paused_since = 0.0
    _stall_check: IDelayedCall | None = None

    @property
    def _clock(self) -> IReactorTime:
        return self.forward.avatar.clock

    def pauseProducing(self) -> None:
        # Twisted calls this on every write while the buffer is full.
        if not self.reading_paused:
            self._paused_since = self._clock.seconds()
        self.reading_paused = True
        if self.growth and self._stall_check is None:
            self._stall_check = self._clock.callLater(STALL_SECONDS, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_check = None
        if not self.reading_paused or not self.growth:
            return
        paused_for = self._clock.seconds() - self._paused_since
        if paused_for >= STALL_SECONDS:
            self._shrink_window()
        else:
            self._stall_check = self._clock.callLater(STALL_SECONDS - paused_for, self._check_stall)

    def resumeProducing(self) -> None:
        self.reading_paused = False
        # A short pause was only the socket catching up: keep growing.
        self.replenish(grow=self._clock.seconds() - self._paused_since < STALL_SECONDS)

    def stopProducing(self) -> None:
        pass

    def _release_window(self) -> None:
        if self._stall_check is not None and self._stall_check.active():
            self._stall_check.cancel()
        self._stall_check = None
        self.budget.give_back(self.growth)
        self.growth = 0

    @property
    def forward(self) -> ActiveForward:
        return self.mesh.forward
