"""The seed's dashboard flow in a real headless Chromium against a real nekojump.

Log in, paste a private key by mistake, paste the public key, register a port,
watch ``ssh -N -R`` appear under Live tunnels without a reload, remove the key
and see the tunnel die.  Screenshots (desktop and phone) go to ``tmp_path`` and,
when ``NEKOJUMP_SCREENSHOTS`` names a directory, are copied there for a human.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import (
    MESH_ADDRESS,
    Jumphost,
    can_connect,
    exchange,
    exited_within,
    fingerprint,
    wait_for,
)

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pytest.skip("selenium is not installed", allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
for _needed in (CHROMIUM, CHROMEDRIVER):
    if not _needed.exists():
        pytest.skip(f"{_needed} is not installed", allow_module_level=True)

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
DESKTOP = (1280, 900)
PHONE = (390, 844)


# -- the browser ---------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile; always quits, even when the test fails."""
    yield from chromium(tmp_path)


def chromium(tmp_path: Path, *flags: str) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile and ``flags``, quit when done."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *flags,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException:  # a slow first start on a busy machine: one more try
        driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, timeout: float = 5.0) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def find(driver: WebDriver, css: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, css)


def absent(driver: WebDriver, css: str) -> bool:
    return not driver.find_elements(By.CSS_SELECTOR, css)


def mark_page(driver: WebDriver) -> None:
    """Tag the current document, so ``wait_for_next_page`` can tell when it is replaced."""
    driver.execute_script("window.nekojumpOldPage = true")


def wait_for_next_page(driver: WebDriver, timeout: float = 10) -> None:
    """Wait until the page marked by ``mark_page`` is replaced and the new one loaded.

    Asks the page's own script rather than chromedriver about an element of
    the old page: mid-navigation chromedriver sometimes answers "Node with
    given id does not belong to the document" instead of "stale element"."""
    WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=(WebDriverException,)
    ).until(
        lambda d: d.execute_script(
            "return !window.nekojumpOldPage && document.readyState === 'complete'"
        )
    )


def submit(driver: WebDriver, form_css: str) -> None:
    """Click the form's submit button and wait for the page it leads to."""
    mark_page(driver)
    try:
        find(driver, f"{form_css} button[type=submit]").click()
    except WebDriverException:
        # Under heavy load, and after CDP screenshots, chromedriver sometimes
        # loses the node it just found ("does not belong to the document",
        # "unhandled inspector error"); click it from the page's own script,
        # which needs no node id from chromedriver.
        try:
            still_here = driver.execute_script("return window.nekojumpOldPage === true")
        except WebDriverException:
            still_here = False  # the click went through: the page is navigating
        if still_here:
            driver.execute_script(
                "document.querySelector(arguments[0]).click()", f"{form_css} button[type=submit]"
            )
    wait_for_next_page(driver)


def log_in(driver: WebDriver, jumphost: Jumphost, name: str) -> None:
    """Visit the dashboard anonymously, get sent to /login, log in, land on the dashboard."""
    driver.get(jumphost.web_url)
    wait(driver).until(expected_conditions.url_contains("/login"))
    find(driver, "#name").send_keys(name)
    find(driver, "#password").send_keys(PASSWORD)
    submit(driver, "form[action='/login']")
    assert driver.current_url.rstrip("/") == jumphost.web_url.rstrip("/")


def badge(driver: WebDriver) -> str:
    return find(driver, "#ssh-key-card .card-header .badge").text


def navigation_redirect_end(driver: WebDriver) -> float:
    """Wall-clock time (seconds) the last redirect response of this page's load arrived."""
    timing = driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {origin: performance.timeOrigin, count: n.redirectCount, end: n.redirectEnd};"
    )
    assert timing["count"] == 1, f"expected POST → redirect → GET, got {timing}"
    assert timing["end"] > 0, timing
    return (timing["origin"] + timing["end"]) / 1000.0


