"""The SSH binary packet layer: framing, AEAD/ETM ciphers, strict kex, rekeying.

``PacketLayerMixin`` goes before Conch's ``SSHServerTransport`` (or
``SSHClientTransport``, which the tests use) and replaces its packet code:

* ``sendPacket``/``getPacket`` seal and open packets with ``ciphers``
  (AES-GCM, chacha20-poly1305, AES-CTR + ETM), each direction switching keys
  on its own NEWKEYS, as RFC 4253 says (Conch switches both at once);
* strict key exchange (``kex-strict-*-v00@openssh.com``, the Terrapin fix,
  OpenSSH PROTOCOL 1.10): when both sides offer it, the peer's KEXINIT must
  be its first packet, nothing but key exchange messages is accepted until
  the first NEWKEYS, and each NEWKEYS resets that direction's sequence
  number to zero;
* no service messages before the first key exchange is done, strict or not;
* rekeying after ``rekey_bytes`` or ``rekey_packets`` in either direction,
  and a disconnect if the peer goes on for ``max_packets_per_key`` without
  rekeying; sequence numbers wrap at 2**32 and never overflow.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import MSG_CHANNEL_DATA
from twisted.conch.ssh.transport import (
    DISCONNECT_KEY_EXCHANGE_FAILED,
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MSG_DISCONNECT,
    MSG_KEXINIT,
    MSG_NEWKEYS,
    MSG_UNIMPLEMENTED,
)

from nekojump.ssh.ciphers import (
    AEAD_CIPHERS,
    CIPHERS,
    IMPLICIT_MAC,
    MACS,
    Direction,
    PacketCiphers,
    Plain,
)
from nekojump.ssh.sending import Borrowed, Burst, Cork, send_or_copy

#: The parts of a key exchange, in the order of a KEXINIT's name-lists.
_KEX_PARTS = (
    "key exchange",
    "host key",
    "cipher",
    "cipher",
    "MAC",
    "MAC",
    "compression",
    "compression",
)
#: The cipher clients without AES-GCM (dropbear's dbclient) have.
CHACHA20 = b"chacha20-poly1305@openssh.com"
STRICT_KEX_S = b"kex-strict-s-v00@openssh.com"
STRICT_KEX_C = b"kex-strict-c-v00@openssh.com"

#: OpenSSH's PACKET_MAX_SIZE.
MAX_PACKET_LENGTH = 256 * 1024
_SEQ_MASK = 0xFFFFFFFF
#: CHANNEL_DATA's fields before the data: recipient channel, data length.
CHANNEL_DATA_FIELDS = struct.Struct(">2L")
_PACKET_LENGTH = struct.Struct(">L")
#: uint32 packet length, byte padding length, byte message number.
_PACKET_HEAD = struct.Struct(">LBB")
#: A CHANNEL_DATA packet up to its data: length, padding length, message
#: number, recipient channel, data length.
_DATA_PACKET_HEAD = struct.Struct(">LBBLL")


#: The most packets one read of a mesh socket is sealed into at once.
MAX_PACKETS_PER_READ = 64


#: A whole packet's size on the wire, its padding, and where each packet's data goes.
_Layout = tuple[int, int, list[memoryview]]


class _SealBuffers:
    """Where ``forward_from_socket`` lays out packets and seals them: two
    buffers for the whole process (one read at a time runs in the reactor),
    replaced by bigger ones on demand.  Nothing outside keeps a view of them
    once a read is sent."""

    source = memoryview(bytearray())
    target = memoryview(bytearray())
    #: Layouts of reads of whole packets, made once: (block size, tag size,
    #: max packet, limit) -> what ``layout`` returns.
    _layouts: dict[tuple[int, int, int, int], _Layout] = {}

    @classmethod
    def layout(cls, tx: Direction, max_packet: int, limit: int) -> _Layout:
        """For a read of up to ``limit`` bytes into packets of ``max_packet``
        bytes of data: the size of a whole packet on the wire (its slot), its
        padding, and the places in ``source`` where each packet's data goes
        (14 bytes into its slot).  ``limit`` is at most MAX_PACKETS_PER_READ
        packets' worth."""
        key = (tx.block_size, tx.tag_size, max_packet, limit)
        found = cls._layouts.get(key)
        if found is not None:
            return found
        count = -(-limit // max_packet)
        padding = _padding_length(tx, 8 + max_packet)
        slot = 14 + max_packet + padding + tx.tag_size
        # The last packet may be short, with up to a block more padding.
        size = count * slot + 2 * tx.block_size
        if len(cls.source) < size:
            cls._layouts = {}
            cls.source, cls.target = memoryview(bytearray(size)), memoryview(bytearray(size))
        source = cls.source
        places = []
        for start in range(14, count * slot, slot):
            places.append(source[start : start + min(max_packet, limit)])
            limit -= max_packet
        found = (slot, padding, places)
        if limit == 0 or len(cls._layouts) < 8:  # whole packets; or a few others
            if len(cls._layouts) >= 16:
                cls._layouts.clear()
            cls._layouts[key] = found
        return found


class Decrypted:
    """Where the packets of one read of an SSH socket are decrypted, one after
    another, instead of into a new (zeroed) ``bytes`` each: one buffer for
    the whole process, as reads are handled one at a time.

    Inside ``with DECRYPTED:`` (the handling of one read) ``take`` hands out
    the next part of it; the channel data passed on are views of it, so
    ``Borrowed`` makes the mesh connections copy what they cannot send before
    the read is done.  Outside, or when a read's packets do not fit, ``take``
    gives None and the packet is decrypted the usual way."""

    #: Room for one whole read of an SSH socket and the packet it completes.
    SIZE = 2 << 20

    def __init__(self) -> None:
        self.view = memoryview(bytearray())
        self.used = 0
        self.depth = 0

    def take(self, size: int) -> memoryview | None:
        if not self.depth:
            return None
        start = self.used
        if start + size > len(self.view):
            if start or size > self.SIZE:
                return None
            self.view = memoryview(bytearray(self.SIZE))
        self.used = start + size
        return self.view[start : start + size]

    def __enter__(self) -> None:
        if not self.depth:
            self.used = 0
        self.depth += 1
        Borrowed.depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self.depth -= 1
        Borrowed.depth -= 1


DECRYPTED = Decrypted()


#: What Conch's connection service raises on a message it cannot parse or
#: place: a truncated field, an unknown channel, a reply to no request.
MALFORMED = (struct.error, ValueError, IndexError, KeyError)
#: The same for transport-layer messages, whose handlers also fail on fields
#: of the wrong kind.
MALFORMED_TRANSPORT = (struct.error, ValueError, IndexError, AttributeError, TypeError)


def is_kex_message(number: int) -> bool:
    """Key exchange messages: KEXINIT, NEWKEYS and the method-specific 30..49."""
    return number in (MSG_KEXINIT, MSG_NEWKEYS) or 30 <= number <= 49


def _padding_length(tx: Direction, size: int) -> int:
    """Random padding for a packet whose payload after the message number is
    ``size`` bytes: at least 4, and the encrypted part a whole number of blocks."""
    block = tx.block_size
    padding = block - (size + (2 if tx.length_outside else 6)) % block
    return padding + block if padding < 4 else padding


class PacketLayerMixin:
    """Packet protection and key exchange rules for a Conch transport."""

    #: Everything this layer can do, AEAD first; subclasses narrow it.
    supportedCiphers = list(CIPHERS)
    supportedMACs = list(MACS)

    #: Offer strict kex in the first KEXINIT (tests turn it off to play an old peer).
    offer_strict_kex = True
    #: Start a new key exchange after this much data or this many packets
    #: in either direction under one set of keys.
    rekey_bytes = 1 << 30
    rekey_packets = 1 << 28
    #: A peer that keeps sending this many packets without rekeying is dropped.
    max_packets_per_key = 1 << 31

    _tx = Plain()
    _rx = Plain()
    _strict = False
    _initial_kex_done = False
    _kexinit_seen = False
    _closing = False
    _rekey_requested = False
    _rx_waiting = False
    _last_incoming_sequence = 0
    #: This key exchange round: the peer's KEXINIT arrived; method messages seen.
    _peer_kexinit_this_round = False
    _kex_method_messages = 0
    #: Bytes of service packets held back while a key exchange runs.
    _blocked_bytes = 0
    #: Held-back bytes at which a stalled key exchange ends the connection.
    max_blocked_bytes = 8 * 1024 * 1024
    _tx_bytes = _tx_packets = _rx_bytes = _rx_packets = 0

    # -- key exchange ------------------------------------------------------

    def sendKexInit(self) -> None:
        """Our KEXINIT; the first one also carries ext-info and strict-kex markers."""
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            raise RuntimeError(f"Cannot send KEXINIT in state {self._keyExchangeState!r}")
        kex = list(self.supportedKeyExchanges)
        if self.sessionID is None:
            kex.append(self._EXT_INFO_C if self.isClient else self._EXT_INFO_S)
            if self.offer_strict_kex:
                kex.append(STRICT_KEX_C if self.isClient else STRICT_KEX_S)
        lists = [
            kex,
            self.supportedPublicKeys,
            self.supportedCiphers,
            self.supportedCiphers,
            self.supportedMACs,
            self.supportedMACs,
            self.supportedCompressions,
            self.supportedCompressions,
            self.supportedLanguages,
            self.supportedLanguages,
        ]
        self.ourKexInitPayload = (
            bytes((MSG_KEXINIT,))
            + os.urandom(16)
            + b"".join(NS(b",".join(names)) for names in lists)
            + b"\0"  # first_kex_packet_follows
            + b"\0\0\0\0"
        )
        self.sendPacket(MSG_KEXINIT, self.ourKexInitPayload[1:])
        self._keyExchangeState = self._KEY_EXCHANGE_REQUESTED
        self._pause_service(True)
        self._blockedByKeyExchange = []

    def ssh_KEXINIT(self, packet: bytes) -> None:
        if self._keyExchangeState == self._KEY_EXCHANGE_PROGRESSING or (
            self._strict and not self._initial_kex_done
        ):
            self._violation("unexpected KEXINIT during key exchange")
            return
        try:
            peer_kex = getNS(packet[16:])[0].split(b",")
        except (struct.error, ValueError):
            self._violation("malformed KEXINIT")
            return
        if not self._kexinit_seen:
            # The markers count in the first KEXINIT only.
            self._kexinit_seen = True
            theirs = STRICT_KEX_S if self.isClient else STRICT_KEX_C
            self._strict = self.offer_strict_kex and theirs in peer_kex
            if self._strict and self._last_incoming_sequence != 0:
                self._violation("KEXINIT was not the first packet")
                return
        self._peer_kexinit_this_round = True
        self._kex_method_messages = 0
        self._pause_service(True)
        if self.isClient:
            super().ssh_KEXINIT(packet)  # Conch's client starts its kex in there
        else:
            self._server_negotiate(packet)
        if self._closing:
            return
        negotiated = self.nextEncryptions
        if (
            negotiated.outCipType not in CIPHERS
            or negotiated.inCipType not in CIPHERS
            or (negotiated.outCipType not in AEAD_CIPHERS and negotiated.outMACType not in MACS)
            or (negotiated.inCipType not in AEAD_CIPHERS and negotiated.inMACType not in MACS)
        ):
            self.sendDisconnect(DISCONNECT_KEY_EXCHANGE_FAILED, b"couldn't match all kex parts")
            return
        self.nextEncryptions = PacketCiphers(
            negotiated.outCipType, negotiated.inCipType, negotiated.outMACType, negotiated.inMACType
        )
        self._keyExchangeState = self._KEY_EXCHANGE_PROGRESSING

    def _server_negotiate(self, packet: bytes) -> None:
        """Conch's server KEXINIT handling, but with no MAC for AEAD ciphers.

        Like OpenSSH, the MAC lists are not consulted for a direction whose
        cipher is AEAD, so a client offering only MACs we refuse still gets
        AES-GCM or chacha20-poly1305.
        """
        self.otherKexInitPayload = bytes((MSG_KEXINIT,)) + packet
        try:
            *lists, rest = getNS(packet[16:], 10)
            follows = rest[0]
        except (struct.error, ValueError, IndexError):
            self._violation("malformed KEXINIT")
            return
        kex, keys, enc_cs, enc_sc, mac_cs, mac_sc, comp_cs, comp_sc = (
            names.split(b",") for names in lists[:8]
        )

        def first(client: list[bytes], ours: list[bytes]) -> bytes | None:
            return next((name for name in client if name in ours), None)

        self.kexAlg = first(kex, self.supportedKeyExchanges)
        self.keyAlg = first(keys, self.supportedPublicKeys)
        cipher_in = first(enc_cs, self.supportedCiphers)
        cipher_out = first(enc_sc, self.supportedCiphers)
        mac_in = IMPLICIT_MAC if cipher_in in AEAD_CIPHERS else first(mac_cs, self.supportedMACs)
        mac_out = IMPLICIT_MAC if cipher_out in AEAD_CIPHERS else first(mac_sc, self.supportedMACs)
        self.incomingCompressionType = first(comp_cs, self.supportedCompressions)
        self.outgoingCompressionType = first(comp_sc, self.supportedCompressions)
        agreed = (
            self.kexAlg,
            self.keyAlg,
            cipher_in,
            cipher_out,
            mac_in,
            mac_out,
            self.incomingCompressionType,
            self.outgoingCompressionType,
        )
        if None in agreed:
            self._no_common_algorithm(
                agreed, (kex, keys, enc_cs, enc_sc, mac_cs, mac_sc, comp_cs, comp_sc)
            )
            self.sendDisconnect(DISCONNECT_KEY_EXCHANGE_FAILED, b"couldn't match all kex parts")
            return
        self.nextEncryptions = PacketCiphers(cipher_out, cipher_in, mac_out, mac_in)
        if self.sessionID is None:
            self._peerSupportsExtensions = self._EXT_INFO_C in kex
        # A guessed first kex packet is ignored if the guess was wrong (RFC 4253
        # 7): the two sides' *first* choices of kex or host key differ, as the
        # client judges it too (dropbear guesses curve25519 while ours is first
        # another; comparing with what was agreed took its resent packet for a
        # second one).
        if follows and (
            kex[0] != self.supportedKeyExchanges[0] or keys[0] != self.supportedPublicKeys[0]
        ):
            self.ignoreNextPacket = True
        self._log.debug(
            "kex {kex!r} host key {key!r} in {cin!r}/{min!r} out {cout!r}/{mout!r}",
            kex=self.kexAlg,
            key=self.keyAlg,
            cin=cipher_in,
            min=mac_in,
            cout=cipher_out,
            mout=mac_out,
        )
        if self._keyExchangeState == self._KEY_EXCHANGE_NONE:
            self.sendKexInit()

    def _no_common_algorithm(
        self, agreed: tuple[bytes | None, ...], offered: tuple[list[bytes], ...]
    ) -> None:
        """Tell the operator which part of a key exchange found nothing in common,
        what the client offered, and the setting that serves it if there is one."""
        index = agreed.index(None)
        what = _KEX_PARTS[index]
        client = self.otherVersionString.decode("ascii", "replace")[:100]
        theirs = offered[index]
        hint = ""
        # A client with chacha20 but no AES-GCM (dropbear) fails on the cipher,
        # or, when CTR is offered too, on the MAC (it has no ETM MAC).
        ciphers = offered[2] + offered[3]
        if (
            what in ("cipher", "MAC")
            and CHACHA20 in ciphers
            and CHACHA20 not in self.supportedCiphers
        ):
            hint = " ([ssh] chacha20_poly1305 = true serves it)"
        self._log.warn(
            "no {what} in common with {client}: it offers {offered}{hint}",
            what=what,
            client=client,
            offered=b", ".join(theirs[:12]).decode("ascii", "replace"),
            hint=hint,
        )

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        if packet != b"":
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS takes no data")
            return
        rx = getattr(self.nextEncryptions, "rx", None)
        if (
            self._keyExchangeState == self._KEY_EXCHANGE_NONE
            or not self._peer_kexinit_this_round
            or (rx is None and not self.isClient)
            or (rx is not None and rx is self._rx)
        ):
            # A NEWKEYS needs a whole round first: the peer's KEXINIT and fresh keys.
            self._violation("NEWKEYS before key exchange")
            return
        if rx is None:
            # A client still checking the host key: Conch's client calls
            # ssh_NEWKEYS again from _keySetup; read nothing more until then.
            self._gotNewKeys = 1
            self._rx_waiting = True
            return
        self._rx.release()
        self._rx = rx
        self._peer_kexinit_this_round = False
        if self._strict:
            self.incomingPacketSequence = 0
        self._rx_bytes = self._rx_packets = 0
        self._initial_kex_done = True
        self._rekey_requested = False
        waiting, self._rx_waiting = self._rx_waiting, False
        super().ssh_NEWKEYS(packet)
        if self._keyExchangeState == self._KEY_EXCHANGE_NONE:
            self._blocked_bytes = 0
            self._pause_service(False)
        if waiting and self.buf:
            self.dataReceived(b"")

    def _violation(self, what: str) -> None:
        prefix = "strict KEX violation: " if self._strict else ""
        self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, (prefix + what).encode("ascii"))

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if 30 <= messageNum <= 49:
            if getattr(self, "ignoreNextPacket", False) and self._peer_kexinit_this_round:
                # The client's wrong guess (see _server_negotiate): dropped
                # unread and uncounted; its real first message follows.
                self.ignoreNextPacket = False
                return
            # Our key exchanges take exactly one method message from the peer per
            # round, after its KEXINIT; more would buy signatures for free.
            if not self._peer_kexinit_this_round or self._kex_method_messages >= 1:
                self._violation(f"unexpected key exchange message {messageNum}")
                return
            self._kex_method_messages += 1
        if not self._initial_kex_done and not is_kex_message(messageNum):
            # Before the first NEWKEYS only key exchange may happen; with
            # strict kex even IGNORE, DEBUG and UNIMPLEMENTED are refused.
            if messageNum == MSG_DISCONNECT or (not self._strict and messageNum <= 4):
                super().dispatchMessage(messageNum, payload)
                return
            self._violation(f"unexpected message {messageNum} during the first key exchange")
            return
        service = self.service
        if messageNum >= 50 and service is not None:
            try:
                service.packetReceived(messageNum, payload)
            except MALFORMED:
                self._malformed(messageNum)
            return
        try:
            super().dispatchMessage(messageNum, payload)
        except MALFORMED_TRANSPORT:
            self._malformed(messageNum)

    def _malformed(self, number: int) -> None:
        """A message that could not be parsed, or names a channel or request that
        does not exist: the connection ends with a disconnect and one log line."""
        self._log.info("malformed message {number}; disconnecting", number=number)
        self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"malformed message")

    def _pause_service(self, paused: bool) -> None:
        """While keys change, forwarded connections stop reading (their data would queue)."""
        hold = getattr(self.service, "key_exchange_running", None)
        if hold is not None:
            hold(paused)

    def connectionLost(self, reason: object = None) -> None:
        self._tx.release()
        self._rx.release()
        # Conch's connectionLost without its line "connection lost", which
        # says neither who nor why: the avatar logs who left, and when.
        if self.service:
            self.service.serviceStopped()
        if hasattr(self, "avatar"):
            self.logoutFunction()

    def sendUnimplemented(self) -> None:
        self.sendPacket(MSG_UNIMPLEMENTED, struct.pack(">L", self._last_incoming_sequence))

    #: Where sealed packets go: sent at once, or gathered while a burst of
    #: input is handled (``output.held()``) and then sent together.
    _output: Cork | None = None

    @property
    def output(self) -> Cork:
        if self._output is None or self._output.transport is not self.transport:
            self._output = Cork(self.transport)
        return self._output

    _burst: Burst | None = None

    @property
    def burst(self) -> Burst:
        """Where the writes to forwarded connections wait for the end of a read."""
        if self._burst is None:
            self._burst = Burst()
        return self._burst

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        """Send DISCONNECT, stop handling what comes in, and end the connection
        (``end_after_disconnect``)."""
        if self._closing:
            return
        self._closing = True
        # Nothing may stay gathered behind DISCONNECT.
        self.output.release()
        self.sendPacket(MSG_DISCONNECT, struct.pack(">L", reason) + NS(desc) + NS(b""))
        self._disconnect_sent = True  # the last packet: nothing is sent after it
        self.output.release()
        self._log.info(
            "Disconnecting with error, code {code}\nreason: {description}",
            code=reason,
            description=desc,
        )
        self.buf = b""
        self.end_after_disconnect()

    def end_after_disconnect(self) -> None:
        """Close the connection once DISCONNECT has left (what Conch does)."""
        self.transport.loseConnection()

    # -- packets -----------------------------------------------------------

    #: True once DISCONNECT is written.
    _disconnect_sent = False

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if self._disconnect_sent:
            return
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE and not (
            self._allowedKeyExchangeMessageType(messageType)
        ):
            self._blockedByKeyExchange.append((messageType, payload))
            self._blocked_bytes += len(payload)
            if self._blocked_bytes > self.max_blocked_bytes:
                self._blockedByKeyExchange = []
                self._keyExchangeState = self._KEY_EXCHANGE_NONE
                self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"key exchange stalled")
            return
        self._seal_and_write(messageType, payload, len(payload))

    def send_packet_parts(self, messageType: int, *parts: bytes) -> None:
        """Like ``sendPacket`` with the payload in pieces (saves a copy of large data)."""
        if self._disconnect_sent:
            return
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            self.sendPacket(messageType, b"".join(parts))
            return
        self._seal_and_write(messageType, parts, sum(map(len, parts)))

    def send_channel_data(self, recipient: int, data: bytes, max_packet: int) -> None:
        """CHANNEL_DATA packets for channel ``recipient`` carrying ``data``,
        ``max_packet`` bytes each (the last one less).

        The packets ``send_packet_parts`` would make, sealed in one loop: a
        1 MiB read becomes 32 packets of 32 KiB for OpenSSH, and the chain
        of calls per packet cost more than the cipher."""
        if self._disconnect_sent:
            return
        view = memoryview(data)
        size = len(view)
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            for offset in range(0, size, max_packet):
                piece = view[offset : offset + max_packet]
                self.send_packet_parts(
                    MSG_CHANNEL_DATA, CHANNEL_DATA_FIELDS.pack(recipient, len(piece)), piece
                )
            return
        tx = self._tx
        seal_pieces = tx.seal_pieces
        seq = self.outgoingPacketSequence
        pieces: list[bytes] = []
        count = wire_bytes = 0
        for offset in range(0, size, max_packet):
            piece = view[offset : offset + max_packet]
            length = len(piece)
            padding = _padding_length(tx, 8 + length)
            head = _DATA_PACKET_HEAD.pack(
                length + padding + 10, padding, MSG_CHANNEL_DATA, recipient, length
            )
            sealed = seal_pieces(seq, b"".join((head, piece, self._padding(padding))))
            pieces.extend(sealed)
            seq = (seq + 1) & _SEQ_MASK
            count += 1
            wire_bytes += length + padding + 14 + tx.tag_size
        self.output.write_pieces(pieces)
        self.outgoingPacketSequence = seq
        self._tx_packets += count
        self._tx_bytes += wire_bytes
        if self._tx_packets >= self.rekey_packets or self._tx_bytes >= self.rekey_bytes:
            self._maybe_rekey()

    def forward_from_socket(
        self, sock: socket.socket, recipient: int, limit: int, max_packet: int
    ) -> int | None:
        """Read up to ``limit`` bytes from ``sock`` straight into CHANNEL_DATA
        packets for channel ``recipient`` (``max_packet`` bytes of data each),
        seal them and send them in one write.

        What a read and ``send_channel_data`` do, without a ``bytes`` for the
        read, a copy of each piece into its packet and a new, zeroed buffer per
        sealed packet: ``recvmsg_into`` scatters the data into the packets'
        places in one buffer, each packet is sealed into a second one, and
        the packets lie back to back there, ready to send.

        Returns how many bytes were read (0: the peer closed), or None if it
        cannot be done now (a key exchange runs, the cipher cannot seal into
        a buffer, output is being gathered or the connection is closing):
        then read and send as usual.  An ``OSError`` of the read is raised."""
        tx = self._tx
        if (
            not tx.seals_into
            or self._keyExchangeState != self._KEY_EXCHANGE_NONE
            or self._closing
            or self.output.holding
        ):
            return None
        # A whole packet on the wire (a slot): length, padding length, message
        # number, recipient, data length, data, padding, tag.
        slot, full_padding, places = _SealBuffers.layout(
            tx, max_packet, min(limit, MAX_PACKETS_PER_READ * max_packet)
        )
        got = sock.recvmsg_into(places)[0]
        if not got:
            return 0
        source, target = _SealBuffers.source, _SealBuffers.target
        seal_into = tx.seal_into
        seq = self.outgoingPacketSequence
        left = got
        start = end = packets = 0
        while left:
            length = min(left, max_packet)
            padding = full_padding if length == max_packet else _padding_length(tx, 8 + length)
            _DATA_PACKET_HEAD.pack_into(
                source, start, length + padding + 10, padding, MSG_CHANNEL_DATA, recipient, length
            )
            source[start + 14 + length : start + 14 + length + padding] = self._padding(padding)
            end = seal_into(seq, source, target, start)
            seq = (seq + 1) & _SEQ_MASK
            packets += 1
            left -= length
            start += slot
        send_or_copy(self.transport, target[:end])
        self.outgoingPacketSequence = seq
        self._tx_packets += packets
        self._tx_bytes += end
        if self._tx_packets >= self.rekey_packets or self._tx_bytes >= self.rekey_bytes:
            self._maybe_rekey()
        return got

    def _padding(self, count: int) -> bytes:
        """``count`` random bytes from a pool refilled 4 KiB at a time."""
        start = self._padding_used
        if start + count > len(self._padding_pool):
            self._padding_pool, start = os.urandom(4096), 0
        self._padding_used = start + count
        return self._padding_pool[start : start + count]

    _padding_pool = b""
    _padding_used = 0

    def _seal_and_write(
        self, messageType: int, payload: bytes | tuple[bytes, ...], size: int
    ) -> None:
        tx = self._tx
        padding = _padding_length(tx, size)
        head = _PACKET_HEAD.pack(size + padding + 2, padding, messageType)
        if isinstance(payload, tuple):
            packet = b"".join((head, *payload, self._padding(padding)))
        else:
            packet = b"".join((head, payload, self._padding(padding)))
        wire = tx.seal(self.outgoingPacketSequence, packet)
        self.output.write(wire)
        self.outgoingPacketSequence = (self.outgoingPacketSequence + 1) & _SEQ_MASK
        self._tx_packets += 1
        self._tx_bytes += len(wire)
        if messageType == MSG_NEWKEYS:
            self._tx.release()
            self._tx = self.nextEncryptions.tx
            if self._strict:
                self.outgoingPacketSequence = 0
            self._tx_bytes = self._tx_packets = 0
        elif self._tx_packets >= self.rekey_packets or self._tx_bytes >= self.rekey_bytes:
            self._maybe_rekey()

    def dataReceived(self, data: bytes) -> None:
        """Hand out every whole packet; Conch only reads the version line.

        Packets are decrypted straight out of ``data``: only a packet that
        began in an earlier read is completed in ``buf`` (a ``bytearray``),
        and only the incomplete tail is kept for the next read.  Appending
        every read to one buffer and cutting packets off its front copied
        each byte two or three times."""
        self.bytes_received += len(data)
        if not self.gotVersion:
            super().dataReceived(data)
            return
        # DECRYPTED outermost: the writes the burst gathered leave while it is held.
        with DECRYPTED, self.output, self.burst:
            used = self._complete_held(data)
            if used == len(data) or self._closing:
                return
            if len(self.buf):  # stuck: waiting for NEWKEYS, or closing
                self.buf += data[used:]
                return
            self.buf = memoryview(data)[used:]
            try:
                self._dispatch_packets()
            finally:
                if isinstance(self.buf, memoryview):
                    self.buf = bytearray(self.buf)

    def _complete_held(self, data: bytes) -> int:
        """Dispatch the packets held from earlier reads, completing the first
        with as few bytes of ``data`` as it needs; returns how many it used."""
        used = 0
        while len(self.buf) and not self._closing and not self._rx_waiting:
            if not isinstance(self.buf, bytearray):
                self.buf = bytearray(self.buf)
            buf = self.buf
            if len(buf) < 4:
                missing = 4 - len(buf)
            else:
                total = self._head_total()
                if total is None:
                    break
                missing = total - len(buf)
            if missing > 0:
                take = min(missing, len(data) - used)
                with memoryview(data) as view:  # one copy, not a slice and a copy
                    buf += view[used : used + take]
                used += take
                if take < missing:
                    break
                continue
            self._dispatch_packets()
        return used

    def _dispatch_packets(self) -> None:
        # Channel data is passed on as a view of the decrypted packet: no
        # copies of up to 256 KiB per packet.  Once the service that holds the
        # channels runs, it goes straight to its ``channel_data`` (nearly every
        # packet of a busy tunnel; ``dispatchMessage`` would only hand it on).
        channel_data = self._channel_data_handler()
        while (opened := self._open_packet()) is not None:
            body, end = opened
            number = body[1]
            if number != MSG_CHANNEL_DATA:
                payload = body[2:end]
                self.dispatchMessage(
                    number, payload.tobytes() if type(payload) is memoryview else payload
                )
                channel_data = self._channel_data_handler()  # the service may change
            elif channel_data is None:
                self.dispatchMessage(number, memoryview(body)[2:end])
            else:
                try:
                    channel_data(memoryview(body)[2:end])
                except MALFORMED:
                    self._malformed(number)

    def _channel_data_handler(self) -> Callable[[memoryview], None] | None:
        """The running service's ``channel_data``, once the first key exchange is done."""
        if not self._initial_kex_done:
            return None
        return getattr(self.service, "channel_data", None)

    #: Bytes read from the peer so far.
    bytes_received = 0

    #: Length of the packet at the head of ``buf``, once its first 4 bytes are read.
    _head_length: int | None = None

    def getPacket(self) -> bytes | None:
        """The next packet's payload (message number first), or None."""
        opened = self._open_packet()
        if opened is None:
            return None
        body, end = opened
        return bytes(body[1:end])

    def _head_total(self) -> int | None:
        """Wire size of the packet at the head of ``buf`` (whose first 4 bytes
        are there); None if its length is bad, and then the connection closes."""
        length = self._head_length
        rx = self._rx
        if length is None:
            if rx.length_in_clear:  # most packets: no call, no copy of the 4 bytes
                length = _PACKET_LENGTH.unpack_from(self.buf)[0]
            else:
                length = rx.length(self.incomingPacketSequence, bytes(self.buf[:4]))
            aligned = length if rx.length_outside else length + 4
            if not 5 <= length <= MAX_PACKET_LENGTH or aligned % rx.block_size:
                self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"bad packet length")
                return None
            self._head_length = length
        return 4 + length + rx.tag_size

    def _open_packet(self) -> tuple[bytes | memoryview, int] | None:
        """Decrypt the packet at the head of ``buf``: its body (padding length,
        payload, padding) and where the payload ends; None if there is no
        whole packet yet or it was bad (then the connection is closing)."""
        if self._closing or self._rx_waiting:
            return None
        buf = self.buf
        if len(buf) < 4:
            return None
        total = self._head_total()
        if total is None or len(buf) < total:
            return None
        rx, seq = self._rx, self.incomingPacketSequence
        # Into the read's share of DECRYPTED if the cipher can (None: a new bytes).
        plain = DECRYPTED.take(total - 4 - rx.tag_size) if rx.opens_into else None
        if isinstance(buf, bytearray):
            with memoryview(buf) as view, view[:total] as wire:
                if plain is None:
                    body = rx.open(seq, wire)
                else:
                    body = plain if rx.open_into(seq, wire, plain) else None
            del buf[:total]
        else:
            if plain is None:
                body = rx.open(seq, buf[:total])
            else:
                body = plain if rx.open_into(seq, buf[:total], plain) else None
            self.buf = buf[total:]
        self._head_length = None
        if body is None:
            self.sendDisconnect(DISCONNECT_MAC_ERROR, b"Corrupted MAC on input")
            return None
        padding = body[0]
        if padding < 4 or padding + 2 > len(body):
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"bad padding")
            return None
        self._last_incoming_sequence = seq
        self.incomingPacketSequence = (seq + 1) & _SEQ_MASK
        self._rx_packets += 1
        self._rx_bytes += total
        if self._rx_packets >= self.max_packets_per_key:
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"peer did not rekey")
            return None
        if self._rx_packets >= self.rekey_packets or self._rx_bytes >= self.rekey_bytes:
            self._maybe_rekey()
        return body, len(body) - padding

    def _maybe_rekey(self) -> None:
        if (
            self._initial_kex_done
            and not self._rekey_requested
            and not self._closing
            and self._keyExchangeState == self._KEY_EXCHANGE_NONE
        ):
            self._rekey_requested = True
            self.sendKexInit()
