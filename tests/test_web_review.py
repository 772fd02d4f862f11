"""Adversarial review of the web dashboard and the JSON API (``nekojump/web/``,
``web/templates``, ``web/static``, with ``store.py``, ``keys.py`` and ``policy.py``
behind them): authorization between members, CSRF, sessions, HTML/JS injection,
input validation and error pages.

Everything runs in memory (treq's StubTreq over the real Klein routes and a real
SQLite store); no socket is opened.

Tests marked ``DEFECT`` failed on the reviewed code (0e3c5e2), each because of
the defect its docstring describes; they pass since the fixes that came with
them.  Tests marked ``GUARD`` pass: they pin down behaviour that was checked
and found right, and that is plausible to regress.
"""

from __future__ import annotations

import http.client
import re
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from treq.testing import StubTreq
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.task import Clock

from nekojump.config import parse_config
from nekojump.passwords import hash_password
from nekojump.ssh.registry import TunnelRegistry
from nekojump.store import ImmediateStore, SQLiteStore
from nekojump.web.app import Dashboard
from nekojump.web.auth import LoginThrottle
from nekojump.web.backend import Backend
from tests.test_web_api import hold_port, public_key_text

URL = "http://jump.test"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password"}


class World:
    """The whole web app over a real store, reachable without sockets."""

    def __init__(self, store: SQLiteStore, config: dict[str, Any] | None = None):
        self.store = store
        self.registry = TunnelRegistry()
        self.backend = Backend(
            config=parse_config(config or {"forwarding": {"port_min": 10000, "port_max": 10999}}),
            store=ImmediateStore(store),
            registry=self.registry,
            host_key=Key(ed25519.Ed25519PrivateKey.generate()),
            throttle=LoginThrottle(clock=Clock().seconds),
        )
        self.resource = Dashboard(self.backend).resource()

    def client(self, headers: dict[str, str] | None = None) -> Browser:
        return Browser(StubTreq(self.resource), dict(headers or {}))

    def session(self, name: str) -> tuple[Browser, str]:
        cookie, csrf = self.store.create_session(name, 3600)
        return self.client({"Cookie": f"nekojump_session={cookie}"}), csrf

    def token(self, name: str) -> Browser:
        _id, token = self.store.create_token(name)
        return self.client({"Authorization": f"Bearer {token}"})


class Browser:
    """One client: the headers it sends (a cookie, a token) and synchronous requests."""

    def __init__(self, treq: StubTreq, headers: dict[str, str]):
        self.treq = treq
        self.headers = headers

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        all_headers = {**self.headers, **(headers or {})}
        if form is not None:
            data = urlencode(form).encode()
            all_headers = {**FORM, **all_headers}
        answered: list[Any] = []
        self.treq.request(
            method, URL + path, data=data, headers=all_headers, allow_redirects=False
        ).addBoth(answered.append)
        self.treq.flush()
        (response,) = answered
        if not hasattr(response, "code"):
            response.raiseException()
        body: list[bytes] = []
        response.content().addBoth(body.append)
        self.treq.flush()
        return response.code, dict(response.headers.getAllRawHeaders()), body[0]

    def page(self, path: str = "/") -> str:
        code, _headers, body = self.request("GET", path)
        assert code == 200, (code, body[:200])
        return body.decode()


def session_cookie(headers: dict[bytes, list[bytes]]) -> str | None:
    for value in headers.get(b"Set-Cookie", []):
        pair = value.split(b";", 1)[0].decode()
        if pair.startswith("nekojump_session=") and pair != "nekojump_session=":
            return pair
    return None


