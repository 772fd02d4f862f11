"""Who may log in: user ``tunnel`` with a stored key of an active member."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.conch.error import IgnoreAuthentication, ValidPublicKey
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.conch.ssh.transport import (
    DISCONNECT_PROTOCOL_ERROR,
    DISCONNECT_SERVICE_NOT_AVAILABLE,
)
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from nekojump.keys import fingerprint_of_blob, key_from_blob
from nekojump.logs import conch_logger
from nekojump.metrics import Metrics
from nekojump.model import Identity, KeyRecord
from nekojump.ssh.avatar import TunnelAvatar
from nekojump.ssh.transport import USER_SIGNATURE_ALGORITHMS
from nekojump.store import DeferredStore

_DENIED = "permission denied"


@implementer(ICredentialsChecker)
class TunnelKeyChecker:
    """Checks SSH public keys against the store; the avatar id is an ``Identity``.

    A wrong user name fails exactly like an unknown key.  A key is confirmed
    (PK_OK) only if it would log in, and a signature only counts if its
    algorithm is the one the client named.
    """

    credentialInterfaces = (ISSHPrivateKey,)
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
        #: watcher's count): a key record read before the count moved is read again.
        self.changes = changes

    def requestAvatarId(self, credentials: Any) -> Deferred[Identity]:
        return Deferred.fromCoroutine(self._check(credentials, None))

    def for_connection(self) -> ConnectionKeyChecker:
        """A checker for one SSH connection's requests (see ``ConnectionKeyChecker``)."""
        return ConnectionKeyChecker(self)

    async def _check(self, credentials: Any, memo: ConnectionKeyChecker | None) -> Identity:
        confirmed = memo.take_confirmed() if memo is not None else None
        if (
            confirmed is not None
            and credentials.signature
            and confirmed[0] == credentials.blob
            and confirmed[3] == self.changes()
        ):
            _, key, record, _ = confirmed
        else:
            try:
                key = key_from_blob(credentials.blob)
                fingerprint = fingerprint_of_blob(credentials.blob)
            except (BadKeyError, ValueError, IndexError, struct.error):
                raise UnauthorizedLogin(_DENIED) from None
            record = await self.store.call(self.store.store.find_key, fingerprint)
        if credentials.username != self.user or record is None or not record.usable:
            if credentials.signature:
                self.metrics.auth.labels("unknown_key_or_user").inc()
            raise UnauthorizedLogin(_DENIED)
        if not credentials.signature:
            if memo is not None:
                memo.confirmed = (credentials.blob, key, record, self.changes())
            raise ValidPublicKey()
        try:
            signature_algorithm = getNS(credentials.signature)[0]
        except (IndexError, ValueError, struct.error):
            raise UnauthorizedLogin(_DENIED) from None
        if (
            signature_algorithm != credentials.algName
            or signature_algorithm not in USER_SIGNATURE_ALGORITHMS
            or not key.verify(credentials.signature, credentials.sigData)
        ):
            self.metrics.auth.labels("bad_signature").inc()
            raise UnauthorizedLogin(_DENIED)
        self.metrics.auth.labels("success").inc()
        return Identity(
            member_id=record.member_id,
            member_name=record.member_name,
            key_id=record.id,
            fingerprint=record.fingerprint,
            key_description=record.description,
            tier=record.member_tier,
        )


