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


def test_the_signed_request_after_pk_ok_needs_no_second_lookup(world):
    store, private, record, _checker = world
    counting = CountingStore(store)
    now = [100.0]
    checker = TunnelKeyChecker(counting, "tunnel", clock=lambda: now[0])

    outcome(checker, query_for(private)).trap(ValidPublicKey)
    now[0] += 1
    assert outcome(checker, signed(private)).key_id == record.id
    assert counting.calls == 1

    # Later than CONFIRMED_SECONDS, the store is asked again ...
    now[0] += TunnelKeyChecker.CONFIRMED_SECONDS
    store.set_member_active("alice", False)
    outcome(checker, signed(private)).trap(UnauthorizedLogin)
    assert counting.calls == 2
    # ... and a query always is, so a removed key gets no PK_OK.
    outcome(checker, query_for(private)).trap(UnauthorizedLogin)
    assert counting.calls == 3


def test_a_remembered_key_still_needs_a_good_signature_and_the_right_user(world):
    _store, private, _record, checker = world
    outcome(checker, query_for(private)).trap(ValidPublicKey)
    good = signed(private)
    forged = Credentials(good.username, good.algName, good.blob, b"other data", good.signature)
    outcome(checker, forged).trap(UnauthorizedLogin)
    outcome(checker, signed(private, user=b"root")).trap(UnauthorizedLogin)
    assert outcome(checker, signed(private)).member_name == "alice"


def test_at_most_confirmed_max_keys_are_remembered(world, monkeypatch):
    _store, _private, _record, checker = world
    monkeypatch.setattr(TunnelKeyChecker, "CONFIRMED_MAX", 3)
    keys = [Key(ed25519.Ed25519PrivateKey.generate()) for _ in range(5)]
    for key in keys:
        checker._remember(key.public().blob(), key.public(), _record)
    assert list(checker._confirmed) == [k.public().blob() for k in keys[2:]]