def csrf_in(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Members alice and bob (with passwords) and admin root; password checks run
    at once instead of on a thread (StubTreq cannot wait for threads)."""
    monkeypatch.setattr(
        "nekojump.web.backend.deferToThread", lambda function, *args: succeed(function(*args))
    )
    store = SQLiteStore.open(tmp_path)
    for name, password in PASSWORDS.items():
        store.add_member(name, password_hash=hash_password(password))
    store.add_member("root", is_admin=True)
    yield World(store)
    store.close()


def log_in(world: World, name: str, headers: dict[str, str] | None = None) -> Browser:
    """Log in through the form, as a browser does; the client keeps the cookie."""
    browser = world.client()
    code, answer_headers, _body = browser.request(
        "POST",
        "/login",
        form={"name": name, "password": PASSWORDS[name]},
        headers=headers,
    )
    assert code == 303, code
    cookie = session_cookie(answer_headers)
    assert cookie is not None
    browser.headers["Cookie"] = cookie
    return browser


# -- sessions, login and logout ------------------------------------------------------------


def test_defect_a_login_form_posted_from_another_site_starts_no_session(world):
    """DEFECT (login CSRF). A page on any other site can auto-submit a login form with
    the attacker's own name and password: the member's browser comes back logged in
    as the attacker (the answer to a top-level POST may set a SameSite=Strict cookie).
    The member then pastes their key and registers their services into the
    attacker's account, where the attacker sees and removes them. Every other form
    has a CSRF token; /login has neither a token nor an Origin check, so the
    foreign post is answered with a session cookie."""
    browser = world.client()
    code, headers, _body = browser.request(
        "POST",
        "/login",
        form={"name": "bob", "password": PASSWORDS["bob"]},
        # What Chromium sends with a form auto-submitted by a page on evil.example.
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert session_cookie(headers) is None, "a foreign page logged the browser in as bob"
    assert code in (400, 403)


def test_guard_a_same_origin_login_works(world):
    """GUARD: the login form of the dashboard itself logs in (with and without the
    Origin header browsers add)."""
    for extra in ({}, {"Origin": URL, "Sec-Fetch-Site": "same-origin"}):
        browser = log_in(world, "alice", headers=extra)
        assert "alice" in browser.page("/")


def test_defect_log_out_from_an_older_tab_ends_the_session(world):
    """DEFECT. Two tabs: the member logs out in tab 2, logs in again there (a new
    session), then presses "Log out" in tab 1 (whose form carries the old session's
    CSRF token). The browser's cookie is cleared and the login page shows, so the
    member believes they are logged out, but the session stays valid server-side for
    14 days: /logout ends the session only if the CSRF token matches, yet clears the
    cookie either way. Ending one's own session needs no CSRF protection."""
    tab1 = log_in(world, "alice")
    old_page = tab1.page("/")
    tab1.request("POST", "/logout", form={"csrf": csrf_in(old_page)})
    tab2 = log_in(world, "alice")
    cookie = tab2.headers["Cookie"]
    # Tab 1's "Log out" button, on the page rendered for the first session.
    code, headers, _ = tab2.request("POST", "/logout", form={"csrf": csrf_in(old_page)})
    assert code == 303 and headers[b"Location"] == [b"/login"]
    # Anyone holding the cookie value (a copy of it) is still in.
    thief = world.client({"Cookie": cookie})
    code, _headers, _body = thief.request("GET", "/")
    assert code == 303, "the session survived a logout the member saw succeed"


def test_guard_log_out_ends_the_session_on_the_server(world):
    """GUARD: logging out with the page's own form ends the session, not only the cookie."""
    browser = log_in(world, "alice")
    cookie = browser.headers["Cookie"]
    code, headers, _ = browser.request("POST", "/logout", form={"csrf": csrf_in(browser.page())})
    assert code == 303
    assert any(b"Max-Age=0" in v for v in headers[b"Set-Cookie"])
    assert world.client({"Cookie": cookie}).request("GET", "/")[0] == 303


def test_guard_session_cookie_flags_and_no_fixation(world):
    """GUARD: the session cookie is HttpOnly and SameSite=Strict, and a login never
    adopts a session id the browser offered (no fixation)."""
    planted = "nekojump_session=attacker-chosen-value"
    browser = world.client({"Cookie": planted})
    _code, headers, _ = browser.request(
        "POST", "/login", form={"name": "alice", "password": PASSWORDS["alice"]}
    )
    (set_cookie,) = [v for v in headers[b"Set-Cookie"] if v.startswith(b"nekojump_session=")]
    assert b"HttpOnly" in set_cookie and b"SameSite=strict" in set_cookie
    assert session_cookie(headers) != planted


def test_defect_another_member_cannot_lock_a_member_out_of_the_dashboard(world):
    """DEFECT (account lockout). Bob sends five wrong passwords for alice from his
    machine. Alice, on her own machine, then types her right password and is told
    "too many failed logins; wait a few minutes" (429); bob can repeat this every
    five minutes and keep her out for good (she cannot remove a stolen key). The
    per-account count blocks every source, not only the ones guessing."""
    backend = world.backend
    for attempt in range(5):
        answered: list[Any] = []
        ensureDeferred(backend.login("alice", f"guess {attempt}", "127.0.0.9")).addBoth(
            answered.append
        )  # bob, from his own address
        assert answered[0].code == "login-failed"
    # Alice, from her own address (StubTreq's 127.0.0.1), with her password.
    code, headers, body = world.client().request(
        "POST", "/login", form={"name": "alice", "password": PASSWORDS["alice"]}
    )
    assert b"too many logins" not in body
    assert code == 303 and session_cookie(headers) is not None


def test_guard_guesses_from_one_source_are_still_throttled(world):
    """GUARD: whatever the fix for the lockout, one source guessing is stopped."""
    browser = world.client()
    codes = [
        browser.request("POST", "/login", form={"name": "alice", "password": f"guess {i}"})[0]
        for i in range(7)
    ]
    assert codes == [401] * 5 + [429] * 2


# -- authorization between members ----------------------------------------------------------


def test_guard_members_cannot_reach_each_others_keys_ports_or_tunnels(world):
    """GUARD: through every route and parameter tried (fingerprint, port, ?member=,
    the form's hidden member field, "*"), bob can neither see nor change alice's
    keys, registered ports or live tunnels; the refusals look like "not found"."""
    store = world.store
    alice = world.token("alice")
    bob_api = world.token("bob")
    bob_page, bob_csrf = world.session("bob")
    key = public_key_text()
    code, _body, _ = alice.request(
        "POST", "/api/v1/keys", data=f'{{"public_key": "{key}"}}'.encode()
    )
    assert code == 201
    (record,) = store.list_keys("alice")
    fp = record.fingerprint
    assert alice.request("POST", "/api/v1/ports", data=b'{"port": 10080}')[0] == 201
    hold_port(world.registry, store, "alice", 10080)

    encoded = fp.replace("/", "%2F").replace("+", "%2B")
    for method, path in [
        ("DELETE", f"/api/v1/keys/{encoded}"),
        ("DELETE", f"/api/v1/keys/{fp}"),
        ("DELETE", "/api/v1/ports/10080"),
        ("DELETE", "/api/v1/ports/10080?member=alice"),
        ("DELETE", "/api/v1/ports/10080?member=*"),
        ("GET", "/api/v1/keys?member=alice"),
        ("GET", "/api/v1/keys?member=*"),
        ("GET", "/api/v1/ports?member=alice"),
        ("GET", "/api/v1/tunnels?member=alice"),
        ("GET", "/api/v1/tunnels?member=*"),
        ("GET", "/api/v1/check/10080"),
    ]:
        code, _h, _b = bob_api.request(method, path)
        assert code in (403, 404), (method, path, code)
    assert bob_api.request("GET", "/api/v1/tunnels")[2].count(b'"port"') == 0
    for path, form in [
        ("/keys/remove", {"fingerprint": fp}),
        ("/ports/remove", {"port": "10080"}),
        ("/ports/remove", {"port": "10080", "member": "alice"}),
        ("/ports/remove", {"port": "10080", "member": "*"}),
        ("/ports/remove", {"port": "10080", "member": "alice", "back": "/admin"}),
    ]:
        code, _h, _b = bob_page.request("POST", path, form={"csrf": bob_csrf, **form})
        assert code == 404, (path, form, code)
    code, headers, _b = bob_page.request("POST", "/check", form={"csrf": bob_csrf, "port": "10080"})
    assert code == 303  # the result is at its own address
    assert bob_page.request("GET", headers[b"Location"][0].decode())[0] == 404
    assert "10080" not in bob_page.page("/tunnels")
    assert bob_page.request("GET", "/admin")[0] == 403
    assert [k.fingerprint for k in store.list_keys("alice")] == [fp]
    assert [p.port for p in store.list_ports("alice")] == [10080]


def test_defect_a_member_cannot_squat_the_port_another_members_tunnel_serves(world):
    """DEFECT. Alice's tunnel serves port 10080. Bob registers 10080 first, with his
    own description ("Alice's NAS: log in here" would do). Alice then cannot list her
    own running service: her "+ Register Port" says "port 10080 is already
    registered", and the Service Directory shows bob as the service's member. The
    registration is taken although another member's tunnel holds the port (nothing
    caps how many ports one member registers either: the whole range can be taken)."""
    hold_port(world.registry, world.store, "alice", 10080)
    bob = world.token("bob")
    code, _h, _b = bob.request(
        "POST", "/api/v1/ports", data=b'{"port": 10080, "description": "my files"}'
    )
    assert code == 409, "bob registered a port alice's live tunnel serves"
    alice = world.token("alice")
    code, _h, body = alice.request(
        "POST", "/api/v1/ports", data=b'{"port": 10080, "description": "NAS"}'
    )
    assert code == 201, body


# -- what a member sees after removing their key --------------------------------------------


def test_defect_registered_ports_stay_manageable_after_the_last_key_is_removed(world):
    """DEFECT. A member stops using the feature as the seed says: Remove Key. Their
    registered ports keep being advertised to everyone in the Service Directory,
    but the dashboard no longer shows them anywhere: the Registered Ports card (the
    only place with Delete) is inside ``{% if connect %}``, i.e. only while a key
    exists. The member has no way to see or withdraw what they advertise."""
    browser, csrf = world.session("alice")
    code, _h, _b = browser.request(
        "POST", "/keys", form={"csrf": csrf, "public_key": public_key_text()}
    )
    assert code == 303
    code, _h, _b = browser.request(
        "POST", "/ports", form={"csrf": csrf, "port": "10080", "description": "home wiki"}
    )
    assert code == 303
    (key,) = world.store.list_keys("alice")
    code, _h, _b = browser.request(
        "POST", "/keys/remove", form={"csrf": csrf, "fingerprint": key.fingerprint}
    )
    assert code == 303
    assert "home wiki" in browser.page("/directory")  # still advertised to everyone
    page = browser.page("/")
    assert "home wiki" in page, "the dashboard no longer shows the member's registered port"
    assert 'action="/ports/remove"' in page, "and offers no way to delete it"


# -- HTML and JS injection ------------------------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>\"'`;$(reboot)&&\\\u202e\u0000"


def test_guard_member_text_is_escaped_everywhere_it_is_shown(world):
    """GUARD: hostile key descriptions, key comments, port descriptions and tunnel
    key names come back escaped on the dashboard, the directory, the admin page and
    the live-tunnels fragment; the copy-ready commands contain only config values
    and numbers."""
    alice, csrf = world.session("alice")
    key_with_comment = public_key_text(comment="<script>alert(1)</script>")
    assert (
        alice.request("POST", "/keys", form={"csrf": csrf, "public_key": key_with_comment})[0]
        == 303
    )
    assert (
        alice.request(
            "POST",
            "/keys",
            form={"csrf": csrf, "public_key": public_key_text(), "description": HOSTILE[:60]},
        )[0]
        == 303
    )
    assert (
        alice.request(
            "POST", "/ports", form={"csrf": csrf, "port": "10080", "description": HOSTILE}
        )[0]
        == 303
    )
    hold_port(world.registry, world.store, "alice", 10080)
    root, _root_csrf = world.session("root")
    pages = [alice.page("/"), alice.page("/directory"), alice.page("/tunnels"), root.page("/admin")]
    for page in pages:
        assert "<img" not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages[0]
    commands = re.findall(r'<pre id="cmd-[a-z-]+"><code>(.*?)</code></pre>', pages[0], re.S)
    assert len(commands) == 5
    for command in commands:
        assert "reboot" not in command and "<" not in command


# -- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"port": 10080, "port": 10081}', "application/json"),
        (
            b'{"public_key": "%s", "public_key": "%s"}'
            % (public_key_text().encode(), public_key_text().encode()),
            "application/json",
        ),
    ],
    ids=["port", "public_key"],
)
def test_defect_json_with_a_name_given_twice_is_refused(world, body, content_type):
    """DEFECT. ``{"port": 10080, "port": 10081}`` registers 10081 and says 201: the
    script's author meant one of them, gets the other, and nothing tells them. The
    API should refuse a body that names a field twice (a 400 ``bad-json``) and store
    nothing."""
    alice = world.token("alice")
    path = "/api/v1/ports" if b'"port"' in body else "/api/v1/keys"
    code, _h, answer = alice.request(
        "POST", path, data=body, headers={"Content-Type": content_type}
    )
    assert code == 400, answer
    assert world.store.list_ports("alice") == [] and world.store.list_keys("alice") == []


