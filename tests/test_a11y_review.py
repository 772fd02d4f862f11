"""An accessibility review of the dashboard in a real headless Chromium.

Logged in as a member (and an admin) of a real ``twistd nekojump`` on loopback,
using only what a keyboard or screen-reader user gets: the accessible names
Chromium computes (WebDriver's computed label), live regions (``aria-live``,
``role=status|alert|log``), focus events, ``aria-describedby``, ``aria-current``
and the colours actually drawn.

Each test failed on the code it was written against (0b692a7), for what its
docstring says a member noticed; each passes since the fix it names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("selenium")  # as tests/test_dashboard_browser.py, which also needs Chromium

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import MESH_ADDRESS, Jumphost, exchange
from tests.test_dashboard_browser import (  # noqa: F401
    PASSWORD,
    absent,
    browser,
    find,
    log_in,
    submit,
    wait,
)
from tests.test_ui_review import refreshed, register_port, started

pytestmark = pytest.mark.e2e

# Is this node announced when its text changes?  Inside an element with aria-live
# polite/assertive or an implicit live role (status, alert, log), not hidden.
IN_LIVE_REGION = """
window.nekojumpLiveRegion = (node) => {
  for (let e = node.nodeType === 1 ? node : node.parentElement; e; e = e.parentElement) {
    if (e.hidden || e.getAttribute('aria-hidden') === 'true') return null;
    const live = e.getAttribute('aria-live');
    if (live === 'off') return null;
    if (live === 'polite' || live === 'assertive') return e;
    if (['status', 'alert', 'log'].includes(e.getAttribute('role'))) return e;
  }
  return null;
};
"""

# Record every text change made inside a live region from now on, as
# [the region's text, whether the region holds the Live tunnels table].
RECORD_ANNOUNCEMENTS = (
    IN_LIVE_REGION
    + """
window.nekojumpAnnounced = [];
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of [record.target, ...record.addedNodes]) {
      const region = window.nekojumpLiveRegion(node);
      if (region) {
        window.nekojumpAnnounced.push(
          [region.textContent.trim(), !!region.querySelector('#tunnels-table')]);
      }
    }
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""
)


def announced(driver: WebDriver) -> list[list[object]]:
    return driver.execute_script("return window.nekojumpAnnounced")


def names(driver: WebDriver, css: str) -> list[str]:
    """The accessible names Chromium computes for the elements ``css`` matches."""
    return [element.accessible_name for element in driver.find_elements(By.CSS_SELECTOR, css)]


def admin_alice(host: Jumphost, *member_keys: Path) -> Jumphost:
    """Member alice, an admin, with ``member_keys``; the host started."""
    added = host.admin("member", "add", "alice", "--admin", "--password-stdin", stdin=PASSWORD)
    assert added.returncode == 0, added.stderr
    for key in member_keys:
        result = host.admin("key", "add", "alice", f"{key}.pub", "--description", key.name)
        assert result.returncode == 0, result.stderr
    return host.start()


@pytest.fixture
def full_dashboard(jumphost, keys, echo, browser):  # noqa: F811
    """Admin alice logged in, two keys, a registered port with a live tunnel on it:
    every table of the dashboard, the directory and the admin page is shown."""
    admin_alice(jumphost, keys["alice"], keys["alice2"])
    port = jumphost.port_min + 7
    log_in(browser, jumphost, "alice")
    register_port(browser, port, "Echo")
    jumphost.forward(keys["alice"], port, echo.port)
    wait(browser, 8).until(lambda d: not absent(d, f"#tunnels-table tr[data-port='{port}']"))
    return jumphost, browser, port


# -- How to Connect: the Copy buttons ------------------------------------------------------


def test_copy_buttons_say_which_command_they_copy(jumphost, keys, browser):  # noqa: F811
    """Tabbing through How to Connect, a screen reader says "Copy, button" five
    times over: the buttons' only name is "Copy", and the command each one copies
    (One-off, autossh, systemd unit, ~/.ssh/config, known_hosts) is in a sibling
    text node the button is not tied to.  A user picking from the list of buttons
    (NVDA's elements list, VoiceOver's rotor) sees five identical entries.
    (dashboard.html, the ``button.copy`` in How to Connect: give each an
    ``aria-label`` or ``aria-labelledby`` naming its command, e.g. "Copy
    One-off command".)"""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    copy = names(browser, "#connect-card button.copy")
    assert len(copy) == 5
    assert len(set(copy)) == 5, f"the Copy buttons are named {copy}"


