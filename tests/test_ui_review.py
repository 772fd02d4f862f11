"""A member-experience review of the dashboard in a real headless Chromium.

Reviewed against the seed page (jumphost-tunnel.txt) and SPEC §2, logged in as a
member of a real ``twistd nekojump`` on loopback: the live tunnels refresh (what it
shows, what it does to focus, what happens when the session ends under it), form
errors (where they show, whether what was typed survives), back/forward after a
post, long names and descriptions at phone and desktop widths, the Copy buttons,
the console on every page, and the seed's step-by-step (the suggested-port table).

Every test here failed on the code it was written against (c75fbca) and passes
since the fixes that came with it; each docstring says what a member saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("selenium")  # as tests/test_dashboard_browser.py, which also needs Chromium

from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions

from tests.conftest import Jumphost, wait_for
from tests.test_dashboard_browser import (  # noqa: F401
    DESKTOP,
    PASSWORD,
    PHONE,
    absent,
    browser,
    browser_errors,
    emulate,
    find,
    horizontal_overflow,
    log_in,
    mark_page,
    submit,
    wait,
    wait_for_next_page,
)

pytestmark = pytest.mark.e2e


def started(host: Jumphost, *members: tuple[str, list[Path]]) -> Jumphost:
    for name, member_keys in members:
        host.add_member(name, *member_keys, password=PASSWORD)
    return host.start()


def refreshed(driver: WebDriver, times: int = 1, timeout: float = 8) -> None:
    """Wait until the Live tunnels card has refreshed ``times`` more times."""
    driver.execute_script(
        "window.nekojumpRefreshes = 0;"
        "new MutationObserver(() => window.nekojumpRefreshes++)"
        ".observe(document.getElementById('tunnels-updated'), {childList: true});"
    )
    wait(driver, timeout).until(
        lambda d: d.execute_script("return window.nekojumpRefreshes") >= times,
        message=f"{times} refreshes of Live tunnels",
    )


def open_register_port(driver: WebDriver) -> None:
    summary = driver.find_element(
        By.XPATH, "//*[@id='ports-card']//details/summary[normalize-space()='+ Register Port']"
    )
    if summary.find_element(By.XPATH, "..").get_attribute("open") is None:
        summary.click()


def register_port(driver: WebDriver, port: int, description: str) -> None:
    open_register_port(driver)
    find(driver, "#port").send_keys(str(port))
    find(driver, "#port-description").send_keys(description)
    submit(driver, "form.port-form")
    assert absent(driver, "#port-error"), find(driver, "#port-error").text


# -- the Live tunnels refresh ---------------------------------------------------------------


def test_the_empty_live_tunnels_hint_survives_the_refresh(jumphost, keys, browser):  # noqa: F811
    """A member with a key and no tunnel reads "No live tunnels. Run the ssh -N -R
    command from How to Connect ..." -- for two seconds: the first refresh replaces it
    with a bare "No live tunnels." (``/tunnels`` renders tunnels.html without ``hint``)."""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    hint = "Run the ssh -N -R command from How to Connect"
    assert hint in find(browser, "#tunnels-empty").text
    refreshed(browser)
    assert hint in find(browser, "#tunnels-empty").text, find(browser, "#tunnels-empty").text


def test_the_live_refresh_says_when_the_session_has_ended(jumphost, keys, browser):  # noqa: F811
    """The session ends while the dashboard is open (cookie expired, logged out in
    another tab).  ``/tunnels`` now answers 401, which app.js ignores: the card keeps
    showing the last tunnels and "updated 12:00:01" forever, with no word that
    nothing is being updated any more or that the member must log in again."""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    refreshed(browser)
    browser.delete_cookie("nekojump_session")
    card = "#live-tunnels-card"
    try:
        wait(browser, 6).until(
            lambda d: "/login" in d.current_url or "log in" in find(d, card).text.lower()
        )
    except TimeoutException:
        pytest.fail(
            f"6 s after the session ended, Live tunnels still says: {find(browser, card).text!r}"
        )


def test_the_live_refresh_keeps_keyboard_focus(jumphost, keys, echo, browser):  # noqa: F811
    """A keyboard user tabs to the Check button of a live tunnel; within two seconds
    the refresh rebuilds the table and focus falls back to <body>, so Enter does
    nothing and the next Tab starts again from the top of the page."""
    started(jumphost, ("alice", [keys["alice"]]))
    port = jumphost.port_min + 3
    jumphost.forward(keys["alice"], port, echo.port)
    log_in(browser, jumphost, "alice")
    check = f"#tunnels-table tr[data-port='{port}'] button"
    wait(browser, 5).until(lambda d: not absent(d, check))
    browser.execute_script("document.querySelector(arguments[0]).focus()", check)
    refreshed(browser)
    focused = browser.execute_script(
        "const e = document.activeElement;"
        "return e.closest('#tunnels-table tr[data-port]') ? e.textContent : e.tagName;"
    )
    assert focused == "Check", f"focus moved to {focused} after the refresh"


def test_a_port_freed_by_another_member_stops_showing_held(jumphost, keys, echo, browser):  # noqa: F811
    """Alice registered a port that bob's tunnel then held: "HELD BY ANOTHER MEMBER".
    Bob disconnects; the badge never changes until alice reloads (app.js skips
    held-by-other cells), so she keeps thinking her port is taken."""
    started(jumphost, ("alice", [keys["alice"]]), ("bob", [keys["bob"]]))
    port = jumphost.port_min + 5
    log_in(browser, jumphost, "alice")
    register_port(browser, port, "Web (HTTP)")
    bob = jumphost.forward(keys["bob"], port, echo.port)
    browser.get(jumphost.web_url)
    state = f"#ports-table tr[data-port='{port}'] .port-state"
    assert find(browser, state).get_attribute("data-state") == "held-by-other"
    bob.terminate()
    bob.wait(timeout=5)
    wait_for(lambda: jumphost.holder_of(port) is None, what="bob's forward to end")
    refreshed(browser, times=2)
    assert find(browser, state).text == "DOWN", find(browser, state).text


# -- forms ------------------------------------------------------------------------------------


def test_a_refused_port_registration_is_seen(jumphost, keys, browser):  # noqa: F811
    """On a laptop screen a member with a key types an out-of-range port in
    "+ Register Port" and saves.  The 400 page comes back scrolled to the top (the
    How to Connect card fills the screen), the error is far below the fold and
    nothing has focus: it looks as if the click did nothing."""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    emulate(browser, DESKTOP)
    open_register_port(browser)
    find(browser, "#port").send_keys("5")
    find(browser, "#port-description").send_keys("too low")
    submit(browser, "form.port-form")
    error = find(browser, "#port-error")
    seen = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "const f = document.activeElement;"
        "return (r.top >= 0 && r.bottom <= window.innerHeight) || f.id === 'port';",
        error,
    )
    assert seen, (
        f"{error.text!r} is at y={error.rect['y']} of a {DESKTOP[1]} px window, "
        f"focus on {browser.execute_script('return document.activeElement.tagName')}"
    )


def test_a_form_sent_from_a_page_older_than_the_session_keeps_what_was_typed(
    jumphost,
    keys,
    browser,  # noqa: F811
):
    """A member logs out and in again in another tab (or the session expired and they
    logged in elsewhere), then registers a port from the dashboard tab still open.  The
    answer is a bare text page "forbidden: this form is stale; ..." -- no dashboard, no
    navigation, and the port and description they typed are gone."""
    started(jumphost, ("alice", [keys["alice"]]))
    port = jumphost.port_min + 9
    log_in(browser, jumphost, "alice")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(jumphost.web_url)
    submit(browser, "form[action='/logout']")
    log_in(browser, jumphost, "alice")
    browser.close()
    browser.switch_to.window(first)
    open_register_port(browser)
    find(browser, "#port").send_keys(str(port))
    find(browser, "#port-description").send_keys("Web (HTTP)")
    submit(browser, "form.port-form")
    registered = not absent(browser, f"#ports-table tr[data-port='{port}']")
    kept = not absent(browser, "#port") and find(browser, "#port").get_attribute("value") == str(
        port
    )
    assert registered or kept, f"the member got: {browser.find_element(By.TAG_NAME, 'body').text!r}"


def test_remove_key_after_the_session_ended_says_why_it_did_not(jumphost, keys, browser):  # noqa: F811
    """A member whose machine was stolen clicks Remove Key on a dashboard left open past
    the session's end, confirms, and lands on the plain login page: nothing says the
    session had ended or that the key was NOT removed (and after logging in, the
    dashboard does not say so either)."""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    browser.delete_cookie("nekojump_session")
    mark_page(browser)
    find(browser, "form[action='/keys/remove'] button[type=submit]").click()
    wait(browser).until(expected_conditions.alert_is_present()).accept()
    wait_for_next_page(browser)
    assert "/login" in browser.current_url
    text = find(browser, "main").text.lower()
    assert "session" in text or "not removed" in text, text


# -- back and forward ------------------------------------------------------------------------


def test_back_to_a_check_result_does_not_ask_to_resubmit(jumphost, keys, browser):  # noqa: F811
    """The member clicks Check on a registered port, reads the result, opens Service
    Directory and presses Back: Chromium shows "Confirm Form Resubmission"
    (ERR_CACHE_MISS) instead of the dashboard, because /check answers the POST with
    a page rather than a redirect (and every page is no-store)."""
    started(jumphost, ("alice", [keys["alice"]]))
    port = jumphost.port_min + 11
    log_in(browser, jumphost, "alice")
    register_port(browser, port, "Web (HTTP)")
    submit(browser, f"#ports-table tr[data-port='{port}'] form[action='/check']")
    assert not absent(browser, "#check-card")
    mark_page(browser)
    find(browser, "a[href='/directory']").click()
    wait_for_next_page(browser)
    browser.back()
    # Back may bring the page out of the browser's back/forward cache (no new load),
    # so wait for what it shows rather than for a new page.
    try:
        wait(browser).until(lambda d: not absent(d, "#reverse-tunnel-section #check-card"))
    except TimeoutException:
        raise AssertionError(browser.find_element(By.TAG_NAME, "body").text[:300]) from None


# -- the seed's step-by-step ------------------------------------------------------------------


def test_the_seeds_suggested_ports_are_on_the_page(jumphost, keys, browser):  # noqa: F811
    """Seed step 2, "Pick a port", gives a table of suggested ports (Web (HTTP) 10080,
    Web (alt) 18080, SSH 10022, IRC 16667, Generic TCP 10000+).  The dashboard, whose
    step-by-step the seed describes, shows none of it: a member at "+ Register Port"
    has only the placeholder "10080" to go on."""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    open_register_port(browser)
    section = find(browser, "#reverse-tunnel-section").text
    missing = [
        s for s in ("Web (HTTP)", "Web (alt)", "SSH", "IRC", "Generic TCP") if s not in section
    ]
    assert not missing, f"suggested services missing from the page: {missing}"


# -- layout -----------------------------------------------------------------------------------


def phone(driver: WebDriver) -> dict[str, object] | None:
    """Emulate a phone (mobile viewport) and say whether the page scrolls sideways.

    Does not wait for ``innerWidth`` to be the phone's: with the meta viewport, a
    page wider than the screen widens the layout viewport, which is the defect."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 1, "mobile": True},
    )
    wait(driver).until(lambda d: d.execute_script("return window.screen.width") == PHONE[0])
    return driver.execute_script(
        "const w = document.documentElement.scrollWidth;"
        "return w > arguments[0] ? {screen: arguments[0], page: w} : null;",
        PHONE[0],
    )


