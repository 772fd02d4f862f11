"""Who gets in: the userauth service over a real SQLite store, no sockets.

Requests go in as USERAUTH_REQUEST payloads; what comes out is what a client
would see: PK_OK, FAILURE, SUCCESS or a disconnect.
"""

from __future__ import annotations

import base64
from hashlib import sha256
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.transport import (
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    DISCONNECT_PROTOCOL_ERROR,
)
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from nekojump.config import parse_config
from nekojump.keys import parse_public_key
from nekojump.model import Identity
from nekojump.ssh.auth import (
    MSG_USERAUTH_FAILURE,
    MSG_USERAUTH_PK_OK,
    MSG_USERAUTH_REQUEST,
    MSG_USERAUTH_SUCCESS,
    TunnelKeyChecker,
    TunnelUserAuthServer,
)
from nekojump.ssh.penalty import SourcePenalties
from nekojump.store import ImmediateStore, SQLiteStore

SESSION_ID = b"\x07" * 32
FAILURE = (MSG_USERAUTH_FAILURE, NS(b"publickey") + b"\x00")


class CountingStore(ImmediateStore):
    """Counts the store calls made."""

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(store)
        self.calls = 0

    def call(self, method, *args, **kwargs):
        self.calls += 1
        return super().call(method, *args, **kwargs)


class Transport:
    """What the userauth service uses of an SSH transport; it keeps what is sent."""

    def __init__(self, factory: SimpleNamespace) -> None:
        self.factory = factory
        self.sessionID = SESSION_ID
        self.startup_source = "192.0.2.7"
        self.unanswered_key_queries = 0
        self.authenticated = False
        self.sent: list[tuple[int, bytes]] = []
        self.disconnected: tuple[int, bytes] | None = None
        self.next_service: object = None

    def sendPacket(self, number: int, payload: bytes) -> None:
        assert self.disconnected is None, "sent after the disconnect"
        self.sent.append((number, payload))

    def sendDisconnect(self, reason: int, description: bytes) -> None:
        self.disconnected = (reason, description)

    def authentication_succeeded(self) -> None:
        self.authenticated = True

    def setService(self, service: object) -> None:
        self.next_service = service


class World:
    def __init__(self, tmp_path) -> None:
        self.store = SQLiteStore.open(tmp_path)
        self.config = parse_config({})
        self.counting = CountingStore(self.store)
        self.changes = 0
        self.checker = TunnelKeyChecker(self.counting, "tunnel", changes=lambda: self.changes)
        self.penalties = SourcePenalties(Clock().seconds, 3, 60)
        self.logins: list[Identity] = []
        self.private = Key(ed25519.Ed25519PrivateKey.generate())
        self.store.add_member("alice")
        self.record = self.add_key(self.private.public().toString("OPENSSH").decode())

    def add_key(self, line: str, member: str = "alice"):
        return self.store.add_key(member, parse_public_key(line), "laptop")

    def connection(self) -> tuple[TunnelUserAuthServer, Transport]:
        factory = SimpleNamespace(
            key_checker=self.checker,
            config=self.config,
            penalties=self.penalties,
            make_avatar=self._avatar,
            getService=lambda transport, name: lambda: name,
        )
        service = TunnelUserAuthServer()
        service.transport = Transport(factory)
        service.serviceStarted()
        return service, service.transport

    def _avatar(self, identity: Identity) -> SimpleNamespace:
        self.logins.append(identity)
        return SimpleNamespace(logout=lambda: None)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def message(user: bytes, algorithm: bytes, blob: bytes) -> bytes:
    """What a publickey signature covers (RFC 4252 section 7)."""
    return (
        NS(SESSION_ID)
        + bytes((MSG_USERAUTH_REQUEST,))
        + NS(user)
        + NS(b"ssh-connection")
        + NS(b"publickey")
        + b"\x01"
        + NS(algorithm)
        + NS(blob)
    )