def test_copying_a_command_is_announced(jumphost, keys, browser):  # noqa: F811
    """A keyboard user presses Enter on a Copy button: the button's text turns to
    "Copied" (or "Selected — press Ctrl-C" when the clipboard is refused) for
    two seconds, but that text is in no live region, so a screen reader says
    nothing: the user cannot tell whether the command is on the clipboard, nor
    that they still have to press Ctrl-C.  (app.js, the copy handler: also write
    the message into a ``role="status"`` / ``aria-live="polite"`` element that is
    in the page from the start.)"""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    browser.execute_script(
        IN_LIVE_REGION
        + """
        window.nekojumpCopyFeedback = [];
        new MutationObserver((records) => {
          for (const record of records) {
            for (const node of [record.target, ...record.addedNodes]) {
              const text = node.textContent || '';
              if (/copied|selected/i.test(text)) {
                window.nekojumpCopyFeedback.push(
                  [text.trim().slice(0, 80), !!window.nekojumpLiveRegion(node)]);
              }
            }
          }
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
        """
    )
    find(browser, "#connect-card button.copy[data-copy='cmd-ssh']").send_keys(Keys.ENTER)
    feedback = wait(browser).until(
        lambda d: d.execute_script("return window.nekojumpCopyFeedback"),
        message="Enter on Copy to show Copied or Selected",
    )
    assert any(live for _text, live in feedback), (
        f"the copy feedback {[text for text, _live in feedback]} is in no live region"
    )


# -- Live tunnels ----------------------------------------------------------------------------


def test_a_tunnel_coming_up_is_announced(jumphost, keys, echo, browser):  # noqa: F811
    """A screen-reader user starts ``ssh -N -R`` on their machine and waits on the
    dashboard: the row appears under Live tunnels (and Registered Ports turns UP)
    with no announcement at all -- nothing on the page is a live region -- so they
    must go and re-read the table to find out.  The same when a tunnel drops.
    (app.js ``refresh``: when the set of live ports changes, write a short message
    such as "Tunnel on port N is up" / "... ended" into a polite live region; not
    the whole table, whose counters change on every refresh.)"""
    started(jumphost, ("alice", [keys["alice"]]))
    port = jumphost.port_min + 5
    log_in(browser, jumphost, "alice")
    refreshed(browser)
    browser.execute_script(RECORD_ANNOUNCEMENTS)
    jumphost.forward(keys["alice"], port, echo.port)
    wait(browser, 8).until(lambda d: not absent(d, f"#tunnels-table tr[data-port='{port}']"))
    refreshed(browser)
    said = [
        text for text, whole_table in announced(browser) if str(port) in text and not whole_table
    ]
    assert said, (
        f"the tunnel on port {port} came up without an announcement; "
        f"live regions said {announced(browser)}"
    )


def test_the_live_refresh_does_not_refocus_on_every_update(jumphost, keys, echo, browser):  # noqa: F811
    """A keyboard/screen-reader user sits on a live tunnel's Check button while
    traffic flows.  Every refresh whose counters changed (every 2 s) rebuilds the
    table with innerHTML and calls ``focus()`` on the new row's button: a fresh
    focus event each time, so the screen reader says "Check, button" again and
    again, and in browse mode its reading position is thrown away with the old
    nodes.  (app.js ``refresh``, the ``tunnels.innerHTML = html`` swap and
    ``(again || tunnels).focus()``: update the rows in place -- change the cells'
    text, add/remove only rows that came or went -- so the focused button stays
    the same element and focus is only moved when its row is gone.)"""
    started(jumphost, ("alice", [keys["alice"]]))
    port = jumphost.port_min + 3
    jumphost.forward(keys["alice"], port, echo.port)
    log_in(browser, jumphost, "alice")
    row = f"#tunnels-table tr[data-port='{port}']"
    wait(browser, 8).until(lambda d: not absent(d, row))
    browser.execute_script(
        "document.querySelector(arguments[0] + ' button').focus();"
        "window.nekojumpFocusEvents = 0;"
        "document.addEventListener('focusin', () => window.nekojumpFocusEvents++, true);",
        row,
    )
    payload = b"counted by the refresh"
    assert exchange(MESH_ADDRESS, port, payload) == payload
    counted = f"{len(payload)} B / {len(payload)} B"
    wait(browser, 8).until(
        lambda d: (
            counted
            in d.execute_script("return document.querySelector(arguments[0]).textContent", row)
        ),
        message="the new byte counts under Live tunnels",
    )
    refreshed(browser)
    focus = browser.execute_script(
        "const e = document.activeElement;"
        "return [window.nekojumpFocusEvents,"
        "        e.closest('tr[data-port]') ? e.textContent : e.tagName];"
    )
    assert focus[1] == "Check", f"focus left the Check button: {focus[1]}"
    assert focus[0] == 0, (
        f"focus was moved {focus[0]} time(s) while the user stayed on the Check button"
    )


