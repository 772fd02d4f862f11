"""The HTML dashboard in memory: forms, CSRF, messages, security headers."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nekojump.keys import parse_public_key
from nekojump.web.auth import LoginThrottle
from tests.test_web_api import (  # noqa: F401
    hold_port,
    in_memory_resource,
    in_memory_site,
    private_key_text,
    public_key_text,
    registry,
    site,
)

URL = "http://jump.test"


def fetch(
    treq, method: str, path: str, headers: dict[str, str], form: dict[str, str] | None = None
) -> tuple[int, dict[bytes, list[bytes]], str]:
    data = None
    headers = dict(headers)
    if form is not None:
        data = urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    results: list[Any] = []
    treq.request(method, URL + path, data=data, headers=headers, allow_redirects=False).addBoth(
        results.append
    )
    treq.flush()
    response = results[0]
    if not hasattr(response, "code"):
        response.raiseException()
    body: list[bytes] = []
    response.content().addBoth(body.append)
    treq.flush()
    return response.code, dict(response.headers.getAllRawHeaders()), body[0].decode()


@pytest.fixture
def alice_session(site):  # noqa: F811
    store, client = site
    session, csrf = client("alice", via="session")
    return store, session.treq, session.headers, csrf


def test_anonymous_visitors_are_sent_to_login(site):  # noqa: F811
    _store, client = site
    treq = client(None).treq
    code, headers, _ = fetch(treq, "GET", "/", {})
    assert code == 303
    assert headers[b"Location"] == [b"/login"]
    code, headers, body = fetch(treq, "GET", "/login", {})
    assert code == 200
    assert 'name="password"' in body


def test_every_page_carries_security_headers(alice_session):
    _store, treq, cookie, _csrf = alice_session
    _code, headers, _body = fetch(treq, "GET", "/", cookie)
    csp = headers[b"Content-Security-Policy"][0]
    assert b"default-src 'self'" in csp and b"frame-ancestors 'none'" in csp
    assert headers[b"X-Content-Type-Options"] == [b"nosniff"]
    assert headers[b"X-Frame-Options"] == [b"DENY"]


def test_unconfigured_page_shows_the_key_card_only(alice_session):
    _store, treq, cookie, _csrf = alice_session
    code, _headers, body = fetch(treq, "GET", "/", cookie)
    assert code == 200
    assert 'id="reverse-tunnel-section"' in body
    assert "NOT CONFIGURED" in body
    assert "ssh-keygen -t ed25519 -f ~/.ssh/nekotopia_jump" in body
    assert 'id="connect-card"' not in body and 'id="ports-card"' not in body
    assert "Reachability" in body and "Jumphost Tunnel" in body


def test_saving_a_key_configures_the_page(alice_session):
    _store, treq, cookie, csrf = alice_session
    code, _headers, _ = fetch(
        treq,
        "POST",
        "/keys",
        cookie,
        {"csrf": csrf, "public_key": public_key_text(), "description": "pi"},
    )
    assert code == 303
    _code, _headers, body = fetch(treq, "GET", "/", cookie)
    assert ">CONFIGURED<" in body
    assert 'id="connect-card"' in body and 'id="ports-card"' in body
    assert "ssh -N -p 2222 -R 10080:localhost:8000" in body


def test_form_posts_without_the_csrf_token_change_nothing(alice_session):
    store, treq, cookie, _csrf = alice_session
    for form in (
        {"public_key": public_key_text()},
        {"csrf": "forged", "public_key": public_key_text()},
    ):
        code, _headers, _body = fetch(treq, "POST", "/keys", cookie, form)
        assert code == 403
    assert store.list_keys("alice") == []


def test_private_key_is_refused_and_not_echoed_back(alice_session):
    store, treq, cookie, csrf = alice_session
    private = private_key_text()
    code, _headers, body = fetch(
        treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": private}
    )
    assert code == 400
    assert "this is a private key" in body
    assert private.splitlines()[1] not in body
    assert store.list_keys("alice") == []


def test_a_private_key_pasted_without_its_armour_is_not_echoed_back(alice_session):
    """Only the base64 lines of ~/.ssh/id_ed25519, without BEGIN/END: still private."""
    store, treq, cookie, csrf = alice_session
    body_lines = private_key_text().strip().splitlines()[1:-1]
    pkcs8 = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    pem_body = "".join(pkcs8.strip().splitlines()[1:-1])  # one line: "MC4CAQAw..."
    body_lines.append(pem_body)
    for pasted in (
        "\n".join(body_lines[:-1]),
        "".join(body_lines[:-1]),
        "\n".join(body_lines[1:-1]),
        pem_body,
    ):
        code, _headers, body = fetch(
            treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": pasted}
        )
        assert code == 400
        assert not any(line in body for line in body_lines[1:]), pasted[:30]
    assert store.list_keys("alice") == []


def test_a_public_key_pasted_without_its_type_is_kept_for_correction(alice_session):
    _store, treq, cookie, csrf = alice_session
    blob = public_key_text().split()[1]
    code, _headers, body = fetch(treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": blob})
    assert code == 400
    assert f"{blob}</textarea>" in body


def test_bad_key_text_is_kept_for_correction(alice_session):
    _store, treq, cookie, csrf = alice_session
    code, _headers, body = fetch(
        treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": "ssh-ed25519 AAAAbroken"}
    )
    assert code == 400
    assert 'id="key-error"' in body
    assert "ssh-ed25519 AAAAbroken</textarea>" in body


def test_html_is_escaped(alice_session):
    _store, treq, cookie, csrf = alice_session
    fetch(
        treq,
        "POST",
        "/keys",
        cookie,
        {"csrf": csrf, "public_key": public_key_text(), "description": "<script>alert(1)</script>"},
    )
    _code, _headers, body = fetch(treq, "GET", "/", cookie)
    assert "<script>alert(1)</script>" not in body
    assert "&lt;script&gt;" in body


def test_register_and_delete_a_port(alice_session):
    store, treq, cookie, csrf = alice_session
    fetch(treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": public_key_text()})
    code, _h, _b = fetch(
        treq, "POST", "/ports", cookie, {"csrf": csrf, "port": "10080", "description": "Web (HTTP)"}
    )
    assert code == 303
    _code, _headers, body = fetch(treq, "GET", "/", cookie)
    assert 'data-port="10080"' in body and "Web (HTTP)" in body
    code, _h, body = fetch(treq, "POST", "/ports", cookie, {"csrf": csrf, "port": "99"})
    assert code == 400 and 'id="port-error"' in body and "outside the allowed range" in body
    fetch(treq, "POST", "/ports/remove", cookie, {"csrf": csrf, "port": "10080"})
    assert store.list_ports("alice") == []


def test_directory_lists_everyones_ports(site):  # noqa: F811
    store, client = site
    from nekojump.policy import ForwardRules

    store.add_port("bob", 10555, "bob's wiki", ForwardRules(10000, 10999))
    session, _csrf = client("alice", via="session")
    _code, _headers, body = fetch(session.treq, "GET", "/directory", session.headers)
    assert "bob&#39;s wiki" in body and "10555" in body


def test_a_disabled_members_services_leave_the_directory_until_enabled_again(site):  # noqa: F811
    """A disabled member's tunnels cannot be up: other members no longer find their
    services (page or API); the admin page still lists the registration."""
    store, client = site
    from nekojump.policy import ForwardRules

    store.add_port("bob", 10555, "bob's wiki", ForwardRules(10000, 10999))
    store.add_port("alice", 10556, "alice's radio", ForwardRules(10000, 10999))
    store.set_member_active("bob", False)
    session, _csrf = client("alice", via="session")
    _code, _headers, body = fetch(session.treq, "GET", "/directory", session.headers)
    assert "10555" not in body and "bob&#39;s wiki" not in body
    assert "10556" in body
    _code, listed = client("alice").get("/directory")
    assert [p["port"] for p in listed["ports"]] == [10556]
    admin, _csrf = client("root", via="session")
    _code, _headers, body = fetch(admin.treq, "GET", "/admin", admin.headers)
    assert "bob&#39;s wiki" in body
    store.set_member_active("bob", True)
    _code, listed = client("alice").get("/directory")
    assert [p["port"] for p in listed["ports"]] == [10555, 10556]


def test_login_throttle_blocks_per_source_and_per_account_from_many_sources():
    clock = Clock()
    throttle = LoginThrottle(clock=clock.seconds, limit=3, window=60)
    for _ in range(3):
        throttle.failed("alice", "127.0.0.9")
    assert throttle.blocked("bob", "127.0.0.9")  # the source, for any account
    assert throttle.blocked("alice", "127.0.0.9")
    # One source guessing does not lock alice out of her own address.
    assert not throttle.blocked("alice", "127.0.0.1")
    assert not throttle.blocked("bob", "127.0.0.1")
    for n in range(27):  # 30 guesses at alice in all, from ten addresses
        throttle.failed("alice", f"127.0.1.{n % 9}")
    assert throttle.blocked("alice", "127.0.0.1")  # the account, from anywhere
    assert not throttle.blocked("bob", "127.0.0.1")
    clock.advance(61)
    assert not throttle.blocked("alice", "127.0.0.9")


def ticking_clock(step: float = 1e-6):
    """A clock that moves on a little every time it is read, as time.time does."""
    now = [1_000_000.0]

    def seconds() -> float:
        now[0] += step
        return now[0]

    return seconds


def test_members_behind_one_address_who_log_in_are_never_throttled():
    """A NAT or a reverse proxy: every login comes from one source; successes take
    their attempt back, whatever the clock read in between."""
    throttle = LoginThrottle(clock=ticking_clock(), limit=5, window=300)
    for round_ in range(4):
        for name in ("alice", "bob", "carol"):
            attempt = throttle.reserve(name, "192.0.2.1")
            assert attempt is not None, (round_, name)
            throttle.succeeded(name, "192.0.2.1", attempt)


def test_throttle_forgets_sources_and_names_once_their_window_is_over():
    clock = Clock()
    throttle = LoginThrottle(clock=clock.seconds, limit=5, window=300)
    for n in range(1000):  # four names from each of 250 sources: all under the limit
        assert throttle.reserve(f"name{n}", f"198.51.100.{n % 250}") is not None
    assert len(throttle._attempts) == 1000 + 250
    clock.advance(301)
    assert not throttle.blocked("alice", "127.0.0.1")  # any call sweeps, once per window
    assert len(throttle._attempts) == 0


def sso_site(tmp_path, trusted: str, store=None):
    from nekojump.store import SQLiteStore

    if store is None:
        store = SQLiteStore.open(tmp_path)
        store.add_member("alice")
    return in_memory_site(
        store, {"web": {"sso_header": "X-Forwarded-User", "trusted_proxies": [trusted]}}
    )


def test_sso_header_from_a_trusted_proxy_logs_the_member_in(tmp_path):
    # StubTreq's requests come from 127.0.0.1.
    treq = sso_site(tmp_path, "127.0.0.1/32")
    code, _headers, body = fetch(treq, "GET", "/", {"X-Forwarded-User": "alice"})
    assert code == 200
    assert "alice" in body
    code, _h, _b = fetch(treq, "GET", "/", {"X-Forwarded-User": "mallory"})
    assert code == 303  # unknown members get nothing


def csrf_in(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_sso_requests_store_no_sessions_and_audit_one_login(tmp_path):
    """Scripts and monitors behind the proxy send no cookie: twenty requests used to
    leave twenty 14-day sessions and twenty login events."""
    from nekojump.store import SQLiteStore

    store = SQLiteStore.open(tmp_path)
    store.add_member("alice")
    app = in_memory_resource(
        store, {"web": {"sso_header": "X-Forwarded-User", "trusted_proxies": ["127.0.0.1/32"]}}
    )
    proxy = {"X-Forwarded-User": "alice"}
    for _ in range(10):
        # A new client each time: no cookie comes back.
        code, headers, body = fetch(StubTreq(app), "GET", "/", proxy)
        assert code == 200 and b"Set-Cookie" not in headers
        code, headers, _body = fetch(StubTreq(app), "GET", "/api/v1/tunnels", proxy)
        assert code == 200
    treq = StubTreq(app)
    assert store._db.execute("SELECT count(*) FROM web_sessions").fetchone()[0] == 0
    logins = [e for e in store.audit_events(100) if e["event"] == "login"]
    assert [(e["member"], e["detail"]) for e in logins] == [("alice", {"via": "sso"})]
    # Forms still need the page's CSRF token, and work with it.
    csrf = csrf_in(body)
    code, _h, _b = fetch(treq, "POST", "/ports", proxy, {"csrf": "forged", "port": "10080"})
    assert code == 403
    code, _h, _b = fetch(treq, "POST", "/ports", proxy, {"csrf": csrf, "port": "10080"})
    assert code == 303
    assert [p.port for p in store.list_ports("alice")] == [10080]


def test_sso_header_from_anyone_else_is_ignored(tmp_path):
    treq = sso_site(tmp_path, "127.0.0.9/32")
    code, headers, _body = fetch(treq, "GET", "/", {"X-Forwarded-User": "alice"})
    assert code == 303
    assert headers[b"Location"] == [b"/login"]


def test_admin_view_is_for_admins_only(site):  # noqa: F811
    store, client = site
    session, _csrf = client("alice", via="session")
    code, _h, _b = fetch(session.treq, "GET", "/admin", session.headers)
    assert code == 403
    from nekojump.keys import parse_public_key

    store.add_key("alice", parse_public_key(public_key_text()), "pi")
    root, root_csrf = client("root", via="session")
    code, _h, body = fetch(root.treq, "GET", "/admin", root.headers)
    assert code == 200
    assert "alice" in body and "pi" in body
    assert 'id="admin-audit-card"' in body and "key-added" in body
    fingerprint = store.list_keys("alice")[0].fingerprint
    code, headers, _ = fetch(
        root.treq,
        "POST",
        "/keys/remove",
        root.headers,
        {"csrf": root_csrf, "fingerprint": fingerprint, "back": "/admin"},
    )
    assert (code, headers[b"Location"]) == (303, [b"/admin"])
    assert store.list_keys("alice") == []


def test_check_button_explains_a_port_without_a_tunnel(alice_session):
    _store, treq, cookie, csrf = alice_session
    fetch(treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": public_key_text()})
    fetch(treq, "POST", "/ports", cookie, {"csrf": csrf, "port": "10080"})
    _code, _headers, body = fetch(treq, "GET", "/", cookie)
    assert 'action="/check"' in body
    # The result has an address of its own: Back and reload never re-post.
    code, body = checked(treq, cookie, csrf, "10080")
    assert code == 200
    assert 'id="check-card"' in body and "NO TUNNEL" in body
    assert "ssh -N -R 10080:localhost:LOCALPORT" in body
    assert "You are browsing from 127.0.0.1" in body
    code, _body = checked(treq, cookie, csrf, "10999")
    assert code == 404  # not a port of alice's
    # Only the page's own Check button leads to a result: a bare link runs none,
    # nor one with a made-up token.
    for address in ("/?check=10080", "/?check=10080&token=abc", "/?check=10080&token=%C3%A9"):
        code, _headers, body = fetch(treq, "GET", address, cookie)
        assert code == 200 and 'id="check-card"' not in body, address


def checked(treq, cookie, csrf: str, port: str) -> tuple[int, str]:
    """Press Check for ``port``: the form's redirect, then the result page."""
    code, headers, _body = fetch(treq, "POST", "/check", cookie, {"csrf": csrf, "port": port})
    (location,) = headers[b"Location"]
    assert code == 303 and location.startswith(f"/?check={port}&token=".encode())
    code, _headers, body = fetch(treq, "GET", location.decode().split("#")[0], cookie)
    return code, body


