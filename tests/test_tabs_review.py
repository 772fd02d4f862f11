"""A review of the dashboard as people really use it: two tabs, two browsers, double
clicks, Back, pages left open while something changed elsewhere (another tab, the
admin CLI, another admin), the session ending mid-form, a member disabled while
logged in.

Each test failed on the reviewed code (ca1fb86) because of something a member or
admin would see; its docstring says what they did, what they saw, and what they
should see (and now do).  The in-memory tests use the ``site`` fixture of tests/test_web_api.py
(real routes and SQLite, no sockets); the browser tests run a real
``twistd nekojump`` and one real headless Chromium (tests/test_dashboard_browser.py).
"""

from __future__ import annotations

import re

import pytest
from twisted.internet.defer import succeed

from nekojump.keys import parse_public_key
from nekojump.passwords import hash_password
from nekojump.policy import ForwardRules
from tests.test_web_api import public_key_text, registry, site  # noqa: F401
from tests.test_web_pages import alice_session, fetch, post_login_without_waiting  # noqa: F401

RULES = ForwardRules(10000, 10999)


def _follow(treq, cookie: dict[str, str], code: int, headers: dict, body: str) -> tuple[int, str]:
    """The page a form's answer shows: the answer itself, or where its 303 leads."""
    if code != 303:
        return code, body
    location = headers[b"Location"][0].decode().split("#")[0]
    code, _headers, body = fetch(treq, "GET", location, cookie)
    return code, body