@implementer(ICredentialsChecker)
class ConnectionKeyChecker:
    """``TunnelKeyChecker`` for the requests of one connection.

    Clients ask whether a key would do (PK_OK) before they sign with it; the
    signed request that comes next on the same connection uses the key the
    store has just confirmed instead of looking it up again (unless another
    process changed the store meanwhile, as the admin CLI does).  Any other
    request forgets it.  The avatar re-checks each login against the store
    right after it, as it does for a key removed during any lookup.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, checker: TunnelKeyChecker) -> None:
        self.checker = checker
        #: The key PK_OK confirmed: blob, key, record, and the store's change count then.
        self.confirmed: tuple[bytes, Key, KeyRecord, int] | None = None

    def take_confirmed(self) -> tuple[bytes, Key, KeyRecord, int] | None:
        confirmed, self.confirmed = self.confirmed, None
        return confirmed

    def requestAvatarId(self, credentials: Any) -> Deferred[Identity]:
        return Deferred.fromCoroutine(self.checker._check(credentials, self))


@implementer(IRealm)
class TunnelRealm:
    """Makes a ``TunnelAvatar`` for each authenticated connection."""

    def __init__(self, make_avatar: Callable[[Identity], TunnelAvatar]):
        self.make_avatar = make_avatar

    def requestAvatar(self, avatarId: Identity, mind: object, *interfaces: Any):
        if IConchUser not in interfaces:  # pragma: no cover - Conch always asks for it
            raise NotImplementedError("only SSH avatars are available")
        avatar = self.make_avatar(avatarId)
        return IConchUser, avatar, avatar.logout


class TunnelUserAuthServer(userauth.SSHUserAuthServer):
    """Bounded attempts and a bounded time to authenticate, from the config."""

    _log = conch_logger("nekojump.ssh.auth", LogLevel.warn)

    #: Requests a client may pipeline while one is being checked.
    max_queued = 8

    def serviceStarted(self) -> None:
        factory = self.transport.factory
        self.loginTimeout = factory.config.ssh.login_grace_time
        # Conch disconnects once attempts exceed this number.
        self.attemptsBeforeDisconnect = factory.config.ssh.max_auth_tries - 1
        self.clock = factory.reactor
        self._pending = False
        self._succeeded = False
        self._stopped = False
        self._queue: deque[bytes] = deque()
        self._key_queries = 0
        self._asking = False
        super().serviceStarted()
        shared = self.portal
        checker = shared.checkers.get(ISSHPrivateKey)
        if isinstance(checker, TunnelKeyChecker):
            self.portal = Portal(shared.realm, [checker.for_connection()])

    def serviceStopped(self) -> None:
        self._stopped = True
        super().serviceStopped()

    def ssh_USERAUTH_REQUEST(self, packet: bytes):
        # Our key checker answers asynchronously; one request at a time, in
        # order, so two successes can never race each other.
        if self._succeeded:
            return None
        try:
            _user, service, method, rest = getNS(packet, 3)
        except (IndexError, ValueError, struct.error):
            service = method = rest = b""
        if service != b"ssh-connection":
            # Any other next service would skip the connection service, where
            # limits, keepalives and revocation take hold of a login.
            self.transport.sendDisconnect(
                DISCONNECT_SERVICE_NOT_AVAILABLE, b"only ssh-connection is offered"
            )
            return None
        if self._pending:
            if len(self._queue) >= self.max_queued:
                self.transport.sendDisconnect(
                    DISCONNECT_PROTOCOL_ERROR, b"too many pipelined auth requests"
                )
                return None
            self._queue.append(packet)
            return None
        # A publickey request without a signature only asks whether a key would do.
        self._asking = method == b"publickey" and rest[:1] == b"\x00"
        d = super().ssh_USERAUTH_REQUEST(packet)
        if d is not None:
            self._pending = True
            d.addBoth(self._request_done)
        return d

    def _request_done(self, result: object) -> object:
        self._pending = False
        if self._queue and not self._succeeded and not self._stopped:
            self.ssh_USERAUTH_REQUEST(self._queue.popleft())
        return result

    def _ebCheckKey(self, reason, packet: bytes):
        # Asking whether a key would do (PK_OK) is no failed attempt to Conch, so
        # max_auth_tries never ends a client that only asks: each answer costs a
        # store lookup, and a client needs one per key it is about to sign with.
        reason.trap(ValidPublicKey)
        self._key_queries += 1
        if self._key_queries > self.attemptsBeforeDisconnect + 1:
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"too many public key queries")
            return Failure(IgnoreAuthentication())
        return super()._ebCheckKey(reason, packet)

    def _ebBadAuth(self, reason):
        if not reason.check(IgnoreAuthentication) and self.method != b"none":
            transport = self.transport
            if self._asking:
                # Clients ask about every key they have (an agent's, ~/.ssh/id_*)
                # before the one that logs in: such a "no" only counts against
                # the source if the connection never logs in (as in OpenSSH).
                transport.unanswered_key_queries += 1
            else:
                transport.factory.penalties.failed(transport.startup_source)
        return super()._ebBadAuth(reason)

    def _cbFinishedAuth(self, result) -> None:
        _interface, _avatar, logout = result
        if self._succeeded or self._stopped:
            logout()  # the client left (or already got in) while we checked
            return
        self._succeeded = True
        self._queue.clear()
        self.transport.authentication_succeeded()
        super()._cbFinishedAuth(result)
