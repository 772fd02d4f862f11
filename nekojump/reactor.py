"""The reactor nekojump runs on: Twisted's epoll reactor, minus per-event bookkeeping.

For every socket event Twisted's ``doPoll`` goes through ``callWithLogger``,
which asks the selectable for its log prefix, copies the context dictionary
and pushes and pops it, so that old-style ``log.msg`` calls made while
handling the event carry a "system" name.  nekojump logs with
``twisted.logger``, which does not read that context; for a small request
through a tunnel (two socket events) the bookkeeping cost about a fifth of
the server's Python time.  ``TunnelReactor`` hands events straight to
``_doReadOrWrite``, which still turns an exception in ``doRead``/``doWrite``
into a logged error and a closed connection; anything that escapes even that
is logged here, as ``callWithLogger`` would.  Its main loop, likewise, only
runs timed calls and calls from threads when there are some.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

_log = Logger(namespace="nekojump.reactor")

#: The longest wait ``epoll_wait`` takes, in seconds (its timeout is a C int of ms).
_LONGEST_WAIT = 2147483


class TunnelReactor(EPollReactor):
    """``EPollReactor`` whose ``doPoll`` does not set a logging context per event."""

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:  # noqa: BLE001 - logged, as callWithLogger does
                _log.failure("unhandled error while handling {selectable!r}", selectable=selectable)

    doIteration = doPoll

    def mainLoop(self) -> None:
        """Twisted's loop: run what is due, wait for events, handle them.

        ``ReactorBase.mainLoop`` makes six Python calls per turn before it
        waits (``runUntilCurrent``, ``timeout``, each of which inserts new
        timed calls, and a logging context manager), whether anything is due
        or not; a small request through a tunnel is two turns.  Here they
        run only when there is something to do: calls from threads, new or
        due timed calls, a stop.  An exception is logged and the loop goes
        on, as Twisted's does."""
        seconds = self.seconds
        while self._started:
            try:
                pending = self._pendingTimedCalls
                if (
                    self.threadCallQueue
                    or self._newTimedCalls
                    or self._justStopped
                    or (pending and pending[0].time <= seconds())
                ):
                    self.runUntilCurrent()
                    self._insertNewDelayedCalls()
                    pending = self._pendingTimedCalls
                if not self.running:
                    timeout: float | None = 0
                elif pending:
                    timeout = max(0.0, min(_LONGEST_WAIT, pending[0].time - seconds()))
                else:
                    timeout = None
                self.doPoll(timeout)
            except BaseException:  # noqa: BLE001 - logged, as Twisted's loop does
                _log.failure("Unexpected error in main loop")
        _log.info("Main loop terminated.")


def install_unless_chosen() -> bool:
    """Install ``TunnelReactor`` as the global reactor, unless one is installed
    already (``twistd --reactor``, or an import that installed the default).

    Returns whether it was installed."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    installReactor(TunnelReactor())
    return True
