"""TunnelReactor: events go straight to the handlers, errors still end only their connection."""

from __future__ import annotations

import socket
import subprocess
import sys

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
