"""The JSON API in memory: real routes, real SQLite, no sockets (treq's StubTreq)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from attrs import define
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from treq.testing import StubTreq
from twisted.conch.ssh.keys import Key
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from nekojump.config import parse_config
from nekojump.model import Identity
from nekojump.policy import Holder
from nekojump.ssh.registry import ActiveForward, TunnelRegistry
from nekojump.store import ImmediateStore, SQLiteStore
from nekojump.web.app import Dashboard
from nekojump.web.auth import LoginThrottle
from nekojump.web.backend import Backend
from nekojump.web.openapi import openapi_document

BASE = "http://jump.test/api/v1"


def public_key_text(comment: str = "me@laptop") -> str:
    private = ed25519.Ed25519PrivateKey.generate()
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + f" {comment}"
    )


def private_key_text() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        .decode()
    )


class Client:
    """Synchronous requests against the in-memory site."""

    def __init__(self, treq: StubTreq, headers: dict[str, str]):
        self.treq = treq
        self.headers = headers

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {**self.headers, **(headers or {})}
        results: list[Any] = []
        self.treq.request(method, BASE + path, data=data, headers=all_headers).addBoth(
            results.append
        )
        self.treq.flush()
        (response,) = results
        if not hasattr(response, "code"):
            response.raiseException()
        contents: list[bytes] = []
        response.content().addBoth(contents.append)
        self.treq.flush()
        text = contents[0]
        return response.code, json.loads(text) if text else None

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("DELETE", path, **kw)


def in_memory_resource(
    store: SQLiteStore, config_document: dict[str, Any], registry: TunnelRegistry | None = None
) -> Resource:
    """The whole web app over ``store``, as one resource."""
    backend = Backend(
        config=parse_config(config_document),
        store=ImmediateStore(store),
        registry=registry if registry is not None else TunnelRegistry(),
        host_key=Key(ed25519.Ed25519PrivateKey.generate()),
        throttle=LoginThrottle(clock=Clock().seconds),
    )
    return Dashboard(backend).resource()


def in_memory_site(
    store: SQLiteStore, config_document: dict[str, Any], registry: TunnelRegistry | None = None
) -> StubTreq:
    """The whole web app over ``store``, reachable through treq without sockets
    (one client: it keeps the cookies it is given)."""
    return StubTreq(in_memory_resource(store, config_document, registry))


@define
class FakeTunnel:
    """What the registry needs of an SSH connection holding a forward."""

    identity: Identity
    source: str = "127.0.0.1"

    @property
    def holder(self) -> Holder:
        return Holder(self.identity.key_id, self.identity.member_id, 1)


def hold_port(registry: TunnelRegistry, store: SQLiteStore, member: str, port: int) -> None:
    """Put a live forward of ``member``'s on ``port`` into the registry."""
    found = store.get_member(member)
    assert found is not None
    identity = Identity(found.id, member, 1, "SHA256:x", f"{member}'s laptop")
    registry.add_forward(
        ActiveForward(
            port=port,
            requested_host="localhost",
            bind_address="127.0.0.2",
            avatar=FakeTunnel(identity),  # type: ignore[arg-type]
            since=0.0,
        )
    )


@pytest.fixture
def registry() -> TunnelRegistry:
    return TunnelRegistry()


@pytest.fixture
def site(tmp_path, registry):
    store = SQLiteStore.open(tmp_path)
    treq = in_memory_site(
        store,
        {"forwarding": {"port_min": 10000, "port_max": 10999, "reserved_ports": [10022]}},
        registry,
    )
    store.add_member("alice")
    store.add_member("bob")
    store.add_member("root", is_admin=True)

    def client(name: str | None, via: str = "token") -> Client:
        if name is None:
            return Client(treq, {})
        if via == "token":
            _id, token = store.create_token(name)
            return Client(treq, {"Authorization": f"Bearer {token}"})
        cookie, csrf = store.create_session(name, 3600)
        return Client(treq, {"Cookie": f"nekojump_session={cookie}"}), csrf

    yield store, client
    store.close()


def test_keys_round_trip(site):
    _store, client = site
    alice = client("alice")
    text = public_key_text()
    code, created = alice.post("/keys", {"public_key": text, "description": "pi"})
    assert code == 201
    assert created["fingerprint"].startswith("SHA256:")
    assert created["description"] == "pi"
    code, listing = alice.get("/keys")
    assert code == 200
    assert [k["fingerprint"] for k in listing["keys"]] == [created["fingerprint"]]
    # Fingerprints contain "/" and "+": the path takes them URL-encoded.
    encoded = created["fingerprint"].replace("/", "%2F").replace("+", "%2B")
    code, removed = alice.delete(f"/keys/{encoded}")
    assert code == 200, removed
    assert alice.get("/keys")[1]["keys"] == []


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        (private_key_text(), "key-is-private", "paste the .pub file"),
        ("not a key", "key-malformed", "does not look like"),
        ("", "key-empty", "paste your public key"),
    ],
)
def test_key_validation_errors_are_json_400(site, text, code, words):
    _store, client = site
    status, body = client("alice").post("/keys", {"public_key": text})
    assert status == 400
    assert body["error"] == code
    assert words in body["message"]


