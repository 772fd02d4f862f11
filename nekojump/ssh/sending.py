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

import errno
import fcntl
import os
import struct
import termios
from collections.abc import Callable

from twisted.internet import main, tcp


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

    ``data`` may be a ``memoryview``; what Twisted has to queue is copied
    (a ``GatheringServer`` queues the view itself)."""
    if not data or not _idle(transport):
        _queue(transport, [data])
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        # Let Twisted find the error on its own write and close as usual.
        sent = 0
    if sent < len(data):
        _queue(transport, [memoryview(data)[sent:]])


def send_or_copy(transport: object, data: memoryview) -> None:
    """``send_now`` for a view of a buffer that is used again as soon as this
    returns: what the socket does not take at once is queued as a copy."""
    if not _idle(transport):
        transport.write(bytes(data))
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        # A full socket, or an error Twisted finds on its own write and closes on.
        sent = 0
    if sent < len(data):
        transport.write(bytes(data[sent:]))


#: The most buffers one ``sendmsg`` takes (Linux: 1024; POSIX promises 16).
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16
#: Pieces smaller than this that wait for a slow peer are copied together.
JOIN_BELOW = 4096


def send_all_now(transport: object, pieces: list[bytes | memoryview]) -> None:
    """Several ``send_now`` writes in one system call (no joining when all fit)."""
    if len(pieces) == 1:
        send_now(transport, pieces[0])
        return
    if len(pieces) > _IOV_MAX or not _idle(transport):
        if isinstance(transport, GatheringServer):
            transport.write_pieces(pieces)
        else:
            send_now(transport, b"".join(pieces))
        return
    try:
        sent = transport.socket.sendmsg(pieces)
    except OSError:
        sent = 0
    if sent < sum(map(len, pieces)):
        _queue(transport, _unsent(pieces, sent))


def _unsent(pieces: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What is left of ``pieces`` once their first ``sent`` bytes are gone (no copies)."""
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            return [memoryview(piece)[sent:], *pieces[index + 1 :]]
        sent -= len(piece)
    return []


def _queue(transport: object, pieces: list[bytes | memoryview]) -> None:
    """Hand ``pieces`` to Twisted to send when the socket has room."""
    if isinstance(transport, GatheringServer):
        transport.write_pieces(pieces)
    elif len(pieces) == 1:
        piece = pieces[0]
        transport.write(bytes(piece) if isinstance(piece, memoryview) else piece)
    else:
        transport.write(b"".join(pieces))


class Borrowed:
    """While ``depth`` is above zero, the views written to mesh connections
    look into a buffer that is used again once the current read is handled
    (``packets.Decrypted``): what has to wait is queued as a copy."""

    depth = 0


