"""The ``tunnel`` account: one decision per SSH request, refusing by default."""

from __future__ import annotations

import errno
import random
import struct
from collections import deque
from typing import TYPE_CHECKING

from attrs import evolve
from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED
from twisted.conch.ssh.forwarding import unpackGlobal_tcpip_forward
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nekojump import policy
from nekojump.capacity import DescriptorBudget
from nekojump.logs import duration
from nekojump.metrics import Metrics
from nekojump.model import Identity, Refused
from nekojump.policy import Bind, Holder, Takeover
from nekojump.ssh.forwarding import MIN_MEMBER_PACKET, ForwardListenerFactory
from nekojump.ssh.registry import ActiveForward, TunnelRegistry
from nekojump.ssh.sending import gather_writes
from nekojump.ssh.session import TunnelSession

if TYPE_CHECKING:
    from nekojump.config import Config
    from nekojump.ssh.connection import TunnelConnection
    from nekojump.store import DeferredStore

#: Refused forward requests one connection may make before it is dropped.
MAX_REFUSALS = 20
#: Refusals a session's banner lists (the newest).
MAX_REFUSALS_SHOWN = 5
#: Forwards one member may open and cancel in an hour, over all their
#: connections (each is audited), besides the first forward of each connection,
#: which is free: a connection that opens its tunnel (an autossh reconnecting,
#: thousands of members' machines) is never held up, a loop that opens and
#: cancels is, and reconnecting does not start its count again.
MAX_FORWARD_CHANGES = 1000
#: Longest bind address a client may send in tcpip-forward.
MAX_HOST_LENGTH = 255

#: Metric labels for the reasons the server ends a connection.
DISCONNECT_LABELS = {
    "key removed": "key_removed",
    "client stopped answering keepalives": "keepalive_timeout",
    "port taken over by a newer connection of the same key": "taken_over",
    "ended by the operator": "operator",
    "server shutting down": "shutdown",
    "too many refused forward requests": "too_many_refusals",
}

#: How long a member's connection has to answer when a new one finds the
#: member at their connection cap (see ``_probe_older_connections``).
STALE_PROBE_SECONDS = 5.0


