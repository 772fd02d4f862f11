"""Live tunnels: which connection holds which port, and killing by key."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from attrs import define, field, frozen
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger
from twisted.python.failure import Failure

from nekojump.model import Identity, LiveForward
from nekojump.policy import ChangeBudget, Holder, plain_number

if TYPE_CHECKING:
    from nekojump.ssh.avatar import TunnelAvatar
    from nekojump.ssh.forwarding import ForwardListenerFactory


def close_now(listener: IListeningPort) -> None:
    """Stop listening and free the port before returning.

    A TCP port's ``stopListening`` closes its socket a reactor turn later: a
    forward asked for in between (a client that cancels and asks again) was
    refused with the port "in use".  Closing here is safe because it is never
    called from the port's own ``doRead``, which is what Twisted's delay is for."""
    if isinstance(listener, tcp.Port) and listener.connected:
        listener.disconnecting = True
        listener.stopReading()
        listener.connectionLost(Failure(CONNECTION_DONE))
    else:
        listener.stopListening()


@define(eq=False)
class ActiveForward:
    """One bound remote forward and what has happened on it."""

    port: int
    requested_host: str
    bind_address: str
    avatar: TunnelAvatar
    since: float
    listener: IListeningPort | None = None
    factory: ForwardListenerFactory | None = None
    open_connections: int = 0
    connections_total: int = 0
    bytes_to_member: int = 0
    bytes_from_member: int = 0
    last_error: str | None = None
    #: When the port last changed hands by takeover, or a takeover of it was
    #: refused (``policy.takeover_contested``).
    contested_at: float | None = None

    @property
    def holder(self) -> Holder:
        return self.avatar.holder

    def live(self) -> LiveForward:
        """This forward as the CLI and dashboard list it."""
        identity = self.avatar.identity
        return LiveForward(
            port=self.port,
            member_name=identity.member_name,
            key_fingerprint=identity.fingerprint,
            key_description=identity.key_description,
            bind_address=self.bind_address,
            requested_host=self.requested_host,
            source=self.avatar.source,
            since=self.since,
            last_error=self.last_error,
        )


@frozen
class Totals:
    """Connections and bytes through all forwards since the server started."""

    connections: int = 0
    bytes_to_member: int = 0
    bytes_from_member: int = 0

    def plus(self, forward: ActiveForward) -> Totals:
        return Totals(
            self.connections + forward.connections_total,
            self.bytes_to_member + forward.bytes_to_member,
            self.bytes_from_member + forward.bytes_from_member,
        )


def _count(counts: dict[int, int], key: int, change: int) -> None:
    value = counts.get(key, 0) + change
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


@define
class TunnelRegistry:
    """Every authenticated tunnel connection and every port it holds."""

    _forwards: dict[int, ActiveForward] = field(factory=dict)
    _avatars: dict[int, TunnelAvatar] = field(factory=dict)
    _ids: Iterable[int] = field(factory=lambda: itertools.count(1))
    _parked: dict[int, tuple[ActiveForward, IDelayedCall]] = field(factory=dict)
    _closed_totals: Totals = field(factory=lambda: Totals())
    #: Released forwards whose mesh connections still run: their bytes still count.
    _lingering: dict[ActiveForward, None] = field(factory=dict)
    #: Each member's forwards by port: what a member's pages show, found without
    #: looking at everyone's (thousands of tunnels, refreshed every 2 s per tab).
    _member_forwards: dict[int, dict[int, ActiveForward]] = field(factory=dict)
    _connections_per_member: dict[int, int] = field(factory=dict)
    _streams_per_member: dict[int, int] = field(factory=dict)
    #: Forwards each member opened and cancelled lately (``avatar.MAX_FORWARD_CHANGES``).
    forward_changes: ChangeBudget = field(factory=ChangeBudget)
    #: Mesh connections open through any forward, removed or not.
    open_streams: int = 0
    on_change: Callable[[ActiveForward | None, int], None] | None = None

    log = Logger()

    def next_connection_id(self) -> int:
        return next(self._ids)  # type: ignore[call-overload]

    # -- connections -------------------------------------------------------------

    def add_avatar(self, avatar: TunnelAvatar) -> None:
        self._avatars[avatar.connection_id] = avatar
        _count(self._connections_per_member, avatar.identity.member_id, +1)

    def remove_avatar(self, avatar: TunnelAvatar) -> None:
        if self._avatars.pop(avatar.connection_id, None) is not None:
            _count(self._connections_per_member, avatar.identity.member_id, -1)

    def connections_of(self, member_id: int) -> int:
        return self._connections_per_member.get(member_id, 0)

    def streams_of(self, member_id: int) -> int:
        return self._streams_per_member.get(member_id, 0)

    def avatars(self) -> list[TunnelAvatar]:
        return list(self._avatars.values())

    def avatars_of_member(self, member_id: int) -> list[TunnelAvatar]:
        return [a for a in self._avatars.values() if a.identity.member_id == member_id]

    def avatars_of_key(self, key_id: int) -> list[TunnelAvatar]:
        return [a for a in self._avatars.values() if a.identity.key_id == key_id]

    def disconnect_unusable(self, usable_key_ids: frozenset[int], reason: str) -> int:
        """End every connection whose key is no longer usable; return how many."""
        doomed = [a for a in self._avatars.values() if a.identity.key_id not in usable_key_ids]
        for avatar in doomed:
            avatar.disconnect(reason)
        return len(doomed)

    def apply_tiers(self, tiers: Mapping[int, str]) -> int:
        """Give each connection its member's tier as stored now; return how many changed."""
        changed = 0
        for avatar in list(self._avatars.values()):
            tier = tiers.get(avatar.identity.member_id)
            if tier is not None and tier != avatar.identity.tier:
                avatar.change_tier(tier)
                changed += 1
        return changed

    def kill(self, action: str, target: str) -> int:
        """End the connection holding a port (``kill-port``) or a member's (``kill-member``)."""
        if action == "kill-port":
            port = plain_number(target)
            forward = self._forwards.get(port) if port is not None else None
            doomed = [forward.avatar] if forward else []
        else:
            doomed = [a for a in self._avatars.values() if a.identity.member_name == target]
        for avatar in doomed:
            avatar.disconnect("ended by the operator")
        return len(doomed)

    # -- forwards ----------------------------------------------------------------

    def holder_of(self, port: int) -> Holder | None:
        forward = self._forwards.get(port)
        return forward.holder if forward else None

    def forward_on(self, port: int) -> ActiveForward | None:
        return self._forwards.get(port)

    def held_ports(self) -> set[int]:
        return set(self._forwards)

    def forwards(self) -> list[ActiveForward]:
        return sorted(self._forwards.values(), key=lambda f: f.port)

    def forwards_of(self, identity: Identity) -> list[ActiveForward]:
        return [f for f in self.forwards() if f.avatar.identity == identity]

    def descriptors_in_use(self) -> int:
        """Sockets this registry accounts for: SSH connections, listeners, mesh streams."""
        return len(self._avatars) + len(self._forwards) + len(self._parked) + self.open_streams

    def count_for_member(self, member_id: int) -> int:
        """Forwards a member holds now (kept as a count: this is asked on every bind)."""
        return len(self._member_forwards.get(member_id, ()))

    def forwards_of_member(self, member_id: int) -> list[ActiveForward]:
        """A member's forwards, by port."""
        mine = self._member_forwards.get(member_id, {})
        return [mine[port] for port in sorted(mine)]

    def stream_opened(self, member_id: int) -> None:
        self.open_streams += 1
        _count(self._streams_per_member, member_id, +1)

    def stream_closed(self, member_id: int, forward: ActiveForward | None = None) -> None:
        """A mesh connection ended (``forward``: the one it came in on)."""
        self.open_streams -= 1
        _count(self._streams_per_member, member_id, -1)
        if forward is not None and not forward.open_connections and forward in self._lingering:
            del self._lingering[forward]
            self._closed_totals = self._closed_totals.plus(forward)

    # -- released listeners, closing on the next reactor turn -----------------------

    def park(self, forward: ActiveForward, clock: IReactorTime) -> None:
        """Stop taking connections on a released forward's listener; close it on the
        next reactor turn unless ``unpark`` claims it first."""
        assert forward.listener is not None and forward.factory is not None
        forward.factory.forward = None
        call = clock.callLater(0, self._close_parked, forward.port)
        self._parked[forward.port] = (forward, call)

    def unpark(self, port: int) -> ActiveForward | None:
        """The released forward still listening on ``port``, now no longer closing."""
        parked = self._parked.pop(port, None)
        if parked is None:
            return None
        forward, call = parked
        call.cancel()
        return forward

    def _close_parked(self, port: int) -> None:
        forward, _call = self._parked.pop(port)
        assert forward.listener is not None
        close_now(forward.listener)

    def add_forward(self, forward: ActiveForward) -> None:
        self._forwards[forward.port] = forward
        self._member_forwards.setdefault(forward.holder.member_id, {})[forward.port] = forward
        self._changed(forward, forward.port)

    def totals(self) -> Totals:
        """Totals of closed forwards plus the live ones."""
        result = self._closed_totals
        for forward in (*self._forwards.values(), *self._lingering):
            result = result.plus(forward)
        return result

    def remove_forward(self, forward: ActiveForward) -> None:
        if self._forwards.get(forward.port) is forward:
            del self._forwards[forward.port]
            member_id = forward.holder.member_id
            mine = self._member_forwards.get(member_id, {})
            mine.pop(forward.port, None)
            if not mine:
                self._member_forwards.pop(member_id, None)
            if forward.open_connections:
                self._lingering[forward] = None  # counted until its last connection ends
            else:
                self._closed_totals = self._closed_totals.plus(forward)
            self._changed(None, forward.port)

    def forward_changed(self, forward: ActiveForward) -> None:
        """Tell listeners (the live-forwards table) that ``forward`` changed."""
        if self._forwards.get(forward.port) is forward:
            self._changed(forward, forward.port)

    def _changed(self, forward: ActiveForward | None, port: int) -> None:
        if self.on_change is not None:
            self.on_change(forward, port)
