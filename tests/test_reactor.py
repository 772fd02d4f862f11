"""TunnelReactor: events go straight to the handlers, errors still end only their connection."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
from twisted.internet.abstract import FileDescriptor

from nekojump.reactor import TunnelReactor


class Reader(FileDescriptor):
    """A socket that records what it reads; ``explode="read"`` makes reading fail."""

    def __init__(self, sock: socket.socket, reactor: TunnelReactor, explode: str = "") -> None:
        super().__init__(reactor)
        self.sock = sock
        self.explode = explode
        self.got = b""
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        if self.explode == "read":
            raise RuntimeError("bug in dataReceived")
        self.got += self.sock.recv(100)

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)
        super().connectionLost(reason)


@pytest.fixture
def reactor():
    reactor = TunnelReactor()
    yield reactor
    reactor.removeAll()
    reactor._poller.close()


def pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


def test_a_failing_reader_is_logged_and_closed_and_the_others_still_read(reactor, logged):
    bad_sock, bad_peer = pair()
    good_sock, good_peer = pair()
    bad = Reader(bad_sock, reactor, explode="read")
    good = Reader(good_sock, reactor)
    reactor.addReader(bad)
    reactor.addReader(good)
    bad_peer.send(b"x")
    good_peer.send(b"hello")

    reactor.doPoll(0)

    assert good.got == b"hello" and good.lost == []
    assert [reason.type for reason in bad.lost] == [RuntimeError]
    assert bad not in reactor.getReaders()
    assert any("bug in dataReceived" in str(e.get("failure", "")) for e in logged)


def test_an_error_that_escapes_the_handler_is_logged_and_polling_goes_on(reactor, logged):
    sock, peer = pair()
    reader = Reader(sock, reactor, explode="read")
    reactor.addReader(reader)
    peer.send(b"x")
    reader.explode = "read"

    def lost(reason: object) -> None:
        raise RuntimeError("bug in close")

    reader.connectionLost = lost  # type: ignore[method-assign]
    reactor.doPoll(0)  # does not raise

    assert any(
        e.get("log_namespace") == "nekojump.reactor" and "bug in close" in str(e["log_failure"])
        for e in logged
    )


def run_briefly(reactor: TunnelReactor, limit: float = 10.0) -> float:
    """Run ``reactor`` until something stops it (at most ``limit`` seconds); how long it ran.

    The limit is kept by a thread, so a loop that lost track of its timed
    calls still ends."""
    guard = threading.Timer(limit, reactor.callFromThread, args=(reactor.stop,))
    guard.start()
    start = time.monotonic()
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        guard.cancel()
    return time.monotonic() - start


def test_its_loop_runs_timed_calls_calls_from_threads_and_shutdown_triggers():
    reactor = TunnelReactor()
    seen: list[str] = []
    reactor.callLater(0.05, seen.append, "timed")
    helper = threading.Thread(target=reactor.callFromThread, args=(seen.append, "thread"))
    reactor.callWhenRunning(helper.start)
    reactor.addSystemEventTrigger("before", "shutdown", seen.append, "shutdown")
    reactor.callLater(0.2, reactor.stop)

    took = run_briefly(reactor)
    helper.join(5)

    assert sorted(seen[:2]) == ["thread", "timed"] and seen[2:] == ["shutdown"]
    assert took < 5


def test_a_timed_call_made_while_handling_a_read_is_not_waited_past():
    """A read handler asks for a call in 50 ms while no other timed call is
    pending: the loop must wait 50 ms, not until the guard's 10 s."""
    reactor = TunnelReactor()
    sock, peer = pair()
    reader = Reader(sock, reactor)
    reader.doRead = lambda: reactor.callLater(0.05, reactor.stop)  # type: ignore[method-assign]
    reactor.callWhenRunning(reactor.addReader, reader)
    reactor.callWhenRunning(peer.send, b"x")

    assert run_briefly(reactor) < 5


def test_an_error_in_its_loop_is_logged_and_the_loop_goes_on(logged):
    reactor = TunnelReactor()
    polls = []
    real_poll = reactor.doPoll

    def poll(timeout: float | None) -> None:
        polls.append(timeout)
        if len(polls) == 1:
            raise RuntimeError("bug in the loop")
        real_poll(timeout)

    reactor.doPoll = poll  # type: ignore[method-assign]
    reactor.callLater(0.1, reactor.stop)

    assert run_briefly(reactor) < 5
    assert len(polls) >= 2  # it polled again after the error, until the stop
    assert any("bug in the loop" in str(e.get("log_failure", "")) for e in logged)


def test_nekojump_runs_on_it_unless_another_reactor_was_chosen():
    from twisted.internet import reactor as installed

    from nekojump.reactor import install_unless_chosen

    assert install_unless_chosen() is False  # one is installed: it is left alone
    assert not isinstance(installed, TunnelReactor)
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "from nekojump.reactor import install_unless_chosen as i; first = i(); "
            "from twisted.internet import reactor; "
            "print(first, i(), type(reactor).__name__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.split() == ["True", "False", "TunnelReactor"]
