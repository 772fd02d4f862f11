"""The dashboard's connections: bounded per address, by the descriptor budget, and
in time (``nekojump.web.site``), with Twisted's in-memory transport and clock."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.static import Data

from nekojump.model import Refused
from nekojump.web.site import BoundedSite

GET = b"GET / HTTP/1.1\r\nHost: jump.test\r\n\r\n"


def site(**options) -> tuple[BoundedSite, MemoryReactorClock]:
    root = Resource()
    root.putChild(b"", Data(b"hello", "text/plain"))
    clock = MemoryReactorClock()
    return BoundedSite(root, clock=clock, request_timeout=30, **options), clock


def connect(bounded: BoundedSite, host: str = "127.0.0.5"):
    """A connection from ``host``: (channel, transport), or (None, None) if refused."""
    channel = bounded.buildProtocol(IPv4Address("TCP", host, 40000))
    if channel is None:
        return None, None
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    channel.makeConnection(transport)
    return channel, transport


def lose(channel) -> None:
    channel.connectionLost(None)


def test_a_client_trickling_a_request_is_cut_off_at_the_deadline():
    """A byte now and then kept Twisted's idle timeout (60 s, restarted by every
    byte) from ever firing; the whole request must come within request_timeout."""
    bounded, clock = site()
    channel, transport = connect(bounded)
    for byte in b"GET / HTTP/1.1\r\nHost: j":
        channel.dataReceived(bytes([byte]))
        clock.advance(2)
        if transport.disconnecting:
            break
    assert transport.disconnecting  # aborted at 30 s, before the 23 bytes took 46
    lose(channel)
    assert bounded.open_connections == 0


def test_a_whole_request_in_time_is_answered_and_a_kept_alive_connection_waits_as_long():
    bounded, clock = site()
    channel, transport = connect(bounded)
    clock.advance(29)
    channel.dataReceived(GET)
    assert b"hello" in transport.value()
    assert not transport.disconnecting
    clock.advance(29)  # the next request has its own 30 s
    channel.dataReceived(GET)
    assert transport.value().count(b"hello") == 2
    clock.advance(31)  # and an idle connection is closed after them
    assert transport.disconnecting


def test_one_address_holds_at_most_its_share_of_connections():
    bounded, _clock = site(max_per_source=3)
    held = [connect(bounded)[0] for _ in range(3)]
    assert all(held)
    assert connect(bounded) == (None, None)  # the fourth is closed at once
    assert connect(bounded, "127.0.0.6")[0] is not None  # other addresses are not held up
    lose(held[0])
    assert connect(bounded)[0] is not None  # a slot freed is a slot again


def test_a_trusted_proxy_carries_any_number_of_connections():
    proxy = ipaddress.ip_network("127.0.0.9/32")
    bounded, _clock = site(max_per_source=2, trusted=[proxy])
    assert all(connect(bounded, "127.0.0.9")[0] for _ in range(10))
    assert bounded.open_connections == 10


def test_no_connection_is_accepted_once_the_descriptor_budget_is_spent():
    full: list[Refused] = []
    bounded, _clock = site(budget=lambda: full[0] if full else None)
    assert connect(bounded)[0] is not None
    full.append(Refused("server-full", "the jumphost is at its connection limit"))
    assert connect(bounded, "127.0.0.6") == (None, None)
    assert bounded.open_connections == 1


def test_a_client_retrying_past_its_share_is_logged_once_until_it_lets_go(logged):
    """Every refused connection wrote a log line: a client retrying in a loop
    could fill the operator's disk.  Now one line, until the address is under
    its share again."""
    bounded, _clock = site(max_per_source=1)
    held, _transport = connect(bounded)
    for _ in range(50):
        assert connect(bounded) == (None, None)
    refused = [e for e in logged if "refused" in e.get("log_format", "")]
    assert len(refused) == 1
    lose(held)
    connect(bounded)
    connect(bounded)
    refused = [e for e in logged if "refused" in e.get("log_format", "")]
    assert len(refused) == 2
