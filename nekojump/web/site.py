"""The dashboard's ``Site``: request bodies are refused past a small limit.

The web server runs in the process that holds every tunnel, and Twisted would
otherwise buffer and parse any body a client sends (a 64 MiB form grew the
server by a gigabyte).  The largest legitimate body is a pasted RSA 16384-bit
public key, about 2.8 KiB of base64 (under 9 KiB url-encoded), so 64 KiB
leaves plenty of room.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.server import Request, Site

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


class BoundedSite(Site):
    """A ``Site`` whose requests refuse bodies over ``MAX_BODY`` with ``413``."""

    requestFactory = BoundedRequest