@pytest.mark.parametrize(
    ("method", "path", "data", "headers"),
    [
        (
            "POST",
            "/api/v1/keys",
            b"--b\r\nContent-Disposition: form-data; name=public_key\r\n\r\nssh-ed25519",
            # A hand-set header without its boundary, or with the wrong one.
            {"Content-Type": "multipart/form-data"},
        ),
        ("DELETE", "/api/v1/keys/SHA256:%ED%A0%80", None, {}),
    ],
    ids=["multipart without its boundary", "non-UTF-8 path"],
)
def test_defect_api_errors_are_json_for_any_request(jumphost, method, path, data, headers):
    """DEFECT. The spec: API errors are JSON ``{"error", "message"}`` with a 4xx. A
    script that posts a multipart body whose Content-Type lacks the boundary (or names
    another one) got a 400 with an empty body, no content type and none of the
    security headers; a path that is not UTF-8 got ``text/html`` "Non-UTF-8 encoding
    in URL." (and a traceback in the server log). Twisted and Klein answered these
    before the API's routes ran, so this goes through a running server's own site."""
    parts = urlsplit(jumphost.start().web_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        code, content_type, body = (
            response.status,
            response.getheader("Content-Type"),
            response.read(),
        )
    finally:
        connection.close()
    assert 400 <= code < 500
    assert content_type == "application/json", body
    assert b'"error"' in body


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"port": "-1"}, b"outside the allowed range"),
        ({"port": "99999999999999999999999"}, b"outside the allowed range"),
        ({"port": "10080.5"}, b"must be a number"),
        ({"port": "ten"}, b"must be a number"),
        ({"port": "1" * 5000}, b"must be a number"),
        ({"port": "10080\u0000"}, b"must be a number"),
        ({"port": ""}, b"must be a number"),
        ({"port": "10081", "description": "x" * 201}, b"under 200 characters"),
    ],
)
def test_guard_bad_port_forms_get_a_clear_error_and_keep_the_input(world, form, words):
    """GUARD: odd ports and long descriptions are a 400 with a message on the page and
    the member's input kept (never a 500)."""
    browser, csrf = world.session("alice")
    world.store.add_key("alice", _parsed_key(), "pi")  # the ports card needs a key
    code, _h, body = browser.request("POST", "/ports", form={"csrf": csrf, **form})
    assert code == 400
    assert words in body
    assert world.store.list_ports("alice") == []