def test_check_says_when_the_viewer_is_off_the_mesh(tmp_path):
    """The seed's "connection refused" case: you are not on the mesh."""
    from nekojump.policy import ForwardRules
    from nekojump.store import SQLiteStore

    store = SQLiteStore.open(tmp_path)
    store.add_member("alice")
    store.add_port("alice", 10080, "", ForwardRules(10000, 60000))
    # A documentation-range network, never contacted: the viewer is outside it.
    treq = in_memory_site(store, {"ssh": {"allowed_sources": ["192.0.2.0/24"]}})
    cookie, csrf = store.create_session("alice", 60)
    _code, body = checked(treq, {"Cookie": f"nekojump_session={cookie}"}, csrf, "10080")
    assert "outside the mesh sources" in body


def post_login_without_waiting(treq, name: str, password: str, **fields: str) -> list[Any]:
    """Send a login form (with any other ``fields``); the list gets the response
    once the server answers."""
    answered: list[Any] = []
    treq.request(
        "POST",
        URL + "/login",
        data=urlencode({"name": name, "password": password, **fields}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False,
    ).addBoth(answered.append)
    treq.flush()
    return answered


@pytest.fixture
def held_password_checks(monkeypatch) -> list[Deferred]:
    """Password checks wait until the test answers them, as a slow scrypt would."""
    checks: list[Deferred] = []

    def check_later(_function, *_args):
        checks.append(Deferred())
        return checks[-1]

    monkeypatch.setattr("nekojump.web.backend.deferToThread", check_later)
    return checks


def test_guesses_sent_at_once_are_checked_no_more_often_than_the_limit(
    site,  # noqa: F811
    held_password_checks,
):
    """Twelve wrong guesses and the right password arrive together: five are checked,
    the rest are throttled, the right one included (it came in the burst)."""
    store, client = site
    treq = client(None).treq
    answers = [post_login_without_waiting(treq, "alice", f"guess {i}") for i in range(12)]
    answers.append(post_login_without_waiting(treq, "alice", "the right one"))
    assert len(held_password_checks) == 5
    assert [a[0].code for a in answers if a] == [429] * 8
    for check in held_password_checks:
        check.callback(False)
    treq.flush()
    assert [a[0].code for a in answers] == [401] * 5 + [429] * 8
    failures = [e for e in store.audit_events(100) if e["event"] == "login-failed"]
    assert len(failures) == 5


def test_a_successful_login_does_not_count_against_its_source(site, held_password_checks):  # noqa: F811
    """Members behind one NAT address can all log in; only failures use up the limit."""
    _store, client = site
    treq = client(None).treq
    for _ in range(7):
        answer = post_login_without_waiting(treq, "alice", "right")
        held_password_checks[-1].callback(True)
        treq.flush()
        assert answer[0].code == 303


def test_a_login_name_no_member_could_have_is_refused_unchecked_and_audited_short(
    site,  # noqa: F811
    held_password_checks,
):
    store, client = site
    treq = client(None).treq
    for name in ("x" * 100_000, "alice bob", "<alice>", ".alice"):
        answer = post_login_without_waiting(treq, name, "whatever")
        assert answer[0].code == 401
    assert held_password_checks == []  # no password was checked
    failures = [e for e in store.audit_events(100) if e["event"] == "login-failed"]
    assert len(failures) == 4
    assert all(e["member"] is None and len(e["detail"]["name"]) <= 65 for e in failures)
    assert failures[-1]["detail"]["name"] == "x" * 64 + "…"
    # They count against the source like any failure.
    answer = post_login_without_waiting(treq, "y" * 70, "whatever")
    answer2 = post_login_without_waiting(treq, "alice", "whatever")
    assert (answer[0].code, answer2[0].code) == (401, 429)


def test_directory_and_dashboard_say_when_another_member_holds_a_registered_port(
    site,  # noqa: F811
    registry,  # noqa: F811
):
    from nekojump.policy import ForwardRules

    store, client = site
    rules = ForwardRules(10000, 10999)
    store.add_port("alice", 10191, "alice wiki", rules)
    store.add_port("alice", 10192, "alice chat", rules)
    store.add_key("alice", parse_public_key(public_key_text()), "pi")
    hold_port(registry, store, "bob", 10191)
    hold_port(registry, store, "alice", 10192)
    session, _csrf = client("bob", via="session")
    _code, _headers, body = fetch(session.treq, "GET", "/directory", session.headers)
    rows = row_texts(body, "directory-table")
    assert "HELD BY ANOTHER MEMBER" in rows["10191"] and "UP" not in rows["10191"]
    assert "UP" in rows["10192"]
    session, _csrf = client("alice", via="session")
    _code, _headers, body = fetch(session.treq, "GET", "/", session.headers)
    rows = row_texts(body, "ports-table")
    assert "HELD BY ANOTHER MEMBER" in rows["10191"] and ">UP<" not in rows["10191"]
    assert ">UP<" in rows["10192"]


def row_texts(page: str, table_id: str) -> dict[str, str]:
    """The HTML of each ``data-port`` row of one table, by port."""
    table = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    rows = table.split('<tr data-port="')[1:]
    return {row.split('"', 1)[0]: row for row in rows}


def test_a_form_csrf_token_with_non_ascii_characters_is_a_403(alice_session):
    store, treq, cookie, _csrf = alice_session
    code, _headers, body = fetch(treq, "POST", "/ports", cookie, {"csrf": "é", "port": "10099"})
    assert code == 403 and "older than your session" in body
    assert store.list_ports("alice") == []


def test_a_pasted_putty_private_key_is_refused_and_not_echoed_back(alice_session):
    from tests.test_keys import putty_private_key

    store, treq, cookie, csrf = alice_session
    ppk = putty_private_key()
    code, _headers, body = fetch(
        treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": ppk, "description": "pc"}
    )
    assert code == 400
    assert "this is a private key" in body
    assert "SECRETSECRET" not in body and "Private-Lines" not in body
    assert store.list_keys("alice") == []


def test_admin_page_removes_another_members_registered_port(site):  # noqa: F811
    from nekojump.policy import ForwardRules

    store, client = site
    store.add_port("bob", 10555, "bob's wiki", ForwardRules(10000, 10999))
    store.add_port("bob", 10556, "bob's chat", ForwardRules(10000, 10999))
    alice, alice_csrf = client("alice", via="session")
    form = {"csrf": alice_csrf, "port": "10555", "member": "bob"}
    code, _h, _b = fetch(alice.treq, "POST", "/ports/remove", alice.headers, form)
    assert code == 404  # not alice's to remove
    root, root_csrf = client("root", via="session")
    _code, _h, body = fetch(root.treq, "GET", "/admin", root.headers)
    rows = row_texts(body, "admin-ports-table")
    assert "bob&#39;s wiki" in rows["10555"] and 'name="member" value="bob"' in rows["10555"]
    form = {"csrf": root_csrf, "port": "10555", "member": "bob", "back": "/admin"}
    code, headers, _b = fetch(root.treq, "POST", "/ports/remove", root.headers, form)
    assert (code, headers[b"Location"]) == (303, [b"/admin#admin-ports-card"])
    assert [p.port for p in store.list_ports("bob")] == [10556]


def test_removing_a_key_says_so_on_the_page(alice_session):
    store, treq, cookie, csrf = alice_session
    fetch(treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": public_key_text()})
    (key,) = store.list_keys("alice")
    code, headers, _ = fetch(
        treq, "POST", "/keys/remove", cookie, {"csrf": csrf, "fingerprint": key.fingerprint}
    )
    assert code == 303
    location = headers[b"Location"][0].decode()
    code, _headers, body = fetch(treq, "GET", location.split("#")[0], cookie)
    assert code == 200 and "Key removed. Tunnels that used it were closed." in body
    _code, _headers, body = fetch(treq, "GET", "/?done=anything-else", cookie)
    assert 'id="key-notice"' not in body  # only known codes, never the text of the URL


@pytest.mark.parametrize("page", ["/admin", "/directory"])
def test_logging_in_from_a_page_returns_to_it(site, held_password_checks, page):  # noqa: F811
    """An admin (or a member) who opens /admin (or /directory) with no session logs
    in and lands back there, not on the dashboard."""
    _store, client = site
    treq = client(None).treq
    code, headers, _ = fetch(treq, "GET", page, {})
    assert code == 303
    assert headers[b"Location"] == [f"/login?next={page}".encode()]
    code, _headers, body = fetch(treq, "GET", f"/login?next={page}", {})
    assert f'<input type="hidden" name="next" value="{page}">' in body
    answered = post_login_without_waiting(treq, "root", "right", next=page)
    held_password_checks[-1].callback(True)
    treq.flush()
    assert answered[0].code == 303
    assert answered[0].headers.getRawHeaders(b"location") == [page.encode()]


@pytest.mark.parametrize(
    "elsewhere", ["https://evil.example/", "//evil.example", "/\\evil.example", "/api/v1/keys"]
)
def test_a_login_never_returns_to_an_address_it_was_not_built_for(
    site,  # noqa: F811
    held_password_checks,
    elsewhere,
):
    """``next`` names one of the dashboard's own pages or is ignored: a link to the
    login page cannot send a member elsewhere once they logged in."""
    _store, client = site
    treq = client(None).treq
    _code, _headers, body = fetch(treq, "GET", "/login?" + urlencode({"next": elsewhere}), {})
    assert 'name="next"' not in body
    plain = post_login_without_waiting(treq, "alice", "right")
    pointed = post_login_without_waiting(treq, "alice", "right", next=elsewhere)
    for check in held_password_checks:
        check.callback(True)
    treq.flush()
    answered = plain + pointed
    assert [a.code for a in answered] == [303, 303]
    assert [a.headers.getRawHeaders(b"location") for a in answered] == [[b"/"], [b"/"]]


def test_an_admin_form_sent_after_the_session_ended_logs_in_back_to_admin(site):  # noqa: F811
    _store, client = site
    treq = client(None).treq
    form = {"csrf": "stale", "port": "10080", "member": "alice", "back": "/admin"}
    code, headers, _ = fetch(treq, "POST", "/ports/remove", {}, form)
    assert code == 303
    assert headers[b"Location"] == [b"/login?expired=1&next=/admin"]
    code, headers, _ = fetch(treq, "POST", "/ports/remove", {}, {**form, "back": "/elsewhere"})
    assert headers[b"Location"] == [b"/login?expired=1"]


def test_the_admin_pages_live_tunnels_come_alone_for_its_refresh(site, registry):  # noqa: F811
    """/admin/tunnels: every member's live tunnels and the registered ports' states,
    for admins only (no session: 401, which the page's script tells as "session ended")."""
    from nekojump.policy import ForwardRules

    store, client = site
    store.add_port("alice", 10193, "alice wiki", ForwardRules(10000, 10999))
    hold_port(registry, store, "bob", 10193)
    code, _headers, _body = fetch(client(None).treq, "GET", "/admin/tunnels", {})
    assert code == 401
    member, _csrf = client("alice", via="session")
    code, _headers, body = fetch(member.treq, "GET", "/admin/tunnels", member.headers)
    assert code == 403 and "bob" not in body
    admin, _csrf = client("root", via="session")
    code, _headers, body = fetch(admin.treq, "GET", "/admin/tunnels", admin.headers)
    assert code == 200 and "<html" not in body
    rows = row_texts(body, "admin-tunnels-table")
    assert list(rows) == ["10193"] and "bob" in rows["10193"]
    assert '<span data-port="10193" data-state="held-by-other"></span>' in body


def test_saving_a_key_and_registering_or_removing_a_port_say_they_worked(alice_session):
    """The page after each change says it was done, in the card it was done in
    (before, only removing a key did: the others came back without a word)."""
    store, treq, cookie, csrf = alice_session

    def after(path: str, form: dict[str, str]) -> str:
        code, headers, _ = fetch(treq, "POST", path, cookie, {"csrf": csrf, **form})
        assert code == 303
        location = headers[b"Location"][0].decode()
        _code, _headers, body = fetch(treq, "GET", location.split("#")[0], cookie)
        return body

    body = after("/keys", {"public_key": public_key_text(), "description": "pi"})
    assert 'id="key-notice">Key saved.' in body
    body = after("/ports", {"port": "10080", "description": "wiki"})
    assert 'id="ports-notice">Port registered' in body and 'id="key-notice"' not in body
    body = after("/ports/remove", {"port": "10080"})
    assert 'id="ports-notice">Registration removed.' in body
    assert store.list_ports("alice") == []
