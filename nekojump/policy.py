"""Pure decisions: which sources, channels, requests and binds are allowed.

Nothing here does I/O or knows about Twisted; the SSH code gathers the facts,
asks, and acts on the answer.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Literal

from attrs import define, field, frozen

from nekojump.model import Refused

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TakeoverMode = Literal["same-key", "same-member", "never"]


# -- sources -----------------------------------------------------------------


def source_allowed(host: str, networks: Iterable[IPNetwork]) -> bool:
    """True if the peer address ``host`` lies in one of ``networks``.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) count as their IPv4
    address; anything that is not an IP address is refused.
    """
    address = _peer_address(host)
    if address is None:
        return False
    return any(address in network for network in networks)


@functools.lru_cache(maxsize=4096)
def _peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` parsed (mapped IPv6 as IPv4), None if it is not an address.
    Cached: the same few peers connect again and again."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@frozen
class StartupLimits:
    """Caps on connections that have not authenticated yet (OpenSSH MaxStartups)."""

    total: int = 100
    per_source: int = 10


def startup_refusal(
    source: str, startups: Mapping[str, int], limits: StartupLimits
) -> Refused | None:
    """None if one more unauthenticated connection from ``source`` may start."""
    if sum(startups.values()) >= limits.total:
        return Refused("too-many-startups", "too many unauthenticated connections")
    if startups.get(source, 0) >= limits.per_source:
        return Refused(
            "too-many-startups-from-source",
            f"too many unauthenticated connections from {source}",
        )
    return None


def capacity_refusal(in_use: int, limit: int, needed: int = 1, reserve: int = 64) -> Refused | None:
    """None if ``needed`` more file descriptors fit under ``limit`` (keeping ``reserve`` spare).

    At the limit the server refuses new connections and forwards cleanly
    instead of accepting sockets it cannot serve.
    """
    if in_use + needed > limit - reserve:
        return Refused("server-full", "the jumphost is at its connection limit; try again later")
    return None


@frozen
class TierLimits:
    """What one member of a tier may hold at once; 0 means no cap of its own."""

    connections: int = 0
    forwards: int = 0
    streams: int = 0

    def refusal(self, what: str, held: int, ceiling: int) -> Refused | None:
        """None if one more ``what`` fits under this tier's cap and the global ``ceiling``."""
        cap = getattr(self, what)
        limit = min(cap, ceiling) if cap else ceiling
        if held >= limit:
            return Refused(
                f"too-many-{what}",
                f"you already hold {held} {what} (the limit is {limit})",
            )
        return None


@define
class ChangeBudget:
    """How many changes each member made in the last ``window`` seconds, so that
    a cap holds per member across requests and connections: every change (a key
    or port registered or removed, a forward opened or cancelled) is an audit
    event, and a loop would otherwise grow the audit trail without bound."""

    window: float = 3600.0
    _times: dict[int, deque[float]] = field(factory=dict)

    def used(self, member_id: int, now: float) -> int:
        """Changes ``member_id`` made in the window ending ``now``."""
        times = self._times.get(member_id)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._times[member_id]
        return len(times)

    def refusal(self, member_id: int, now: float, limit: int) -> Refused | None:
        """None if one more change fits under ``limit``; otherwise why not."""
        used = self.used(member_id, now)
        if used < limit:
            return None
        minutes = round(self.window / 60)
        return Refused(
            "too-many-changes",
            f"you made {used} changes in the last {minutes} minutes (the limit is {limit}); "
            "try again later",
        )

    def spend(self, member_id: int, now: float) -> None:
        self._times.setdefault(member_id, deque()).append(now)


# -- channels and requests -----------------------------------------------------

SESSION_CHANNEL = b"session"

#: Global requests a tunnel connection may make.  Keepalives get FAILURE, which
#: is the answer OpenSSH itself gives and its clients expect.
FORWARD_REQUESTS = frozenset({b"tcpip-forward", b"cancel-tcpip-forward"})

#: Session requests that are accepted and ignored, so stock clients carry on.
IGNORED_SESSION_REQUESTS = frozenset({b"pty-req", b"env", b"window-change"})


def channel_allowed(channel_type: bytes) -> Refused | None:
    """None for a session channel; a refusal for every other channel type.

    ``direct-tcpip`` (``ssh -L``/``-D``/``-W``, ProxyJump) and
    ``direct-streamlocal@openssh.com`` would let the account reach the
    jumphost's network; the account may only hold remote forwards.
    """
    if channel_type == SESSION_CHANNEL:
        return None
    return Refused(
        "channel-prohibited",
        f"channel type {channel_type.decode('ascii', 'replace')!r} is not "
        "available: this account can only hold remote forwards (ssh -R)",
    )