def test_duplicate_key_is_409_even_across_members(site):
    _store, client = site
    text = public_key_text()
    assert client("alice").post("/keys", {"public_key": text})[0] == 201
    status, body = client("bob").post("/keys", {"public_key": text})
    assert (status, body["error"]) == (409, "key-exists")


def test_members_cannot_touch_each_others_keys_or_ports(site):
    _store, client = site
    alice, bob = client("alice"), client("bob")
    fingerprint = alice.post("/keys", {"public_key": public_key_text()})[1]["fingerprint"]
    alice.post("/ports", {"port": 10080, "description": "web"})
    assert bob.get("/keys")[1]["keys"] == []
    assert bob.get("/ports")[1]["ports"] == []
    assert bob.get("/keys?member=alice")[0] == 403
    assert bob.delete(f"/keys/{fingerprint}")[0] == 404
    assert bob.delete("/ports/10080")[0] == 404
    assert len(alice.get("/keys")[1]["keys"]) == 1
    # ... but the directory shows everyone's registered services.
    assert [p["port"] for p in bob.get("/directory")[1]["ports"]] == [10080]


def test_admins_can_see_and_remove_other_members_keys(site):
    _store, client = site
    alice, root = client("alice"), client("root")
    fingerprint = alice.post("/keys", {"public_key": public_key_text()})[1]["fingerprint"]
    assert [k["member"] for k in root.get("/keys?member=alice")[1]["keys"]] == ["alice"]
    assert len(root.get("/keys?member=*")[1]["keys"]) == 1
    assert root.delete(f"/keys/{fingerprint}")[0] == 200
    assert alice.get("/keys")[1]["keys"] == []


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"port": 80}, 400, "port-out-of-range"),
        ({"port": 10022}, 400, "port-reserved"),
        ({"port": "10080"}, 400, "bad-request"),
        ({"port": 10080, "description": "x" * 201}, 400, "description-too-long"),
    ],
)
def test_port_registration_errors(site, body, status, error):
    _store, client = site
    code, answer = client("alice").post("/ports", body)
    assert (code, answer["error"]) == (status, error)


def test_a_port_registered_by_someone_cannot_be_registered_again(site):
    _store, client = site
    assert client("alice").post("/ports", {"port": 10080})[0] == 201
    code, body = client("bob").post("/ports", {"port": 10080})
    assert (code, body["error"]) == (409, "port-registered")


def test_unauthenticated_requests_get_401_json(site):
    _store, client = site
    anonymous = client(None)
    for path in ["/keys", "/ports", "/tunnels", "/connect", "/directory"]:
        code, body = anonymous.get(path)
        assert code == 401, path
        assert body["error"] == "unauthenticated"


def test_revoked_and_bogus_tokens_are_refused(site):
    store, client = site
    token_id, token = store.create_token("alice")
    alice = Client(client(None).treq, {"Authorization": f"Bearer {token}"})
    assert alice.get("/keys")[0] == 200
    assert store.revoke_token(token_id)
    assert alice.get("/keys")[0] == 401
    bogus = Client(client(None).treq, {"Authorization": "Bearer nkj_bogus"})
    assert bogus.get("/keys")[0] == 401


def test_disabled_members_tokens_stop_working(site):
    store, client = site
    alice = client("alice")
    store.set_member_active("alice", False)
    assert alice.get("/keys")[0] == 401


def test_browser_sessions_need_the_csrf_header_to_change_things(site):
    _store, client = site
    session, csrf = client("alice", via="session")
    assert session.get("/keys")[0] == 200  # reading needs no token
    code, body = session.post("/keys", {"public_key": public_key_text()})
    assert (code, body["error"]) == (403, "csrf")
    code, _ = session.post(
        "/keys", {"public_key": public_key_text()}, headers={"X-CSRF-Token": "wrong"}
    )
    assert code == 403
    code, _ = session.post(
        "/keys", {"public_key": public_key_text()}, headers={"X-CSRF-Token": csrf}
    )
    assert code == 201


def test_connect_info_is_filled_in(site):
    _store, client = site
    alice = client("alice")
    alice.post("/ports", {"port": 10443, "description": "https"})
    code, info = alice.get("/connect")
    assert code == 200
    assert info["ssh"] == (
        "ssh -N -p 2222 -R 10443:localhost:8000 -i ~/.ssh/nekotopia_jump tunnel@localhost"
    )
    assert "autossh -M 0" in info["autossh"]
    assert "ExecStart=/usr/bin/autossh" in info["systemd_unit"]
    assert info["known_hosts"].startswith("[localhost]:2222 ssh-ed25519 AAAA")
    assert info["host_key_fingerprint"].startswith("SHA256:")


