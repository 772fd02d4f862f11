"""The dashboard's ``Site``: request bodies are refused past a small limit, and
connections are bounded per address and in time.

The web server runs in the process that holds every tunnel, and Twisted would
otherwise buffer and parse any body a client sends (a 64 MiB form grew the
server by a gigabyte).  The largest legitimate body is a pasted RSA 16384-bit
public key, about 2.8 KiB of base64 (under 9 KiB url-encoded), so 64 KiB
leaves plenty of room.

Its sockets come out of the descriptors the tunnels need, too: one address
may hold ``[web] max_connections_per_source`` at once (trusted proxies, which
carry everyone's requests, any number), no connection is accepted once the
descriptor budget is spent, and a client has ``[web] request_timeout``
seconds to send each whole request, counted from when the connection opened
or the previous response was sent (Twisted's own timeout restarts with every
byte, so a client trickling a header held a socket for days).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from nekojump.model import Refused
from nekojump.policy import IPNetwork, source_allowed

_log = Logger(namespace="nekojump.web")

#: The largest request body the dashboard and API read.
MAX_BODY = 64 * 1024

#: After refusing, at most this much of the body is read (and dropped) so the
#: client sees the answer instead of a reset; then the connection is closed.
MAX_DISCARD = 64 * 1024 * 1024


def body_too_large(declared: int | None, received: int, limit: int = MAX_BODY) -> bool:
    """True if a body declared (Content-Length) or received so far exceeds ``limit``."""
    return (declared is not None and declared > limit) or received > limit


def too_large_response(path: bytes, limit: int = MAX_BODY) -> bytes:
    """A complete ``413`` response that closes the connection; JSON for the API."""
    message = f"the request body is too large: the limit is {limit // 1024} KiB"
    if path.startswith(b"/api/"):
        content_type = b"application/json"
        body = json.dumps({"error": "body-too-large", "message": message}).encode() + b"\n"
    else:
        content_type = b"text/plain; charset=utf-8"
        body = message.encode() + b"\n"
    return (
        b"HTTP/1.1 413 Content Too Large\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"\r\n" + body
    )


def _readable_address(request: Request) -> bool:
    """True if the request's path (%-decoded) and Host header are UTF-8."""
    try:
        unquote_to_bytes(request.path).decode("utf-8")
        (request.getHeader(b"host") or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class BoundedRequest(Request):
    """A ``Request`` that answers ``413`` as soon as its body is known to be too large
    (from Content-Length, or while a chunked body arrives) and never processes it."""

    max_body = MAX_BODY
    log = Logger()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._received = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        if body_too_large(length, 0, self.max_body):
            # No "100 Continue" for a body we will not read.
            self.requestHeaders.removeHeader(b"expect")
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._refused:
            if self._received > MAX_DISCARD:
                self.channel.transport.abortConnection()
            return
        if body_too_large(None, self._received, self.max_body):
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # Answered already, and the whole body is in: close (after the 413
            # has left).  Twisted stopped the idle timeout for this request, so
            # nothing else would ever close it.
            self.content.close()
            self.channel.transport.loseConnection()
            return
        if path.startswith(b"/api/"):
            # The API reads JSON bodies only: Twisted must not parse a form
            # body first (a multipart body it cannot parse is an empty 400).
            self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if not _readable_address(self):
            self._bad_address()
            return
        super().process()

    def _bad_address(self) -> None:
        """Answer 400 to an address that is not UTF-8 (JSON under ``/api/``).

        Klein would answer ``text/html`` and log a traceback for each."""
        message = "the address is not valid UTF-8 (after %-decoding)"
        if self.path.startswith(b"/api/"):
            content_type = b"application/json"
            body = json.dumps({"error": "bad-address", "message": message}).encode() + b"\n"
        else:
            content_type = b"text/plain; charset=utf-8"
            body = message.encode() + b"\n"
        self.setResponseCode(400)
        self.setHeader(b"content-type", content_type)
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"cache-control", b"no-store")
        self.write(body)
        self.finish()

    def _refuse(self) -> None:
        """Send the 413 now and stop writing; the rest of the body is read and dropped."""
        self._refused = True
        channel = self.channel
        path = getattr(channel, "_path", b"")  # the request line, parsed before the body
        self.log.info(
            "refused a request body over {limit} bytes from {peer}",
            limit=self.max_body,
            peer=getattr(self.getClientAddress(), "host", "unknown"),
        )
        channel.transport.write(too_large_response(path, self.max_body))
        half_close = getattr(channel.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:  # pragma: no cover - TCP transports can half-close
            channel.loseConnection()


class DeadlineChannel(HTTPChannel):
    """An ``HTTPChannel`` that closes a connection whose next request does not
    arrive whole (head and body) within the site's ``request_timeout``."""

    site: BoundedSite
    #: The address the connection came from (counted in ``site.open_from``).
    source_host = ""
    _deadline: IDelayedCall | None = None
    #: The deadline starts once the response being sent is out.
    _arm_when_sent = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        if self.persistent:
            # Kept alive: the next request has as long, from when this response
            # is out (a slow link may still be reading a large page).  Armed
            # first, since a request already buffered is handled (and disarms)
            # in there.
            if self._waitingForTransport:
                self._arm_when_sent = True
            else:
                self._arm()
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self._arm_when_sent and not self._handlingRequest:
            self._arm()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        self.site.closed(self)
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.site.clock.callLater(self.site.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        self._arm_when_sent = False
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.transport.abortConnection()


class BoundedSite(Site):
    """A ``Site`` whose requests refuse bodies over ``MAX_BODY`` with ``413``,
    and whose connections are bounded per address, by the descriptor budget
    and in time (see the module's docstring)."""

    requestFactory = BoundedRequest
    protocol = DeadlineChannel

    def __init__(
        self,
        resource: Any,
        *,
        clock: IReactorTime,
        max_per_source: int = 32,
        request_timeout: float = 30.0,
        trusted: Iterable[IPNetwork] = (),
        budget: Callable[[], Refused | None] = lambda: None,
    ):
        super().__init__(resource)
        self.clock = clock
        self.max_per_source = max_per_source
        self.request_timeout = request_timeout
        self.trusted = tuple(trusted)
        self.budget = budget
        #: Open connections by source address.
        self.open_from: Counter[str] = Counter()
        #: Addresses told of in the log as refused ("" for the descriptor budget).
        self._told: set[str] = set()

    @property
    def open_connections(self) -> int:
        return self.open_from.total()

    def buildProtocol(self, addr: IAddress) -> DeadlineChannel | None:
        """A channel, or None (the socket is closed at once) if ``addr`` holds its
        share of connections already or the process has no descriptors to spare."""
        host = getattr(addr, "host", "")
        # Each refusal is logged once until it stops (a client retrying in a
        # loop would otherwise write a line per attempt).
        if self.open_from[host] >= self.max_per_source and not source_allowed(host, self.trusted):
            if host not in self._told:
                self._told.add(host)
                _log.info(
                    "dashboard connections from {host} refused: it holds {held}",
                    host=host,
                    held=self.open_from[host],
                )
            return None
        full = self.budget()
        if full is not None:
            if "" not in self._told:
                self._told.add("")
                _log.warn("dashboard connections refused: {why}", why=full.reason)
            return None
        self._told.discard("")
        channel = super().buildProtocol(addr)
        channel.source_host = host
        self.open_from[host] += 1
        return channel

    def closed(self, channel: DeadlineChannel) -> None:
        """``channel``'s connection is gone: its address may open another."""
        host = channel.source_host
        self.open_from[host] -= 1
        self._told.discard(host)
        if self.open_from[host] <= 0:
            del self.open_from[host]
