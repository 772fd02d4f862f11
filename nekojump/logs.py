"""Loggers for the Conch classes we subclass, without their per-packet chatter."""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)


def conch_logger(namespace: str, level: LogLevel = LogLevel.info) -> Logger:
    """A ``Logger`` for ``namespace`` that drops events below ``level``.

    Conch logs every kex step, auth try and channel open; at thousands of
    tunnels that buries what an operator needs.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return Logger(
        namespace=namespace,
        observer=FilteringLogObserver(globalLogPublisher, [predicate]),
    )
