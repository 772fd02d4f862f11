"""A review of the dashboard change aa973d0 (and cfe91a2's ``/logout``).

Reviewed: the Live tunnels refresh in app.js (the ``setTimeout`` chain, 401/offline
handling, the swap that keeps focus, the Registered Ports badges from
``#port-states``), ``/tunnels`` with hint and port states, POST ``/check`` as a
303 to ``GET /?check=PORT``, the stale-form re-render (``_stale_form``), the
``/login?expired=1`` notice, ``/logout`` with ``from_this_site`` or the CSRF token,
the suggested ports, and the templates (dashboard, tunnels, login, admin,
directory).

Each test failed on aa973d0 because of a defect a member or operator would see
(its docstring says what), and passes since the fixes that came with it.  The
in-memory tests use the ``site`` fixture of tests/test_web_api.py; the browser
tests run a real ``twistd nekojump`` and a real headless Chromium, reaching the
dashboard through a small HTTP relay on 127.0.0.76 that can hold or cut one
``/tunnels`` answer (a laptop waking up on another network, a server restarting
mid-answer).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from nekojump.policy import ForwardRules
from nekojump.web.backend import Backend
from tests.test_web_api import registry, site  # noqa: F401
from tests.test_web_pages import fetch, held_password_checks  # noqa: F401

# -- in memory ---------------------------------------------------------------------------------


def test_a_stale_form_on_the_admin_page_comes_back_as_the_admin_page(site):  # noqa: F811
    """An admin logged in again in another tab, then clicks Remove on /admin (a
    form with ``back=/admin``).  ``_stale_form`` answers with the admin's *own
    member dashboard* ("This page was older than your session ... check and send it
    again"), which has no such form: the admin must find /admin again and cannot
    see the member's port the message refers to."""
    store, client = site
    store.add_port("bob", 10080, "bob's wiki", ForwardRules(10000, 10999))
    root, old_csrf = client("root", via="session")
    store.end_session(root.headers["Cookie"].split("=", 1)[1])
    fresh, _fresh_csrf = client("root", via="session")
    code, _headers, body = fetch(
        fresh.treq,
        "POST",
        "/ports/remove",
        fresh.headers,
        {"csrf": old_csrf, "port": "10080", "member": "bob", "back": "/admin"},
    )
    assert code == 403
    assert [p.port for p in store.list_ports("bob")] == [10080]  # nothing changed: right
    assert 'id="admin-section"' in body, "a stale form sent from /admin came back as " + (
        "the admin's own member dashboard" if "reverse-tunnel-section" in body else body[:200]
    )


def test_a_same_site_page_cannot_make_the_browser_run_a_check(site, monkeypatch):  # noqa: F811
    """A Check opens a connection through the member's tunnel and sends
    ``HEAD / HTTP/1.1`` to their service (an admin's Check reaches anyone's).  It was
    a POST with the CSRF token; now ``GET /?check=PORT`` runs it with no token at
    all, so any page of the same site -- a member's own web service on another port
    of this host, which cfe91a2 treats as hostile for /logout, and which the
    browser sends the SameSite=Strict cookie to -- can run Checks in a visitor's
    browser with an ``<img src=".../?check=10081">``: the visited member's service
    logs nekojump-check requests nobody asked for."""
    _store, client = site
    calls: list[object] = []
    original = Backend.check

    async def recording(self, viewer, port, address):  # type: ignore[no-untyped-def]
        calls.append(port)
        return await original(self, viewer, port, address)

    monkeypatch.setattr(Backend, "check", recording)
    root, _csrf = client("root", via="session")
    headers = dict(root.headers, **{"Sec-Fetch-Site": "same-site", "Sec-Fetch-Dest": "image"})
    fetch(root.treq, "GET", "/?check=10081", headers)
    assert calls == [], "a same-site <img> ran a Check of port 10081 as the admin"


def test_the_dashboards_own_login_form_over_plain_http_is_not_foreign(site, held_password_checks):  # noqa: F811
    """``from_this_site`` falls back to ``Origin`` when there is no
    ``Sec-Fetch-Site``, and Chromium sends no ``Sec-Fetch-*`` to a plain-HTTP
    origin that is not localhost (the dashboard at ``http://jump.mesh:8080`` over
    WireGuard).  With the dashboard's ``Referrer-Policy: no-referrer`` its own form
    posts carried ``Origin: null`` (checked in Chromium), so the member could not log
    in at all.  Fixed by sending ``Referrer-Policy: same-origin``, under which
    same-origin posts carry the real origin (``Origin: null`` stays foreign: a page
    elsewhere can make its posts say null); in Chromium, see
    ``test_logging_in_and_out_over_plain_http_at_a_mesh_name``."""
    _store, client = site
    treq = client(None).treq
    answers: list[object] = []
    treq.request("GET", "http://jump.mesh:8080/login").addBoth(answers.append)
    treq.flush()
    assert answers[0].headers.getRawHeaders(b"referrer-policy") == [b"same-origin"]
    answers.clear()
    treq.request(
        "POST",
        "http://jump.mesh:8080/login",
        data=urlencode({"name": "alice", "password": "right"}).encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Host": "jump.mesh:8080",
            "Origin": "http://jump.mesh:8080",  # what Chromium sends now
        },
        allow_redirects=False,
    ).addBoth(answers.append)
    treq.flush()
    if held_password_checks:
        held_password_checks[-1].callback(True)
        treq.flush()
    assert answers[0].code == 303, f"{answers[0].code}: the dashboard's own login form refused"


