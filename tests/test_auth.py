"""Who gets in: the key checker over a real SQLite store, no sockets."""

from __future__ import annotations

import pytest
from attrs import frozen
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.cred.error import UnauthorizedLogin

from nekojump.keys import parse_public_key
from nekojump.model import Identity
from nekojump.ssh.auth import TunnelKeyChecker
from nekojump.store import ImmediateStore, SQLiteStore

MESSAGE = b"session id and request"


@frozen
class Credentials:
    """An ISSHPrivateKey as Conch's userauth builds it."""

    username: bytes
    algName: bytes
    blob: bytes
    sigData: bytes
    signature: bytes | None


@pytest.fixture
def world(tmp_path):
    store = SQLiteStore.open(tmp_path)
    private = Key(ed25519.Ed25519PrivateKey.generate())
    public = parse_public_key(private.public().toString("OPENSSH").decode())
    store.add_member("alice")
    record = store.add_key("alice", public, "laptop")
    checker = TunnelKeyChecker(ImmediateStore(store), "tunnel")
    yield store, private, record, checker
    store.close()


def outcome(checker, credentials):
    """The checker's answer: an Identity, or a Failure (ImmediateStore: no waiting)."""
    results = []
    checker.requestAvatarId(credentials).addBoth(results.append)
    (result,) = results
    return result


def signed(private, user=b"tunnel", alg=b"ssh-ed25519", sign_alg=None):
    signature = private.sign(MESSAGE)
    if sign_alg is not None:  # lie about the algorithm inside the signature
        _, rest = signature[4 : 4 + len(b"ssh-ed25519")], signature[4 + len(b"ssh-ed25519") :]
        signature = NS(sign_alg) + rest
    return Credentials(user, alg, private.public().blob(), MESSAGE, signature)


def test_signed_request_with_a_stored_key_logs_in_as_that_key(world):
    _store, private, record, checker = world
    identity = outcome(checker, signed(private))
    assert identity == Identity(
        member_id=record.member_id,
        member_name="alice",
        key_id=record.id,
        fingerprint=record.fingerprint,
        key_description="laptop",
    )


def test_unsigned_query_for_a_stored_key_gets_pk_ok(world):
    _store, private, _record, checker = world
    query = Credentials(b"tunnel", b"ssh-ed25519", private.public().blob(), MESSAGE, None)
    outcome(checker, query).trap(ValidPublicKey)


@pytest.mark.parametrize(
    "case",
    [
        "wrong user",
        "unknown key",
        "bad signature",
        "algorithm mismatch",
        "disabled member",
        "garbage blob",
    ],
)
def test_every_failure_looks_the_same(world, case):
    store, private, _record, checker = world
    if case == "wrong user":
        credentials = signed(private, user=b"root")
    elif case == "unknown key":
        credentials = signed(Key(ed25519.Ed25519PrivateKey.generate()))
    elif case == "bad signature":
        good = signed(private)
        credentials = Credentials(
            good.username, good.algName, good.blob, b"other data", good.signature
        )
    elif case == "algorithm mismatch":
        credentials = signed(private, sign_alg=b"ssh-rsa")
    elif case == "disabled member":
        store.set_member_active("alice", False)
        credentials = signed(private)
    else:
        credentials = Credentials(b"tunnel", b"ssh-ed25519", b"\x00\x00\x00\x05junk", MESSAGE, None)
    failure = outcome(checker, credentials)
    failure.trap(UnauthorizedLogin)
    assert str(failure.value) == "permission denied"


def test_unknown_key_query_gets_no_pk_ok(world):
    """Probing which keys exist (for the wrong user) learns nothing."""
    _store, private, _record, checker = world
    query = Credentials(b"root", b"ssh-ed25519", private.public().blob(), MESSAGE, None)
    outcome(checker, query).trap(UnauthorizedLogin)


class CountingStore(ImmediateStore):
    """Counts the store calls the checker makes."""

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(store)
        self.calls = 0

    def call(self, method, *args, **kwargs):
        self.calls += 1
        return super().call(method, *args, **kwargs)


def query_for(private) -> Credentials:
    return Credentials(b"tunnel", b"ssh-ed25519", private.public().blob(), MESSAGE, None)


def test_the_signed_request_after_pk_ok_on_the_same_connection_needs_no_second_lookup(world):
    store, private, record, _checker = world
    counting = CountingStore(store)
    shared = TunnelKeyChecker(counting, "tunnel")
    connection = shared.for_connection()

    outcome(connection, query_for(private)).trap(ValidPublicKey)
    assert outcome(connection, signed(private)).key_id == record.id
    assert counting.calls == 1

    # Used once: another signed request asks the store again.
    store.set_member_active("alice", False)
    outcome(connection, signed(private)).trap(UnauthorizedLogin)
    assert counting.calls == 2


def test_a_confirmed_key_is_not_shared_between_connections(world):
    store, private, _record, _checker = world
    counting = CountingStore(store)
    shared = TunnelKeyChecker(counting, "tunnel")
    first, second = shared.for_connection(), shared.for_connection()
    outcome(first, query_for(private)).trap(ValidPublicKey)
    store.set_member_active("alice", False)
    outcome(second, signed(private)).trap(UnauthorizedLogin)
    assert counting.calls == 2


def test_any_other_request_forgets_the_confirmed_key(world):
    store, private, _record, _checker = world
    connection = TunnelKeyChecker(ImmediateStore(store), "tunnel").for_connection()
    other = Key(ed25519.Ed25519PrivateKey.generate())
    outcome(connection, query_for(private)).trap(ValidPublicKey)
    outcome(connection, query_for(other)).trap(UnauthorizedLogin)
    store.set_member_active("alice", False)
    outcome(connection, signed(private)).trap(UnauthorizedLogin)


def test_a_confirmed_key_still_needs_a_good_signature_and_the_right_user(world):
    _store, private, _record, checker = world
    connection = checker.for_connection()
    good = signed(private)
    forged = Credentials(good.username, good.algName, good.blob, b"other data", good.signature)
    for attempt in (forged, signed(private, user=b"root")):
        outcome(connection, query_for(private)).trap(ValidPublicKey)
        outcome(connection, attempt).trap(UnauthorizedLogin)
    outcome(connection, query_for(private)).trap(ValidPublicKey)
    assert outcome(connection, signed(private)).member_name == "alice"


def test_a_confirmed_key_is_looked_up_again_after_another_process_changed_the_store(world):
    """OpenSSH asks (PK_OK), then signs: seconds later with an agent that asks or
    a hardware key. A tier the admin CLI changed meanwhile must be the one the
    connection starts with (its first forwards are decided before any re-check)."""
    store, private, _record, _checker = world
    changes = [0]
    counting = CountingStore(store)
    connection = TunnelKeyChecker(counting, "tunnel", changes=lambda: changes[0]).for_connection()
    outcome(connection, query_for(private)).trap(ValidPublicKey)
    assert outcome(connection, signed(private)).tier == "basic"
    assert counting.calls == 1  # nothing changed: the confirmed key was used

    outcome(connection, query_for(private)).trap(ValidPublicKey)
    store.set_member_tier("alice", "pro")
    changes[0] += 1  # the revocation watcher saw another process write
    assert outcome(connection, signed(private)).tier == "pro"
    assert counting.calls == 3


def test_the_revocation_watcher_counts_changes_made_by_other_processes(tmp_path):
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

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
