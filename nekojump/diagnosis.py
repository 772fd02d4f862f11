"""Self-diagnosis for members: the seed's Troubleshooting section, answered by the jumphost.

``probe_forward`` opens a ``forwarded-tcpip`` channel to the member's ssh,
exactly as a mesh member's connection would, sends an HTTP request with the
mesh address as ``Host``, and reports what came back.  ``diagnose`` turns the
facts into one of a few cases with a sentence for people.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from attrs import frozen
from twisted.conch.error import ConchError
from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.forwarding import packOpen_forwarded_tcpip
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from nekojump.ssh.registry import ActiveForward

PROBE_TIMEOUT = 3.0
MAX_REPLY = 1024


@frozen
class ProbeResult:
    """What happened when the jumphost tried the member's service."""

    opened: bool
    refused_reason: str | None = None
    timed_out: bool = False
    open_rtt: float | None = None  # seconds from channel open request to confirmation
    first_line: str | None = None


@frozen
class Diagnosis:
    case: str  # no-tunnel | local-service-refused | timeout | reachable
    message: str
    port: int
    rtt_ms: float | None = None
    http_status: str | None = None
    last_error: str | None = None
    viewer_address: str | None = None
    viewer_allowed: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case,
            "message": self.message,
            "port": self.port,
            "rtt_ms": self.rtt_ms,
            "http_status": self.http_status,
            "last_error": self.last_error,
            "viewer_address": self.viewer_address,
            "viewer_allowed": self.viewer_allowed,
        }


def diagnose(
    port: int,
    forward_exists: bool,
    probe: ProbeResult | None,
    last_error: str | None,
    viewer_address: str | None,
    viewer_allowed: bool | None,
    mesh_address: str,
) -> Diagnosis:
    """Which troubleshooting case applies, in words a member can act on."""
    common = dict(
        port=port,
        last_error=last_error,
        viewer_address=viewer_address,
        viewer_allowed=viewer_allowed,
    )
    if not forward_exists or probe is None:
        return Diagnosis(
            "no-tunnel",
            f"No tunnel holds port {port} now. Run ssh -N -R {port}:localhost:LOCALPORT … "
            "on the machine with the service, and keep it running.",
            **common,
        )
    if not probe.opened:
        if probe.timed_out:
            return Diagnosis(
                "timeout",
                f"Your ssh did not answer within {PROBE_TIMEOUT:.0f} s: the tunnel is up but "
                "your machine or its local service is not responding.",
                **common,
            )
        return Diagnosis(
            "local-service-refused",
            "The tunnel is up, but your local service refused the connection: nothing "
            "listens on the local port you forwarded to. Check it with curl -v "
            "http://localhost:LOCALPORT on that machine.",
            **common,
        )
    rtt_ms = round(probe.open_rtt * 1000, 1) if probe.open_rtt is not None else None
    if probe.first_line and probe.first_line.startswith("HTTP/"):
        status = probe.first_line
        note = ""
        if " 5" in status[:13] or " 4" in status[:13]:
            note = (
                f" It answered an error for Host {mesh_address}: some frameworks only "
                "accept their own hostname."
            )
        message = f"Reachable: your service answered {status!r} in {rtt_ms} ms.{note}"
        return Diagnosis("reachable", message, rtt_ms=rtt_ms, http_status=status, **common)
    return Diagnosis(
        "reachable",
        f"Reachable: your service accepted the connection in {rtt_ms} ms "
        "(it did not answer HTTP, which is fine for other protocols).",
        rtt_ms=rtt_ms,
        **common,
    )


class ProbeChannel(SSHChannel):
    """One ``forwarded-tcpip`` channel that sends an HTTP HEAD and reads a line."""

    name = b"forwarded-tcpip"

    def __init__(
        self,
        request: bytes,
        clock: IReactorTime,
        done: Callable[[ProbeResult], None],
        **kwargs: object,
    ):
        super().__init__(**kwargs)
        self.request = request
        self.clock = clock
        self.done = done
        self.sent_at = time.monotonic()
        self.open_rtt: float | None = None
        self.reply = b""
        self.finished = False
        self.timer: IDelayedCall = clock.callLater(PROBE_TIMEOUT, self._timeout)

    def channelOpen(self, specificData: bytes) -> None:
        self.open_rtt = time.monotonic() - self.sent_at
        self.write(self.request)

    def openFailed(self, reason: Failure | Exception) -> None:
        error = reason.value if isinstance(reason, Failure) else reason
        text = error.value if isinstance(error, ConchError) else str(error)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if isinstance(error, ConchError) and error.data == connection.OPEN_CONNECT_FAILED:
            text = text or "connect failed"
        self._finish(ProbeResult(opened=False, refused_reason=str(text)))

    def dataReceived(self, data: bytes) -> None:
        self.reply += data
        if b"\n" in self.reply or len(self.reply) >= MAX_REPLY:
            self._finish_open()

    def closed(self) -> None:
        if self.open_rtt is None:
            self._finish(ProbeResult(opened=False, refused_reason="closed"))
        else:
            self._finish_open()

    def _timeout(self) -> None:
        if self.open_rtt is None:
            self._finish(ProbeResult(opened=False, timed_out=True))
        else:
            self._finish_open()

    def _finish_open(self) -> None:
        line = self.reply.split(b"\n", 1)[0].strip().decode("latin-1")[:200] or None
        self._finish(ProbeResult(opened=True, open_rtt=self.open_rtt, first_line=line))

    def _finish(self, result: ProbeResult) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer.active():
            self.timer.cancel()
        self.done(result)
        if self.open_rtt is not None and not self.localClosed:
            self.loseConnection()


def probe_forward(
    forward: ActiveForward, mesh_address: str, clock: IReactorTime
) -> Deferred[ProbeResult]:
    """Try the member's service through its tunnel, as a mesh member would."""
    result: Deferred[ProbeResult] = Deferred()
    request = (
        f"HEAD / HTTP/1.1\r\nHost: {mesh_address}:{forward.port}\r\n"
        "User-Agent: nekojump-check\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    conn = forward.avatar.conn
    channel = ProbeChannel(request, clock, result.callback, conn=conn)
    conn.openChannel(
        channel,
        packOpen_forwarded_tcpip((forward.requested_host, forward.port), (mesh_address, 0)),
    )
    return result
