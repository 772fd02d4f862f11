"""Review of the last three commits (refusal logging, dashboard notices, kex
guesses and no-common-algorithm logging, closing parked listeners at once).

Each test failed on the reviewed code (351316b) and passes since the fix.
All in memory: no sockets, no processes.
"""

from __future__ import annotations

from twisted.logger import formatEvent

from tests.test_transport_crypto import Client, _world, closed, connect
from tests.test_web_api import public_key_text, registry, site  # noqa: F401
from tests.test_web_pages import alice_session, fetch  # noqa: F401


def _no_common_lines(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if "in common with" in (e.get("log_format") or "")]


# -- b51f35d: the dashboard's notices ---------------------------------------------------


def test_removing_the_last_port_after_removing_the_keys_still_says_it_worked(alice_session):  # noqa: F811
    """The template keeps the Registered Ports card while a member has ports after
    Remove Key ("this card is where they are deleted").  Deleting the last one
    redirects to ``/?done=port-removed``, whose notice goes only into that card, which
    is no longer drawn (no key, no port): the member gets no word that it worked."""
    store, treq, cookie, csrf = alice_session
    fetch(treq, "POST", "/keys", cookie, {"csrf": csrf, "public_key": public_key_text()})
    fetch(treq, "POST", "/ports", cookie, {"csrf": csrf, "port": "10080", "description": "wiki"})
    (key,) = store.list_keys("alice")
    fetch(treq, "POST", "/keys/remove", cookie, {"csrf": csrf, "fingerprint": key.fingerprint})
    _code, _headers, body = fetch(treq, "GET", "/", cookie)
    assert 'id="ports-card"' in body  # the port is still listed, to be deleted here

    code, headers, _ = fetch(treq, "POST", "/ports/remove", cookie, {"csrf": csrf, "port": "10080"})
    assert code == 303 and store.list_ports("alice") == []
    location = headers[b"Location"][0].decode()
    _code, _headers, body = fetch(treq, "GET", location.split("#")[0], cookie)
    assert "Registration removed." in body


# -- 351316b: "no {what} in common" ------------------------------------------------------


def test_no_common_compression_is_not_logged_as_no_common_mac(tmp_path, logged):
    """``_no_common_algorithm`` clamps the index of the missing part to 5, so a
    client with no compression in common (nekojump offers only "none") is logged
    as "no MAC in common ... it offers " with an empty list: the operator is sent
    after MACs the client was never refused for."""
    store, factory = _world(tmp_path)
    try:
        client = Client()
        client.supportedCompressions = [b"zlib@openssh.com"]
        _client, server, _pump = connect(factory, client)
        assert closed(server)
        (line,) = _no_common_lines(logged)
        assert "no MAC in common" not in line, line
        assert "zlib@openssh.com" in line, line
    finally:
        store.close()


def test_a_chacha20_client_refused_for_want_of_a_mac_is_told_the_setting(tmp_path, logged):
    """Debian 12's dbclient offers chacha20-poly1305 and aes*-ctr with hmac-sha1 and
    hmac-sha2-256 (no ETM).  With ``compat_ctr_ciphers = true`` (the setting the docs
    give "for clients without AES-GCM") the cipher matches (aes128-ctr) and the MAC
    does not; the log says "no MAC in common" and omits the hint
    ``chacha20_poly1305 = true``, the one setting that serves this client."""
    store, factory = _world(tmp_path, compat_ctr_ciphers=True)
    try:
        client = Client()
        client.supportedCiphers = [b"chacha20-poly1305@openssh.com", b"aes128-ctr", b"aes256-ctr"]
        client.supportedMACs = [b"hmac-sha1", b"hmac-sha2-256"]
        _client, server, _pump = connect(factory, client)
        assert closed(server)
        (line,) = _no_common_lines(logged)
        assert "chacha20_poly1305 = true" in line, line
    finally:
        store.close()
