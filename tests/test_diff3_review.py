"""A review of commit 25d240e ("Fixes from three reviews"): what its new code gets
wrong or left half-done.  Each test failed on 25d240e; its docstring says what a
member or operator does, what happens, and what should happen.

In-memory tests use the ``site`` fixture of tests/test_web_api.py; e2e tests run a
real ``twistd nekojump`` (forwards bind on 127.0.0.74); browser tests one real
headless Chromium (tests/test_dashboard_browser.py).
"""

from __future__ import annotations

import re

import pytest

from tests.test_tabs_review import _follow, _text
from tests.test_web_api import public_key_text, registry, site  # noqa: F401
from tests.test_web_pages import alice_session, fetch  # noqa: F401

MESH = "127.0.0.74"


# -- 1. a key sent twice without a description ------------------------------------------


def test_a_key_form_sent_twice_without_a_description_answers_as_the_save_did(
    alice_session,  # noqa: F811
):
    """Alice pastes ``ssh-ed25519 AAAA... alice@laptop`` (a .pub file has a comment),
    leaves Description empty -- it is optional -- and double-clicks Save Key.  The
    first send stores the key with the *comment* as its description
    (``key_description``); the second is compared by ``_again`` with the empty
    description she sent, so she reads the 400 "you registered this key already,
    as 'alice@laptop'; remove it first to describe it differently" under a form
    marked invalid, though she described nothing and the save worked.  25d240e
    promised "sending the same key twice answers as the save did"; it does only when
    a description was typed.  (Fix: ``Backend.add_key`` compares with
    ``key_description(description, key.comment)``.)"""
    store, treq, cookie, csrf = alice_session
    form = {"csrf": csrf, "public_key": public_key_text("alice@laptop"), "description": ""}
    first = fetch(treq, "POST", "/keys", cookie, form)
    assert first[0] == 303
    code, headers, body = fetch(treq, "POST", "/keys", cookie, form)
    code, page = _follow(treq, cookie, code, headers, body)
    assert len(store.list_keys("alice")) == 1
    assert code == 200 and "Key saved" in page, f"the second send answered {code}: " + ", ".join(
        re.findall(r'role="alert"[^>]*>([^<]+)<', page)
    )


def test_an_api_script_adding_a_key_again_without_a_description_is_not_refused(site):  # noqa: F811
    """A provisioning script runs ``POST /api/v1/keys {"public_key": "... pi@home"}``
    (no description) on every boot, as the README now invites ("Sending a key ...
    you already saved, with the same description, answers as a save did").  The
    second run gets 409 ``key-exists`` "you registered this key already, as
    'pi@home'": the stored description is the key's comment, which the script never
    sent.  It should get the answer the first run got."""
    _store, client = site
    alice = client("alice")
    text = public_key_text("pi@home")
    code, first = alice.post("/keys", {"public_key": text})
    assert code == 201, first
    code, again = alice.post("/keys", {"public_key": text})
    assert code in (200, 201), (code, again)
    assert again.get("fingerprint") == first["fingerprint"]


# -- 2. the server lock names a pid that is gone when twistd daemonizes -------------------