class GatheringServer(tcp.Server):
    """A TCP server connection whose queued writes go out with ``sendmsg``, never joined.

    Twisted's transports join what waits to be written into one ``bytes``
    before each send, and join the unsent rest with what came since once less
    than 128 KiB of it is left.  When a mesh client reads slower than the
    member sends (a download over a slow link, a busy client), every byte was
    copied two or three times on its way out.  Here the queue holds the
    written buffers themselves (views of the decrypted packets), and each
    writable event sends as many of them as one ``sendmsg`` takes.

    The queue is Twisted's own ``_tempDataBuffer``/``_tempDataLen``, so
    Twisted's producer pausing and ``unsent_bytes`` see it as before;
    ``dataBuffer`` stays empty.

    Its protocol may also read the socket itself: if it has
    ``read_socket(sock)``, that is asked first on each readable event and
    returns the bytes it read (0 at end of file), or None to have Twisted
    read as usual.
    """

    #: Bytes of the first queued buffer already sent.
    _head_sent = 0

    def doRead(self) -> object:
        read_socket = getattr(self.protocol, "read_socket", None)
        if read_socket is not None:
            try:
                got = read_socket(self.socket)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return main.CONNECTION_LOST
            if got is not None:
                return None if got else main.CONNECTION_DONE
        return super().doRead()

    def write_pieces(self, pieces: list[bytes | memoryview]) -> None:
        """Queue ``pieces`` (``bytes`` or views) to be sent in order.

        Large pieces are queued as they are (copied while ``Borrowed``: views
        of a buffer the next read reuses).  Small ones are copied onto the
        end of the queue while its last piece is small too: a queued view keeps
        the whole buffer it looks into alive, and each queued piece costs a
        hundred bytes or more of its own, so a flood of tiny packets (one per
        read) must not cost much more than the bytes it carries."""
        if not self.connected or self._writeDisconnected or not pieces:
            return
        queue = self._tempDataBuffer
        for piece in pieces:
            size = len(piece)
            if size >= JOIN_BELOW:
                if Borrowed.depth and type(getattr(piece, "obj", piece)) is not bytes:
                    piece = bytes(piece)  # a view of a buffer the next read reuses
                queue.append(piece)
            elif queue and len(queue[-1]) < JOIN_BELOW:
                # The tail only grows: what of it was sent (_head_sent) stays put.
                queue[-1] = b"".join((queue[-1], piece))
            else:
                queue.append(bytes(piece))
            self._tempDataLen += size
        self._maybePauseProducer()
        self.startWriting()

    # Twisted's own API takes bytes only (a bytearray reused by its writer would
    # change while queued); views come through write_pieces.
    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError("Data must be bytes")
        self.write_pieces([data])

    def writeSequence(self, iovec: list[bytes]) -> None:
        if not all(isinstance(data, bytes) for data in iovec):
            raise TypeError("Data must be bytes")
        self.write_pieces(list(iovec))

    def doWrite(self) -> object:
        queue = self._tempDataBuffer
        if self.dataBuffer or not queue:
            # Nothing of ours waits: Twisted's own ending (stop writing,
            # resume the producer, close or half-close when asked to).
            return super().doWrite()
        batch = queue[:_IOV_MAX]
        if self._head_sent:
            batch[0] = memoryview(batch[0])[self._head_sent :]
        try:
            sent = self.socket.sendmsg(batch)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                return None
            return main.CONNECTION_LOST
        self._tempDataLen -= sent
        sent += self._head_sent
        done = 0
        for piece in queue:
            if sent < len(piece):
                break
            sent -= len(piece)
            done += 1
        del queue[:done]
        self._head_sent = sent
        if queue:
            return None
        self._head_sent = 0
        return super().doWrite()


class SharedReadServer(GatheringServer):
    """A ``GatheringServer`` that reads into one buffer shared by every such
    connection in the process and hands its protocol a view of what it read.

    Twisted's ``recv(bufferSize)`` makes a new ``bytes`` of ``bufferSize``
    for each read: at 256 KiB or more that is above malloc's mmap threshold, so a
    small message (an SSH packet of a request) cost an ``mmap``, an
    ``mremap`` to shrink it and a ``munmap``, about 15 us per read here.

    The protocol must not keep the view past ``dataReceived`` (nekojump's
    packet layer copies what it keeps of a read).  Reads run one at a time in
    the reactor, so one buffer serves them all."""

    _buffer = memoryview(bytearray())
    #: True while a protocol handles what was read (a read from within that,
    #: which Twisted never makes, would get a buffer of its own).
    _busy = False

    def doRead(self) -> object:
        cls = SharedReadServer
        view = cls._buffer
        if cls._busy:
            return super().doRead()
        if len(view) < self.bufferSize:
            view = cls._buffer = memoryview(bytearray(self.bufferSize))
        try:
            got = self.socket.recv_into(view, self.bufferSize)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not got:
            return main.CONNECTION_DONE
        cls._busy = True
        try:
            self.protocol.dataReceived(view[:got])
        finally:
            cls._busy = False
        return None


def gather_writes(listener: object, transport: type[tcp.Server] = GatheringServer) -> None:
    """Make the connections ``listener`` accepts from now on ``transport``, a
    ``GatheringServer`` (a real TCP port only: test reactors keep their own)."""
    if isinstance(listener, tcp.Port):
        listener.transport = transport


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

    @property
    def holding(self) -> bool:
        """True while writes are gathered rather than sent."""
        return self._pieces is not None

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
    sock = getattr(transport, "socket", None)  # gone once the connection is lost
    if sock is None:
        return queued
    try:
        packed = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return queued
    return queued + struct.unpack("i", packed)[0]
