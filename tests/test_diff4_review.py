"""Review of 54ac075..2aefbfd: the per-member forward index, /admin's 500-row
lists with ``?member=NAME``, the paged JSON API and the paged Service Directory.

Each test failed on the reviewed code (2aefbfd) because of something an admin,
a member or an API client would notice; its docstring says what they do, what
happens, and what should happen.  The in-memory tests drive the real web app
(``test_web_api.in_memory_site``) with the registry filled directly, as
``test_scale_web_review`` does; the browser test runs one headless Chromium
against pages that app rendered, served from loopback.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nekojump.keys import parse_public_key
from nekojump.policy import ForwardRules
from nekojump.ssh.registry import TunnelRegistry
from nekojump.store import SQLiteStore
from nekojump.web.openapi import openapi_document
from tests.test_scale_web_review import admin_site, fill, get, session
from tests.test_web_api import hold_port, public_key_text
from tests.test_web_pages import fetch

RULES = ForwardRules(10000, 60000)
#: Anything this review starts listens here (loopback).
LOOPBACK = "127.0.0.76"
STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


@pytest.fixture
def server(tmp_path):
    """``admin_site`` with ``alice`` and ``bob``."""
    world = admin_site(tmp_path, "alice", "bob")
    yield world
    world[0].close()


def hold(registry: TunnelRegistry, store: SQLiteStore, member: str, ports) -> None:
    """Live forwards of ``member`` on ``ports``."""
    for port in ports:
        hold_port(registry, store, member, port)


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def form_fields(html: str, action: str) -> dict[str, str]:
    """The hidden fields of the first form posting to ``action`` on the page."""
    match = re.search(rf'<form method="post" action="{re.escape(action)}".*?</form>', html, re.S)
    assert match, f"no {action} form on the page"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', match.group(0)))


# -- /admin?member=NAME --------------------------------------------------------------------


@pytest.mark.parametrize("what", ["key", "port", "key already gone"])
def test_removing_from_a_filtered_admin_page_keeps_the_filter(server, what):
    """An admin with thousands of tunnels uses "Show one member" (``/admin?member=bob``)
    to find bob's key or port, and clicks Remove.  The answer leads to ``/admin``
    (the form's hidden ``back`` is "/admin" and the handlers redirect to
    ``/admin``): the filter is gone and the admin is back on the first 500 of
    everyone's rows, where bob's other keys and ports are not even listed; to
    remove a second one they type the name again.  A refused removal (already gone)
    renders the unfiltered page too.  The page after a removal should still show
    bob's rows (``?member=bob``).  Fix: the admin forms carry the filter (e.g.
    ``back=/admin?member=bob``, or a hidden ``filter``) and ``remove_key`` /
    ``remove_port`` / ``_nothing_removed`` / ``_stale_form`` keep it."""
    store, _registry, treq = server
    store.add_key("bob", parse_public_key(public_key_text("bob@pi")), "bob's pi")
    store.add_key("bob", parse_public_key(public_key_text("bob@nas")), "bob's nas")
    store.add_port("bob", 10080, "bob's wiki", RULES)
    store.add_port("bob", 10081, "bob's chat", RULES)
    cookie, csrf = store.create_session("root", 3600)
    headers = {"Cookie": f"nekojump_session={cookie}"}
    code, _headers, page = fetch(treq, "GET", "/admin?member=bob", headers)
    assert code == 200 and 'id="admin-showing"' in page
    action = "/ports/remove" if what == "port" else "/keys/remove"
    fields = form_fields(page, action)
    assert fields["csrf"] == csrf
    if what == "key already gone":
        store.remove_key(fields["fingerprint"], actor="bob")  # removed elsewhere meanwhile
    code, answer_headers, body = fetch(treq, "POST", action, headers, fields)
    if code == 303:
        location = answer_headers[b"Location"][0].decode()
        assert "member=bob" in location, (
            f"a removal from /admin?member=bob led to {location}: the filter is lost"
        )
    else:
        assert 'id="admin-showing"' in body and 'value="bob"' in body, (
            f"a refused removal from /admin?member=bob ({code}) came back as everyone's "
            f"/admin: {text_of(body)[:300]}"
        )


def test_showing_a_member_who_does_not_exist_says_so(server):
    """An admin types "bbo" (or "Bob") into "Show one member".  The page says
    "Showing bbo's tunnels, keys and ports only." and then "No live tunnels",
    "No keys", "No registered ports": it reads as if that member exists and has
    nothing, while there is no such member (``GET /api/v1/tunnels?member=bbo``
    answers 404 ``no-such-member``).  The page should say there is no member of
    that name.  Fix: ``Dashboard._admin_lists`` passes ``found is None`` to the
    template, which says "No member named ...", as the API does."""
    store, _registry, treq = server
    code, body = get(treq, "/admin?member=bbo", session(store, "root"))
    text = text_of(body.decode()).lower()
    assert "no member" in text or "no such member" in text or "not a member" in text, (
        f"/admin?member=bbo ({code}) says: "
        + text[text.index("show one member") : text.index("show one member") + 300]
    )


def test_one_members_tunnels_past_500_are_not_sent_to_show_one_member(server):
    """A member may hold up to ``max_forwards_per_member`` tunnels (1,000 by
    default).  An admin shows that member alone (``/admin?member=bob``) to see
    them all; with 600 the page lists 500 and says "First 500 of 600 live
    tunnels, by port: show one member above, or run nekojump-admin tunnels." --
    which is what they just did.  Tunnels 501-600 of bob cannot be seen on the
    dashboard at all.  A filtered page should list all of that member's tunnels
    (bounded by the per-member cap), or at least not send the admin to the
    filter they are using.  Fix: ``_admin_lists`` does not cut one member's list
    at ``ADMIN_ROWS`` (or pages it), and ``admin_tunnels.html`` words the note by
    ``member_filter``."""
    store, registry, treq = server
    hold(registry, store, "bob", range(20000, 20600))
    code, body = get(treq, "/admin/tunnels?member=bob", session(store, "root"))
    assert code == 200
    rows = len(re.findall(rb"<tr data-port=", body))
    note = re.search(rb'<p class="muted small" id="tunnels-cut">(.*?)</p>', body)
    assert rows == 600 or (note and b"show one member" not in note.group(1)), (
        f"/admin?member=bob shows {rows} of bob's 600 tunnels and says: "
        f"{note.group(1).decode() if note else None!r}"
    )


# -- the JSON API ----------------------------------------------------------------------------


def test_the_openapi_document_says_bad_page_arguments_are_a_400(server):
    """A client generated from ``/api/v1/openapi.json`` sends ``?limit=5000`` (or
    ``offset=-1``); the server answers 400 ``bad-request`` -- which the document
    does not list for any of the paged GETs (only 200 and 401), though the
    commit says "bad page arguments are a 400; README and OpenAPI say so".
    Generated clients treat an undocumented status as an unexpected error.  Fix:
    ``openapi.py`` adds ``"400": _error(...)`` to the operations that take
    ``PAGE_PARAMETERS`` (and may mark ``total``/``next_offset`` required: they are
    always there)."""
    store, _registry, treq = server
    code, _body = get(treq, "/api/v1/tunnels?limit=5000", session(store, "alice"))
    assert code == 400
    document = openapi_document()
    missing = [
        path
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if any(p.get("name") == "limit" for p in operation.get("parameters", []))
        and "400" not in operation["responses"]
    ]
    assert missing == [], f"paged operations that do not document their 400: {missing}"


# -- /admin's Live tunnels refresh, in a real browser ----------------------------------------


class _Pages(BaseHTTPRequestHandler):
    """Serves one rendered /admin, its /admin/tunnels fragment, and web/static."""

    pages: dict[str, bytes] = {}

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/static/"):
            file = STATIC / path.removeprefix("/static/")
            body = file.read_bytes()
            kind = "text/css" if file.suffix == ".css" else "text/javascript"
        else:
            body = self.pages.get(path)
            kind = "text/html; charset=utf-8"
            if body is None:
                self.send_error(404)
                return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def after_one_refresh(tmp_path: Path, page: bytes, fragment: bytes, script: str):
    """Open ``page`` as /admin in Chromium, its refresh answered with ``fragment``;
    once the page says it updated, return what ``script`` returns there."""
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By

    from tests.test_dashboard_browser import chromium, wait

    handler = type("Pages", (_Pages,), {"pages": {"/admin": page, "/admin/tunnels": fragment}})
    httpd = ThreadingHTTPServer((LOOPBACK, 0), handler)
    serving = threading.Thread(target=httpd.serve_forever, daemon=True)
    serving.start()
    browser_gen = chromium(tmp_path)
    browser = next(browser_gen)
    try:
        browser.get(f"http://{LOOPBACK}:{httpd.server_address[1]}/admin")
        wait(browser, 15).until(
            lambda d: d.find_element(By.ID, "tunnels-updated").text.startswith("updated")
        )
        return browser.execute_script(script)
    finally:
        browser_gen.close()
        httpd.shutdown()
        httpd.server_close()


def test_the_admin_refresh_keeps_the_number_of_live_tunnels_true(server, tmp_path):
    """An admin watches /admin with 501 live tunnels: it lists the first 500 by port
    and says "First 500 of 501 live tunnels".  100 more tunnels come up on higher
    ports.  The 2-s refresh fetches a fragment that says "First 500 of 601", but
    app.js puts it in with ``updateInPlace`` (same 500 rows: only the cells and
    ``#port-states`` are copied), so the page keeps saying 501 for as long as the
    first 500 ports stay the same -- and with exactly 500 tunnels at load, it
    never says there are more.  Fix: ``updateInPlace`` also replaces
    ``#tunnels-cut`` (present or not) from the answer, or the note moves into a
    row-independent element that is always swapped."""
    store, registry, treq = server
    root = session(store, "root")
    fill(store, registry, 501, members=5)
    _code, page = get(treq, "/admin", root)
    assert b"First 500 of 501" in page
    hold(registry, store, "bob", range(30000, 30100))
    _code, fragment = get(treq, "/admin/tunnels", root)
    assert b"First 500 of 601" in fragment
    rows, note = after_one_refresh(
        tmp_path,
        page,
        fragment,
        "return [document.querySelectorAll('#admin-tunnels-table tr[data-port]').length,"
        " document.getElementById('tunnels-cut').textContent]",
    )
    assert rows == 500
    assert "601" in note, f"after a refresh that said 601 tunnels the page says: {note!r}"


def test_the_admin_refresh_does_not_announce_tunnels_cut_off_the_list_as_ended(server, tmp_path):
    """A screen-reader user watches /admin with 501 live tunnels (ports 20000-20500;
    the first 500 are listed).  A tunnel comes up on port 19999.  The refresh's
    list now ends at 20499, and app.js's ``announceChanges`` compares the rows it
    shows: it says "Tunnel on port 19999 is up. Tunnel on port 20499 ended.",
    though that tunnel is up and only moved past the 500th row.  With thousands
    of tunnels every new low port makes such a false "ended".
    Only tunnels that really ended should be announced.  Fix: ``announceChanges``
    ignores rows that fell off a cut list (the fragment could carry the ports
    that ended, or the last shown port, so the script can tell)."""
    store, registry, treq = server
    root = session(store, "root")
    fill(store, registry, 501, members=5)
    _code, page = get(treq, "/admin", root)
    hold(registry, store, "bob", [19999])
    _code, fragment = get(treq, "/admin/tunnels", root)
    assert registry.forward_on(20499) is not None  # still up
    said = after_one_refresh(
        tmp_path, page, fragment, "return document.getElementById('announcer').textContent"
    )
    assert "19999 is up" in said, said
    assert "20499 ended" not in said, f"the page announced: {said!r}"
