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
is logged here, as ``callWithLogger`` would.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

_log = Logger(namespace="nekojump.reactor")


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


def install_unless_chosen() -> bool:
    """Install ``TunnelReactor`` as the global reactor, unless one is installed
    already (``twistd --reactor``, or an import that installed the default).

    Returns whether it was installed."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    installReactor(TunnelReactor())
    return True