def test_guard_the_same_port_registered_by_two_members(world):
    """GUARD: the second member gets a clear 409 (API) or message (page), keeps what
    they typed, and the first keeps the registration."""
    alice, bob = world.token("alice"), world.token("bob")
    assert alice.request("POST", "/api/v1/ports", data=b'{"port": 10080}')[0] == 201
    code, _h, body = bob.request("POST", "/api/v1/ports", data=b'{"port": 10080}')
    assert code == 409 and b"port-registered" in body
    page, csrf = world.session("bob")
    world.store.add_key("bob", _parsed_key(), "pi")
    code, _h, body = page.request(
        "POST", "/ports", form={"csrf": csrf, "port": "10080", "description": "bob wiki"}
    )
    assert code == 400 and b"already registered" in body and b'value="bob wiki"' in body
    assert [(p.port, p.member_name) for p in world.store.list_ports()] == [(10080, "alice")]


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"{nope", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"\xff\xfe{}", "application/json"),
        (b'{"port": "10080"}', "application/json"),
        (b'{"port": 10080.0}', "application/json"),
        (b'{"port": true}', "application/json"),
        (b'{"port": -5}', "application/json"),
        (b'{"port": 1e400}', "application/json"),
        (b'{"port": NaN}', "application/json"),
        (b'{"port": 10080, "description": null}', "application/json"),
        (b'{"port": 10080, "description": "\\ud800"}', "application/json"),
        (b"[" * 100 + b"]" * 100, "application/json"),
        (b"port=10080", "application/x-www-form-urlencoded"),
        (b"port=10080", "text/plain"),
    ],
)
def test_guard_bad_api_bodies_are_json_4xx_and_store_nothing(world, data, content_type):
    """GUARD: malformed JSON, wrong types, wrong content types: a JSON 4xx, nothing stored."""
    alice = world.token("alice")
    code, headers, body = alice.request(
        "POST", "/api/v1/ports", data=data, headers={"Content-Type": content_type}
    )
    assert 400 <= code < 500, body
    assert headers[b"Content-Type"] == [b"application/json"]
    assert world.store.list_ports() == []