def emulate(driver: WebDriver, size: tuple[int, int]) -> None:
    """A viewport of ``size`` CSS px; phone widths get mobile emulation (meta viewport on)."""
    width, height = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    wait(driver).until(lambda d: d.execute_script("return window.innerWidth") == width)


def screenshot(driver: WebDriver, directory: Path, name: str, size: tuple[int, int]) -> Path:
    """A full-page PNG at viewport ``size``, also copied to $NEKOJUMP_SCREENSHOTS if set."""
    emulate(driver, size)
    width = size[0]
    # From the top, so the sticky sidebar is drawn where a visitor first sees it.
    driver.execute_script("window.scrollTo(0, 0)")
    full_height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": full_height, "scale": 1},
        },
    )
    path = directory / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if target := os.environ.get("NEKOJUMP_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    return path


def after_screenshots(driver: WebDriver, url: str) -> None:
    """Back to the normal viewport on a freshly loaded page.

    Full-page CDP screenshots can leave chromedriver holding node ids that no
    longer belong to the document ("Node with given id does not belong to the
    document" on the next click), so the page is loaded again (a GET, never a
    re-posted form).
    """
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.get(url)
    wait(driver, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")


def horizontal_overflow(driver: WebDriver) -> dict[str, object] | None:
    """None if the page fits its viewport's width, else the widths and the widest culprits."""
    return driver.execute_script(
        """
        const width = window.innerWidth;
        const scroll = document.documentElement.scrollWidth;
        if (scroll <= width) return null;
        const wide = [...document.querySelectorAll('body *')]
          .filter(e => e.getBoundingClientRect().right > width + 0.5)
          .slice(0, 5)
          .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
                    (e.className && typeof e.className === 'string'
                       ? '.' + e.className.trim().split(/\\s+/).join('.') : '') +
                    ' right=' + Math.round(e.getBoundingClientRect().right));
        return {innerWidth: width, scrollWidth: scroll, culprits: wide};
        """
    )


def wrapped_copy_buttons(driver: WebDriver) -> list[str]:
    """Copy buttons whose one-word label is broken over several lines (squeezed flat)."""
    return driver.execute_script(
        """
        return [...document.querySelectorAll('button.copy')].filter(button => {
          const range = document.createRange();
          range.selectNodeContents(button);
          return range.getClientRects().length > 1;
        }).map(button => button.dataset.copy + ' ' +
               Math.round(button.getBoundingClientRect().width) + 'x' +
               Math.round(button.getBoundingClientRect().height));
        """
    )


def browser_errors(driver: WebDriver) -> list[str]:
    """SEVERE console entries (CSP violations, script errors), minus expected ones."""
    expected = ("favicon.ico", "status of 400")  # the refused-key page is a 400 on purpose
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not any(word in entry["message"] for word in expected)
    ]


# -- the flow ------------------------------------------------------------------------------------


def test_seed_flow_in_a_real_browser(jumphost, keys, echo, browser, tmp_path):
    jumphost.add_member("alice", password=PASSWORD)
    jumphost.start()
    port = jumphost.port_min + 7
    public_key = Path(f"{keys['alice']}.pub").read_text().strip()
    private_key = keys["stranger"].read_text()
    # The base64 body, long lines only: a short tail line could turn up anywhere by chance.
    private_body = [line for line in private_key.splitlines()[1:-1] if len(line) >= 40]
    assert private_body

    # 1. Log in; an anonymous visit to / lands on the login form.
    log_in(browser, jumphost, "alice")
    assert find(browser, "#reverse-tunnel-section h1").text == "Jumphost Tunnel"
    assert badge(browser) == "NOT CONFIGURED"
    assert absent(browser, "#connect-card") and absent(browser, "#ports-card")
    assert "ssh-keygen -t ed25519 -f ~/.ssh/nekotopia_jump" in find(browser, "pre.hint").text

    # 3 (first, as a newcomer would): a pasted PRIVATE key is refused next to the field,
    # not stored, and not echoed back anywhere in the page.
    find(browser, "#public_key").send_keys(private_key)
    find(browser, "#description").send_keys("oops")
    submit(browser, "form.key-form")
    error = find(browser, "#key-error")
    assert "private key" in error.text
    assert error.is_displayed()
    next_to = browser.execute_script(
        "const e = document.getElementById('key-error');"
        "return [e.closest('form').className, e.previousElementSibling.id];"
    )
    assert next_to == ["key-form", "public_key"]
    assert find(browser, "#public_key").get_attribute("value") == ""
    source = browser.page_source
    assert "PRIVATE KEY" not in source
    assert not [line for line in private_body if line in source]
    assert badge(browser) == "NOT CONFIGURED"  # nothing stored
    screenshot(browser, tmp_path, "key-error-desktop", DESKTOP)
    after_screenshots(browser, jumphost.web_url)

    # 2. Paste the public half: CONFIGURED, and the two new cards appear.
    find(browser, "#public_key").send_keys(public_key)
    description = find(browser, "#description")
    description.clear()
    description.send_keys("laptop (browser test)")
    submit(browser, "form.key-form")
    assert badge(browser) == "CONFIGURED"
    assert absent(browser, "#key-error")
    row = find(browser, "#ssh-key-card .key-row")
    assert "laptop (browser test)" in row.text
    assert "ssh-ed25519" in row.text
    assert find(browser, "#ssh-key-card .fingerprint").text == fingerprint(keys["alice"])
    assert find(browser, "#connect-card h2").text == "How to Connect"
    assert find(browser, "#ports-card h2").text == "Registered Ports"
    ssh_command = find(browser, "#cmd-ssh").text
    assert f"-p {jumphost.ssh_port}" in ssh_command and "tunnel@jump.test" in ssh_command

    # 4. Register a port; it is listed, and the connect commands now use it.
    summary = browser.find_element(
        By.XPATH, "//*[@id='ports-card']//details/summary[normalize-space()='+ Register Port']"
    )
    if summary.find_element(By.XPATH, "..").get_attribute("open") is None:
        summary.click()
    find(browser, "#port").send_keys(str(port))
    find(browser, "#port-description").send_keys("Echo (browser test)")
    submit(browser, "form.port-form")
    assert absent(browser, "#port-error")
    registered = find(browser, f"#ports-table tr[data-port='{port}']")
    assert "Echo (browser test)" in registered.text
    assert "DOWN" in registered.text
    assert f"-R {port}:localhost:8000" in find(browser, "#cmd-ssh").text

    # 5. A real ssh -N -R shows up under Live tunnels through the page's own refresh.
    assert find(browser, "#tunnels-empty").is_displayed()
    browser.execute_script("window.nekojumpSamePage = true;")  # gone if the page reloads
    ssh = jumphost.forward(keys["alice"], port, echo.port)
    payload = b"through the tunnel"
    assert exchange(MESH_ADDRESS, port, payload) == payload
    live_row = f"#tunnels-table tr[data-port='{port}']"
    counted = f"{len(payload)} B / {len(payload)} B"  # forward()'s probe carries no bytes
    try:
        wait(browser, 8).until(
            lambda d: not absent(d, live_row) and counted in find(d, live_row).text
        )
    except TimeoutException:
        pytest.fail(
            "the tunnel did not appear under Live tunnels without a reload; the card shows "
            f"{find(browser, '#live-tunnels-card').get_attribute('outerHTML')}\n"
            f"browser console: {browser.get_log('browser')}"
        )
    assert browser.execute_script("return window.nekojumpSamePage === true")
    live = find(browser, live_row).text
    assert f"{MESH_ADDRESS}:{port}" in live
    assert "laptop (browser test)" in live
    assert find(browser, "#tunnels-updated").text.startswith("updated")
    # The Registered Ports card follows along: the port is UP now, still without a reload.
    state = f"#ports-table tr[data-port='{port}'] .port-state"
    wait(browser, 5).until(lambda d: find(d, state).text == "UP")

    # 7. Screenshots of the fullest page, desktop and phone; neither scrolls sideways.
    desktop = screenshot(browser, tmp_path, "dashboard-desktop", DESKTOP)
    assert horizontal_overflow(browser) is None, horizontal_overflow(browser)
    phone = screenshot(browser, tmp_path, "dashboard-phone", PHONE)
    overflow = horizontal_overflow(browser)
    assert overflow is None, f"the phone-size page scrolls sideways: {overflow}"
    assert desktop.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    after_screenshots(browser, jumphost.web_url)

    # 6. Remove Key (accepting its confirm()): ssh ends within 1 s of the response.
    exit_times: list[float] = []
    watcher = threading.Thread(
        target=lambda: (ssh.wait(), exit_times.append(time.time())), daemon=True
    )
    watcher.start()
    remove = find(browser, "form[action='/keys/remove'] button[type=submit]")
    assert remove.text == "Remove Key"
    mark_page(browser)
    remove.click()
    dialog = wait(browser).until(expected_conditions.alert_is_present())
    assert "Remove this key" in dialog.text
    dialog.accept()
    wait_for_next_page(browser)
    responded_at = navigation_redirect_end(browser)
    watcher.join(timeout=max(0.0, responded_at + 1.0 - time.time()))
    assert exit_times, "ssh was still running 1 s after the Remove Key response"
    assert exit_times[0] - responded_at <= 1.0
    assert exited_within(ssh, 0)
    wait_for(lambda: not can_connect(MESH_ADDRESS, port), timeout=2, what="the port to close")
    assert badge(browser) == "NOT CONFIGURED"
    assert absent(browser, "#connect-card")
    # The registered port is still in the directory, so it stays listed here with its Delete.
    assert find(browser, f"#ports-table tr[data-port='{port}'] form[action='/ports/remove']")
    wait(browser, 5).until(
        lambda d: not absent(d, "#tunnels-empty"), message="Live tunnels to empty out"
    )

    # The private key was never stored or logged either.
    leaked = [
        path
        for path in [jumphost.log, *jumphost.data_dir.rglob("*")]
        if path.is_file() and any(line.encode() in path.read_bytes() for line in private_body)
    ]
    assert not leaked, f"private key material found in {leaked}"
    assert browser_errors(browser) == []


def test_phone_layout(jumphost, keys, browser, tmp_path):
    """On a phone: the login page and a configured dashboard fit the screen's width,
    and each Copy button keeps its label on one line."""
    jumphost.add_member("alice", keys["alice"], password=PASSWORD)
    jumphost.start()
    browser.get(jumphost.web_url + "login")
    screenshot(browser, tmp_path, "login-phone", PHONE)
    overflow = horizontal_overflow(browser)
    assert overflow is None, f"the phone-size login page scrolls sideways: {overflow}"
    assert find(browser, "#name").is_displayed() and find(browser, "#password").is_displayed()

    log_in(browser, jumphost, "alice")
    assert badge(browser) == "CONFIGURED"
    overflow = horizontal_overflow(browser)
    assert overflow is None, f"the phone-size dashboard scrolls sideways: {overflow}"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#connect-card button.copy")) == 5
    squeezed = wrapped_copy_buttons(browser)
    assert squeezed == [], f"Copy buttons squeezed to one letter per line: {squeezed}"


def test_an_admin_sent_to_log_in_from_the_admin_page_lands_back_on_it(jumphost, browser):
    added = jumphost.admin(
        "member", "add", "root", "--admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    jumphost.start()
    browser.get(jumphost.web_url + "admin")
    wait(browser).until(expected_conditions.url_contains("/login"))
    find(browser, "#name").send_keys("root")
    find(browser, "#password").send_keys(PASSWORD)
    submit(browser, "form[action='/login']")
    assert browser.current_url == jumphost.web_url + "admin"
    assert find(browser, "h1").text == "All tunnels and keys"


def test_the_admin_page_shows_a_tunnel_coming_up_without_a_reload(jumphost, keys, echo, browser):
    """An admin watching /admin sees alice's tunnel appear in Live tunnels and her
    registered port turn UP, as a member's dashboard does, with no reload."""
    from tests.test_member_review import api, token_for

    added = jumphost.admin(
        "member", "add", "root", "--admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    jumphost.add_member("alice", keys["alice"])
    jumphost.start()
    port = jumphost.port_min + 88
    api(jumphost, token_for(jumphost, "alice"), "/ports", {"port": port, "description": "wiki"})
    log_in(browser, jumphost, "root")
    browser.get(jumphost.web_url + "admin")
    state = f"#admin-ports-table tr[data-port='{port}'] .port-state"
    assert find(browser, state).text == "DOWN"
    mark_page(browser)
    jumphost.forward(keys["alice"], port, echo.port)
    wait(browser, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#admin-tunnels-table tr[data-port='{port}']")
    )
    row = find(browser, f"#admin-tunnels-table tr[data-port='{port}']").text
    assert "alice" in row
    wait(browser, 10).until(lambda d: find(d, state).text == "UP")
    assert browser.execute_script("return window.nekojumpOldPage === true")  # not reloaded


def test_a_login_form_posted_from_a_page_on_another_port_logs_nobody_in(
    jumphost, browser, tmp_path
):
    """Login CSRF in Chromium: a page served from another port of the dashboard's
    own address (where a member's service behind a tunnel lives, the same *site*
    to a browser) auto-submits the login form with its author's name and
    password.  The browser must not come back logged in as them."""
    jumphost.add_member("mallory", password=PASSWORD)
    jumphost.start()
    (tmp_path / "page.html").write_text(
        f'<form id="f" method="post" action="{jumphost.web_url.rstrip("/")}/login">'
        f'<input name="name" value="mallory"><input name="password" value="{PASSWORD}">'
        '</form><script>document.getElementById("f").submit()</script>'
    )
    host = urlsplit(jumphost.web_url).hostname
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    other = ThreadingHTTPServer((host, 0), handler)
    serving = threading.Thread(target=other.serve_forever, daemon=True)
    serving.start()
    try:
        browser.get(f"http://{host}:{other.server_address[1]}/page.html")
        wait(browser).until(expected_conditions.url_contains("/login"))
        wait(browser).until(lambda d: "another site" in find(d, "p.error").text)
        browser.get(jumphost.web_url)
        wait(browser).until(expected_conditions.url_contains("/login"))  # not logged in
        assert not [c for c in browser.get_cookies() if c["name"] == "nekojump_session"]
    finally:
        other.shutdown()
        other.server_close()


def test_logging_in_and_out_over_plain_http_at_a_mesh_name(jumphost, tmp_path):
    """Over plain HTTP at a name that is not localhost (the dashboard on the mesh),
    Chromium sends no Sec-Fetch-Site, so only Origin says where a form came from;
    with the old Referrer-Policy no-referrer it said "null", and the dashboard's
    own login form was refused as foreign.  ``jump.test`` is mapped to the
    loopback address the dashboard listens on."""
    jumphost.add_member("alice", password=PASSWORD)
    jumphost.start()
    parts = urlsplit(jumphost.web_url)
    url = f"http://jump.test:{parts.port}/"
    mapped = f"--host-resolver-rules=MAP jump.test {parts.hostname}"
    driver = next(browser_gen := chromium(tmp_path, mapped))
    try:
        driver.get(url)
        wait(driver).until(expected_conditions.url_contains("/login"))
        find(driver, "#name").send_keys("alice")
        find(driver, "#password").send_keys(PASSWORD)
        submit(driver, "form[action='/login']")
        assert driver.current_url == url, find(driver, "body").text[:300]
        submit(driver, "form[action='/logout']")
        wait(driver).until(expected_conditions.url_contains("/login"))
        driver.get(url)
        wait(driver).until(expected_conditions.url_contains("/login"))  # logged out
    finally:
        browser_gen.close()
