"""Conch's chatter is dropped before it is built; warnings still reach observers."""

from __future__ import annotations

from twisted.logger import LogLevel

from nekojump.logs import conch_logger


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
