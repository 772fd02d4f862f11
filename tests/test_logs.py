"""Conch's chatter is dropped before it is built; warnings still reach observers."""

from __future__ import annotations

import io
import sys

import pytest
from twisted.logger import LogLevel, textFileLogObserver
from twisted.python.failure import Failure

from nekojump.logs import conch_logger, duration, text_observer


class Chatty:
    _log = conch_logger("chatty", LogLevel.warn)


def test_events_below_the_level_are_dropped_and_the_rest_published(logged):
    chatty = Chatty()
    chatty._log.debug("sending eof")
    chatty._log.info("channel open")
    chatty._log.warn("too much data on channel {id}", id=3)
    chatty._log.error("bad")

    ours = [e for e in logged if e["log_namespace"] == f"{__name__}.Chatty"]
    assert [e["log_format"] for e in ours] == ["too much data on channel {id}", "bad"]
    warned = ours[0]
    assert warned["id"] == 3
    assert warned["log_namespace"] == f"{__name__}.Chatty"
    assert warned["log_level"] is LogLevel.warn


def test_failures_are_always_published(logged):
    chatty = Chatty()
    try:
        raise ZeroDivisionError("channel crashed")
    except ZeroDivisionError:
        chatty._log.failure("channel crashed")
    assert [e["log_format"] for e in logged if e["log_namespace"].endswith("Chatty")] == [
        "channel crashed"
    ]


def test_the_text_observer_writes_what_twistds_own_writes(monkeypatch):
    """Same lines as ``twistd --logfile=-``, the time stamp made once a second."""
    ours, theirs = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", ours)
    observer = text_observer()
    reference = textFileLogObserver(theirs)
    start = 1_764_100_000.0
    for offset in (0.1, 0.5, 0.99, 1.0, 1.7, 61.2, 3600.4):
        event = {
            "log_format": "{member} connected from {source}",
            "member": "alice",
            "source": "127.0.0.9",
            "log_namespace": "nekojump.ssh.avatar.TunnelAvatar",
            "log_level": LogLevel.info,
            "log_time": start + offset,
        }
        observer(dict(event))
        reference(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    lines = ours.getvalue().splitlines()
    assert len(lines) == 7 and lines[0] != lines[-1]
    assert lines[0].endswith(
        "[nekojump.ssh.avatar.TunnelAvatar#info] alice connected from 127.0.0.9"
    )


class Peer:
    host = "127.0.0.9"

    def __str__(self) -> str:
        return "peer 127.0.0.9"


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no")


def _failure() -> Failure:
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        return Failure()


BASE = {
    "log_namespace": "nekojump.ssh.avatar.TunnelAvatar",
    "log_level": LogLevel.info,
    "log_time": 1_764_100_000.5,
    "member": "alice",
}


@pytest.mark.parametrize(
    "extra",
    [
        {"log_format": "{member} logged in"},
        {"log_format": "{member!r:>10} from {peer.host} ({peer})", "peer": Peer()},
        {"log_format": "ports {ports[0]} and {ports[1]}", "ports": [10001, 10002]},
        {"log_format": "two\nlines for {member}"},
        {"log_format": "{member} called {f()}", "f": lambda: "back"},  # call syntax
        {"log_format": "positional {}"},
        {"log_format": "missing {nobody}"},
        {"log_format": b"bytes for {member}"},
        {"log_format": ""},
        {"log_format": "braces {{}} and {member}"},
        {"log_format": "{log_text}", "log_text": "legacy line", "log_system": "-"},
        {"log_format": "{member}", "log_system": Peer()},
        {"log_format": "{member}", "log_system": Unprintable()},
        {"log_format": "{member}", "log_level": None},
        {"log_format": "failed for {member}", "log_failure": _failure()},
        {"log_format": "{member}", "log_time": None},
        {"member": "no format at all"},
    ],
)
def test_every_event_is_written_as_twisted_writes_it(monkeypatch, extra):
    ours, theirs = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", ours)
    event = {**BASE, **extra}
    text_observer()(dict(event))
    textFileLogObserver(theirs)(dict(event))
    assert ours.getvalue() == theirs.getvalue()


def test_durations_read_like_a_person_would_say_them():
    assert [
        duration(s) for s in (0, 45.9, 60, 12 * 60 + 5, 3 * 3600 + 5 * 60, 2 * 86400 + 4 * 3600)
    ] == [
        "0 s",
        "45 s",
        "1 min",
        "12 min",
        "3 h 05 min",
        "2 d 4 h",
    ]
