"""SSH packet protection: AEAD ciphers and encrypt-then-MAC, built on ``cryptography``.

Conch's own ``SSHCiphers`` only knows encrypt-and-MAC (the MAC over the
plaintext, the length encrypted).  Every mode here keeps the 4-byte packet
length outside the alignment and authenticates the ciphertext:

``aes128-gcm@openssh.com``, ``aes256-gcm@openssh.com``
    RFC 5647 as OpenSSH does it: the length is sent in clear and is the
    AAD, the tag is 16 bytes, the nonce is the 4-byte fixed IV followed by
    an 8-byte counter that goes up by one per packet.  The MAC is implicit.

``chacha20-poly1305@openssh.com``
    OpenSSH's PROTOCOL.chacha20poly1305: 64 bytes of key, the second half
    encrypts the length, the first half (block 0) gives the Poly1305 key
    and (from block 1) encrypts the packet; the nonce is the sequence number.

``aes*-ctr`` with ``hmac-sha2-*-etm@openssh.com``
    The length in clear, the rest encrypted, then HMAC(seq || length ||
    ciphertext).

Each ``Direction`` seals or opens whole packets (``uint32 length || body``,
body = padding length, payload, padding) for one direction.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

#: MAC name reported for AEAD ciphers, whose MAC is not negotiated.
IMPLICIT_MAC = b"<implicit>"

_LENGTH = struct.Struct(">L")
_SEQ = struct.Struct(">L")


class Direction:
    """Protection for one direction of a connection."""

    #: Alignment of the encrypted part (``block_size`` bytes).
    block_size = 8
    #: Authentication tag (or MAC) bytes after each packet.
    tag_size = 0
    #: True when the 4-byte length is outside the alignment (ETM and AEAD).
    length_outside = True
    #: True when the 4-byte length is sent unencrypted (then ``length`` only reads it).
    length_in_clear = True
    #: True if ``seal_into`` seals into a buffer of the caller's.
    seals_into = False
    #: True if ``open_into`` opens into a buffer of the caller's.
    opens_into = False

    def length(self, seq: int, head: bytes) -> int:
        """The packet length from the first 4 bytes on the wire."""
        return _LENGTH.unpack(head)[0]

    def seal(self, seq: int, packet: bytes) -> bytes:
        """Wire bytes for ``packet`` (length field + body)."""
        raise NotImplementedError

    def seal_pieces(self, seq: int, packet: bytes) -> tuple[bytes, ...]:
        """``seal``, possibly as several pieces to be sent one after another."""
        return (self.seal(seq, packet),)

    def release(self) -> None:
        """These keys are done with (replaced by a rekey, or the connection closed)."""

    def open(self, seq: int, wire: bytes) -> bytes | None:
        """The body of one whole packet on the wire, or None if forged.

        ``wire`` may be a ``memoryview`` of the receive buffer: keep no
        reference to it, and return ``bytes``."""
        raise NotImplementedError


class Plain(Direction):
    """No encryption, no MAC: only before the first NEWKEYS."""

    length_outside = False

    def seal(self, seq: int, packet: bytes) -> bytes:
        return packet

    def open(self, seq: int, wire: bytes) -> bytes | None:
        return bytes(wire[4:])


#: AES-GCM contexts kept at once.  Each holds ~2.4 KiB of OpenSSL state and
#: an idle tunnel needs two: with thousands of tunnels only the busy ones
#: keep theirs, and an idle one builds its context again when it next sends
#: (a few microseconds).
MAX_LIVE_CONTEXTS = 1024
#: Directions holding a context, oldest first.  A direction used since it was
#: last passed over goes to the back instead of losing its context (the
#: "clock" approximation of least recently used: a packet only sets a flag).
_live: OrderedDict[AesGcm, None] = OrderedDict()
_NONCE_COUNTER_MASK = 0xFFFFFFFFFFFFFFFF


class AesGcm(Direction):
    block_size = 16
    tag_size = 16
    seals_into = hasattr(AESGCM, "encrypt_into")  # in recent cryptography releases
    opens_into = hasattr(AESGCM, "decrypt_into")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._key = key
        self._context: AESGCM | None = None
        self._used = False
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def _new_context(self) -> AESGCM:
        context = self._context = AESGCM(self._key)
        _live[self] = None
        while len(_live) > MAX_LIVE_CONTEXTS:
            oldest, _ = _live.popitem(last=False)
            if oldest._used:
                oldest._used = False
                _live[oldest] = None
            else:
                oldest._context = None
        return context

    def release(self) -> None:
        _live.pop(self, None)
        self._context = None

    def seal(self, seq: int, packet: bytes) -> bytes:
        return b"".join(self.seal_pieces(seq, packet))

    def seal_pieces(self, seq: int, packet: bytes) -> tuple[bytes, ...]:
        # The clear length and the ciphertext, without joining 32 KiB+ again.
        # (Once per packet: the nonce and the context are not method calls.)
        context = self._context or self._new_context()
        self._used = True
        counter = self._counter
        self._counter = (counter + 1) & _NONCE_COUNTER_MASK
        head = packet[:4]
        with memoryview(packet) as view:
            return head, context.encrypt(self._fixed + counter.to_bytes(8, "big"), view[4:], head)

    def seal_into(self, seq: int, source: memoryview, target: memoryview, start: int) -> int:
        """Seal the packet at ``source[start:]`` (its length field says how
        long it is) into ``target`` at the same offset, tag included, without
        building a new ``bytes``; returns where it ends.  ``source`` and
        ``target`` are distinct buffers."""
        context = self._context or self._new_context()
        self._used = True
        counter = self._counter
        self._counter = (counter + 1) & _NONCE_COUNTER_MASK
        body = start + 4
        end = body + _LENGTH.unpack_from(source, start)[0]
        target[start:body] = source[start:body]
        context.encrypt_into(
            self._fixed + counter.to_bytes(8, "big"),
            source[body:end],
            source[start:body],
            target[body : end + 16],
        )
        return end + 16

    def open(self, seq: int, wire: bytes) -> bytes | None:
        context = self._context or self._new_context()
        self._used = True
        counter = self._counter
        self._counter = (counter + 1) & _NONCE_COUNTER_MASK
        try:
            return context.decrypt(self._fixed + counter.to_bytes(8, "big"), wire[4:], wire[:4])
        except InvalidTag:
            return None

    def open_into(self, seq: int, wire: memoryview, target: memoryview) -> bool:
        """``open`` into ``target`` (exactly the body's size); False if forged."""
        context = self._context or self._new_context()
        self._used = True
        counter = self._counter
        self._counter = (counter + 1) & _NONCE_COUNTER_MASK
        try:
            context.decrypt_into(
                self._fixed + counter.to_bytes(8, "big"), wire[4:], wire[:4], target
            )
        except InvalidTag:
            return False
        return True


_ZERO_BLOCK = bytes(64)


def _chacha(key: bytes, seq: int):
    """A ChaCha20 keystream at block 0 for packet ``seq`` (encrypts and decrypts alike).

    cryptography takes OpenSSL's 16-byte IV: a little-endian block counter
    (starting at 0) then the nonce.  OpenSSH's ChaCha20 has a 64-bit counter
    and a 64-bit nonce, the big-endian sequence number.
    """
    return Cipher(algorithms.ChaCha20(key, _SEQ_NONCE.pack(0, seq)), mode=None).encryptor()


_SEQ_NONCE = struct.Struct(">QQ")


class ChaChaPoly(Direction):
    block_size = 8
    tag_size = 16
    length_in_clear = False

    def __init__(self, key: bytes) -> None:
        self._main = key[:32]
        self._header = key[32:64]

    def length(self, seq: int, head: bytes) -> int:
        return _LENGTH.unpack(_chacha(self._header, seq).update(head))[0]

    def seal(self, seq: int, packet: bytes) -> bytes:
        stream = _chacha(self._main, seq)
        # Block 0 is the Poly1305 key; the body starts at block 1.
        mac = Poly1305(stream.update(_ZERO_BLOCK)[:32])
        with memoryview(packet) as view:
            head = _chacha(self._header, seq).update(view[:4])
            body = stream.update(view[4:])
        mac.update(head)
        mac.update(body)
        return b"".join((head, body, mac.finalize()))

    def open(self, seq: int, wire: bytes) -> bytes | None:
        stream = _chacha(self._main, seq)
        mac = Poly1305(stream.update(_ZERO_BLOCK)[:32])
        mac.update(wire[:-16])
        try:
            mac.verify(bytes(wire[-16:]))
        except InvalidSignature:
            return None
        return stream.update(wire[4:-16])


class CtrEtm(Direction):
    """AES-CTR with an encrypt-then-MAC HMAC."""

    block_size = 16

    def __init__(
        self, key: bytes, iv: bytes, mac_key: bytes, digest: Callable, encrypt: bool
    ) -> None:
        cipher = Cipher(algorithms.AES(key), modes.CTR(iv[:16]))
        self._stream = cipher.encryptor() if encrypt else cipher.decryptor()
        self._mac = hmac.new(mac_key, digestmod=digest)
        self.tag_size = self._mac.digest_size

    def _tag(self, seq: int, data: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(_SEQ.pack(seq))
        mac.update(data)
        return mac.digest()

    def seal(self, seq: int, packet: bytes) -> bytes:
        sealed = packet[:4] + self._stream.update(packet[4:])
        return sealed + self._tag(seq, sealed)

    def open(self, seq: int, wire: bytes) -> bytes | None:
        data, tag = wire[: -self.tag_size], wire[-self.tag_size :]
        if not hmac.compare_digest(self._tag(seq, data), tag):
            return None
        return self._stream.update(data[4:])


#: name -> (kind, key bytes)
CIPHERS: dict[bytes, tuple[str, int]] = {
    b"chacha20-poly1305@openssh.com": ("chacha", 64),
    b"aes256-gcm@openssh.com": ("gcm", 32),
    b"aes128-gcm@openssh.com": ("gcm", 16),
    b"aes256-ctr": ("ctr", 32),
    b"aes192-ctr": ("ctr", 24),
    b"aes128-ctr": ("ctr", 16),
}
AEAD_CIPHERS = frozenset(name for name, (kind, _) in CIPHERS.items() if kind != "ctr")

#: Encrypt-then-MAC only: the MAC covers the ciphertext.
MACS: dict[bytes, Callable] = {
    b"hmac-sha2-512-etm@openssh.com": hashlib.sha512,
    b"hmac-sha2-256-etm@openssh.com": hashlib.sha256,
}


def make_direction(
    cipher: bytes, mac: bytes, iv: bytes, key: bytes, integrity: bytes, encrypt: bool
) -> Direction:
    """The ``Direction`` for a negotiated cipher and MAC and derived keys."""
    kind, key_size = CIPHERS[cipher]
    if len(key) < key_size:
        raise ValueError(f"{cipher!r} needs {key_size} key bytes")
    if kind == "gcm":
        return AesGcm(key[:key_size], iv)
    if kind == "chacha":
        return ChaChaPoly(key[:key_size])
    digest = MACS[mac]
    return CtrEtm(key[:key_size], iv, integrity[: digest().digest_size], digest, encrypt)


class PacketCiphers:
    """What one key exchange agreed, in both directions.

    Takes the place of Conch's ``SSHCiphers`` as ``nextEncryptions`` and
    ``currentEncryptions``: it keeps the attribute names that Conch reads
    (``outCipType``, ``encBlockSize``...) and builds ``tx``/``rx``.
    """

    def __init__(self, outCip: bytes, inCip: bytes, outMac: bytes, inMac: bytes) -> None:
        self.outCipType = outCip
        self.inCipType = inCip
        self.outMACType = IMPLICIT_MAC if outCip in AEAD_CIPHERS else outMac
        self.inMACType = IMPLICIT_MAC if inCip in AEAD_CIPHERS else inMac
        self.encBlockSize = 0
        self.decBlockSize = 0
        self.verifyDigestSize = 0
        self.tx: Direction | None = None
        self.rx: Direction | None = None

    def setKeys(self, outIV, outKey, inIV, inKey, outInteg, inInteg) -> None:
        self.tx = make_direction(self.outCipType, self.outMACType, outIV, outKey, outInteg, True)
        self.rx = make_direction(self.inCipType, self.inMACType, inIV, inKey, inInteg, False)
        self.encBlockSize = self.tx.block_size
        self.decBlockSize = self.rx.block_size
        self.verifyDigestSize = self.rx.tag_size
