"""Server keepalives: find clients that vanished without a FIN, like OpenSSH's ClientAlive."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Keepalive:
    """Asks the client for a reply every ``interval`` seconds.

    Any reply counts (OpenSSH answers ``keepalive@openssh.com`` with
    REQUEST_FAILURE).  When more than ``count_max`` asks in a row go
    unanswered, ``on_dead`` is called once: a vanished laptop frees its ports
    after about ``interval * (count_max + 1)`` seconds, as with sshd.

    Data from the client counts as much as a reply, as with sshd: an interval
    in which any arrived needs no ask, and clears the count.  On a slow uplink
    carrying a download the answers wait behind megabytes of the client's own
    data; counting only answers ended such tunnels mid-transfer.
    """

    def __init__(
        self,
        send: Callable[[], Deferred[object]],
        clock: IReactorTime,
        interval: float,
        count_max: int,
        on_dead: Callable[[], None],
        received: Callable[[], int] = lambda: 0,
    ):
        self._send = send
        self._clock = clock
        self.interval = interval
        self.count_max = count_max
        self._on_dead = on_dead
        #: Bytes received from the client so far: any counts as a sign of life
        #: for a probe (its answer may wait behind the client's own data).
        self._received = received
        self.unanswered = 0
        self._call: IDelayedCall | None = None
        self._probe: IDelayedCall | None = None
        self._probed_at: float | None = None

    def start(self) -> None:
        self._received_at_tick = self._received()
        self._call = self._clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        for call in (self._call, self._probe):
            if call is not None and call.active():
                call.cancel()
        self._call = self._probe = None

    def probe(self, timeout: float) -> None:
        """Ask now, out of turn: if neither a reply nor any other data comes
        within ``timeout`` seconds, the client is gone (``on_dead``).  At most
        one probe per ``interval``: a client that just showed it is there is
        left to the regular asks."""
        now = self._clock.seconds()
        if self._probe is not None or (
            self._probed_at is not None and now - self._probed_at < self.interval
        ):
            return
        self._probed_at = now
        self._probe = self._clock.callLater(timeout, self._probe_expired, self._received())
        self._send().addBoth(self._probe_answered)

    def _probe_answered(self, _reply: object) -> None:
        self._answered(_reply)
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None

    def _probe_expired(self, received_before: int) -> None:
        self._probe = None
        if self._received() != received_before:
            return  # busy sending: there, whatever became of the answer
        self.stop()
        self._on_dead()

    #: ``received()`` at the last tick.
    _received_at_tick = 0

    def _tick(self) -> None:
        self._call = None
        received = self._received()
        if received != self._received_at_tick:
            self._received_at_tick = received
            self.unanswered = 0  # the client is there
        else:
            if self.unanswered >= self.count_max:
                self._on_dead()
                return
            self.unanswered += 1
            self._send().addBoth(self._answered)
        self._call = self._clock.callLater(self.interval, self._tick)

    def _answered(self, _reply: object) -> None:
        self.unanswered = 0
        # The reply is data from the client too, but only an answer to our
        # ask: counted as fresh data it would skip the next ask, and a client
        # gone right after answering would be dropped an interval late.
        self._received_at_tick = self._received()
