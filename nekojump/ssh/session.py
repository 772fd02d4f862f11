"""The ``session`` channel of the tunnel account: a banner, never a shell.

``shell`` prints what this connection forwards and then idles until the
member closes it; ``exec`` is refused with exit status 1; subsystems (sftp,
scp), X11 and agent forwarding are refused; pty and env requests are
accepted and ignored so stock clients carry on.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import EXTENDED_DATA_STDERR
from twisted.logger import Logger, LogLevel

from nekojump.logs import conch_logger

if TYPE_CHECKING:
    from nekojump.ssh.avatar import TunnelAvatar

#: Keys that end the idle banner session when a pty sends them raw.
_CLOSE_KEYS = (b"\x03", b"\x04")  # Ctrl-C, Ctrl-D

EXEC_REFUSAL = (
    "nekojump: this account cannot run commands; it only holds remote forwards "
    "(use ssh -N -R PORT:localhost:LOCALPORT ...)\n"
)


class TunnelSession(SSHChannel):
    """A session channel that can show status and hold forwards, nothing more."""

    name = b"session"
    log = Logger()
    _log = conch_logger("nekojump.ssh.session", LogLevel.warn)

    def __init__(self, *args: object, avatar: TunnelAvatar, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.avatar = avatar
        self.started = False

    def request_pty_req(self, data: bytes) -> int:
        return 1

    def request_env(self, data: bytes) -> int:
        return 1

    def request_window_change(self, data: bytes) -> int:
        return 1

    def request_shell(self, data: bytes) -> int:
        if self.started:
            return 0
        self.started = True
        banner = self.avatar.status_banner().replace("\n", "\r\n")
        self.avatar.clock.callLater(0, self.write, banner.encode("utf-8"))
        return 1

    def request_exec(self, data: bytes) -> int:
        if self.started:
            return 0
        self.started = True
        self.log.info("refused exec for {member}", member=self.avatar.identity.member_name)
        self.avatar.clock.callLater(0, self._refuse_exec)
        return 1

    def _refuse_exec(self) -> None:
        self.writeExtended(EXTENDED_DATA_STDERR, EXEC_REFUSAL.encode("utf-8"))
        self.finish(1)

    #: The exit status to send once what was written has gone (None: not finished).
    _finishing: int | None = None

    def finish(self, status: int) -> None:
        """Send exit status, EOF and close, as a finished command would (after
        what was written: a client short of window gets it first)."""
        if self.closing or self.localClosed:
            return
        if self.buf or self.extBuf:
            self._finishing = status
            return
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status))
        self.conn.sendEOF(self)
        self.loseConnection()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        if self._finishing is not None and not self.buf and not self.extBuf:
            status, self._finishing = self._finishing, None
            self.finish(status)

    def dataReceived(self, data: bytes) -> None:
        if any(key in data for key in _CLOSE_KEYS):
            self._finish_soon()

    def eofReceived(self) -> None:
        self._finish_soon()

    def _finish_soon(self) -> None:
        # After the banner, which is queued the same way.
        self.avatar.clock.callLater(0, self.finish, 0)

    def closeReceived(self) -> None:
        # What waits for a window the client will never give (it closed) is
        # dropped: Conch answers CLOSE only once nothing waits.
        self.buf = b""
        self.extBuf = []
        self.loseConnection()
