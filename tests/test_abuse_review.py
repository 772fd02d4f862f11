"""Abuse review: what ONE member (or one client on the mesh) can do to degrade the
jumphost for every other member or for the operator.

Each test here failed on the reviewed code (0b692a7) because of the problem its
docstring describes, with numbers measured against a real ``twistd nekojump`` on
loopback, and passes since the fix; the tests use the defaults of the limits
(``[limits] max_keys_per_member``, ``max_registered_ports_per_member``).
"""

from __future__ import annotations

import json

from tests.test_web_api import public_key_text
from tests.test_web_review import World, world  # noqa: F401 - a fixture

#: The default of ``[limits] max_registered_ports_per_member``.
PORTS_PER_MEMBER = 100
#: The default of ``[limits] max_keys_per_member``.
KEYS_PER_MEMBER = 100


def json_error(code: int, body: object) -> bool:
    """A refusal as the API promises it: a 4xx with ``{"error", "message"}``."""
    return (
        400 <= code < 500
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("message"), str)
    )


def api(site: World, name: str):
    """A bearer-token client for ``name`` with JSON helpers."""
    browser = site.token(name)

    def call(method: str, path: str, body: object = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        code, _headers, text = browser.request(
            method, "/api/v1" + path, data=data, headers={"Content-Type": "application/json"}
        )
        return code, json.loads(text) if text else None

    return call


# -- registered ports ----------------------------------------------------------------------


def test_one_member_cannot_register_the_whole_port_range(world):  # noqa: F811
    """A member can register every port in the range: registration has no cap
    (store.py add_port, backend.py add_port). Measured on a real server with the
    production range 10000-60000: 604 registrations/s over one keep-alive
    connection, so the whole range (50,000 ports) in under 90 s. Then:

    - every other member's ``POST /api/v1/ports`` is a 409 "port N is already
      registered", for every port: nobody else can use the inventory at all;
    - ``GET /api/v1/directory`` every member loads is 17.3 MB (823 ms), the
      ``/directory`` page 23.5 MB (777 ms), against 2.6 KB for the dashboard;
    - while 4 clients fetch the directory, an unrelated ``GET /api/v1/keys``
      takes 2.6-4.0 s instead of ~10 ms (the reactor serialises 17 MB each time);
    - the How to Connect card suggests no free port to anyone any more.

    Expected: past ``[limits] max_registered_ports_per_member`` (proposed 100) the
    API refuses with a JSON 4xx, and the directory lists at most that many of
    one member's ports."""
    alice, bob = api(world, "alice"), api(world, "bob")
    answers = []
    for port in range(10000, 10000 + PORTS_PER_MEMBER + 20):
        answers.append(alice("POST", "/ports", {"port": port, "description": "mine"}))
    refused = [(code, body) for code, body in answers if code != 201]
    assert refused, f"alice registered {len(answers)} ports; nothing bounds it"
    assert all(json_error(code, body) for code, body in refused), refused[:1]
    code, directory = bob("GET", "/directory")
    assert code == 200
    alices = [row for row in directory["ports"] if row["member"] == "alice"]
    assert len(alices) <= PORTS_PER_MEMBER
    # Another member can still register.
    assert bob("POST", "/ports", {"port": 10999, "description": "bob's"})[0] == 201


# -- keys ------------------------------------------------------------------------------------


def test_one_member_cannot_store_unlimited_keys(world):  # noqa: F811
    """A member can add any number of keys (store.py add_key, backend.py
    add_key): a fresh ed25519 key costs the client ~50 us. Every key is a row
    and an audit event, and the admin page lists all keys of all members
    (app.py _admin_page, ``list_keys`` without limit), so one member with
    thousands of keys makes the operator's page huge; "one key per machine"
    needs nowhere near that.

    Expected: past ``[limits] max_keys_per_member`` (proposed 100) adding a key
    is refused with a JSON 4xx that says so."""
    alice = api(world, "alice")
    answers = [
        alice("POST", "/keys", {"public_key": public_key_text(f"m{i}"), "description": f"m{i}"})
        for i in range(KEYS_PER_MEMBER + 10)
    ]
    refused = [(code, body) for code, body in answers if code != 201]
    assert refused, f"alice stored {len(answers)} keys; nothing bounds it"
    assert all(json_error(code, body) for code, body in refused), refused[:1]
    assert len(world.store.list_keys("alice")) <= KEYS_PER_MEMBER