# -- in Chromium, through a relay that can hold or cut /tunnels -------------------------------

pytest.importorskip("selenium")

from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402

from tests.conftest import Jumphost  # noqa: E402
from tests.test_dashboard_browser import (  # noqa: E402, F401
    PASSWORD,
    browser,
    find,
    log_in,
    submit,
    wait,
)

RELAY_HOST = "127.0.0.76"


class Relay:
    """An HTTP/1.1 relay on 127.0.0.76, one request per connection.

    ``mode`` says what happens to the next ``GET /tunnels``: ``pass`` relays it,
    ``hang`` keeps the connection open and never answers, ``cut`` answers 200
    with a Content-Length, half the body, then closes (a network error while the
    page reads the body)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.mode = "pass"
        self.tunnels_requests: list[tuple[float, str]] = []
        self.held: list[socket.socket] = []
        self.listener = self._bind()
        self.url = f"http://{RELAY_HOST}:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _bind() -> socket.socket:
        for port in range(46760, 46800):
            try:
                return socket.create_server((RELAY_HOST, port))
            except OSError:
                continue
        raise RuntimeError("no free port on 127.0.0.76:46760-46799")

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(20)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = 0
            kept = [lines[0]]
            for line in lines[1:]:
                name = line.split(b":", 1)[0].strip().lower()
                if name == b"content-length":
                    length = int(line.split(b":", 1)[1])
                if name in (b"connection", b"keep-alive"):
                    continue
                kept.append(line)
            while len(body) < length:
                body += client.recv(65536)
            path = lines[0].split(b" ")[1].decode()
            if path.startswith("/tunnels"):
                mode = self.mode
                self.tunnels_requests.append((time.monotonic(), mode))
                if mode == "hang":
                    self.held.append(client)
                    return
                if mode == "cut":
                    self.mode = "pass"
                    client.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                        b"Content-Length: 4000\r\n\r\n<p>No live"
                    )
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    return
            upstream = socket.create_connection(self.upstream, timeout=20)
            upstream.sendall(b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n" + body)
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
            upstream.close()
            client.close()
        except OSError:
            client.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for held in self.held:
            held.close()


@pytest.fixture
def relay(jumphost: Jumphost, keys) -> Iterator[Relay]:
    jumphost.add_member("alice", keys["alice"], password=PASSWORD)
    jumphost.start()
    host, _, port = jumphost.web_url.split("://", 1)[1].rstrip("/").rpartition(":")
    relay = Relay((host, int(port)))
    try:
        yield relay
    finally:
        relay.close()


def log_in_via(driver: WebDriver, relay: Relay) -> None:
    driver.get(relay.url + "/login")
    find(driver, "#name").send_keys("alice")
    find(driver, "#password").send_keys(PASSWORD)
    submit(driver, "form[action='/login']")
    wait(driver).until(expected_conditions.presence_of_element_located(("id", "tunnels")))


def updated_text(driver: WebDriver) -> str:
    return find(driver, "#tunnels-updated").text


def wait_for_a_refresh(driver: WebDriver, relay: Relay) -> None:
    before = len(relay.tunnels_requests)
    wait(driver, 8).until(
        lambda d: len(relay.tunnels_requests) > before and updated_text(d).startswith("updated")
    )


def test_one_unanswered_refresh_freezes_live_tunnels_for_good(relay, browser):  # noqa: F811
    """The laptop wakes up on another network and the refresh's request goes out on
    a connection nobody answers any more.  The refresh waits for it with no time
    limit and only then schedules the next one, so Live tunnels never refreshes
    again and keeps saying "updated 12:00:01" -- it looks current while tunnels come
    and go.  (With ``setInterval`` the next refresh went out two seconds later.)"""
    log_in_via(browser, relay)
    wait_for_a_refresh(browser, relay)
    relay.mode = "hang"
    wait(browser, 5).until(lambda d: relay.tunnels_requests[-1][1] == "hang")
    hung_at = relay.tunnels_requests[-1][0]
    shown = updated_text(browser)
    relay.mode = "pass"  # the network is fine again: only that one request is lost
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        later = [t for t, _mode in relay.tunnels_requests if t > hung_at]
        if later or updated_text(browser) != shown:
            return
        time.sleep(0.2)
    pytest.fail(
        f"10 s after one /tunnels request went unanswered no other was sent, and Live "
        f"tunnels still says {updated_text(browser)!r}"
    )


def test_a_refresh_cut_off_mid_answer_stops_live_tunnels_for_good(relay, browser):  # noqa: F811
    """The server restarts (or the Wi-Fi drops) while an answer to ``/tunnels`` is
    on its way: the headers arrived, the body did not.  ``await response.text()``
    throws outside the ``try``, the promise rejects, and no further refresh is
    ever scheduled: Live tunnels and the Registered Ports badges stop changing for
    good, still saying "updated 12:00:01", with no "offline" or "retrying"."""
    log_in_via(browser, relay)
    wait_for_a_refresh(browser, relay)
    relay.mode = "cut"
    wait(browser, 5).until(lambda d: relay.tunnels_requests[-1][1] == "cut")
    cut_at = relay.tunnels_requests[-1][0]
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        if any(t > cut_at for t, _mode in relay.tunnels_requests):
            return
        time.sleep(0.2)
    pytest.fail(
        "8 s after one /tunnels answer was cut off mid-body no refresh was sent; "
        f"Live tunnels says {updated_text(browser)!r}"
    )


def test_focus_is_not_dropped_when_the_focused_tunnel_ends(jumphost, keys, echo, browser):  # noqa: F811
    """A keyboard user is on a live tunnel's Check button when that tunnel ends (the
    machine went to sleep).  The refresh swaps the table out, finds no row for the
    port and leaves focus on the removed button: it falls back to <body>, so the
    next Tab starts again from the top of the page and a screen reader says
    nothing about where the user is.  (Focus should land somewhere in Live
    tunnels, e.g. the card or its "No live tunnels" text.)"""
    jumphost.add_member("alice", keys["alice"], password=PASSWORD)
    jumphost.start()
    port = jumphost.port_min + 7
    ssh = jumphost.forward(keys["alice"], port, echo.port)
    log_in(browser, jumphost, "alice")
    check = f"#tunnels-table tr[data-port='{port}'] button"
    wait(browser, 5).until(
        lambda d: d.execute_script("return !!document.querySelector(arguments[0])", check)
    )
    browser.execute_script("document.querySelector(arguments[0]).focus()", check)
    ssh.terminate()
    ssh.wait(timeout=5)
    wait(browser, 10).until(
        lambda d: d.execute_script("return !document.querySelector(arguments[0])", check),
        message="the ended tunnel's row to leave Live tunnels",
    )
    focused = browser.execute_script(
        "const e = document.activeElement;"
        "return e.closest('#live-tunnels-card') ? 'live tunnels' : e.tagName;"
    )
    assert focused == "live tunnels", f"focus fell back to <{focused.lower()}>"