@pytest.mark.e2e
def test_the_server_lock_names_the_running_server_when_twistd_daemonizes(tmp_path):
    """An operator starts ``twistd --pidfile=... --logfile=... nekojump`` (twistd's
    default is to daemonize; the docs speak of "a second ``twistd nekojump``").  The
    data-directory lock is taken in ``makeService``, before twistd forks, so
    ``server.lock`` holds the pid of the process that has exited, and a second
    start says "in use by another nekojump server (pid N)" with an N that does not
    exist: ``kill N`` does nothing, ``ps`` shows nothing, and the operator may
    conclude the lock is stale and remove it while the server runs.  The lock file
    (and so the refusal) should name the pid twistd wrote to its pidfile, the
    process that holds the lock (fix: write the pid in ``startService``, after
    twistd's daemonize, as ``start_server`` does)."""
    import os
    import signal
    import subprocess
    import time

    from nekojump.datalock import LOCK_NAME
    from tests.conftest import Jumphost, tool, wait_for
    from tests.test_failure_review import run_to_the_end

    (tmp_path / "first").mkdir()
    first = Jumphost(tmp_path / "first")
    first.write_config(mesh_address=MESH)
    pidfile = tmp_path / "first" / "twistd.pid"
    logfile = tmp_path / "first" / "daemon.log"
    subprocess.run(
        [
            tool("twistd"),
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "nekojump",
            "--config",
            str(first.config),
        ],
        cwd=tmp_path / "first",
        check=True,
        timeout=30,
    )
    daemon = 0
    try:
        daemon = int(
            wait_for(
                lambda: pidfile.exists() and pidfile.read_text().strip(), what="twistd's pidfile"
            )
        )
        wait_for(
            lambda: logfile.exists() and "SSH on" in logfile.read_text(),
            what="the daemon to listen",
        )
        locked = (first.data_dir / LOCK_NAME).read_text().strip()
        (tmp_path / "second").mkdir()
        second = Jumphost(tmp_path / "second")
        second.data_dir = first.data_dir
        second.write_config(mesh_address=MESH)
        code, output = run_to_the_end(second.config, tmp_path / "second")
    finally:
        if daemon:
            os.kill(daemon, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(daemon, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
    assert code != 0 and "in use" in output, output
    assert locked == str(daemon), (
        f"server.lock says pid {locked}, the running server is pid {daemon} "
        f"(twistd.pid); the second start said: {output.strip().splitlines()[-1]!r}"
    )
    assert f"pid {daemon}" in output, output


# -- 3. logging in while the database cannot be written -----------------------------------


def test_logging_in_while_the_database_cannot_be_written_is_not_a_bare_500(tmp_path, monkeypatch):
    """The disk is full.  25d240e made every dashboard form and API change answer
    "the jumphost could not save this ... nothing was changed", and the operator
    guide now says members "can still log in" -- but the dashboard's own login
    form was left out (``login`` is not a ``form_post``): alice, logged out, types
    her right password and gets ``500 Processing Failed`` (the session cannot be
    stored); with a typo, the same (its ``login-failed`` audit event cannot be
    stored).  No word of what happened, and the traceback is in the log per try.
    She should get the login page back saying the jumphost cannot log anyone in
    right now (the store failed), status 503 -- as ``STORE_FAILED`` says for the
    other forms."""
    from twisted.internet.defer import succeed

    from nekojump.passwords import hash_password
    from nekojump.store import SQLiteStore
    from tests.test_web_api import in_memory_site
    from tests.test_web_pages import post_login_without_waiting

    monkeypatch.setattr(
        "nekojump.web.backend.deferToThread", lambda function, *args: succeed(function(*args))
    )
    store = SQLiteStore.open(tmp_path)
    try:
        store.add_member("alice")
        store.set_password_hash("alice", hash_password("alice's password"))
        treq = in_memory_site(store, {"forwarding": {"port_min": 10000, "port_max": 10999}})
        store._db.execute("PRAGMA query_only = ON")  # every write fails, as on a full disk
        answers = {}
        for password in ("alice's password", "a typo"):
            (response,) = post_login_without_waiting(treq, "alice", password)
            body: list[bytes] = []
            response.content().addBoth(body.append)
            treq.flush()
            answers[password] = (response.code, body[0].decode())
    finally:
        store.close()
    for password, (code, page) in answers.items():
        assert "Processing Failed" not in page and code != 500, (password, code, _text(page)[:200])
        assert 'name="password"' in page, (password, _text(page)[:300])  # the login form again


# -- in a real browser: the key draft app.js keeps in sessionStorage -----------------------

try:
    from tests.conftest import fingerprint  # noqa: F401
    from tests.test_dashboard_browser import PASSWORD, browser, find, log_in, submit, wait
    from tests.test_ui_review import started
except (ImportError, pytest.skip.Exception):  # no selenium or no Chromium
    browser = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(browser is None, reason="selenium or Chromium missing")

#: What a Windows member finds next to their public key: PuTTYgen's private key
#: file (``.ppk``), whose first lines are the public half.
PPK = """PuTTY-User-Key-File-3: ssh-ed25519
Encryption: none
Comment: alice@windows
Public-Lines: 2
AAAAC3NzaC1lZDI1NTE5AAAAIDwE4m0nHBRp9fzzrMOeZq7w3Bz7oWCI0aqg8SmUJoYP
Private-Lines: 1
AAAAIIq0SfJ8bXhUAB7kYx0sZ3oJ0r4ZqTBm1nRfkyFqU5ZJ
Private-MAC: 6c1b2f5c1d0c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f"""


def _log_in_on_login_page(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    find(driver, "#name").send_keys(name)
    find(driver, "#password").send_keys(PASSWORD)
    submit(driver, "form[action='/login']")


@needs_browser
@pytest.mark.e2e
def test_a_private_key_pasted_by_mistake_is_not_put_back_in_the_form(jumphost, browser):
    """Alice, on Windows, pastes her PuTTY ``.ppk`` file (the private key) into
    Public key and clicks Save Key.  The server refuses it and, on purpose, does
    not echo it ("Private key material is never echoed back into the page",
    ``safe_to_echo``).  But app.js stored the text in sessionStorage on submit --
    its only check is ``/PRIVATE KEY/``, and a .ppk says ``PuTTY-User-Key-File`` /
    ``Private-Lines`` -- and, finding the refused form empty, puts it back:
    "Your unsaved key is back in the form.", the private key in the page again.
    The same for an OpenSSH private key whose BEGIN/END lines were not copied.
    app.js should never keep or restore what the server takes for a private key
    (fix: the draft check uses the server's markers -- ``PRIVATE_KEY_MARKERS``,
    ``b3BlbnNzaC1rZXktdjE``, more than one line -- or keeps only a text the
    server would echo, and the draft is not restored over a refusal)."""
    jumphost.write_config(mesh_address=MESH)
    started(jumphost, ("alice", []))
    log_in(browser, jumphost, "alice")
    textarea = find(browser, "#public_key")
    browser.execute_script("arguments[0].value = arguments[1];", textarea, PPK)
    submit(browser, "form.key-form")
    wait(browser).until(lambda d: d.execute_script("return document.readyState") == "complete")
    error = find(browser, "#ssh-key-card").text
    shown = find(browser, "#public_key").get_attribute("value")
    stored = browser.execute_script("return JSON.stringify(sessionStorage)")
    assert "Private-Lines" not in shown and "Private-MAC" not in shown, (
        f"the refused private key is back in the form ({error[:200]!r}): {shown[:120]!r}"
    )
    assert "Private-Lines" not in stored, f"sessionStorage keeps the private key: {stored[:200]}"


@needs_browser
@pytest.mark.e2e
def test_a_key_draft_is_not_given_to_the_next_member_in_the_same_tab(jumphost, keys, browser):
    """On a shared computer alice pastes her public key and clicks Save Key after
    her session ended; the login page says nothing was changed, and she walks away.
    Bob logs in in the same tab -- and his dashboard says "Your unsaved key is back
    in the form." with *alice's* key and description in *his* Add-key form; one
    click on Save Key registers her key on his account (her laptop could then log
    in as bob).  The draft is restored into whichever member's dashboard comes
    next.  It should go back only to the member who typed it (fix: store the
    member's name with the draft and restore it only for them, or clear it on the
    login of another member / on Log out)."""
    jumphost.write_config(mesh_address=MESH)
    started(jumphost, ("alice", []), ("bob", []))
    alices = (keys["alice"].parent / (keys["alice"].name + ".pub")).read_text().strip()
    log_in(browser, jumphost, "alice")
    find(browser, "#public_key").send_keys(alices)
    find(browser, "#description").send_keys("alice-laptop")
    browser.delete_cookie("nekojump_session")  # her session ended
    submit(browser, "form.key-form")
    assert "/login" in browser.current_url
    _log_in_on_login_page(browser, "bob")
    assert "/login" not in browser.current_url, find(browser, "main").text
    shown = find(browser, "#public_key").get_attribute("value")
    assert alices.split()[1] not in shown, (
        "bob's dashboard offers alice's unsaved key: "
        f"{shown[:60]!r}, description {find(browser, '#description').get_attribute('value')!r}"
    )