# -- binds ---------------------------------------------------------------------


@frozen
class ForwardRules:
    """The forwarding part of the configuration, as policy needs it."""

    port_min: int
    port_max: int
    reserved_ports: frozenset[int] = frozenset()
    takeover: TakeoverMode = "same-key"
    #: A safety ceiling, not a quota: the seed promises no enforced cap.
    max_per_member: int = 1000


@frozen
class Holder:
    """Who holds a port now: the key, member and connection behind it."""

    key_id: int
    member_id: int
    connection_id: int


@frozen
class Bind:
    """Bind ``port`` for the requesting connection."""

    port: int


@frozen
class Takeover:
    """Move ``port`` from an older connection (``previous``) to this one."""

    port: int
    previous: Holder


BindDecision = Bind | Takeover | Refused


def plain_number(text: str) -> int | None:
    """``text`` as a number if it is nothing but ASCII digits (a port, a count), else None.

    ``str.isdigit`` alone is not enough: it takes "²" and "٣", which ``int``
    refuses or reads as another number."""
    return int(text) if text.isascii() and text.isdecimal() else None


def port_refusal(port: int, rules: ForwardRules) -> Refused | None:
    """None if ``port`` may ever be forwarded; otherwise why not."""
    if not rules.port_min <= port <= rules.port_max:
        return Refused(
            "port-out-of-range",
            f"port {port} is outside the allowed range {rules.port_min}-{rules.port_max}",
        )
    if port in rules.reserved_ports:
        return Refused("port-reserved", f"port {port} is reserved by the operator")
    return None


def decide_bind(
    port: int,
    requester: Holder,
    holder: Holder | None,
    rules: ForwardRules,
) -> BindDecision:
    """Decide a ``tcpip-forward`` for a non-zero ``port``.

    ``holder`` is whoever holds the port on this server now (or None).  A port
    held by the same connection, or by another member, is never handed over;
    a port held by an older connection of the same key (or member, by config)
    is taken over so a reconnecting autossh gets its port back at once.
    """
    refusal = port_refusal(port, rules)
    if refusal is not None:
        return refusal
    if holder is None:
        return Bind(port)
    if holder.connection_id != requester.connection_id and _may_take_over(
        requester, holder, rules.takeover
    ):
        return Takeover(port, holder)
    return Refused("port-in-use", f"port {port} is already forwarded by a tunnel")


#: Once a port has passed from one connection to another by takeover, how
#: long (seconds) a further takeover first has the holder show it is gone:
#: longer than autossh's slowest retry (10 minutes), so two live clients with
#: one key (a systemd unit and a hand-started autossh, a key copied to a
#: second machine) settle instead of taking the port from each other forever.
CONTEST_SECONDS = 900.0


def takeover_contested(last_contest: float | None, now: float) -> bool:
    """True if a takeover of a port must wait for its holder to prove gone:
    the port changed hands, or a takeover was refused, within ``CONTEST_SECONDS``."""
    return last_contest is not None and now - last_contest < CONTEST_SECONDS


def _may_take_over(requester: Holder, holder: Holder, mode: TakeoverMode) -> bool:
    if mode == "same-key":
        return holder.key_id == requester.key_id
    if mode == "same-member":
        return holder.member_id == requester.member_id
    return False


def candidate_ports(
    rules: ForwardRules,
    held: Container[int],
    rng: random.Random,
    attempts: int = 64,
) -> Iterable[int]:
    """Ports to try, in order, for a ``tcpip-forward`` of port 0.

    Random picks first (cheap when the range is mostly free), then a sweep of
    the whole range from a random start, so a free port is found whenever one
    exists.  Held and reserved ports are skipped.
    """

    def usable(port: int) -> bool:
        return port not in held and port not in rules.reserved_ports

    span = rules.port_max - rules.port_min + 1
    for _ in range(attempts):
        port = rules.port_min + rng.randrange(span)
        if usable(port):
            yield port
    start = rng.randrange(span)
    for offset in range(span):
        port = rules.port_min + (start + offset) % span
        if usable(port):
            yield port


def allocate_port(
    rules: ForwardRules,
    held: Container[int],
    try_bind: Callable[[int], bool],
    rng: random.Random,
    max_tries: int = 256,
) -> int | Refused:
    """Pick a free port for ``ssh -R 0:...``: the first candidate ``try_bind`` takes.

    ``try_bind(port)`` returns False when something else on the host holds
    the port.  After ``max_tries`` failed binds the request is refused.
    """
    for tries, port in enumerate(candidate_ports(rules, held, rng)):
        if tries >= max_tries:
            break
        if try_bind(port):
            return port
    return Refused("no-free-port", "no free port is left in the allowed range")