def _text(body: str) -> str:
    """What a person reads of a page: its text without tags."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


# -- an admin page left open while the key or port went elsewhere ------------------------


def test_admin_removing_a_key_that_is_already_gone_stays_on_the_admin_page(site):  # noqa: F811
    """An admin has /admin open and clicks Remove Key on bob's key; meanwhile bob
    removed it himself (or another admin, or ``nekojump-admin key remove``).  The
    admin lands on their *own member dashboard* (at /keys/remove) with the error
    "you have no key SHA256:..." under their own Add-key textarea, which is marked
    invalid: it reads as if the admin's own key were the problem, and /admin with
    its up-to-date list is gone.  They should get the admin page back, saying the
    key was already removed (fix: ``Dashboard.remove_key`` honours ``back=/admin``
    on a refusal too, e.g. ``_admin_page(viewer, notice=...)``)."""
    store, client = site
    bobs = store.add_key("bob", parse_public_key(public_key_text("bob@pi")), "bob's pi")
    root, csrf = client("root", via="session")
    store.remove_key(bobs.fingerprint, actor="bob")  # gone while /admin was open
    code, headers, body = fetch(
        root.treq,
        "POST",
        "/keys/remove",
        root.headers,
        {"csrf": csrf, "fingerprint": bobs.fingerprint, "back": "/admin"},
    )
    _code, page = _follow(root.treq, root.headers, code, headers, body)
    assert 'id="admin-section"' in page, (
        "a Remove Key sent from /admin for a key already gone came back as the admin's "
        "own dashboard: " + _text(page)[:300]
    )


def test_admin_removing_a_port_that_is_already_gone_is_told_so(site):  # noqa: F811
    """An admin with no key or port of their own has /admin open and clicks Remove
    on bob's port 10080; bob deleted it a moment before.  The answer is a 404 of the
    admin's own, empty dashboard: the refusal went into ``port_error``, which only
    the Registered Ports card shows, and that card is not drawn for a member with
    no key and no port.  The admin sees no word of what happened, and is no longer
    on /admin.  They should see /admin again, saying the registration was already
    gone (fix: ``Dashboard.remove_port`` honours ``back=/admin`` on a refusal, and
    falls back to ``notice`` as ``dashboard()`` does for a Check)."""
    store, client = site
    store.add_port("bob", 10080, "bob's wiki", RULES)
    root, csrf = client("root", via="session")
    store.remove_port("bob", 10080)  # gone while /admin was open
    code, headers, body = fetch(
        root.treq,
        "POST",
        "/ports/remove",
        root.headers,
        {"csrf": csrf, "port": "10080", "member": "bob", "back": "/admin"},
    )
    _code, page = _follow(root.treq, root.headers, code, headers, body)
    text = _text(page)
    assert "10080" in text, f"the admin was told nothing about port 10080: {text[:400]!r}"
    assert 'id="admin-section"' in page, "the admin was sent away from /admin"


# -- a member's second tab ---------------------------------------------------------------


def test_removing_a_key_another_tab_already_removed_does_not_flag_the_add_key_form(
    alice_session,  # noqa: F811
):
    """Alice has two keys and the dashboard open in two tabs.  In one she removes her
    laptop key; in the other, still listing it, she clicks Remove Key on it too.
    The answer is a 404 in which the *Add a key for another machine* section is
    opened, its empty Public key textarea focused and marked invalid, with the alert
    "you have no key SHA256:..." under it: a form she never touched is flagged, and
    "you have no key" reads like a fault.  The key is gone, as she wanted; the page
    should say so in the key card (a notice, as ``?done=key-removed`` does) and
    leave the Add-key form alone (fix: ``Dashboard.remove_key`` on ``no-such-key``
    for one of the viewer's own recent keys, or any, renders ``notice=`` instead of
    ``key_error=``)."""
    store, treq, cookie, csrf = alice_session
    laptop = store.add_key("alice", parse_public_key(public_key_text("a@laptop")), "laptop")
    store.add_key("alice", parse_public_key(public_key_text("a@pi")), "pi")
    fetch(treq, "POST", "/keys/remove", cookie, {"csrf": csrf, "fingerprint": laptop.fingerprint})
    code, headers, body = fetch(
        treq, "POST", "/keys/remove", cookie, {"csrf": csrf, "fingerprint": laptop.fingerprint}
    )
    _code, page = _follow(treq, cookie, code, headers, body)
    assert laptop.fingerprint not in re.findall(r'class="fingerprint">([^<]+)<', page)
    assert 'id="key-error"' not in page and 'aria-invalid="true"' not in page, (
        "the Add-key form came back flagged: "
        + _text(page[page.index("ssh-key-card") : page.index("ssh-key-card") + 3000])[:400]
    )


@pytest.mark.parametrize(
    ("path", "fields", "done"),
    [
        ("/keys", {"description": "laptop"}, "Key saved"),
        ("/ports", {"port": "10080", "description": "wiki"}, "Port registered"),
    ],
)
def test_a_form_sent_twice_does_not_say_it_failed(alice_session, path, fields, done):  # noqa: F811
    """Alice double-clicks Save Key (or Register Port): the browser sends the form
    twice and shows the answer to the second.  That answer is a 400 with the error
    "this key is already registered" ("port 10080 is already registered") and her
    text kept in the form for correction, as if the save had failed -- it worked,
    and the registration it complains about is her own.  Neither form guards
    against a second submit (app.js disables nothing) and the server treats her own
    registration like another member's.  Checked in real Chromium: two clicks 10
    or 40 ms apart end on /keys with "this key is already registered" (at 0 ms the
    browser drops the first).  The second answer should say it is saved
    (fix: ``add_key``/``add_port`` treat an identical registration by the same
    member as done; or app.js disables a form's button once it is sent)."""
    store, treq, cookie, csrf = alice_session
    if path == "/ports":
        store.add_key("alice", parse_public_key(public_key_text()), "pi")
        form = {"csrf": csrf, **fields}
    else:
        form = {"csrf": csrf, "public_key": public_key_text("alice@laptop"), **fields}
    first = fetch(treq, "POST", path, cookie, form)
    assert first[0] == 303
    code, headers, body = fetch(treq, "POST", path, cookie, form)
    code, page = _follow(treq, cookie, code, headers, body)
    assert len(store.list_keys("alice")) == 1 and len(store.list_ports("alice")) <= 1
    assert code == 200 and done in page and "already registered" not in page, (
        f"the second send of {path} answered {code}: "
        + ", ".join(re.findall(r'role="alert"[^>]*>([^<]+)<', page))
    )


# -- a member disabled while logged in ---------------------------------------------------


def test_a_disabled_member_logging_in_again_is_not_told_the_password_is_wrong(
    site,  # noqa: F811
    monkeypatch,
):
    """The admin disables alice (``nekojump-admin member disable``) while her
    dashboard is open.  Her tab rightly says "session ended -- log in again"; she
    does, with her right password, and reads "wrong member name or password".  She
    tries again until the throttle stops her, then asks for a password reset that
    changes nothing.  With the right password she should be told the account is
    disabled (and whom to ask); a wrong password may still get the usual answer, so
    nothing is revealed to someone guessing (fix: ``Backend.login`` checks the hash
    of disabled members too and refuses with its own reason;
    ``SQLiteStore.password_hash`` now returns None for them)."""
    monkeypatch.setattr(
        "nekojump.web.backend.deferToThread", lambda function, *args: succeed(function(*args))
    )
    store, client = site
    store.set_password_hash("alice", hash_password("alice's password"))
    treq = client(None).treq
    answered = post_login_without_waiting(treq, "alice", "alice's password")
    assert answered[0].code == 303  # she can log in
    store.set_member_active("alice", False)
    (response,) = post_login_without_waiting(treq, "alice", "alice's password")
    body: list[bytes] = []
    response.content().addBoth(body.append)
    treq.flush()
    text = _text(body[0].decode())
    assert "disabled" in text.lower(), f"a disabled member with the right password read: {text}"


# -- in a real browser -------------------------------------------------------------------

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    from tests.conftest import fingerprint
    from tests.test_dashboard_browser import (
        PASSWORD,
        absent,
        browser,
        find,
        log_in,
        mark_page,
        submit,
        wait,
        wait_for_next_page,
    )
    from tests.test_ui_review import refreshed, started
except (ImportError, pytest.skip.Exception):  # no selenium or no Chromium: in-memory tests only
    browser = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(browser is None, reason="selenium or Chromium missing")


def _key_rows(driver) -> list[str]:  # type: ignore[no-untyped-def]
    return [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#ssh-key-card .key-row")]


def _remove_key_confirmed(driver) -> None:  # type: ignore[no-untyped-def]
    mark_page(driver)
    find(driver, "form[action='/keys/remove'] button[type=submit]").click()
    wait(driver).until(expected_conditions.alert_is_present()).accept()
    wait_for_next_page(driver)


@needs_browser
@pytest.mark.e2e
def test_a_tab_left_open_stops_showing_a_key_removed_in_another_tab(jumphost, keys, browser):
    """Alice has the dashboard open in two tabs and removes her key in the second.
    Back in the first, the page goes on showing the key: CONFIGURED, its row with
    a Remove Key button, How to Connect with commands for it -- while the Live
    tunnels card of the same page, refreshed every two seconds, now says "Save a
    key first".  The page contradicts itself for as long as she does not reload;
    she may run the How to Connect command and get "Permission denied".  The open
    tab should stop showing the key as configured once the refresh has seen it
    go (fix: ``/tunnels`` also says which keys exist, and app.js drops or marks
    removed rows -- or tells her the page is out of date)."""
    started(jumphost, ("alice", [keys["alice"]]))
    removed = fingerprint(keys["alice"])
    log_in(browser, jumphost, "alice")
    assert any(removed in row for row in _key_rows(browser))
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(jumphost.web_url)
    _remove_key_confirmed(browser)
    assert not any(removed in row for row in _key_rows(browser))  # gone in this tab
    browser.close()
    browser.switch_to.window(first)
    wait(browser, 10).until(
        lambda d: "Save a key first" in find(d, "#live-tunnels-card").text,
        message="the first tab's Live tunnels refresh to see the key gone",
    )
    refreshed(browser)
    card = find(browser, "#ssh-key-card").text
    still_listed = any(removed in row for row in _key_rows(browser))
    assert not still_listed or "removed" in card.lower(), (
        "the open tab still shows the removed key as configured while its Live tunnels "
        f"say {find(browser, '#tunnels-empty').text!r}: {card!r}"
    )


@needs_browser
@pytest.mark.e2e
def test_back_after_removing_a_key_does_not_say_key_saved(jumphost, keys, browser):
    """Alice saves a key (the page says "Key saved. How to Connect below has your
    commands."), then removes it ("Key removed.") and presses Back.  She is shown
    "Key saved. How to Connect below has your commands." again -- on a page with
    no key and no How to Connect (the notice comes from ``?done=key-added`` in the
    address, whatever the key's fate), or the old page with the removed key still
    listed (from the back/forward cache).  Either way the page claims a key she
    has just removed.  Back should show what is true now: no success notice for a
    change since undone, and no removed key (fix: the notice is a one-time flash
    kept with the session, or ``?done=`` names the key and is shown only while it
    is there; ``Cache-Control: no-store`` already asks for no cached copy)."""
    started(jumphost, ("alice", []))
    public = (keys["alice"].parent / (keys["alice"].name + ".pub")).read_text().strip()
    removed = fingerprint(keys["alice"])
    log_in(browser, jumphost, "alice")
    find(browser, "#public_key").send_keys(public)
    submit(browser, "form.key-form")
    assert "Key saved" in find(browser, "#key-notice").text
    _remove_key_confirmed(browser)
    assert "Key removed" in find(browser, "#key-notice").text
    browser.back()
    wait(browser, 10).until(
        lambda d: (
            d.execute_script("return document.readyState") == "complete"
            and not absent(d, "#ssh-key-card")
            and "Key removed" not in d.find_element(By.ID, "ssh-key-card").text
        )
    )
    card = find(browser, "#ssh-key-card").text
    assert "Key saved" not in card and not any(removed in row for row in _key_rows(browser)), (
        f"Back after removing the key shows ({browser.current_url}): {card[:300]!r}"
    )


@needs_browser
@pytest.mark.e2e
def test_a_key_typed_when_the_session_ended_is_still_there_after_logging_in(
    jumphost,
    keys,
    browser,
):
    """Alice pastes her public key and a description into the dashboard, which has
    been open past the end of her session (expired, or ended from another tab), and
    clicks Save Key.  The login page rightly says "Your session ended, so nothing
    was changed. Log in and try again."; she logs in and lands on the dashboard --
    with an empty form: what she pasted is gone (the form had no ``back``, and
    nothing of it is carried through the login).  A stale form (``_stale_form``)
    keeps what was typed; an ended session should too, or save it once she has
    logged in (fix: ``form_post`` carries the public part of the form through
    ``/login`` -- it is never private: ``echoable`` -- or the page stores the draft
    in sessionStorage and app.js puts it back)."""
    started(jumphost, ("alice", []))
    public = (keys["alice"].parent / (keys["alice"].name + ".pub")).read_text().strip()
    log_in(browser, jumphost, "alice")
    find(browser, "#public_key").send_keys(public)
    find(browser, "#description").send_keys("home-pi")
    browser.delete_cookie("nekojump_session")  # the session ends while she types
    submit(browser, "form.key-form")
    assert "/login" in browser.current_url
    assert "session ended" in find(browser, "main").text.lower()
    find(browser, "#name").send_keys("alice")
    find(browser, "#password").send_keys(PASSWORD)
    submit(browser, "form[action='/login']")
    assert absent(browser, "form[action='/login']"), find(browser, "main").text
    saved = any(fingerprint(keys["alice"]) in row for row in _key_rows(browser))
    kept = find(browser, "#public_key").get_attribute("value").strip() == public
    assert saved or kept, (
        "after logging in again the key she pasted is gone: "
        f"textarea {find(browser, '#public_key').get_attribute('value')!r}, "
        f"keys {_key_rows(browser)!r}"
    )
