"""Loggers for the Conch classes we subclass, without their per-packet chatter."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
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


def json_observer() -> ILogObserver:
    """JSON lines on stdout for log shippers: ``twistd --logger=nekojump.logs.json_observer``.

    Each line is one event with stable fields (``log_namespace``,
    ``log_level``, ``log_format`` and the event's own keys such as ``member``,
    ``port``, ``code``).  Nothing secret is ever put in an event.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