class TunnelAvatar(ConchUser):
    """A member authenticated as ``tunnel`` with one key.

    It may open session channels (banner only) and ask for remote forwards;
    everything else is refused.
    """

    log = Logger()
    conn: TunnelConnection

    def __init__(
        self,
        identity: Identity,
        *,
        registry: TunnelRegistry,
        config: Config,
        store: DeferredStore,
        reactor: IReactorTCP,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        budget: DescriptorBudget | None = None,
    ):
        super().__init__()
        self.identity = identity
        self.registry = registry
        self.config = config
        self.store = store
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.rng = rng or random.Random()
        self.metrics = metrics if metrics is not None else Metrics()
        self.budget = budget
        self.limits = config.limits.for_tier(identity.tier)
        self.connection_id = registry.next_connection_id()
        self.holder = Holder(identity.key_id, identity.member_id, self.connection_id)
        self.source = "unknown"
        self.forwards: dict[int, ActiveForward] = {}
        self.gone = False
        #: When the connection service started (None until it does).
        self.connected_at: float | None = None
        self.refusals = 0
        #: Whether this connection has opened a forward (its first one is free
        #: of the member's MAX_FORWARD_CHANGES).
        self.opened_forward = False
        #: Why forwards were refused on this connection, newest last (for the banner).
        self.refused: deque[str] = deque(maxlen=MAX_REFUSALS_SHOWN)
        self.channelLookup[b"session"] = TunnelSession

    def change_tier(self, tier: str) -> None:
        """The member's tier changed: its limits apply to what they ask for next
        (what they hold already stays)."""
        self.identity = evolve(self.identity, tier=tier)
        self.limits = self.config.limits.for_tier(tier)

    # -- life cycle ----------------------------------------------------------------

    def connection_started(self, conn: TunnelConnection) -> None:
        """The SSH connection service runs: register and re-check the key once."""
        self.conn = conn
        peer = conn.transport.transport.getPeer()
        self.source = getattr(peer, "host", "unknown")
        self.registry.add_avatar(self)
        too_many = self.limits.refusal(
            "connections",
            self.registry.connections_of(self.identity.member_id) - 1,
            self.config.limits.max_connections_per_member,
        )
        if too_many is not None:
            self._probe_older_connections()
            self.disconnect(too_many.reason)
            return
        self.connected_at = self.clock.seconds()
        self.log.info(
            "{member} connected from {source} with key {fingerprint}",
            member=self.identity.member_name,
            source=self.source,
            fingerprint=self.identity.fingerprint,
        )
        self._audit("ssh-login")
        # A key removed or a tier changed between the auth lookup and now would
        # escape the revocation watcher; this second look closes that window.
        self.store.write_later(self.store.store.confirm_login, self.identity.key_id).addCallbacks(
            self._confirmed, self._confirm_failed
        )

    def _probe_older_connections(self) -> None:
        """At the member's connection cap, a new connection is often autossh
        back after a blip, while the old one has not timed out yet (that takes
        up to a minute of keepalives).  The member's connections are asked to
        answer at once: one that does not within ``STALE_PROBE_SECONDS`` is
        ended, so the next try gets in.  A connection that answers stays."""
        for other in self.registry.avatars_of_member(self.identity.member_id):
            if other is not self and other.connected_at is not None:
                other.conn.probe(STALE_PROBE_SECONDS)

    def _confirmed(self, tier: str | None) -> None:
        if tier is None:
            self.disconnect("key removed")
        elif tier != self.identity.tier:
            self.change_tier(tier)

    def _confirm_failed(self, failure: Failure) -> None:
        # Recording the login failed (a full or failing disk): the key is still
        # checked, by a read, so members can log in while the disk is seen to.
        self.log.warn(
            "could not record the login of {member} ({error}); checking the key without it",
            member=self.identity.member_name,
            error=failure.getErrorMessage(),
        )
        self.store.call(self.store.store.login_tier, self.identity.key_id).addCallbacks(
            self._confirmed, self._check_failed
        )

    def _check_failed(self, failure: Failure) -> None:
        # Can't tell whether the key is still good: fail closed.
        self.log.failure(
            "could not re-check the key of {member}", failure, member=self.identity.member_name
        )
        self.disconnect("internal error checking the key")

    def logout(self) -> None:
        """The connection is gone: release every port at once."""
        if self.gone:
            return
        self.gone = True
        if self.connected_at is not None:
            self.log.info(
                "{member} disconnected from {source} after {duration}",
                member=self.identity.member_name,
                source=self.source,
                fingerprint=self.identity.fingerprint,
                seconds=round(self.clock.seconds() - self.connected_at, 3),
                duration=duration(self.clock.seconds() - self.connected_at),
            )
        for forward in list(self.forwards.values()):
            self._release(forward)
        self.registry.remove_avatar(self)

    def disconnect(self, reason: str) -> None:
        """End this connection now: ports freed at once, socket cut within a second."""
        if self.gone:
            return
        self.log.info(
            "disconnecting {member} ({fingerprint}): {reason}",
            member=self.identity.member_name,
            fingerprint=self.identity.fingerprint,
            reason=reason,
        )
        transport = self.conn.transport
        self.metrics.disconnects.labels(DISCONNECT_LABELS.get(reason, "other")).inc()
        self._audit("disconnect", reason=reason)
        self.logout()
        # The transport cuts the socket if the client has not closed it
        # within transport.DISCONNECT_GRACE.
        transport.sendDisconnect(DISCONNECT_BY_APPLICATION, reason.encode("utf-8"))

    # -- channels ------------------------------------------------------------------

    def lookupChannel(self, channelType, windowSize, maxPacket, data):
        refusal = policy.channel_allowed(channelType)
        if refusal is not None:
            raise ConchError(refusal.reason, OPEN_ADMINISTRATIVELY_PROHIBITED)
        if maxPacket < MIN_MEMBER_PACKET:
            # Conch cuts what it writes into packets of maxPacket bytes: with 0
            # it loops forever on empty packets, and the whole server with it.
            raise ConchError(
                f"maximum packet size {maxPacket} is too small "
                f"(at least {MIN_MEMBER_PACKET} needed)",
                OPEN_ADMINISTRATIVELY_PROHIBITED,
            )
        return TunnelSession(
            remoteWindow=windowSize, remoteMaxPacket=maxPacket, data=data, avatar=self
        )

    # -- global requests -------------------------------------------------------------

    def gotGlobalRequest(self, requestType: bytes, data: bytes):
        if requestType == b"tcpip-forward":
            return self.request_forward(data)
        if requestType == b"cancel-tcpip-forward":
            return self.cancel_forward(data)
        return 0

    def request_forward(self, data: bytes) -> int | tuple[int, bytes]:
        """Answer ``tcpip-forward``: 1 (or the allocated port for port 0), 0 if refused."""
        try:
            requested_host, port = unpackGlobal_tcpip_forward(data)
        except (struct.error, UnicodeDecodeError, ValueError):
            self.log.warn("malformed tcpip-forward from {member}", member=self.identity.member_name)
            self._tell_refusal("the tcpip-forward request is malformed")
            self._count_refusal()
            return 0
        first = not self.opened_forward
        if not first and self._out_of_changes():
            return 0
        result = self._bind(requested_host, port)
        if isinstance(result, Refused):
            self.log.info(
                "bind {port} for {member} refused: {code}",
                port=port,
                member=self.identity.member_name,
                code=result.code,
            )
            self.metrics.refused_binds.labels(result.code).inc()
            self._tell_refusal(result.reason)
            if self._count_refusal():
                self._audit("bind-refused", port=port, code=result.code)
            return 0
        self._audit("bind", port=result.port, requested_host=requested_host)
        self.opened_forward = True
        if not first:
            self._count_change()
        if port == 0:
            return (1, struct.pack(">L", result.port))
        return 1

    def _tell_refusal(self, reason: str) -> None:
        """Say why a forward was refused, before the bare failure reply: the
        SSH answer to ``tcpip-forward`` has no room for a reason.  ``ssh -v``
        prints an SSH_MSG_DEBUG as ``debug1: Remote: ...`` (sshd tells of its
        own refusals the same way); the banner of a session lists them."""
        message = f"Forward refused: {reason}"
        self.refused.append(message)
        self.conn.transport.sendDebug(message.encode("utf-8"), alwaysDisplay=True)

    def _count_refusal(self) -> bool:
        """Count a refused or malformed request; False once there were too many
        (the connection is ending: a client looping on them would flood the logs
        and the audit trail)."""
        self.refusals += 1
        if self.refusals > MAX_REFUSALS:
            self.disconnect("too many refused forward requests")
            return False
        return True

    def _bind(self, requested_host: str, port: int) -> ActiveForward | Refused:
        rules = self.config.forwarding.rules
        if len(requested_host) > MAX_HOST_LENGTH:
            return Refused("bad-host", "the requested bind address is too long")
        if self.budget is not None and self.registry.holder_of(port) is None:
            full = self.budget.refusal()
            if full is not None:
                return full
        if self.registry.holder_of(port) is None:
            held = self.registry.count_for_member(self.identity.member_id)
            too_many = self.limits.refusal("forwards", held, rules.max_per_member)
            if too_many is not None:
                return too_many
        if port == 0:
            forward = None

            def try_bind(candidate: int) -> bool:
                nonlocal forward
                forward = self._listen(requested_host, candidate)
                return forward is not None

            allocated = policy.allocate_port(rules, self.registry.held_ports(), try_bind, self.rng)
            if isinstance(allocated, Refused):
                return allocated
            assert forward is not None
            return forward

        decision = policy.decide_bind(port, self.holder, self.registry.holder_of(port), rules)
        if isinstance(decision, Refused):
            return decision
        if isinstance(decision, Takeover):
            contested = self._contested(decision)
            if contested is not None:
                return contested
            return self._take_over(requested_host, decision)
        assert isinstance(decision, Bind)
        forward = self._listen(requested_host, port)
        if forward is None:
            return Refused("port-unavailable", f"port {port} is in use on the jumphost")
        return forward

    def _listen(self, requested_host: str, port: int) -> ActiveForward | None:
        bind_address = self.config.forwarding.bind_address
        forward = ActiveForward(
            port=port,
            requested_host=requested_host,
            bind_address=bind_address,
            avatar=self,
            since=self.clock.seconds(),
        )
        parked = self.registry.unpark(port)
        if parked is not None:
            # Released a moment ago and not closed yet: reuse the socket.
            forward.listener, forward.factory = parked.listener, parked.factory
            assert forward.factory is not None
            forward.factory.forward = forward
        else:
            forward.factory = ForwardListenerFactory(
                forward, self.config.ssh.allowed_sources, self.metrics
            )
            try:
                forward.listener = self.reactor.listenTCP(
                    port, forward.factory, interface=bind_address
                )
                gather_writes(forward.listener)
            except CannotListenError as error:
                self._log_bind_error(bind_address, port, error.socketError)
                return None
        self.forwards[port] = forward
        self.registry.add_forward(forward)
        return forward

    _bind_error_logged = False

    def _log_bind_error(self, address: str, port: int, error: object) -> None:
        """Say why the OS would not open a port, unless it was only in use (once
        per connection: with the mesh address gone every port fails alike)."""
        if getattr(error, "errno", None) == errno.EADDRINUSE or self._bind_error_logged:
            return
        self._bind_error_logged = True
        self.log.error(
            "cannot open port {port} on {address} for {member}: {reason} "
            "(is [forwarding] bind_address an address of this machine, and up?)",
            port=port,
            address=address,
            member=self.identity.member_name,
            reason=getattr(error, "strerror", None) or error,
        )

    def _contested(self, decision: Takeover) -> Refused | None:
        """Refuse a takeover of a port that changed hands a short while ago
        (``policy.takeover_contested``), and ask its holder to answer: one
        that does not within ``STALE_PROBE_SECONDS`` is ended, so the next try
        gets the port.  A holder that answers keeps it, and hears why on the
        dashboard (its Live tunnels row)."""
        forward = self.registry.forward_on(decision.port)
        now = self.clock.seconds()
        if (
            forward is None
            or forward.avatar.conn.keepalive is None  # no way to ask: as before
            or not policy.takeover_contested(forward.contested_at, now)
        ):
            return None
        forward.contested_at = now
        forward.last_error = (
            "another connection with this key asked for this port; is the key in use on "
            "two machines?"
        )
        self.registry.forward_changed(forward)  # the last error, for the admin CLI too
        forward.avatar.conn.probe(STALE_PROBE_SECONDS)
        return Refused(
            "port-contested",
            f"port {decision.port} changed hands between connections of this key a short "
            "while ago and its holder is being asked whether it is still there",
        )

    def _take_over(self, requested_host: str, decision: Takeover) -> ActiveForward | Refused:
        forward = self.registry.forward_on(decision.port)
        if forward is None:  # pragma: no cover - policy saw a holder a moment ago
            return Refused("port-unavailable", "port changed hands")
        previous = forward.avatar
        previous.forwards.pop(forward.port, None)
        forward.avatar = self
        forward.requested_host = requested_host
        forward.since = forward.contested_at = self.clock.seconds()
        forward.last_error = None
        self.forwards[forward.port] = forward
        self.registry.forward_changed(forward)
        self.log.info(
            "port {port} taken over by {member} from connection {previous}",
            port=forward.port,
            member=self.identity.member_name,
            previous=previous.connection_id,
        )
        self._audit("takeover", port=forward.port)
        self.metrics.takeovers.inc()
        if not previous.forwards:
            previous.disconnect("port taken over by a newer connection of the same key")
        return forward

    def cancel_forward(self, data: bytes) -> int:
        """Answer ``cancel-tcpip-forward``: release one port this connection holds."""
        try:
            _host, port = unpackGlobal_tcpip_forward(data)
        except (struct.error, UnicodeDecodeError, ValueError):
            return 0
        forward = self.forwards.get(port)
        if forward is None or self._out_of_changes():
            return 0
        self._release(forward)
        self._audit("unbind", port=port)
        self._count_change()
        return 1

    def _out_of_changes(self) -> bool:
        """True (and the connection ends) if the member opened and cancelled
        MAX_FORWARD_CHANGES forwards in the last hour."""
        changes = self.registry.forward_changes
        if changes.used(self.identity.member_id, self.clock.seconds()) < MAX_FORWARD_CHANGES:
            return False
        self.disconnect("too many forward requests")
        return True

    def _count_change(self) -> None:
        self.registry.forward_changes.spend(self.identity.member_id, self.clock.seconds())

    def _release(self, forward: ActiveForward) -> None:
        self.forwards.pop(forward.port, None)
        self.registry.remove_forward(forward)
        if forward.listener is not None and forward.avatar is self:
            # The socket closes on the next reactor turn; until then a bind
            # for this port (a reconnecting client) gets it back at once.
            self.registry.park(forward, self.clock)

    def forward_failed(self, forward: ActiveForward, message: str) -> None:
        """A mesh connection could not be handed to the member; remember why."""
        self.log.info(
            "forward {port} of {member}: {message}",
            port=forward.port,
            member=self.identity.member_name,
            message=message,
        )
        self.registry.forward_changed(forward)

    # -- presentation ------------------------------------------------------------------

    def status_banner(self) -> str:
        """What the shell shows: forwards of this connection and how to close."""
        cfg = self.config
        host = cfg.web.public_hostname
        lines = [
            f"nekojump: tunnel-only session for {self.identity.member_name}"
            + (f" (key: {self.identity.key_description})" if self.identity.key_description else ""),
        ]
        if self.forwards:
            lines.append("Forwarding:")
            for port in sorted(self.forwards):
                lines.append(
                    f"  port {port}: mesh members reach it at "
                    f"{cfg.forwarding.bind_address}:{port} ({host}:{port})"
                )
        else:
            lines.append(
                "No forwards on this connection. Open one with "
                f"-R PORT:localhost:LOCALPORT (ports {cfg.forwarding.port_min}-"
                f"{cfg.forwarding.port_max}), e.g. ssh -N -R "
                f"{cfg.forwarding.port_min + 80}:localhost:8000 ..."
            )
        lines.extend(self.refused)
        lines.append("There is no shell here. Close with Ctrl-C or Ctrl-D; the tunnel closes too.")
        return "\n".join(lines) + "\n"

    def _audit(self, event: str, **detail: object) -> None:
        self.store.write_later(
            self.store.store.audit,
            event,
            member=self.identity.member_name,
            source=self.source,
            detail={"key": self.identity.fingerprint, **detail},
        ).addErrback(self._audit_failed, event)

    def _audit_failed(self, failure: Failure, event: str) -> None:
        # One line, not a traceback per login while the disk is full.
        self.log.warn(
            "could not write the audit event {event} of {member}: {error}",
            event=event,
            member=self.identity.member_name,
            error=failure.getErrorMessage(),
        )
