"""Who may log in: user ``tunnel`` with a stored key of an active member.

nekojump answers ``ssh-userauth`` itself (RFC 4252, publickey only) rather
than through Conch's ``SSHUserAuthServer`` and a cred ``Portal``.  Those
turn every request into Deferred chains and every "no" (even the PK_OK
answer) into a raised exception with a traceback; for a login that was
about a third of the server's CPU, twice the cost of checking the
signature.  Here a request is parsed once, the store is asked only when the
connection has not just confirmed the same key, and the answer is decided
by plain code (``TunnelKeyChecker.decide``).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from hashlib import sha256

from attrs import frozen
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.conch.ssh.service import SSHService
from twisted.conch.ssh.transport import (
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    DISCONNECT_PROTOCOL_ERROR,
    DISCONNECT_SERVICE_NOT_AVAILABLE,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from nekojump.keys import fingerprint_of_blob, key_from_blob, read_string, read_strings
from nekojump.logs import conch_logger
from nekojump.metrics import Metrics
from nekojump.model import Identity, KeyRecord
from nekojump.ssh.transport import USER_SIGNATURE_ALGORITHMS
from nekojump.store import DeferredStore

MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_FAILURE = 51
MSG_USERAUTH_SUCCESS = 52
MSG_USERAUTH_PK_OK = 60

#: The one method offered, as USERAUTH_FAILURE lists it.
METHODS = NS(b"publickey") + b"\x00"

#: Signature algorithms each key type may log in with: RSA keys only with
#: SHA-2 (``ssh-rsa`` signs with SHA-1), every other key with its own name.
ALGORITHMS_BY_KEY_TYPE: dict[bytes, frozenset[bytes]] = {
    b"ssh-rsa": frozenset(a for a in USER_SIGNATURE_ALGORITHMS if a.startswith(b"rsa-sha2-")),
    **{a: frozenset((a,)) for a in USER_SIGNATURE_ALGORITHMS if not a.startswith(b"rsa-")},
}

#: The "user present" flag of a security key's signature: the key was touched.
SK_USER_PRESENT = 0x01


@frozen
class KeyRequest:
    """One publickey USERAUTH_REQUEST."""

    user: bytes
    algorithm: bytes
    blob: bytes
    #: The signature field, or None when the client only asks whether the key
    #: would do (and gets PK_OK if it would).
    signature: bytes | None
    #: What the signature must cover (RFC 4252 section 7).
    message: bytes


def parse_publickey_request(
    session_id: bytes, user: bytes, service: bytes, rest: bytes
) -> KeyRequest:
    """The publickey request whose method-specific part is ``rest``; ``ValueError``
    if it is malformed (bytes left over included, as in OpenSSH)."""
    if not rest or rest[0] not in (0, 1):
        raise ValueError("malformed publickey request")
    strings = read_strings(rest, 1)
    if len(strings) != 2 + rest[0]:
        raise ValueError("malformed publickey request")
    algorithm, blob = strings[:2]
    signature = strings[2] if rest[0] else None
    message = (
        NS(session_id)
        + bytes((MSG_USERAUTH_REQUEST,))
        + NS(user)
        + NS(service)
        + NS(b"publickey")
        + b"\x01"
        + NS(algorithm)
        + NS(blob)
    )
    return KeyRequest(user, algorithm, blob, signature, message)


def signature_valid(key: Key, algorithm: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` (a USERAUTH_REQUEST's signature field) is ``key``'s
    over ``message``, made with ``algorithm``.

    The field must be exactly what OpenSSH makes: the algorithm and the
    signature, an Ed25519 signature 64 bytes, an ECDSA one the two numbers r
    and s.  A security key's signature is followed by its flags and counter and
    counts only if the key was touched (the "user present" flag, which OpenSSH
    requires too); it covers the hashes of the application and the message
    with the flags and counter in between (OpenSSH's PROTOCOL.u2f)."""
    try:
        signed_with, end = read_string(signature)
        raw, end = read_string(signature, end)
        if key.type() == "EC" and len(read_strings(raw)) != 2:
            return False
    except ValueError:
        return False
    trailing = signature[end:]
    if signed_with != algorithm:
        return False
    if key.type() == "Ed25519" and len(raw) != 64:
        return False
    if key.isSecurityKey():
        if len(trailing) != 5 or not trailing[0] & SK_USER_PRESENT:
            return False
        message = sha256(key.application).digest() + trailing + sha256(message).digest()
    elif trailing:
        return False
    try:
        return key.verify(signature, message)
    except (ValueError, IndexError, TypeError, struct.error):
        return False  # numbers that make no signature


