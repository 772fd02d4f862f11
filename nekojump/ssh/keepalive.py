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
    """

    def __init__(
        self,
        send: Callable[[], Deferred[object]],
        clock: IReactorTime,
        interval: float,
        count_max: int,
        on_dead: Callable[[], None],
    ):
        self._send = send
        self._clock = clock
        self.interval = interval
        self.count_max = count_max
        self._on_dead = on_dead
        self.unanswered = 0
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._call = self._clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self) -> None:
        self._call = None
        if self.unanswered >= self.count_max:
            self._on_dead()
            return
        self.unanswered += 1
        self._send().addBoth(self._answered)
        self._call = self._clock.callLater(self.interval, self._tick)

    def _answered(self, _reply: object) -> None:
        self.unanswered = 0