def test_bad_json_is_a_400(site):
    _store, client = site
    alice = client("alice")
    results: list[Any] = []
    alice.treq.request("POST", BASE + "/keys", data=b"{nope", headers=alice.headers).addBoth(
        results.append
    )
    alice.treq.flush()
    assert results[0].code == 400


def test_openapi_document_matches_the_routes(site):
    """Every documented path answers (not 404), and every API route is documented."""
    _store, client = site
    code, document = client(None).get("/openapi.json")
    assert code == 200
    assert document == json.loads(json.dumps(openapi_document()))
    assert document["openapi"].startswith("3.")
    alice = client("alice")
    for path, operations in document["paths"].items():
        concrete = path.replace("{fingerprint}", "SHA256:x").replace("{port}", "10080")
        for method in operations:
            status, body = alice.request(
                method.upper(), concrete, body={} if method == "post" else None
            )
            assert status != 404 or body["error"] in ("no-such-key", "no-such-port"), (
                method,
                path,
                body,
            )
    from nekojump.web.api import Api

    routed = {rule.rule for rule in Api.app.url_map.iter_rules()}
    documented = {"/" + p.lstrip("/") for p in document["paths"]}
    normalised = {
        r.replace("<path:fingerprint>", "{fingerprint}").replace("<int:port>", "{port}")
        for r in routed
        if r not in ("/", "/<path:__rest__>")
    }
    assert normalised == documented


def test_openapi_document_is_valid(site):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document())


def test_token_use_is_audited_once_an_hour(site):
    store, client = site
    alice = client("alice")
    for _ in range(3):
        assert alice.get("/keys")[0] == 200
    used = [e for e in store.audit_events(100, member="alice") if e["event"] == "token-used"]
    assert len(used) == 1


def test_a_port_another_member_holds_is_not_shown_as_the_registrants_service(site, registry):
    """Bob forwarding alice's registered port must not make alice's entry look live."""
    store, client = site
    alice, bob = client("alice"), client("bob")
    alice.post("/ports", {"port": 10191, "description": "alice wiki"})
    alice.post("/ports", {"port": 10192, "description": "alice chat"})
    bob.post("/ports", {"port": 10193, "description": "bob's own"})
    hold_port(registry, store, "bob", 10191)
    hold_port(registry, store, "alice", 10192)
    hold_port(registry, store, "bob", 10193)
    _code, body = bob.get("/directory")
    states = {p["port"]: (p["live"], p["state"]) for p in body["ports"]}
    assert states == {
        10191: (False, "held-by-other"),
        10192: (True, "up"),
        10193: (True, "up"),
    }
    _code, body = alice.get("/ports")
    assert [(p["port"], p["state"]) for p in body["ports"]] == [
        (10191, "held-by-other"),
        (10192, "up"),
    ]