def query(key: Key, user: bytes = b"tunnel", algorithm: bytes = b"ssh-ed25519") -> bytes:
    """Would this key do?"""
    head = NS(user) + NS(b"ssh-connection") + NS(b"publickey") + b"\x00"
    return head + NS(algorithm) + NS(key.public().blob())


def signed(
    private: Key,
    user: bytes = b"tunnel",
    algorithm: bytes = b"ssh-ed25519",
    signature: bytes | None = None,
    signed_over: bytes | None = None,
) -> bytes:
    blob = private.public().blob()
    if signature is None:
        data = message(user, algorithm, blob) if signed_over is None else signed_over
        signature = private.sign(data, signatureType=algorithm)
    head = NS(user) + NS(b"ssh-connection") + NS(b"publickey") + b"\x01"
    return head + NS(algorithm) + NS(blob) + NS(signature)


def test_a_signed_request_with_a_stored_key_logs_in_as_that_key(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent == [(MSG_USERAUTH_SUCCESS, b"")]
    assert transport.authenticated and transport.next_service == b"ssh-connection"
    record = world.record
    assert world.logins == [
        Identity(
            member_id=record.member_id,
            member_name="alice",
            key_id=record.id,
            fingerprint=record.fingerprint,
            key_description="laptop",
        )
    ]


def test_a_query_for_a_stored_key_gets_pk_ok_naming_that_key(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    blob = world.private.public().blob()
    assert transport.sent == [(MSG_USERAUTH_PK_OK, NS(b"ssh-ed25519") + NS(blob))]
    assert world.logins == []


def test_none_lists_publickey_and_is_no_attempt(world):
    service, transport = world.connection()
    none = NS(b"tunnel") + NS(b"ssh-connection") + NS(b"none")
    for _ in range(world.config.ssh.max_auth_tries + 2):
        service.ssh_USERAUTH_REQUEST(none)
    assert transport.disconnected is None
    assert set(transport.sent) == {FAILURE}
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent[-1] == (MSG_USERAUTH_SUCCESS, b"")


@pytest.mark.parametrize(
    "case",
    [
        "wrong user",
        "unknown key",
        "bad signature",
        "signature algorithm differs",
        "algorithm is not the key's",
        "disabled member",
        "garbage blob",
        "bytes after the signature",
        "bytes inside the signature field",
        "truncated",
        "password method",
    ],
)
def test_every_failure_looks_the_same(world, case):
    private = world.private
    if case == "wrong user":
        request = signed(private, user=b"root")
    elif case == "unknown key":
        request = signed(Key(ed25519.Ed25519PrivateKey.generate()))
    elif case == "bad signature":
        request = signed(private, signed_over=b"something else")
    elif case == "signature algorithm differs":
        good = private.sign(message(b"tunnel", b"ssh-ed25519", private.public().blob()))
        request = signed(private, signature=NS(b"ssh-rsa") + good[4 + len(b"ssh-ed25519") :])
    elif case == "algorithm is not the key's":
        request = signed(private, signature=b"", algorithm=b"ecdsa-sha2-nistp256")
    elif case == "disabled member":
        world.store.set_member_active("alice", False)
        request = signed(private)
    elif case == "garbage blob":
        head = NS(b"tunnel") + NS(b"ssh-connection") + NS(b"publickey") + b"\x01"
        request = head + NS(b"ssh-ed25519") + NS(b"\x00\x00\x00\x05junk") + NS(b"sig")
    elif case == "bytes after the signature":
        request = signed(private) + b"\x00"
    elif case == "bytes inside the signature field":
        good = private.sign(message(b"tunnel", b"ssh-ed25519", private.public().blob()))
        request = signed(private, signature=good + b"\x00")
    elif case == "truncated":
        request = signed(private)[:-9]
    else:
        request = NS(b"tunnel") + NS(b"ssh-connection") + NS(b"password") + b"\x00" + NS(b"pw")
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(request)
    assert transport.sent == [FAILURE]
    assert world.logins == [] and not transport.authenticated


def test_a_query_under_another_user_name_learns_nothing(world):
    """Probing which keys exist (for the wrong user) gets no PK_OK."""
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private, user=b"root"))
    assert transport.sent == [FAILURE]