def test_the_end_of_the_session_is_announced(jumphost, keys, browser):  # noqa: F811
    """The session ends while the dashboard is open (logged out in another tab).
    Sighted users read "session ended — log in again" next to Live tunnels; a
    screen reader says nothing (``#tunnels-updated`` is no live region), so the
    user goes on trusting a table that no longer updates.  The same for "offline —
    retrying".  (app.js, the 401 and offline branches: put those messages in a
    polite live region -- but not the "updated 12:00:01" line, which would then be
    read out every two seconds.)"""
    started(jumphost, ("alice", [keys["alice"]]))
    log_in(browser, jumphost, "alice")
    refreshed(browser)
    browser.execute_script(RECORD_ANNOUNCEMENTS)
    browser.delete_cookie("nekojump_session")
    wait(browser, 8).until(
        lambda d: "log in" in find(d, "#live-tunnels-card").text.lower(),
        message="Live tunnels to say the session ended",
    )
    said = [text for text, _whole in announced(browser) if "log in" in text.lower()]
    assert said, f"the end of the session was not announced; live regions said {announced(browser)}"


# -- forms and messages ------------------------------------------------------------------------


def test_a_refused_login_is_tied_to_the_field_that_has_focus(jumphost, browser):  # noqa: F811
    """A wrong password: the page comes back with focus on "Member name" (autofocus)
    and the error in a ``role=alert`` paragraph that is present at load -- which
    screen readers do not reliably read -- and referenced by no field.  The user
    hears "Member name, edit, alice" and nothing about the refusal.  The key and
    port forms do this right (aria-invalid, aria-describedby, focus on the field).
    (login.html: give the error an id, put ``aria-describedby`` and
    ``aria-invalid`` on the field that gets focus -- the password, since the name
    is kept.)"""
    jumphost.add_member("alice", password=PASSWORD)
    jumphost.start()
    browser.get(jumphost.web_url + "login")
    find(browser, "#name").send_keys("alice")
    find(browser, "#password").send_keys("not the password")
    submit(browser, "form[action='/login']")
    error = find(browser, "p.error").text
    assert error
    focused = browser.execute_script(
        """
        const e = document.activeElement;
        const ids = (e.getAttribute('aria-describedby') || '').split(/\\s+/).filter(Boolean);
        return {
          id: e.id,
          description: ids.map(i => (document.getElementById(i) || {}).textContent || '').join(' '),
          in_error: !!e.closest('.error'),
        };
        """
    )
    assert focused["in_error"] or error in focused["description"], (
        f"focus is on #{focused['id']}, described as {focused['description']!r}; "
        f"the error {error!r} is not tied to it"
    )


# -- page structure --------------------------------------------------------------------------


def test_the_sidebar_says_which_page_is_current(full_dashboard):
    """The sidebar marks the page you are on only by a purple background
    (``.nav-link.active``): a screen reader reads "Jumphost Tunnel, link" and
    "Service Directory, link" alike on either page.  (base.html, the nav links:
    add ``aria-current="page"`` next to the ``active`` class.)"""
    jumphost, driver, _port = full_dashboard
    current = {}
    for path, text in [
        ("", "Jumphost Tunnel"),
        ("directory", "Service Directory"),
        ("admin", "All tunnels and keys"),
    ]:
        driver.get(jumphost.web_url + path)
        link = driver.find_element(By.XPATH, f"//nav//a[normalize-space()='{text}']")
        current[text] = link.get_attribute("aria-current")
    assert current == dict.fromkeys(current, "page"), current


def test_data_tables_have_a_name(full_dashboard):
    """Listing the tables of a page (NVDA's T key, VoiceOver's rotor) gives "table,
    4 columns" for each: Registered Ports, Live tunnels, the directory and the four
    admin tables have no caption or ``aria-labelledby``, though each sits under an
    h2 that names it (only the suggested-ports table has a caption).  (dashboard.html
    ``#ports-table``, tunnels.html ``#tunnels-table``, directory.html, admin.html:
    ``aria-labelledby`` pointing at the card's h2, or a ``<caption>``.)"""
    jumphost, driver, _port = full_dashboard
    unnamed = []
    for path in ["", "directory", "admin"]:
        driver.get(jumphost.web_url + path)
        for table in driver.find_elements(By.CSS_SELECTOR, "main table"):
            if table.is_displayed() and not table.accessible_name.strip():
                where = table.get_attribute("id") or table.find_element(
                    By.XPATH, "ancestor::article[1]"
                ).get_attribute("id")
                unnamed.append(f"/{path} {where}")
    assert unnamed == [], f"tables without an accessible name: {unnamed}"