def post_to(url: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST with the standard library's HTTP client; ``body`` may be an iterable (chunked)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        chunked = not isinstance(body, bytes)
        connection.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_running_server_refuses_bodies_over_64_kib_with_413(jumphost):
    """A body over the limit is refused from its Content-Length, or while a chunked
    one arrives, before it is buffered; ordinary requests still work."""
    url = jumphost.start().web_url
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, text = post_to(url, "/login", b"name=a&password=" + b"x" * 70_000, form)
    assert (status, text) == (413, b"the request body is too large: the limit is 64 KiB\n")
    chunks = (b"[" + b" " * 8190 + b"]" for _ in range(16))  # 128 KiB, length unknown
    status, text = post_to(url, "/api/v1/keys", chunks, {"Content-Type": "application/json"})
    assert status == 413
    assert json.loads(text)["error"] == "body-too-large"
    # A pasted RSA 16384-bit key with a description is about 3 KiB: read as usual.
    status, text = post_to(url, "/login", b"name=alice&password=" + b"x" * 9_000, form)
    assert status == 401 and b"wrong member name or password" in text


def closed_by_peer(client: socket.socket, seconds: float = 5.0) -> bool:
    """True once writing to ``client`` fails: the server closed its socket (a
    server that only half-closed keeps taking the bytes)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.sendall(b"x" * 1024)
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_a_connection_refused_with_413_is_closed_once_its_body_is_in(jumphost):
    """Twisted stops a request's idle timeout once its body has arrived: a refused
    request must close its connection itself, or each one holds a socket forever."""
    parts = urlsplit(jumphost.start().web_url)
    body = b"x" * 70_000
    for path in (b"/login", b"/api/v1/keys"):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as client:
            client.sendall(
                b"POST " + path + b" HTTP/1.1\r\nHost: jump.test\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 413 ")
            assert closed_by_peer(client), path


def raw_request(
    client: Client, method: str, path: str, data: bytes | None, headers: dict[Any, Any]
) -> tuple[int, Any, Any]:
    """(status, JSON body, response) for a request with exactly these bytes and headers."""
    results: list[Any] = []
    client.treq.request(method, BASE + path, data=data, headers=headers).addBoth(results.append)
    client.treq.flush()
    (response,) = results
    if not hasattr(response, "code"):
        response.raiseException()
    contents: list[bytes] = []
    response.content().addBoth(contents.append)
    client.treq.flush()
    return response.code, json.loads(contents[0]), response


def test_json_nested_just_under_the_parsers_limit_is_a_400_too(site):
    """json.loads takes ~990 levels; checking what it parsed must not recurse past it."""
    _store, client = site
    alice = client("alice")
    for depth in range(900, 1000, 3):
        deep = b'{"a":' * depth + b"1" + b"}" * depth
        status, body, _ = raw_request(alice, "POST", "/keys", deep, alice.headers)
        assert (status, body["error"]) == (400, "bad-json"), depth


def test_deeply_nested_json_is_a_400_not_a_crash(site):
    _store, client = site
    alice = client("alice")
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body, _ = raw_request(alice, "POST", "/keys", deep, alice.headers)
    assert (status, body["error"]) == (400, "bad-json")
    assert "nested too deeply" in body["message"]


def test_text_that_is_not_unicode_is_a_400_and_nothing_is_stored(site):
    """JSON's "\\ud800" escape is a lone surrogate, which no UTF-8 store can hold."""
    store, client = site
    alice = client("alice")
    status, body = alice.post("/ports", {"port": 10111, "description": "wiki \ud800"})
    assert (status, body["error"]) == (400, "bad-text")
    status, body = alice.post(
        "/keys", {"public_key": public_key_text("me@\udc80laptop"), "description": ""}
    )
    assert (status, body["error"]) == (400, "bad-text")
    assert store.list_ports("alice") == [] and store.list_keys("alice") == []


def test_a_csrf_token_with_non_ascii_characters_is_a_403(site):
    _store, client = site
    browser, _csrf = client("alice", via="session")
    status, body, _ = raw_request(
        browser,
        "POST",
        "/ports",
        b'{"port": 10099}',
        {**browser.headers, b"X-CSRF-Token": "é".encode()},
    )
    assert (status, body["error"]) == (403, "csrf")


def test_unknown_api_paths_are_404_and_wrong_methods_405(site):
    _store, client = site
    alice = client("alice")
    status, body = alice.get("/no-such-thing")
    assert (status, body["error"]) == (404, "not-found")
    status, body, response = raw_request(alice, "PUT", "/keys", b"{}", alice.headers)
    assert (status, body["error"]) == (405, "method-not-allowed")
    assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD, POST"]
    status, body = alice.delete("/tunnels")
    assert (status, body["error"]) == (405, "method-not-allowed")


def test_a_long_key_comment_becomes_a_description_of_at_most_100_characters(site):
    """An empty description falls back to the key's comment, cut like a typed one."""
    store, client = site
    alice = client("alice")
    status, body = alice.post("/keys", {"public_key": public_key_text("A" * 20_000)})
    assert status == 201
    assert body["description"] == "A" * 100
    assert store.list_keys("alice")[0].description == "A" * 100
    status, body = alice.post("/keys", {"public_key": public_key_text(), "description": "B" * 101})
    assert (status, body["error"]) == (400, "description-too-long")


def test_admins_can_remove_any_members_registered_port(site):
    store, client = site
    bob, root, alice = client("bob"), client("root"), client("alice")
    for port in (10081, 10082, 10083):
        assert bob.post("/ports", {"port": port})[0] == 201
    status, body = root.delete("/ports/10081?member=bob")
    assert (status, body["removed"]["member"]) == (200, "bob")
    status, body = root.delete("/ports/10082?member=*")
    assert (status, body["removed"]["port"]) == (200, 10082)
    status, body = root.delete("/ports/10083?member=alice")
    assert (status, body["error"]) == (404, "no-such-port")
    # Members still only forget their own.
    status, body = alice.delete("/ports/10083?member=bob")
    assert (status, body["error"]) == (403, "forbidden")
    status, body = alice.delete("/ports/10083")
    assert (status, body["error"]) == (404, "no-such-port")
    assert [p.port for p in store.list_ports("bob")] == [10083]
    removals = [e for e in store.audit_events(100) if e["event"] == "port-unregistered"]
    assert {(e["member"], e["actor"], e["detail"]["port"]) for e in removals} == {
        ("bob", "root", 10081),
        ("bob", "root", 10082),
    }
