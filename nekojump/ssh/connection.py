"""The ``ssh-connection`` service of a tunnel connection."""

from __future__ import annotations

import struct

from twisted.conch.ssh import common
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_WINDOW_ADJUST,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_RESOURCE_SHORTAGE,
    SSHConnection,
)
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from nekojump import policy
from nekojump.logs import conch_logger
from nekojump.ssh.forwarding import ForwardedChannel
from nekojump.ssh.keepalive import Keepalive
from nekojump.ssh.packets import CHANNEL_DATA_FIELDS
from nekojump.ssh.session import TunnelSession

KEEPALIVE_REQUEST = b"keepalive@openssh.com"
#: The largest window SSH can express (RFC 4254 5.2).
MAX_WINDOW = 2**32 - 1

#: Session channels one connection may have open at once (OpenSSH MaxSessions).
MAX_SESSIONS = 10


@implementer(IPushProducer)
class TunnelConnection(SSHConnection):
    """Refuses unwanted channels quietly and withholds window from paused channels."""

    log = Logger()
    _log = conch_logger("nekojump.ssh.connection", LogLevel.warn)

    keepalive: Keepalive | None = None

    def serviceStarted(self) -> None:
        super().serviceStarted()
        avatar = self.transport.avatar
        avatar.connection_started(self)
        ssh = self.transport.factory.config.ssh
        self.keepalive = Keepalive(
            send=lambda: self.sendGlobalRequest(KEEPALIVE_REQUEST, b"", wantReply=1),
            clock=self.transport.factory.reactor,
            interval=ssh.client_alive_interval,
            count_max=ssh.client_alive_count_max,
            on_dead=lambda: avatar.disconnect("client stopped answering keepalives"),
            received=lambda: self.transport.bytes_received,
        )
        self.keepalive.start()
        socket = self.transport.transport
        if getattr(socket, "producer", True) is None:
            socket.registerProducer(self, True)

    def probe(self, timeout: float) -> None:
        """Make sure the client is still there: a keepalive now, and the
        connection ends if no reply comes within ``timeout`` seconds."""
        if self.keepalive is not None:
            self.keepalive.probe(timeout)

    #: True while the member's SSH socket has more queued than it should:
    #: every forwarded connection stops reading its mesh socket meanwhile.
    output_paused = False

    def forwarded_channels(self) -> list[ForwardedChannel]:
        return [c for c in self.channels.values() if isinstance(c, ForwardedChannel)]

    #: True while a key exchange runs: channel data would only queue up.
    kex_running = False

    @property
    def reading_blocked(self) -> bool:
        """Forwarded connections must not read their mesh sockets now."""
        return self.output_paused or self.kex_running

    def key_exchange_running(self, running: bool) -> None:
        self.kex_running = running
        self._update_readers()

    # IPushProducer, registered on the member's SSH socket.
    def pauseProducing(self) -> None:
        # Twisted calls this on every write while the socket's buffer is full:
        # only the first call has channels to pause.
        if self.output_paused:
            return
        self.output_paused = True
        self._update_readers()

    def resumeProducing(self) -> None:
        self.output_paused = False
        self._update_readers()

    def _update_readers(self) -> None:
        for channel in self.forwarded_channels():
            channel.update_reading()

    def stopProducing(self) -> None:
        pass

    def serviceStopped(self) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        super().serviceStopped()

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        try:
            channel_type, rest = common.getNS(packet)
            (sender,) = struct.unpack(">L", rest[:4])
        except (struct.error, ValueError, IndexError):
            self.log.info("malformed channel open; disconnecting")
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"malformed channel open")
            return
        refusal = policy.channel_allowed(channel_type)
        if refusal is not None:
            avatar = self.transport.avatar
            self.log.info(
                "refused {channel_type} channel for {member}",
                channel_type=channel_type.decode("ascii", "replace"),
                member=avatar.identity.member_name,
            )
            self._refuse_open(sender, OPEN_ADMINISTRATIVELY_PROHIBITED, refusal.reason)
            return
        sessions = sum(isinstance(c, TunnelSession) for c in self.channels.values())
        if sessions >= MAX_SESSIONS:
            self._refuse_open(sender, OPEN_RESOURCE_SHORTAGE, "too many open sessions")
            return
        super().ssh_CHANNEL_OPEN(packet)

    def _refuse_open(self, sender: int, code: int, text: str) -> None:
        self.transport.sendPacket(
            MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, code) + common.NS(text.encode("utf-8")) + common.NS(b""),
        )

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        # Data and window adjusts, nearly every message of a busy tunnel, skip
        # Conch's dispatch by handler name.
        if messageNum == MSG_CHANNEL_DATA:
            self.ssh_CHANNEL_DATA(packet)
        elif messageNum == MSG_CHANNEL_WINDOW_ADJUST:
            self.ssh_CHANNEL_WINDOW_ADJUST(packet)
        else:
            super().packetReceived(messageNum, packet)

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:
        """More window from the peer, never beyond the protocol's 2**32 - 1."""
        try:
            local_channel, added = struct.unpack(">2L", packet[:8])
            channel = self.channels[local_channel]
        except (struct.error, KeyError):
            self.log.info("window adjust for an unknown channel; disconnecting")
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"unknown channel")
            return
        added = min(added, MAX_WINDOW - channel.remoteWindowLeft)
        if added > 0:
            channel.addWindowBytes(added)

    def ssh_CHANNEL_DATA(self, packet: bytes | memoryview) -> None:
        """Data for a channel, checked against its window and packet size.

        ``packet`` may be a view of the decrypted packet.  Channels with a
        ``receive_data`` method get the data there, as a view, and give the
        window back themselves; the others get ``bytes`` in ``dataReceived``
        and the window back once half of it is used."""
        try:
            local_channel, length = CHANNEL_DATA_FIELDS.unpack_from(packet)
            channel = self.channels[local_channel]
        except (struct.error, KeyError):
            self.log.info("data for an unknown channel; disconnecting")
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"unknown channel")
            return
        if len(packet) != 8 + length:
            # Bytes missing, or bytes after the data (OpenSSH refuses those too):
            # a view of the data would keep the whole packet alive while it waits.
            self.log.info("malformed data for channel {id}; disconnecting", id=local_channel)
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"malformed channel data")
            return
        data = packet[8:]
        if length > channel.localWindowLeft or length > channel.localMaxPacket:
            self.log.info(
                "channel {id}: more data than the window allows; closing it", id=local_channel
            )
            self.sendClose(channel)
            return
        channel.localWindowLeft -= length
        receive = getattr(channel, "receive_data", None)
        if receive is not None:
            receive(data)
            return
        if isinstance(data, memoryview):
            data = data.tobytes()
        channel.dataReceived(data)
        consumed = channel.localWindowSize - channel.localWindowLeft
        if consumed >= channel.localWindowSize // 2 and not channel.localClosed:
            self.adjustWindow(channel, consumed)

    #: Where the packet layer hands channel data once this service runs,
    #: without going through ``dispatchMessage`` and ``packetReceived``.
    channel_data = ssh_CHANNEL_DATA

    def sendData(self, channel: SSHChannel, data: bytes) -> None:
        """Conch's ``sendData`` without copying ``data`` into a new payload first."""
        if channel.localClosed:
            return
        self.transport.send_packet_parts(
            MSG_CHANNEL_DATA,
            CHANNEL_DATA_FIELDS.pack(self.channelsToRemoteChannel[channel], len(data)),
            data,
        )

    def send_data_packets(self, channel: SSHChannel, data: bytes, max_packet: int) -> None:
        """``sendData`` for ``data`` cut into packets of ``max_packet`` bytes."""
        if channel.localClosed:
            return
        self.transport.send_channel_data(self.channelsToRemoteChannel[channel], data, max_packet)

    def adjustWindow(self, channel: SSHChannel, bytesToAdd: int) -> None:
        # A forwarded channel whose mesh socket is full gets its window back
        # in resumeProducing, once the socket drains.
        if getattr(channel, "reading_paused", False):
            return
        super().adjustWindow(channel, bytesToAdd)
