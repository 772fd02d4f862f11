"""Writing to TCP sockets without waiting for the next reactor turn.

Twisted's ``transport.write`` only queues: the bytes go out on a later turn
of the reactor, after ``epoll_ctl`` has registered the socket for writing
and ``epoll_wait`` has reported it writable (and another ``epoll_ctl`` takes
it off again).  For a small request through a tunnel that is two extra
turns and four extra system calls per round trip.  ``send_now`` sends at
once when nothing is queued, the way asyncio's transports do, and leaves
the rest (a full socket, errors, closing) to Twisted as before.

``Cork`` gathers the packets produced while one burst of input is handled
and sends them with one system call; ``Burst`` does the same for the other
sockets that one read of input writes to.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from collections.abc import Callable

from twisted.internet import tcp


def _idle(transport: object) -> bool:
    """True if ``transport`` is a live TCP connection with nothing queued to write."""
    return (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._aborting
        and not transport.TLS
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
    )


def send_now(transport: object, data: bytes | memoryview) -> None:
    """``transport.write(data)``, but sent at once if the socket takes it.

    ``data`` may be a ``memoryview``; what Twisted has to queue is copied."""
    if not data or not _idle(transport):
        transport.write(bytes(data) if isinstance(data, memoryview) else data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        # Let Twisted find the error on its own write and close as usual.
        sent = 0
    if sent < len(data):
        transport.write(bytes(data[sent:]))


#: The most buffers one ``sendmsg`` takes (Linux: 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def send_all_now(transport: object, pieces: list[bytes | memoryview]) -> None:
    """Several ``send_now`` writes in one system call (no joining when all fit)."""
    if len(pieces) == 1:
        send_now(transport, pieces[0])
        return
    if len(pieces) > _IOV_MAX or not _idle(transport):
        send_now(transport, b"".join(pieces))
        return
    try:
        sent = transport.socket.sendmsg(pieces)
    except OSError:
        sent = 0
    total = sum(map(len, pieces))
    if sent < total:
        transport.write(b"".join(pieces)[sent:])


class Cork:
    """Collects one transport's writes while held; sends them together after.

    ``with cork.held():`` (or ``with cork:``) gathers; blocks nest and the
    outermost one sends.  A plain class rather than ``contextlib``: it runs
    twice per forwarded message.
    """

    def __init__(self, transport: object) -> None:
        self.transport = transport
        self._pieces: list[bytes] | None = None
        self._depth = 0

    def write(self, data: bytes | memoryview) -> None:
        if self._pieces is not None:
            self._pieces.append(data)
        else:
            send_now(self.transport, data)

    def write_pieces(self, pieces: list[bytes]) -> None:
        """``write`` each of ``pieces`` in turn (one system call if not held)."""
        if self._pieces is not None:
            self._pieces.extend(pieces)
        else:
            send_all_now(self.transport, pieces)

    def held(self) -> Cork:
        """Gather writes made inside the ``with`` block (nested blocks join the outer one)."""
        return self

    def __enter__(self) -> None:
        if self._depth == 0:
            self._pieces = []
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.release()

    def release(self) -> None:
        """Send what was gathered and stop gathering (also before closing)."""
        pieces, self._pieces = self._pieces, None
        if pieces:
            send_all_now(self.transport, pieces)


class Burst:
    """The corks of other transports held while one read is handled.

    Each SSH packet of a read may carry data for a forwarded connection:
    ``burst.hold(cork)`` gathers what one read writes to each, and the end
    of the read sends it, one system call per socket instead of one per
    packet.  Work that must wait until then (giving window back once the
    data has left) goes in ``burst.after``.  Outside a ``with burst:``
    block ``hold`` holds nothing.
    """

    def __init__(self) -> None:
        #: The corks held, in the order they were first written to (a dict:
        #: ``holds`` is asked once per packet, with thousands of corks held).
        self._corks: dict[Cork, None] = {}
        self._after: dict[object, Callable[[], None]] = {}
        self._depth = 0

    def hold(self, cork: Cork) -> Cork:
        if self._depth and cork._pieces is None:
            cork.__enter__()
            self._corks[cork] = None
        return cork

    def holds(self, cork: Cork) -> bool:
        return cork in self._corks

    def after(self, key: object, action: Callable[[], None]) -> None:
        """Run ``action`` once the held corks are sent (once per ``key``: the last one)."""
        self._after[key] = action

    def __enter__(self) -> None:
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        corks, self._corks = self._corks, {}
        after, self._after = self._after, {}
        errors: list[Exception] = []
        # Every cork is sent and every action run, whatever one of them raises.
        for cork in corks:
            try:
                cork.__exit__()
            except Exception as error:  # noqa: BLE001 - raised below, after the rest
                errors.append(error)
        for action in after.values():
            try:
                action()
            except Exception as error:  # noqa: BLE001 - raised below, after the rest
                errors.append(error)
        if errors:
            raise errors[0]


def unsent_bytes(transport: object) -> int:
    """Bytes written to ``transport`` that its peer has not yet received: what
    Twisted still queues plus, on Linux, the socket's send queue (SIOCOUTQ)."""
    if not isinstance(transport, tcp.Connection):
        return 0
    queued = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    try:
        packed = fcntl.ioctl(transport.socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return queued
    return queued + struct.unpack("i", packed)[0]
