"""The SSH transport: algorithms nekojump offers and quieter logging."""

from __future__ import annotations

from twisted.conch.ssh import _kex
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.transport import (
    DISCONNECT_PROTOCOL_ERROR,
    DISCONNECT_SERVICE_NOT_AVAILABLE,
    MSG_SERVICE_ACCEPT,
    SSHServerTransport,
)
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from nekojump import __version__
from nekojump.logs import conch_logger
from nekojump.ssh.forwarding import tune_socket
from nekojump.ssh.packets import PacketLayerMixin

#: How long a connection ended with DISCONNECT may take to close on its own
#: (its client reads DISCONNECT and closes) before it is cut.
DISCONNECT_GRACE = 0.3

#: Key exchanges, best first.  Group exchange, SHA-1 groups and the NIST
#: curves (ssh-audit fails them) are not offered.
KEX_PREFERENCE = (
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
)
#: Authenticated encryption only, by default: while aes*-ctr is offered,
#: OpenSSH clients pick it (their list has it before the GCM ciphers).
#: AES-GCM costs nekojump about half the CPU per byte of chacha20-poly1305
#: (one ``cryptography`` call per packet instead of two ChaCha20 contexts
#: and a Poly1305), and OpenSSH clients prefer chacha20-poly1305 whenever it
#: is offered: so it is not, unless ``[ssh] chacha20_poly1305 = true``.
AEAD_CIPHERS = (
    b"aes256-gcm@openssh.com",
    b"aes128-gcm@openssh.com",
)
#: Offered first with ``[ssh] chacha20_poly1305 = true``.
CHACHA_CIPHERS = (b"chacha20-poly1305@openssh.com",)
#: Added after the AEAD ciphers with ``[ssh] compat_ctr_ciphers = true``.
COMPAT_CIPHERS = (b"aes256-ctr", b"aes192-ctr", b"aes128-ctr")
CIPHERS = AEAD_CIPHERS
#: Encrypt-then-MAC only (used with the CTR ciphers; AEAD ciphers ignore it).
MACS = (b"hmac-sha2-512-etm@openssh.com", b"hmac-sha2-256-etm@openssh.com")

#: Signature algorithms we verify on *user* keys, sent as server-sig-algs so
#: OpenSSH offers RSA keys with SHA-2 signatures.
USER_SIGNATURE_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"sk-ssh-ed25519@openssh.com",
    b"sk-ecdsa-sha2-nistp256@openssh.com",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)


def _available(preference: tuple[bytes, ...], supported: list[bytes]) -> list[bytes]:
    return [name for name in preference if name in supported]


class TunnelServerTransport(PacketLayerMixin, SSHServerTransport):
    """SSH server transport with nekojump's algorithm choices.

    Packets, ciphers, strict kex and rekeying come from ``PacketLayerMixin``.
    """

    log = Logger()
    _log = conch_logger("nekojump.ssh.transport")
    ourVersionString = f"SSH-2.0-nekojump_{__version__}".encode("ascii")
    supportedKeyExchanges = _available(KEX_PREFERENCE, _kex.getSupportedKeyExchanges())
    supportedCiphers = list(CIPHERS)
    supportedMACs = list(MACS)
    supportedCompressions = [b"none"]

    #: Bytes an unauthenticated client may have buffered in the server; every
    #: legitimate pre-auth packet (kex, userauth with a 4096-bit RSA
    #: signature) is a few KiB.
    preauth_buffer_limit = 64 * 1024

    authenticated = False
    #: Keys the client asked about that would not do (counted as failed logins
    #: of the source only if the connection ends without logging in).
    unanswered_key_queries = 0
    _grace: IDelayedCall | None = None

    def connectionMade(self) -> None:
        ssh = self.factory.config.ssh
        self.supportedCiphers = [
            *(CHACHA_CIPHERS if ssh.chacha20_poly1305 else ()),
            *AEAD_CIPHERS,
            *(COMPAT_CIPHERS if ssh.compat_ctr_ciphers else ()),
        ]
        tune_socket(self.transport)
        super().connectionMade()
        # login_grace_time runs from the first byte, not from userauth: a
        # client that never finishes the version or kex is dropped too.
        self._grace = self.factory.reactor.callLater(ssh.login_grace_time, self._grace_expired)

    def _grace_expired(self) -> None:
        self._grace = None
        self._log.info("{peer} did not authenticate in time", peer=self._peer())
        self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"authentication timeout")
        self.transport.abortConnection()

    def end_after_disconnect(self) -> None:
        """Stop writing once DISCONNECT has left, but go on reading (and
        dropping) what the client sends until it closes, for at most
        ``DISCONNECT_GRACE`` seconds.

        Closing with the client's data unread makes the kernel answer with a
        reset, and the reset can overtake the DISCONNECT: a member whose ssh
        was busy sending when their key was removed saw "Broken pipe", a
        network error autossh retries, instead of "key removed"."""
        transport = self.transport
        if not isinstance(transport, tcp.Connection):  # a test's transport
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        self.factory.reactor.callLater(DISCONNECT_GRACE, transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not self.authenticated and len(self.buf) > self.preauth_buffer_limit:
            self._log.info(
                "{peer} sent an oversized packet before authenticating", peer=self._peer()
            )
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"packet too large")
            self.transport.abortConnection()

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        """``ssh-userauth`` until login, as in OpenSSH: the first request starts
        the userauth service, and later ones are accepted for that same service,
        failures and all (paramiko asks before every attempt).  Any other
        service ends the connection; after login a request is answered
        UNIMPLEMENTED and changes nothing.

        Conch starts a fresh service on every request: a new userauth service
        forgot its failures and limits, and one started after login could log
        in again over the avatar holding the ports.  Conch's own client asks
        again after every key exchange."""
        if self.authenticated:
            self.sendUnimplemented()
            return
        if packet != NS(b"ssh-userauth"):
            self.sendDisconnect(DISCONNECT_SERVICE_NOT_AVAILABLE, b"only ssh-userauth is offered")
            return
        self.sendPacket(MSG_SERVICE_ACCEPT, packet)
        if self.service is None:
            self.setService(self.factory.services[b"ssh-userauth"]())

    def authentication_succeeded(self) -> None:
        """Userauth is done: stop the grace timer and leave the startup count."""
        self.authenticated = True
        self._end_preauth()

    def _end_preauth(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        self.factory.preauth_ended(self)

    def connectionLost(self, reason=None) -> None:
        self._end_preauth()
        if not self.authenticated:
            for _ in range(self.unanswered_key_queries):
                self.factory.penalties.failed(self.startup_source)
        super().connectionLost(reason)

    def _peer(self) -> str:
        return getattr(self.transport.getPeer(), "host", "unknown")

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        extensions = [
            (name, b",".join(USER_SIGNATURE_ALGORITHMS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ]
        super().sendExtInfo(extensions)

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self._release_socket_producer()
        super().sendDisconnect(reason, desc)

    def _release_socket_producer(self) -> None:
        # A paused producer on the socket would keep loseConnection from ever
        # closing it (Twisted resumes the producer instead of closing).
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # ssh_DISCONNECT calls loseConnection right after this.
        self._release_socket_producer()
        # Every client that quits sends "disconnected by user"; that is no error.
        self._log.debug(
            "client disconnected: code {code}: {description!r}",
            code=reasonCode,
            description=description,
        )
