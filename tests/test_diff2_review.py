"""Review of 6a764cc..HEAD (forward refusal messages, login ``next=``, directory of
active members, admin live tunnels, per-member caps and change budgets, bounded
dashboard connections, accessibility).

Each test failed on the reviewed code (c044017's parent, 555b94a) because of
the defect its docstring describes, and passes since the fix.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.static import Data

from nekojump.web.site import BoundedSite
from tests.test_web_api import public_key_text
from tests.test_web_review import World, csrf_in, world  # noqa: F401 - a fixture


def test_a_member_can_still_revoke_a_key_after_spending_the_change_budget(world):  # noqa: F811
    """The per-member change budget (backend.py ``_changes_left`` in
    ``remove_key``) also refuses *removing* a key. A member who spent the budget
    (a script churning ports, or whoever holds a leaked API token: it adds its
    own SSH key, then burns the rest) cannot revoke the unwanted key from the
    dashboard for up to an hour: Remove Key answers "you made N changes ... try
    again later" while that key keeps opening tunnels. Removals need not be
    capped for the budget's purpose: each one undoes an earlier add, and adds
    are capped."""
    limit = world.backend.config.limits.max_changes_per_member_per_hour
    alice = world.token("alice")  # e.g. a leaked API token
    code, _h, body = alice.request(
        "POST",
        "/api/v1/keys",
        data=json.dumps({"public_key": public_key_text("intruder@box")}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert code in (200, 201), body
    for _ in range(limit):  # the rest of the hour's budget
        code, _h, _b = alice.request(
            "POST",
            "/api/v1/ports",
            data=json.dumps({"port": 10080, "description": "x"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        if code == 429:
            break
        alice.request("DELETE", "/api/v1/ports/10080")
    (intruder,) = world.store.list_keys("alice")

    browser, _csrf = world.session("alice")
    csrf = csrf_in(browser.page("/"))
    code, _h, body = browser.request(
        "POST", "/keys/remove", form={"csrf": csrf, "fingerprint": intruder.fingerprint}
    )
    assert world.store.list_keys("alice") == [], (
        f"Remove Key refused ({code}): the intruder's key stays usable for up to an hour"
    )


class SlowReader(StringTransport):
    """A TCP transport to a client that reads slowly: like Twisted's
    ``FileDescriptor``, it pauses its producer once more than ``bufferSize`` bytes
    wait to be sent, and ``drain`` is the client catching up."""

    bufferSize = 64 * 1024

    def __init__(self, host: str):
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.unsent = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        if self.producer is not None and self.unsent > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unsent = 0
        if self.producer is not None:
            self.producer.resumeProducing()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def test_a_large_page_still_going_out_to_a_slow_client_is_not_cut_off():
    """``DeadlineChannel.requestDone`` (site.py) starts the next request's 30 s
    as soon as the handler *finished writing* the response into Twisted's send
    buffer, not when the client has received it. A member on a slow link (a
    train, a hotel Wi-Fi) loading a page larger than the socket buffers, e.g.
    the admin page with its keys, ports and audit trail, still has the rest of
    it queued when the deadline fires: ``abortConnection`` throws the queued
    bytes away and resets the connection, so the browser shows a truncated page
    or a "connection reset" error. Before, an idle timeout of 12 h applied and
    the page arrived. The deadline should wait for the response to be written
    out (e.g. arm it from ``resumeProducing`` when ``_waitingForTransport``)."""
    root = Resource()
    root.putChild(b"", Data(b"x" * (400 * 1024), "text/html"))
    clock = MemoryReactorClock()
    site = BoundedSite(root, clock=clock, request_timeout=30)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.71", 40000))
    transport = SlowReader("127.0.0.71")
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: jump.test\r\n\r\n")  # kept alive
    assert transport.unsent > transport.bufferSize  # most of the page is still queued
    clock.advance(31)  # the client is still reading it
    assert not transport.aborted, "the page was cut off while the client was still reading it"
    transport.drain()
    clock.advance(31)  # once it is out, an idle connection may well be closed
    assert transport.aborted
