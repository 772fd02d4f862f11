"""The data path of one remote forward: mesh socket <-> ``forwarded-tcpip`` channel.

Flow control runs both ways, so a forwarded connection never buffers much
more than one SSH window in the server:

- mesh -> member: when the member's channel window is used up, Conch calls
  ``stopWriting`` on the channel and we stop reading the mesh socket until
  the window opens again (``startWriting``).
- member -> mesh: the channel is a push producer for the mesh socket; while
  the socket's write buffer is full we grant the member no more window.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.conch.error import ConchError
from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.forwarding import packOpen_forwarded_tcpip
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from nekojump.logs import conch_logger
from nekojump.metrics import Metrics
from nekojump.policy import IPNetwork, source_allowed
from nekojump.ssh.registry import ActiveForward

#: OpenSSH's own channel window and packet size.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PACKET = 32 * 1024

LOCAL_SERVICE_REFUSED = "your local service refused the connection"


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
        self.transport.setTcpNoDelay(True)
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

    def readConnectionLost(self) -> None:
        """The mesh member sent FIN: pass EOF on, keep the other direction."""
        self.read_closed = True
        if self.channel is not None:
            self.channel.send_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.forward.open_connections -= 1
        self.forward.avatar.registry.stream_closed(self.member_id)
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

    # -- channel events ----------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self.is_open = True
        if self.mesh_closed:
            self.loseConnection()
            return
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

    def dataReceived(self, data: bytes) -> None:
        self.forward.bytes_from_member += len(data)
        self.mesh.transport.write(data)

    def eofReceived(self) -> None:
        # The member sends no more: stop being the socket's producer (a paused
        # producer would keep Twisted from ever sending the FIN), then FIN.
        self._stop_producing_for_mesh()
        self.mesh.transport.loseWriteConnection()

    def closed(self) -> None:
        self.is_open = False
        self._stop_producing_for_mesh()
        self.mesh.transport.loseConnection()

    def _stop_producing_for_mesh(self) -> None:
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

    # -- IPushProducer, for the mesh socket's write buffer ------------------------

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False
        grant = self.localWindowSize - self.localWindowLeft
        if grant > 0 and self.is_open and not self.localClosed:
            self.conn.adjustWindow(self, grant)

    def stopProducing(self) -> None:
        pass

    @property
    def forward(self) -> ActiveForward:
        return self.mesh.forward