def test_max_auth_tries_failures_end_the_connection(world):
    service, transport = world.connection()
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    for _ in range(world.config.ssh.max_auth_tries + 3):
        service.ssh_USERAUTH_REQUEST(signed(stranger))
    assert transport.sent == [FAILURE] * (world.config.ssh.max_auth_tries - 1)
    assert transport.disconnected == (
        DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
        b"too many bad auths",
    )
    service.ssh_USERAUTH_REQUEST(signed(world.private))  # too late
    assert world.logins == []


def test_failed_signatures_count_against_the_source_and_queries_only_against_the_connection(
    world,
):
    service, transport = world.connection()
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    service.ssh_USERAUTH_REQUEST(query(stranger))
    service.ssh_USERAUTH_REQUEST(query(stranger))
    assert transport.unanswered_key_queries == 2
    assert world.penalties.refusal("192.0.2.7") is None
    for _ in range(3):
        service, transport = world.connection()
        service.ssh_USERAUTH_REQUEST(signed(stranger))
    assert world.penalties.refusal("192.0.2.7") is not None


def test_a_store_that_fails_fails_closed(world):
    world.checker.look_up = lambda fingerprint: fail(OSError("disk I/O error"))
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent == [FAILURE] and world.logins == []


def test_the_signed_request_after_pk_ok_on_the_same_connection_needs_no_second_lookup(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent[-1] == (MSG_USERAUTH_SUCCESS, b"")
    assert world.counting.calls == 1


def test_a_confirmed_key_is_used_once(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    service.ssh_USERAUTH_REQUEST(signed(world.private, signed_over=b"forged"))
    world.store.set_member_active("alice", False)
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent[1:] == [FAILURE, FAILURE]
    assert world.counting.calls == 2


def test_a_confirmed_key_is_not_shared_between_connections(world):
    first, _ = world.connection()
    first.ssh_USERAUTH_REQUEST(query(world.private))
    world.store.set_member_active("alice", False)
    second, transport = world.connection()
    second.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent == [FAILURE]


def test_any_other_request_forgets_the_confirmed_key(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    service.ssh_USERAUTH_REQUEST(query(Key(ed25519.Ed25519PrivateKey.generate())))
    world.store.set_member_active("alice", False)
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent[1:] == [FAILURE, FAILURE]


def test_a_confirmed_key_still_needs_the_right_user(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    service.ssh_USERAUTH_REQUEST(signed(world.private, user=b"root"))
    assert transport.sent[-1] == FAILURE and world.logins == []


def test_a_confirmed_key_is_looked_up_again_after_another_process_changed_the_store(world):
    """OpenSSH asks (PK_OK), then signs: seconds later with an agent that asks or
    a hardware key. A tier the admin CLI changed meanwhile must be the one the
    connection starts with (its first forwards are decided before any re-check)."""
    service, _ = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    world.store.set_member_tier("alice", "pro")
    world.changes += 1  # the revocation watcher saw another process write
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert [identity.tier for identity in world.logins] == ["pro"]
    assert world.counting.calls == 2


def test_a_lookup_in_flight_queues_what_follows_and_logs_in_once(world):
    pending = []

    def slow_lookup(fingerprint):
        d = world.counting.call(world.store.find_key, fingerprint)
        held = Deferred()
        pending.append((d, held))
        return held

    world.checker.look_up = slow_lookup
    service, transport = world.connection()
    for _ in range(3):
        service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent == [] and len(pending) == 1
    d, held = pending.pop()
    d.addBoth(held.callback)
    assert transport.sent == [(MSG_USERAUTH_SUCCESS, b"")]
    assert len(world.logins) == 1 and pending == []


def test_too_many_pipelined_requests_end_the_connection(world):
    world.checker.look_up = lambda fingerprint: Deferred()  # never answers
    service, transport = world.connection()
    for _ in range(service.max_queued + 2):
        service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.disconnected == (
        DISCONNECT_PROTOCOL_ERROR,
        b"too many pipelined auth requests",
    )


# -- other key types ------------------------------------------------------------------


def test_rsa_keys_log_in_with_sha2_signatures_only(world):
    private = Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    world.add_key(private.public().toString("OPENSSH").decode())
    for algorithm, answer in [
        (b"rsa-sha2-512", MSG_USERAUTH_SUCCESS),
        (b"rsa-sha2-256", MSG_USERAUTH_SUCCESS),
        (b"ssh-rsa", MSG_USERAUTH_FAILURE),  # SHA-1
    ]:
        service, transport = world.connection()
        service.ssh_USERAUTH_REQUEST(query(private, algorithm=algorithm))
        assert transport.sent[0][0] == (MSG_USERAUTH_PK_OK if answer == 52 else answer)
        service.ssh_USERAUTH_REQUEST(signed(private, algorithm=algorithm))
        assert transport.sent[-1][0] == answer, algorithm


SK = b"sk-ssh-ed25519@openssh.com"
APPLICATION = b"ssh:"


def security_key(world: World) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    """A FIDO key as ssh-keygen -t ed25519-sk stores it: the authenticator's
    ed25519 key and the application string; stored for alice."""
    private = ed25519.Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes_raw()
    blob = NS(SK) + NS(raw) + NS(APPLICATION)
    world.add_key(f"{SK.decode()} {base64.b64encode(blob).decode()} yubikey")
    return private, blob


def sk_request(private, blob: bytes, flags: int, trailing: bytes = b"") -> bytes:
    counter = (41).to_bytes(4, "big")
    data = message(b"tunnel", SK, blob)
    signed_data = sha256(APPLICATION).digest() + bytes((flags,)) + counter + sha256(data).digest()
    signature = NS(SK) + NS(private.sign(signed_data)) + bytes((flags,)) + counter + trailing
    head = NS(b"tunnel") + NS(b"ssh-connection") + NS(b"publickey") + b"\x01"
    return head + NS(SK) + NS(blob) + NS(signature)


@pytest.mark.parametrize(
    ("flags", "trailing", "logs_in"),
    [
        (0x01, b"", True),  # touched
        (0x05, b"", True),  # touched and verified (PIN)
        (0x00, b"", False),  # signed without a touch: OpenSSH refuses it too
        (0x01, b"\x00", False),  # bytes after the counter
    ],
)
def test_security_keys_log_in_only_when_touched(world, flags, trailing, logs_in):
    private, blob = security_key(world)
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(sk_request(private, blob, flags, trailing))
    assert transport.sent == ([(MSG_USERAUTH_SUCCESS, b"")] if logs_in else [FAILURE])


def test_the_revocation_watcher_counts_changes_made_by_other_processes(tmp_path):
    from nekojump.revocation import RevocationWatcher
    from nekojump.ssh.registry import TunnelRegistry

    server_side = SQLiteStore.open(tmp_path)
    server_side.add_member("alice")
    watcher = RevocationWatcher(ImmediateStore(server_side), TunnelRegistry(), Clock())
    admin_cli = SQLiteStore.open(tmp_path)
    try:

        def check() -> None:
            Deferred.fromCoroutine(watcher.check())

        check()
        check()
        server_side.set_member_tier("alice", "plus")  # the server's own write
        check()
        assert watcher.changes == 1  # the first look
        admin_cli.set_member_tier("alice", "pro")
        check()
        check()
        assert watcher.changes == 2
    finally:
        admin_cli.close()
        server_side.close()
