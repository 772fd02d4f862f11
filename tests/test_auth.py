"""Who gets in: the userauth service over a real SQLite store, no sockets.

Requests go in as USERAUTH_REQUEST payloads; what comes out is what a client
would see: PK_OK, FAILURE, SUCCESS or a disconnect.
"""

from __future__ import annotations

import base64
from hashlib import sha256
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.conch.ssh.common import MP, NS
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
        self.data_dir = tmp_path
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

    def hold_lookups(self) -> list[tuple[str, Deferred]]:
        """From now on store lookups wait: each is listed (fingerprint, Deferred)
        until ``answer`` gives it the store's answer."""
        waiting: list[tuple[str, Deferred]] = []
        self._look_up = self.checker.look_up

        def held(fingerprint: str) -> Deferred:
            waiting.append((fingerprint, Deferred()))
            return waiting[-1][1]

        self.checker.look_up = held
        return waiting

    def answer(self, waiting: list[tuple[str, Deferred]]) -> None:
        """Answer the oldest waiting lookup as the store would."""
        fingerprint, held = waiting.pop(0)
        self._look_up(fingerprint).addCallback(held.callback)

    def _avatar(self, identity: Identity) -> SimpleNamespace:
        self.logins.append(identity)
        return SimpleNamespace(logout=lambda: None)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def message(user: bytes, algorithm: bytes, blob: bytes, session_id: bytes = SESSION_ID) -> bytes:
    """What a publickey signature covers (RFC 4252 section 7)."""
    return (
        NS(session_id)
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


def test_the_first_none_lists_publickey_and_is_no_attempt_the_others_are(world):
    """As in OpenSSH: clients send one "none" to learn the methods."""
    service, transport = world.connection()
    none = NS(b"tunnel") + NS(b"ssh-connection") + NS(b"none")
    service.ssh_USERAUTH_REQUEST(none)
    for _ in range(world.config.ssh.max_auth_tries - 2):
        service.ssh_USERAUTH_REQUEST(signed(Key(ed25519.Ed25519PrivateKey.generate())))
    assert transport.disconnected is None and set(transport.sent) == {FAILURE}
    service.ssh_USERAUTH_REQUEST(signed(world.private))  # the last try logs in
    assert transport.sent[-1] == (MSG_USERAUTH_SUCCESS, b"")

    service, transport = world.connection()
    for _ in range(world.config.ssh.max_auth_tries + 3):
        service.ssh_USERAUTH_REQUEST(none)
    assert transport.sent == [FAILURE] * world.config.ssh.max_auth_tries
    assert transport.disconnected == (
        DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
        b"too many bad auths",
    )


def test_a_none_request_after_another_request_is_a_failed_try(world):
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    for _ in range(world.config.ssh.max_auth_tries):
        service.ssh_USERAUTH_REQUEST(NS(b"tunnel") + NS(b"ssh-connection") + NS(b"none"))
    assert transport.disconnected is not None


def test_a_stored_rsa_key_with_a_huge_exponent_checks_no_signature(world, monkeypatch):
    """Stored before the dashboard refused such keys: a check would cost
    milliseconds, and anyone who knows the public key could ask for checks."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    from nekojump.keys import PublicKey

    class Grandfathered(PublicKey):
        @property
        def fingerprint(self) -> str:  # as ssh-keygen -l prints it
            return "SHA256:" + base64.b64encode(sha256(self.blob).digest()).decode().rstrip("=")

    modulus = Key(rsa.generate_private_key(65537, 2048)).public().data()["n"]
    public = Key(RSAPublicNumbers(2**2047 + 1, modulus).public_key())
    world.store.add_key("alice", Grandfathered("ssh-rsa", public.blob(), "old", 2048), "old")
    checked = []
    monkeypatch.setattr(Key, "verify", lambda *args: checked.append(args))
    head = NS(b"tunnel") + NS(b"ssh-connection") + NS(b"publickey") + b"\x01"
    request = head + NS(b"rsa-sha2-256") + NS(public.blob())
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(request + NS(NS(b"rsa-sha2-256") + NS(b"\x01" * 256)))
    assert transport.sent == [FAILURE] and checked == []


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
    admin_cli = SQLiteStore.open(world.data_dir)
    try:
        admin_cli.set_member_tier("alice", "pro")
    finally:
        admin_cli.close()
    world.changes += 1  # the revocation watcher saw another process write
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert [identity.tier for identity in world.logins] == ["pro"]
    assert world.counting.calls == 2


def test_a_key_removed_on_the_dashboard_between_pk_ok_and_the_signature_does_not_log_in(world):
    """The dashboard writes through this process's store: no watcher is needed to
    see it, and no session starts only to be ended by the re-check after login."""
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query(world.private))
    world.store.remove_key(world.record.fingerprint, actor="alice")
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent[-1] == FAILURE and world.logins == []


def test_a_lookup_in_flight_queues_what_follows_and_logs_in_once(world):
    waiting = world.hold_lookups()
    service, transport = world.connection()
    for _ in range(3):
        service.ssh_USERAUTH_REQUEST(signed(world.private))
    assert transport.sent == [] and len(waiting) == 1
    world.answer(waiting)
    assert transport.sent == [(MSG_USERAUTH_SUCCESS, b"")]
    assert len(world.logins) == 1 and waiting == []


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


# -- what a client may send as its key and signature --------------------------------


def query_with_blob(blob: bytes, algorithm: bytes, user: bytes = b"tunnel") -> bytes:
    """A publickey query (no signature) whose key blob field is ``blob``."""
    head = NS(user) + NS(b"ssh-connection") + NS(b"publickey") + b"\x00"
    return head + NS(algorithm) + NS(blob)


def agentv3_rsa_blob() -> bytes:
    """What Conch's ``Key.fromString`` takes for an RSA *private* key in the
    agent v3 format: it starts like an ssh-rsa public key blob, and more than
    four numbers make Conch guess "agentv3".  Checking one makes OpenSSL test p
    for primality, and a client may make p as large as a packet allows (20000
    bits took 10.7 s of the reactor thread)."""
    p, q = 2**127 - 1, 2**89 - 1
    return NS(b"ssh-rsa") + MP(65537) + MP(3) + MP(p * q) + MP(pow(q, -1, p)) + MP(p) + MP(q)


def test_a_key_blob_is_never_read_as_a_private_key(world, monkeypatch):
    """Unauthenticated, any user name: the key field is read as a public key
    blob and nothing else."""
    guessed = []
    for name in ("_fromString_AGENTV3", "_fromString_PRIVATE_OPENSSH", "_fromString_PRIVATE_LSH"):
        monkeypatch.setattr(
            Key, name, classmethod(lambda cls, *args, _name=name: guessed.append(_name))
        )
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query_with_blob(agentv3_rsa_blob(), b"rsa-sha2-256", b"nobody"))
    assert transport.sent == [FAILURE] and guessed == []


@pytest.mark.parametrize("form", ["authorized_keys line", "OpenSSH private key file"])
def test_a_key_in_another_format_than_the_wire_blob_gets_no_pk_ok(world, form):
    """RFC 4253 6.6 / OpenSSH sshkey_from_blob: the field is a public key blob.
    Here the text of an authorized_keys line, or the member's private key file,
    is parsed by format guessing, maps to the stored fingerprint and gets PK_OK
    (the private key is then kept in the key cache of the server)."""
    if form == "authorized_keys line":
        blob = world.private.public().toString("OPENSSH")
    else:
        blob = world.private.toString("OPENSSH")
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query_with_blob(blob, b"ssh-ed25519"))
    assert transport.sent == [FAILURE]


def _ec_pem_with_unknown_curve() -> bytes:
    pem = Key(ec.generate_private_key(ec.SECP256R1())).toString("openssh", subtype="PEM")
    lines = pem.splitlines()
    der = base64.b64decode(b"".join(lines[1:-1]))
    der = der.replace(bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06082a8648ce3d030109"))
    return lines[0] + b"\n" + base64.encodebytes(der) + lines[-1]


POISON_BLOBS = {
    # Conch guesses "private_lsh" and asserts on the s-expression.
    "lsh": (b"(", "AssertionError"),
    # An encrypted OpenSSH private key: EncryptedKeyError (not a BadKeyError).
    "encrypted": (
        Key(ed25519.Ed25519PrivateKey.generate()).toString("OPENSSH", passphrase=b"x"),
        "EncryptedKeyError",
    ),
    # cryptography.exceptions.UnsupportedAlgorithm from load_pem_private_key.
    "unknown curve": (_ec_pem_with_unknown_curve(), "UnsupportedAlgorithm"),
}


@pytest.mark.parametrize("name", sorted(POISON_BLOBS))
def test_a_malformed_key_blob_is_refused_not_raised(world, name):
    """None of these is in the transport's MALFORMED tuple either, so in the
    server the reactor logs an unhandled error and drops the connection; the
    request is counted nowhere."""
    blob, _ = POISON_BLOBS[name]
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query_with_blob(blob, b"ssh-ed25519"))
    assert transport.sent == [FAILURE]


def test_an_exception_in_a_queued_request_does_not_stall_the_ones_behind_it(world):
    """A blob Conch's parser trips over (an assertion), queued behind a lookup:
    it is answered, and the member's own request behind it goes on in turn (an
    exception there would end up in the lookup's Deferred and stall the queue)."""
    waiting = world.hold_lookups()
    service, transport = world.connection()
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    service.ssh_USERAUTH_REQUEST(signed(stranger))  # lookup in flight
    service.ssh_USERAUTH_REQUEST(query_with_blob(b"(", b"ssh-ed25519"))  # queued
    service.ssh_USERAUTH_REQUEST(signed(world.private))  # queued
    world.answer(waiting)
    assert waiting != []  # the member's own request asks the store in turn
    world.answer(waiting)
    assert transport.sent == [FAILURE, FAILURE, (MSG_USERAUTH_SUCCESS, b"")]


@pytest.mark.parametrize("ending", ["client closes", "server ends it: too many pipelined"])
def test_a_failed_signature_in_flight_when_the_connection_ends_still_counts(world, ending):
    """Otherwise ten bad signed requests in one write (the server ends the
    connection at the ninth, while the first is looked up) would never be
    counted, and the penalty box never close."""
    waiting = world.hold_lookups()
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    for _ in range(3):  # the harness's penalty box: 3 failures
        service, transport = world.connection()
        service.ssh_USERAUTH_REQUEST(signed(stranger))
        if ending == "client closes":
            service.serviceStopped()  # what connectionLost does
        else:
            for _ in range(service.max_queued + 1):
                service.ssh_USERAUTH_REQUEST(signed(stranger))
            assert transport.disconnected is not None
        world.answer(waiting)
    assert world.penalties.refusal("192.0.2.7") is not None


@pytest.mark.parametrize("case", ["ed25519 length overstated", "ecdsa bytes after s"])
def test_a_signature_that_is_not_exactly_well_formed_is_refused(world, case):
    """Not a forgery (the key's own signature is still needed), but neither
    field is a well-formed signature and OpenSSH refuses both
    (SSH_ERR_UNEXPECTED_TRAILING_DATA / INVALID_FORMAT), while the commit says
    malformed signatures are refused: ``getNS`` silently truncates a length
    that overstates what follows, and Conch's ECDSA verify ignores bytes after s."""
    if case == "ed25519 length overstated":
        private, algorithm = world.private, b"ssh-ed25519"
        blob = private.public().blob()
        good = private.sign(message(b"tunnel", algorithm, blob))
        raw = good[4 + len(algorithm) + 4 :]
        assert len(raw) == 64
        signature = NS(algorithm) + (1000).to_bytes(4, "big") + raw
    else:
        private, algorithm = Key(ec.generate_private_key(ec.SECP256R1())), b"ecdsa-sha2-nistp256"
        world.add_key(private.public().toString("OPENSSH").decode())
        blob = private.public().blob()
        good = private.sign(message(b"tunnel", algorithm, blob))
        inner = good[4 + len(algorithm) + 4 :]
        signature = NS(algorithm) + NS(inner + b"junk")
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(signed(private, algorithm=algorithm, signature=signature))
    assert transport.sent == [FAILURE]


# -- what a client signs, and what PK_OK says -----------------------------------------


def test_pk_ok_echoes_the_algorithm_and_blob_exactly(world):
    service, transport = world.connection()
    blob = world.private.public().blob()
    service.ssh_USERAUTH_REQUEST(query_with_blob(blob, b"ssh-ed25519"))
    assert transport.sent == [(MSG_USERAUTH_PK_OK, NS(b"ssh-ed25519") + NS(blob))]


@pytest.mark.parametrize("field", ["session id", "user", "algorithm", "blob"])
def test_a_signature_over_another_message_does_not_log_in(world, field):
    blob = world.private.public().blob()
    fields = {
        "session id": b"\x07" * 32,
        "user": b"tunnel",
        "algorithm": b"ssh-ed25519",
        "blob": blob,
    }
    fields[field] = {
        "session id": b"\x08" * 32,
        "user": b"root",
        "algorithm": b"ssh-rsa",
        "blob": blob + b"\x00",
    }[field]
    data = message(fields["user"], fields["algorithm"], fields["blob"], fields["session id"])
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(signed(world.private, signed_over=data))
    assert transport.sent == [FAILURE] and world.logins == []


def successes(world: World) -> float:
    return world.checker.metrics.auth.labels("success")._value.get()


def test_a_good_signature_answered_after_the_connection_ended_is_no_login_in_the_metrics(world):
    waiting = world.hold_lookups()
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(signed(world.private))  # lookup in flight
    service.serviceStopped()  # the client closed: what connectionLost does
    world.answer(waiting)
    assert world.logins == [] and not transport.authenticated
    assert successes(world) == 0


@pytest.mark.parametrize(
    ("key_type", "curve_name", "curve"),
    [
        (b"ecdsa-sha2-nistp521", b"nistp521", ec.SECP521R1()),
        (b"sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", ec.SECP256R1()),
    ],
)
def test_a_compressed_ec_point_is_refused_before_it_is_decompressed(
    world, monkeypatch, key_type, curve_name, curve
):
    """Unauthenticated, any user name: decompressing a point is a modular square
    root (P-521: about 0.15 ms), and OpenSSH refuses such points unread."""
    point = (
        ec.generate_private_key(curve)
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    )
    blob = NS(key_type) + NS(curve_name) + NS(point)
    if key_type.startswith(b"sk-"):
        blob += NS(b"ssh:")
    decoded = []
    real = ec.EllipticCurvePublicKey.from_encoded_point

    def recording(curve, data):
        decoded.append(data)
        return real(curve, data)

    monkeypatch.setattr(ec.EllipticCurvePublicKey, "from_encoded_point", recording)
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(query_with_blob(blob, key_type, b"nobody"))
    assert transport.sent == [FAILURE]
    assert decoded == []


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


def test_a_bug_while_deciding_ends_the_connection_and_is_logged(world, monkeypatch, logged):
    def broken(*args: object) -> None:
        raise RuntimeError("bug in decide")

    monkeypatch.setattr(world.checker, "decide", broken)
    service, transport = world.connection()
    service.ssh_USERAUTH_REQUEST(signed(world.private))
    service.ssh_USERAUTH_REQUEST(signed(world.private))  # nothing more is answered
    assert transport.sent == [] and world.logins == []
    assert transport.disconnected == (DISCONNECT_PROTOCOL_ERROR, b"internal error")
    assert any("bug in decide" in str(e.get("log_failure", "")) for e in logged)