def test_guard_error_pages_show_no_traceback_or_path(world):
    """GUARD: unknown pages, wrong methods and stale forms answer without tracebacks
    or file-system paths."""
    browser, _csrf = world.session("alice")
    for method, path in [
        ("GET", "/nope"),
        ("GET", "/keys"),
        ("PUT", "/"),
        ("GET", "/static/../../etc/passwd"),
        ("GET", "/static/nope.js"),
        ("GET", "/api/v1/nope"),
        ("PATCH", "/api/v1/keys"),
    ]:
        code, _h, body = browser.request(method, path)
        assert 400 <= code < 500, (method, path)
        assert b"Traceback" not in body and b"/work/" not in body and b".py" not in body


def _parsed_key():
    from nekojump.keys import parse_public_key

    return parse_public_key(public_key_text())


@pytest.mark.parametrize(
    ("given", "number"),
    [
        (10080, 10080),
        (" 10080 ", 10080),
        ("-1", -1),  # a number, then refused as outside the range
        ("+10080", None),
        ("1_0080", None),
        ("\u0661\u0660\u0660\u0668\u0660", None),  # Arabic-Indic digits
        ("1" * 5000, None),
        (True, None),
        (10080.0, None),
    ],
)
def test_guard_a_port_is_plain_ascii_digits(given, number):
    """GUARD (a minor finding, fixed): ``int`` reads "+10080", "1_0080" and
    digits of other scripts as ports; the backend takes plain digits only."""
    from nekojump.web.backend import port_number

    assert port_number(given) == number