class Answer(enum.Enum):
    """What the checker says to a request that does not log in."""

    DENIED = "denied"
    #: The key would do: PK_OK.
    KEY_OK = "key ok"


class TunnelKeyChecker:
    """Decides publickey requests against the store.

    A wrong user name fails exactly like an unknown key.  A key is confirmed
    (PK_OK) only if it would log in, and a signature only counts if its
    algorithm is the one the client named and fits the key's type.
    """

    log = Logger()

    def __init__(
        self,
        store: DeferredStore,
        user: str,
        metrics: Metrics | None = None,
        changes: Callable[[], int] = lambda: 0,
    ):
        self.store = store
        self.user = user.encode("utf-8")
        self.metrics = metrics if metrics is not None else Metrics()
        #: Counts the changes other processes made to the store (the revocation
        #: watcher's count).
        self.changes_elsewhere = changes

    def changes(self) -> int:
        """Changes to keys and members so far, by other processes and this one:
        a key record read before the count moved is read again."""
        return self.changes_elsewhere() + self.store.store.login_changes

    def look_up(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        """The stored key with ``fingerprint`` and its member, or None."""
        return self.store.call(self.store.store.find_key, fingerprint)

    def decide(self, request: KeyRequest, key: Key, record: KeyRecord | None) -> Identity | Answer:
        """The login ``request`` (whose key is ``key``, stored as ``record``)
        earns, counted in the auth metrics."""
        answer, result = self.judge(request, key, record)
        if result is not None:
            self.metrics.auth.labels(result).inc()
        return answer

    def judge(
        self, request: KeyRequest, key: Key, record: KeyRecord | None
    ) -> tuple[Identity | Answer, str | None]:
        """What ``request`` earns, and the auth metric's result for it (None for
        a query without signature)."""
        signed = request.signature is not None
        if request.user != self.user or record is None or not record.usable:
            return Answer.DENIED, "unknown_key_or_user" if signed else None
        fits = request.algorithm in ALGORITHMS_BY_KEY_TYPE.get(key.sshType(), ())
        if request.signature is None:
            return (Answer.KEY_OK if fits else Answer.DENIED), None
        if not fits or not signature_valid(
            key, request.algorithm, request.signature, request.message
        ):
            return Answer.DENIED, "bad_signature"
        identity = Identity(
            member_id=record.member_id,
            member_name=record.member_name,
            key_id=record.id,
            fingerprint=record.fingerprint,
            key_description=record.description,
            tier=record.member_tier,
        )
        return identity, "success"


@frozen
class Confirmed:
    """The key a PK_OK answer confirmed, kept for the signed request after it."""

    blob: bytes
    key: Key
    record: KeyRecord
    #: ``TunnelKeyChecker.changes`` when the record was read.
    changes: int


#: User names and keys a failed login's log line lists, at most.
MAX_NOTED = 5


class TunnelUserAuthServer(SSHService):
    """The ``ssh-userauth`` service: publickey logins, one request at a time.

    - Requests are answered in order; a client may pipeline up to
      ``max_queued`` while one waits for the store.
    - A signed request right after PK_OK for the same key uses the record the
      store just gave, unless keys or members changed since (on the dashboard,
      or in another process such as the admin CLI); the avatar re-checks every
      login right after it anyway.
    - ``max_auth_tries`` failed requests end the connection, and so do more
      PK_OK answers than that (each one is a store lookup).
    - A failed signature counts against the source address at once; a key the
      client only asked about counts only if the connection never logs in
      (clients ask about every key they have before the one that logs in).
    - The next service must be ``ssh-connection``: that is where limits,
      keepalives and revocation take hold of a login.
    """

    name = b"ssh-userauth"
    protocolMessages = {MSG_USERAUTH_REQUEST: "MSG_USERAUTH_REQUEST"}
    log = Logger()
    # SSHService logs every message it cannot handle at info level.
    _log = conch_logger("nekojump.ssh.auth", LogLevel.warn)

    #: Requests a client may pipeline while one is being checked.
    max_queued = 8

    def serviceStarted(self) -> None:
        factory = self.transport.factory
        self.checker: TunnelKeyChecker = factory.key_checker
        self.max_tries: int = factory.config.ssh.max_auth_tries
        self.failures = 0
        self.key_queries = 0
        #: Requests handled so far.
        self.requests = 0
        self.confirmed: Confirmed | None = None
        self._queue: deque[bytes] = deque()
        self._waiting = False
        #: Logged in, disconnected or gone: nothing more to answer.
        self._finished = False
        self._logged_in_as: Identity | None = None
        #: The user names and key fingerprints tried, for the log (a few of each).
        self._users_tried: list[str] = []
        self._keys_tried: list[str] = []
        #: Key queries answered "no", and whether a signed request was refused
        #: (that one is counted in the auth metric as it happens).
        self._queries_denied = 0
        self._signed_denied = False

    def serviceStopped(self) -> None:
        self._finished = True
        self._queue.clear()
        if self._logged_in_as is None and self.failures:
            self._log_failed_login()
            if self._queries_denied and not self._signed_denied:
                # OpenSSH asks whether a key would do and signs only after a yes:
                # a login with unknown keys (or as another user) is never signed,
                # so it is counted here, once, when it gives up.
                self.checker.metrics.auth.labels("unknown_key_or_user").inc()

    def _note_tried(self, tried: list[str], what: str) -> None:
        if what not in tried and len(tried) < MAX_NOTED:
            tried.append(what)

    def _log_failed_login(self) -> None:
        """One line per connection that tried and never logged in: who tried
        what from where (what a member's "Permission denied" is about)."""
        self.log.info(
            "login failed from {source}: {failures} failed attempt(s) as {users} with {keys}",
            source=self.transport.startup_source,
            failures=self.failures,
            users=", ".join(self._users_tried) or "no user",
            keys=", ".join(self._keys_tried) or "no public key",
        )

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> None:
        if self._finished:
            return
        if self._waiting:
            if len(self._queue) >= self.max_queued:
                self._disconnect(DISCONNECT_PROTOCOL_ERROR, b"too many pipelined auth requests")
            else:
                self._queue.append(packet)
            return
        self._handle_safely(packet)

    def _handle_safely(self, packet: bytes) -> None:
        """``_handle``; a bug it trips on ends the connection, not the queue behind it."""
        try:
            self._handle(packet)
        except Exception:  # noqa: BLE001 - logged; failing closed is the answer
            self._internal_error()

    def _internal_error(self) -> None:
        self._waiting = False
        self.log.failure("error answering an auth request")
        self._disconnect(DISCONNECT_PROTOCOL_ERROR, b"internal error")

    def _handle(self, packet: bytes) -> None:
        self.requests += 1
        confirmed, self.confirmed = self.confirmed, None  # any request forgets it
        try:
            user, service, method, rest = getNS(packet, 3)
        except (IndexError, struct.error):
            self._disconnect(DISCONNECT_PROTOCOL_ERROR, b"malformed auth request")
            return
        self._note_tried(self._users_tried, repr(user.decode("utf-8", "replace"))[:66])
        if service != b"ssh-connection":
            self._disconnect(DISCONNECT_SERVICE_NOT_AVAILABLE, b"only ssh-connection is offered")
            return
        if method == b"none":
            # Asks which methods there are: as the first request no attempt,
            # else a failed one, as in OpenSSH.
            if self.requests > 1:
                self.failures += 1
            self._fail_or_end()
            return
        if method != b"publickey":
            self._denied(asking=False)
            return
        try:
            request = parse_publickey_request(self.transport.sessionID, user, service, rest)
        except ValueError:
            self._denied(asking=False)
            return
        if (
            confirmed is not None
            and request.signature is not None
            and confirmed.blob == request.blob
            and confirmed.changes == self.checker.changes()
        ):
            self._decide(request, confirmed.key, confirmed.record, confirmed.changes)
            return
        try:
            key = key_from_blob(request.blob)
            fingerprint = fingerprint_of_blob(request.blob)
        except (BadKeyError, ValueError, IndexError, struct.error):
            self._denied(asking=request.signature is None)
            return
        self._note_tried(self._keys_tried, fingerprint)
        changes = self.checker.changes()
        self._waiting = True
        self.checker.look_up(fingerprint).addCallbacks(
            self._looked_up,
            self._lookup_failed,
            callbackArgs=(request, key, changes),
        )

    def _looked_up(
        self, record: KeyRecord | None, request: KeyRequest, key: Key, changes: int
    ) -> None:
        self._waiting = False
        try:
            if self._finished:
                self._count_after_the_end(request, key, record)
                return
            self._decide(request, key, record, changes)
        except Exception:  # noqa: BLE001 - logged; failing closed is the answer
            self._internal_error()
            return
        self._handle_queued()

    def _count_after_the_end(self, request: KeyRequest, key: Key, record: KeyRecord | None) -> None:
        """The connection ended while the store answered: a request that fails
        still counts against the source (this connection never logged in)."""
        if self.checker.judge(request, key, record)[0] is Answer.DENIED:
            transport = self.transport
            transport.factory.penalties.failed(transport.startup_source)

    def _lookup_failed(self, failure: Failure) -> None:
        self._waiting = False
        self.log.failure("could not look up a login key", failure)
        if self._finished:
            return
        self.failures += 1  # ours, not the source's: no penalty, but no endless retries
        self._fail_or_end()
        self._handle_queued()

    def _handle_queued(self) -> None:
        while self._queue and not self._waiting and not self._finished:
            self._handle_safely(self._queue.popleft())

    def _decide(
        self, request: KeyRequest, key: Key, record: KeyRecord | None, changes: int
    ) -> None:
        answer = self.checker.decide(request, key, record)
        if isinstance(answer, Identity):
            self._logged_in(answer)
        elif answer is Answer.KEY_OK:
            self.key_queries += 1
            if self.key_queries > self.max_tries:
                self._disconnect(DISCONNECT_PROTOCOL_ERROR, b"too many public key queries")
                return
            assert record is not None
            self.confirmed = Confirmed(request.blob, key, record, changes)
            self.transport.sendPacket(MSG_USERAUTH_PK_OK, NS(request.algorithm) + NS(request.blob))
        else:
            self._denied(asking=request.signature is None)

    def _denied(self, asking: bool) -> None:
        transport = self.transport
        if asking:
            transport.unanswered_key_queries += 1
            self._queries_denied += 1
        else:
            transport.factory.penalties.failed(transport.startup_source)
            self._signed_denied = True
        self.failures += 1
        self._fail_or_end()

    def _fail_or_end(self) -> None:
        if self.failures >= self.max_tries:
            self._disconnect(DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many bad auths")
        else:
            self.transport.sendPacket(MSG_USERAUTH_FAILURE, METHODS)

    def _logged_in(self, identity: Identity) -> None:
        self._finished = True
        self._logged_in_as = identity
        self._queue.clear()
        transport = self.transport
        avatar = transport.factory.make_avatar(identity)
        transport.avatar = avatar
        transport.logoutFunction = avatar.logout
        transport.authentication_succeeded()
        transport.sendPacket(MSG_USERAUTH_SUCCESS, b"")
        transport.setService(transport.factory.getService(transport, b"ssh-connection")())

    def _disconnect(self, reason: int, description: bytes) -> None:
        self._finished = True
        self._queue.clear()
        self.transport.sendDisconnect(reason, description)
