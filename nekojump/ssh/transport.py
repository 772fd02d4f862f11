"""The SSH transport: algorithms nekojump offers and quieter logging."""

from __future__ import annotations

from twisted.conch.ssh import _kex
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.logger import Logger

from nekojump import __version__
from nekojump.logs import conch_logger

#: Key exchanges, best first; group-exchange and SHA-1 groups are not offered.
KEX_PREFERENCE = (
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
CIPHERS = (b"aes128-ctr", b"aes192-ctr", b"aes256-ctr")
MACS = (b"hmac-sha2-256", b"hmac-sha2-512")

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


class TunnelServerTransport(SSHServerTransport):
    """SSH server transport with nekojump's algorithm choices."""

    log = Logger()
    _log = conch_logger("nekojump.ssh.transport")
    ourVersionString = f"SSH-2.0-nekojump_{__version__}".encode("ascii")
    supportedKeyExchanges = _available(KEX_PREFERENCE, _kex.getSupportedKeyExchanges())
    supportedCiphers = _available(CIPHERS, SSHServerTransport.supportedCiphers)
    supportedMACs = _available(MACS, SSHServerTransport.supportedMACs)
    supportedCompressions = [b"none"]

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        extensions = [
            (name, b",".join(USER_SIGNATURE_ALGORITHMS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ]
        super().sendExtInfo(extensions)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # Every client that quits sends "disconnected by user"; that is no error.
        self._log.debug(
            "client disconnected: code {code}: {description!r}",
            code=reasonCode,
            description=description,
        )
