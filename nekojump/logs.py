"""Loggers for the Conch classes we subclass, without their per-packet chatter."""

from __future__ import annotations

import sys
from collections.abc import Callable

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
)


class QuietLogger(Logger):
    """A ``Logger`` that drops events below ``level`` before it builds them.

    Conch's classes log several events per channel and packet exchange; even
    when an observer filters them out, building and offering each event costs
    more than the rest of a small request's handling.
    """

    def __init__(
        self,
        namespace: str | None = None,
        source: object = None,
        observer: ILogObserver | None = None,
        level: LogLevel = LogLevel.info,
    ) -> None:
        super().__init__(namespace, source, observer)
        self.level = level
        self._dropped = _BELOW[level]
        self._bound: dict[type, QuietLogger] = {}

    def __get__(self, instance: object, owner: type | None = None) -> QuietLogger:
        """The logger of ``owner``'s namespace, made once per class (Twisted's
        makes one per attribute access, with the instance as ``log_source``;
        no message of Conch's or ours shows the source)."""
        assert owner is not None
        bound = self._bound.get(owner)
        if bound is None:
            bound = self._bound[owner] = QuietLogger(
                f"{owner.__module__}.{owner.__name__}", owner, self.observer, self.level
            )
        return bound

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level in self._dropped:
            return
        super().emit(level, format, **kwargs)


_BELOW = {
    level: frozenset(lower for lower in LogLevel.iterconstants() if lower < level)
    for level in LogLevel.iterconstants()
}


def conch_logger(namespace: str, level: LogLevel = LogLevel.info) -> Logger:
    """A ``Logger`` for ``namespace`` that drops events below ``level``.

    Conch logs every kex step, auth try and channel open; at thousands of
    tunnels that buries what an operator needs.
    """
    return QuietLogger(namespace, observer=globalLogPublisher, level=level)


def json_observer() -> ILogObserver:
    """JSON lines on stdout for log shippers: ``twistd --logger=nekojump.logs.json_observer``.

    Each line is one event with stable fields (``log_namespace``,
    ``log_level``, ``log_format`` and the event's own keys such as ``member``,
    ``port``, ``code``).  Nothing secret is ever put in an event.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


class _TimeOncePerSecond:
    """``formatTime`` for log lines, worked out once per second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def text_observer() -> ILogObserver:
    """twistd's text log lines on stdout, cheaper to make:
    ``twistd --logger=nekojump.logs.text_observer`` (the systemd unit uses it).

    Each line is what twistd's own observer writes, but the time stamp is
    worked out once a second instead of once a line, and plain events are
    filled in by ``str.format_map`` (see ``classic_line``): those were the
    dearest parts of a line, and a burst of logins writes a line or two each.
    """
    stamp = _TimeOncePerSecond()
    return FileLogObserver(sys.stdout, lambda event: classic_line(event, stamp))


def classic_line(event: dict, stamp: Callable[[float | None], str]) -> str | None:
    """``formatEventAsClassicLogText(event, formatTime=stamp)``, made about ten
    times faster for the events nekojump and Conch log: a text format whose
    fields are keys of the event.  ``str.format_map`` fills those in as
    Twisted's formatter does; anything else (a failure, call syntax, a field
    that is missing) goes to Twisted's own."""
    text_format = event.get("log_format")
    if type(text_format) is not str or "log_failure" in event or "log_flattened" in event:
        return formatEventAsClassicLogText(event, formatTime=stamp)
    try:
        text = text_format.format_map(event)
    except Exception:  # noqa: BLE001 - Twisted's formatter says what went wrong
        return formatEventAsClassicLogText(event, formatTime=stamp)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:  # noqa: BLE001 - as Twisted's formatter does
            system = "UNFORMATTABLE"
    return f"{stamp(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


def duration(seconds: float) -> str:
    """A span of time for log lines: ``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 4 h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
