"""Review of the changes 0e3c5e2..c75fbca: the reactor's main loop
(``nekojump/reactor.py``), DISCONNECT then half-close (``ssh/packets.py``,
``ssh/transport.py``, ``ssh/avatar.py``), data from the client as a keepalive
answer (``ssh/keepalive.py``), refused takeovers of a contested port
(``ssh/avatar.py``, ``policy.takeover_contested``), schema 4 (``store.py``,
``schema/004-key-ids.sql``) and the dashboard/API changes (``web/``).

Each test here failed on the reviewed code because of the defect its docstring
describes, and passes since the fixes that came with it.  Everything runs in
memory (Twisted ``Clock``, iosim, treq's StubTreq); no socket is opened.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nekojump.ssh.keepalive import Keepalive
from tests.test_ssh_protocol import (
    MSG_GLOBAL_REQUEST,
    MSG_REQUEST_FAILURE,
    MSG_REQUEST_SUCCESS,
    World,
    forward_request,
)
from tests.test_web_review import log_in, world  # noqa: F401 - a fixture

# -- keepalive: data from the client counts as an answer ---------------------------------


def test_a_client_that_vanishes_right_after_answering_is_dropped_within_the_documented_time():
    """The keepalive reply is itself data from the client.  With the change, a
    tick that sees that reply's bytes asks nothing, so an idle client that
    answers every ask is asked only every *other* interval, and one that
    vanishes right after answering is dropped ``interval * (count_max + 2)``
    after it went (75 s with the defaults) instead of the
    ``interval * (count_max + 1)`` (60 s) the Keepalive docstring, the
    operator guide and sshd give: its ports stay held 15 s longer.  sshd
    restarts the interval from the last data, so its next ask comes one
    interval after the reply."""
    clock = Clock()
    received = [0]
    client_there = [True]
    dead: list[float] = []

    def send() -> Deferred[object]:
        d: Deferred[object] = Deferred()
        if client_there[0]:
            received[0] += 40  # the REQUEST_FAILURE packet, counted by the transport
            d.callback(None)
        return d

    keepalive = Keepalive(
        send, clock, 15.0, 3, lambda: dead.append(clock.seconds()), received=lambda: received[0]
    )
    keepalive.start()
    asked_at: list[float] = []
    for _ in range(3):  # 45 s of an idle, healthy tunnel
        before = received[0]
        clock.advance(15)
        if received[0] != before:
            asked_at.append(clock.seconds())
    # Vanishes (laptop lid closed) right after its last answer.
    vanished_at = asked_at[-1]
    client_there[0] = False
    for _ in range(20):
        if dead:
            break
        clock.advance(15)
    assert dead, "never dropped"
    assert dead[0] - vanished_at <= 15.0 * (3 + 1), (
        f"dropped {dead[0] - vanished_at:.0f} s after it vanished (asked at {asked_at})"
    )


# -- refused takeover of a contested port --------------------------------------------------


def test_a_refused_takeover_shows_in_the_live_tunnels_table_the_admin_cli_reads(tmp_path):
    """When a takeover is refused as contested, ``_contested`` sets the holder's
    ``last_error`` ("another connection with this key asked for this port; is
    the key in use on two machines?") but does not call
    ``registry.forward_changed``: the server never republishes the forward, so
    the ``live_forwards`` table (``nekojump-admin tunnels``' LAST ERROR column)
    keeps showing no error while the dashboard shows one.  Every other place
    that sets ``last_error`` (``forward_failed``) republishes."""
    jump = World(tmp_path)
    published: list[tuple[int, str | None]] = []
    jump.registry.on_change = lambda forward, port: published.append(
        (port, forward.live().last_error if forward is not None else None)
    )
    try:
        jump.holding(20063)
        second, _pump2, _ = jump.holding(20063)
        assert second.count(MSG_REQUEST_SUCCESS) == 1  # the first takeover: at once
        again, pump3, _ = jump.logged_in()
        again.send(MSG_GLOBAL_REQUEST, forward_request(20063))
        pump3.flush()
        assert again.count(MSG_REQUEST_FAILURE) == 1  # contested: refused
        (forward,) = jump.registry.forwards()
        assert forward.last_error and "two machines" in forward.last_error
        assert published[-1] == (20063, forward.last_error), (
            "the live-forwards table (admin CLI) was not told about the refused takeover"
        )
    finally:
        jump.store.close()


# -- dashboard: log out --------------------------------------------------------------------


def test_a_members_service_on_another_port_of_this_host_cannot_log_a_member_out(world):  # noqa: F811
    """/logout no longer checks anything: it ends whatever session the cookie
    names.  The comment says another site's post carries no SameSite=Strict
    cookie, but a member's service on another port of the jumphost's own
    address is the *same site* to a browser (ports do not count: the very
    reason ``from_this_site`` was added to /login), so the cookie is sent with
    its auto-submitted form.  Any member's web service opened by another member
    logs that member out of the dashboard (session ended, cookie cleared).  A
    same-origin check (``Sec-Fetch-Site``/``Origin``, as for /login) would stop
    it and still let a stale tab's Log out work."""
    browser = log_in(world, "alice")
    cookie = browser.headers["Cookie"]
    code, _headers, _body = browser.request(
        "POST",
        "/logout",
        form={},
        # What a browser sends with a form auto-submitted by a page served from
        # http://jump.test:10080/ (a member's forwarded service).
        headers={"Origin": "http://jump.test:10080", "Sec-Fetch-Site": "same-site"},
    )
    still_in = world.client({"Cookie": cookie}).request("GET", "/")[0]
    assert still_in == 200, f"a page on another port logged alice out (logout answered {code})"