def test_the_static_folder_is_not_listed(world):
    """A minor finding, fixed: ``/static/`` listed the folder's files (the files
    themselves are served as before: the browser tests load them)."""
    browser = world.client()
    code, _headers, body = browser.request("GET", "/static/")
    assert code == 404 and b"app.css" not in body


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # not a browser
        ({b"sec-fetch-site": b"same-origin"}, True),
        ({b"sec-fetch-site": b"none"}, True),  # an address typed in
        ({b"sec-fetch-site": b"same-site", b"origin": b"http://jump.test"}, False),
        ({b"sec-fetch-site": b"cross-site"}, False),
        ({b"origin": b"http://jump.test", b"host": b"jump.test"}, True),
        ({b"origin": b"http://jump.test", b"host": b"jump.test:80"}, True),
        ({b"origin": b"https://jump.test", b"host": b"jump.test:443"}, True),
        ({b"origin": b"http://[::1]:8080", b"host": b"[::1]:8080"}, True),
        ({b"origin": b"http://jump.test:10080", b"host": b"jump.test"}, False),
        ({b"origin": b"null", b"host": b"jump.test"}, False),
    ],
)
def test_guard_which_posts_count_as_from_the_dashboard_itself(headers, allowed):
    """GUARD: browsers name where a form came from in Sec-Fetch-Site, older ones
    in Origin (compared with Host, default ports left out)."""
    from twisted.web.test.requesthelper import DummyRequest

    from nekojump.web.app import from_this_site

    request = DummyRequest([b"login"])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    assert from_this_site(request) is allowed