def test_action_columns_have_a_header(full_dashboard):
    """In Registered Ports, Live tunnels and the admin tables the column holding the
    Check / Delete / Remove buttons has an empty ``<th></th>``: moving into it a
    screen reader announces no column, and the header row reads as a blank cell.
    (dashboard.html ``#ports-table``, tunnels.html, admin.html: name the column,
    e.g. ``<th scope="col">Actions</th>``, visually hidden if need be.)"""
    jumphost, driver, _port = full_dashboard
    empty = []
    for path in ["", "admin"]:
        driver.get(jumphost.web_url + path)
        for table in driver.find_elements(By.CSS_SELECTOR, "main table"):
            if not table.is_displayed():
                continue
            headers = table.find_elements(By.CSS_SELECTOR, "th")
            blank = [i for i, th in enumerate(headers) if not th.accessible_name.strip()]
            if blank:
                where = table.get_attribute("id") or table.find_element(
                    By.XPATH, "ancestor::article[1]"
                ).get_attribute("id")
                empty.append(f"/{path} {where} column {blank}")
    assert empty == [], f"header cells with no name: {empty}"


def test_row_buttons_say_which_row_they_act_on(full_dashboard):
    """With two keys and two ports, tabbing through the dashboard a screen reader
    says "Remove Key, button", "Remove Key, button", then "Check, button",
    "Delete, button", "Check, button", "Delete, button": which key or port each
    acts on is only in the row's other cells, and the buttons list shows a column
    of identical names.  (The confirm() dialog names the port only after pressing.)
    (dashboard.html key list and ``#ports-table``, tunnels.html: e.g.
    ``aria-label="Remove key MacBook"``, "Check port 34307", "Delete port 34307";
    likewise admin.html.)"""
    _jumphost, driver, port = full_dashboard
    register_port(driver, port + 1, "a second service")
    repeated = {}
    for where in ["#ssh-key-card .key-list", "#ports-table", "#tunnels-table"]:
        buttons = names(driver, f"{where} button")
        if len(set(buttons)) < len(buttons):
            repeated[where] = buttons
    assert repeated == {}, f"buttons with the same name in one list: {repeated}"


# -- colour ------------------------------------------------------------------------------------

CONTRAST = """
const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
const luminance = ([r, g, b]) => {
  const c = [r, g, b].map(v => v / 255).map(
    v => v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4));
  return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
};
const background = (e) => {
  for (; e; e = e.parentElement) {
    const c = rgb(getComputedStyle(e).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c;
  }
  return [255, 255, 255];
};
return [...document.querySelectorAll(arguments[0])].filter(e => e.offsetParent).map(e => {
  const a = luminance(rgb(getComputedStyle(e).color)), b = luminance(background(e));
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  return [e.textContent.trim().slice(0, 40), Math.round(ratio * 100) / 100];
});
"""


def test_status_badges_and_notices_can_be_read(full_dashboard):
    """The CONFIGURED / UP badges (green #1f8a4c on #e3f5ea, 3.9:1), the DOWN badge
    (#69708a on #f0f1f6, 4.3:1) and the green notice ("Key removed ...", 3.9:1)
    are below the 4.5:1 WCAG 1.4.3 asks of small text -- and the badges are 11 px:
    a member with low vision cannot read whether their tunnel is up.  (app.css
    ``--ok``, ``.badge``: a darker green, e.g. #17663a, and a darker grey for
    plain badges.)"""
    jumphost, driver, port = full_dashboard
    driver.get(jumphost.web_url + "?done=key-removed")  # shows the notice, changes nothing
    assert find(driver, "#key-notice").is_displayed()
    register_port(driver, port + 1, "down")  # a DOWN badge beside the UP one
    driver.get(jumphost.web_url + "?done=key-removed")
    measured = driver.execute_script(CONTRAST, ".badge, .notice")
    shown = {text for text, _ratio in measured}
    assert {"CONFIGURED", "UP", "DOWN"} <= shown, measured
    low = [(text, ratio) for text, ratio in measured if ratio < 4.5]
    assert low == [], f"text below 4.5:1 contrast: {low}"