def test_a_long_member_name_fits_a_phone(jumphost, browser):  # noqa: F811
    """A member with a long name (the store allows 64 characters) opens the dashboard
    on a phone: the name in the sidebar does not wrap, so the whole page scrolls
    sideways."""
    name = "konstantin.papadopoulos.vandenberghe.buildworkstation01"
    started(jumphost, (name, []))
    log_in(browser, jumphost, name)
    assert phone(browser) is None, phone(browser)


def test_a_key_comment_as_description_fits_a_phone(jumphost, keys, browser, tmp_path):  # noqa: F811
    """A member pastes a key made with ``ssh-keygen -C user@host`` and no description;
    the comment becomes the key's name in the card.  On a phone a usual long
    user@host comment does not wrap: it sticks out of the card and the page scrolls
    sideways (``.key-main strong`` has no overflow-wrap)."""
    started(jumphost, ("alice", []))
    comment = "administrator@buildserver01.internal.example.com"
    public = Path(f"{keys['bob']}.pub").read_text().split()[:2]
    log_in(browser, jumphost, "alice")
    find(browser, "#public_key").send_keys(" ".join([*public, comment]))
    submit(browser, "form.key-form")
    assert comment in find(browser, "#ssh-key-card .key-row").text
    assert phone(browser) is None, phone(browser)


def test_the_admin_page_fits_a_phone(jumphost, keys, browser):  # noqa: F811
    """An operator opens "All tunnels and keys" on a phone with one member and one key:
    the audit trail's ``fingerprint=SHA256:...`` detail does not wrap, so the page
    scrolls sideways (the Keys table's fingerprint wraps; the audit's does not)."""
    jumphost.add_member("alice", keys["alice"], password=PASSWORD)
    added = jumphost.admin(
        "member", "add", "root", "--admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    jumphost.start()
    log_in(browser, jumphost, "root")
    browser.get(jumphost.web_url + "admin")
    assert "fingerprint=SHA256:" in find(browser, "#admin-audit-card").text
    assert phone(browser) is None, phone(browser)
