"""The member operations behind both the HTML dashboard and the JSON API."""

from __future__ import annotations

import secrets
from typing import Any, TypeVar

from attrs import define, field
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from nekojump.config import Config
from nekojump.diagnosis import Diagnosis, diagnose, probe_forward
from nekojump.hostkey import host_key_fingerprint
from nekojump.keys import MAX_DESCRIPTION, key_description, parse_public_key
from nekojump.metrics import Metrics
from nekojump.model import KeyRecord, Member, Refused, RegisteredPort
from nekojump.passwords import verify_password
from nekojump.policy import ChangeBudget, plain_number, source_allowed
from nekojump.ssh.registry import ActiveForward, TunnelRegistry
from nekojump.store import DeferredStore
from nekojump.web.auth import (
    SESSION_LIFETIME,
    LoginThrottle,
    Viewer,
    is_member_name,
    sso_csrf_token,
)
from nekojump.web.views import ConnectInfo, port_state, suggest_port, tunnel_rows

#: An SSO member's requests are audited as one login per this many seconds.
SSO_AUDIT_INTERVAL = 3600.0

LOGIN_FAILED = Refused("login-failed", "wrong member name or password")
#: A change the database could not store (a full or failing disk).
STORE_FAILED = Refused(
    "storage-unavailable",
    "the jumphost could not save this: its database failed, so nothing was changed. "
    "Try again later; the operator finds the error in the jumphost's log",
)
#: Told only to whoever gave the right password: a disabled member who logs in
#: again learns why, and nothing is revealed to someone guessing.
MEMBER_DISABLED = Refused(
    "member-disabled",
    "this account is disabled, so it cannot log in; ask an admin to enable it again",
)

T = TypeVar("T")


def shortened(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis), for the audit trail."""
    return text if len(text) <= limit else text[:limit] + "…"


_store_log = Logger(namespace="nekojump.web")


def log_store_failure(request: Any, error: BaseException) -> None:
    """One line for the operator: which request the database failed, and how."""
    _store_log.warn(
        "{method} {path} not done: the database failed: {error}",
        method=request.method.decode("ascii", "replace"),
        path=request.path.decode("utf-8", "replace"),
        error=str(error) or type(error).__name__,
    )


def _again(mine: KeyRecord | RegisteredPort, description: str, what: str) -> Any:
    """A member saving what they have saved already (a form sent twice, a script
    run again): done, if it says the same; else why not, in their own words."""
    if mine.description == description.strip():
        return mine
    return Refused(
        "key-exists" if isinstance(mine, KeyRecord) else "port-registered",
        f"you registered {what} already, as {mine.description or '(no description)'!r}; "
        "remove it first to describe it differently",
    )


def _default_clock() -> IReactorTime:
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


def ssh_port_of(listen: str) -> int:
    """The TCP port an SSH endpoint string listens on (2222 if it cannot tell)."""
    endpoint = serverFromString(None, listen)
    return int(getattr(endpoint, "_port", 2222))


def port_number(port: Any) -> int | None:
    """A port as a member gave it (a JSON number, or the text of a form), or
    None if it is not a plain whole number ("+10080", "1_0080" and digits of
    other scripts are not, although ``int`` reads them)."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if not isinstance(port, str):
        return None
    text = port.strip()
    digits = text.removeprefix("-")  # a negative number is one, outside the range
    try:
        number = plain_number(digits)
    except ValueError:  # more digits than int() converts: no port anyway
        return None
    return None if number is None else -number if digits != text else number


@define
class Backend:
    """Reads and changes through the store; kills sessions of removed keys at once."""

    config: Config
    store: DeferredStore
    registry: TunnelRegistry
    host_key: Key
    throttle: LoginThrottle
    metrics: Metrics = field(factory=Metrics)
    clock: IReactorTime = field(factory=lambda: _default_clock())
    log: Logger = field(factory=Logger)
    sso_secret: bytes = field(factory=lambda: secrets.token_bytes(32))
    #: When each member's last SSO login was audited (one entry per member).
    _sso_logins: dict[str, float] = field(factory=dict)
    #: Keys and ports each member added or removed lately (each is audited).
    changes: ChangeBudget = field(factory=ChangeBudget)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self.store.call(getattr(self.store.store, name), *args, **kwargs)

    def _changes_left(self, member: Member) -> Refused | None:
        """Why ``member`` may not add a key or port now (None: they may); removals
        count but are never refused.  Admins are not counted: they clean up after
        others."""
        if member.is_admin:
            return None
        limit = self.config.limits.max_changes_per_member_per_hour
        return self.changes.refusal(member.id, self.clock.seconds(), limit)

    def _changed(self, member: Member, result: T) -> T:
        """Count a change ``member`` made (unless ``result`` refused it); returns it."""
        if not isinstance(result, Refused) and not member.is_admin:
            self.changes.spend(member.id, self.clock.seconds())
        return result

    # -- who is asking ---------------------------------------------------------------

    async def login(self, name: str, password: str, source: str) -> str | Refused:
        """A new session token, or why not (bad credentials look alike).

        Each attempt is counted before its password is checked, so a burst of
        guesses sent at once is checked no more often than one after another.
        A name no member could have is refused without a password check."""
        known_form = is_member_name(name)
        attempt = self.throttle.reserve(name if known_form else None, source)
        if attempt is None:
            return Refused("login-throttled", "too many logins; wait a few minutes")
        if not known_form:
            detail = {"name": shortened(name)}
            await self._call("audit", "login-failed", source=source, detail=detail)
            return LOGIN_FAILED
        stored_hash, active = await self._call("password_hash", name) or (None, False)
        if not await deferToThread(verify_password, password, stored_hash):
            await self._call("audit", "login-failed", member=name, source=source)
            return LOGIN_FAILED
        if not active:
            detail = {"why": "member disabled"}
            await self._call("audit", "login-failed", member=name, source=source, detail=detail)
            return MEMBER_DISABLED
        self.throttle.succeeded(name, source, attempt)
        token, _csrf = await self._call("create_session", name, SESSION_LIFETIME)
        return token

    async def viewer_from_session(self, token: str) -> Viewer | None:
        found = await self._call("session_member", token)
        return Viewer(found[0], found[1], token) if found else None

    async def viewer_from_token(self, token: str) -> Viewer | None:
        member = await self._call("token_member", token)
        return Viewer(member, None) if member else None

    async def viewer_from_sso(self, name: str, source: str) -> Viewer | None:
        """The active member the trusted SSO proxy names, for this request only.

        The proxy names them on every request, so no session is stored; their CSRF
        token is derived (``sso_csrf_token``). The login is audited at most once
        an hour per member, not on every request."""
        member = await self._call("get_member", name)
        if member is None or not member.active:
            return None
        now = self.clock.seconds()
        if now - self._sso_logins.get(name, -SSO_AUDIT_INTERVAL) >= SSO_AUDIT_INTERVAL:
            self._sso_logins[name] = now
            await self._call("audit", "login", member=name, source=source, detail={"via": "sso"})
        return Viewer(member, sso_csrf_token(self.sso_secret, name))

    async def logout(self, token: str) -> None:
        await self._call("end_session", token)

    # -- keys ----------------------------------------------------------------------------

    async def keys(self, member: Member) -> list[KeyRecord]:
        return await self._call("list_keys", member.name)

    async def add_key(self, member: Member, text: str, description: str) -> KeyRecord | Refused:
        key = parse_public_key(text)
        if isinstance(key, Refused):
            return key
        if len(description) > MAX_DESCRIPTION:
            return Refused(
                "description-too-long",
                f"keep the description under {MAX_DESCRIPTION} characters",
            )
        mine = await self._call("find_key", key.fingerprint)
        if mine is not None and mine.member_id == member.id:
            # Compared with what a save stores: no description means the key's comment.
            return _again(mine, key_description(description, key.comment), "this key")
        if (busy := self._changes_left(member)) is not None:
            return busy
        added = await self._call(
            "add_key", member.name, key, description, self.config.limits.max_keys_per_member
        )
        return self._changed(member, added)

    async def remove_key(self, viewer: Member, fingerprint: str) -> KeyRecord | Refused:
        """Remove one of the viewer's keys (any key for admins); its sessions end now."""
        record = await self._call("find_key", fingerprint)
        if record is None or (record.member_id != viewer.id and not viewer.is_admin):
            return Refused("no-such-key", f"you have no key {fingerprint}")
        # Never refused for the change budget: a key must go at once (a leaked
        # token that spent the budget must not keep its own key alive).
        removed = self._changed(
            viewer, await self._call("remove_key", fingerprint, actor=viewer.name)
        )
        if not isinstance(removed, Refused):
            self.metrics.key_removals.inc()
            for avatar in self.registry.avatars_of_key(removed.id):
                avatar.disconnect("key removed")
        return removed

    # -- registered ports -----------------------------------------------------------------

    async def ports(self, member: Member | None) -> list[RegisteredPort]:
        return await self._call("list_ports", member.name if member else None)

    async def directory(self) -> list[RegisteredPort]:
        """The Service Directory: registered ports of active members."""
        return await self._call("directory")

    async def add_port(self, member: Member, port: Any, description: str) -> Any:
        """Register ``port`` in ``member``'s inventory, unless another member's
        tunnel serves it now: a registration names a service, and that one is
        someone else's (its member registers it)."""
        number = port_number(port)
        if number is None:
            return Refused("port-invalid", "the port must be a number")
        holder = self.registry.holder_of(number)
        if holder is not None and holder.member_id != member.id:
            return Refused(
                "port-held",
                f"port {number} is served by another member's tunnel right now; "
                "only that member can register it",
            )
        mine = [p for p in await self.ports(member) if p.port == number]
        if mine:
            return _again(mine[0], description, f"port {number}")
        if (busy := self._changes_left(member)) is not None:
            return busy
        added = await self._call(
            "add_port",
            member.name,
            number,
            description,
            self.config.forwarding.rules,
            self.config.limits.max_registered_ports_per_member,
        )
        return self._changed(member, added)

    async def remove_port(
        self, viewer: Member, port: Any, owner: str | None = None
    ) -> RegisteredPort | Refused:
        """Forget one of the viewer's registrations; admins may name another ``owner``,
        or ``"*"`` for whoever registered the port."""
        number = port_number(port)
        if number is None:
            return Refused("port-invalid", "the port must be a number")
        if owner is None or owner == viewer.name:
            # Counted, never refused: removing undoes an add, which is limited.
            return self._changed(viewer, await self._call("remove_port", viewer.name, number))
        if not viewer.is_admin:
            return Refused("no-such-port", f"you have not registered port {number}")
        if owner == "*":
            owners = [p.member_name for p in await self.ports(None) if p.port == number]
            if not owners:
                return Refused("no-such-port", f"port {number} is not registered")
            owner = owners[0]
        removed = await self._call("remove_port", owner, number, actor=viewer.name)
        if isinstance(removed, Refused):
            return Refused("no-such-port", f"{owner} has not registered port {number}")
        return removed

    # -- self-diagnosis ----------------------------------------------------------------------

    async def check(self, viewer: Member, port: Any, viewer_address: str) -> Diagnosis | Refused:
        """Which troubleshooting case applies to one of the viewer's ports."""
        try:
            number = int(port)
        except (TypeError, ValueError):
            return Refused("port-invalid", "the port must be a number")
        forward = self.registry.forward_on(number)
        mine = forward is not None and forward.avatar.identity.member_id == viewer.id
        if not mine and not viewer.is_admin:
            registered = {p.port for p in await self.ports(viewer)}
            if number not in registered:
                return Refused(
                    "no-such-port", f"port {number} is neither forwarded nor registered by you"
                )
            forward = None if forward is not None and not mine else forward
        mesh = self.config.forwarding.bind_address
        probe = await probe_forward(forward, mesh, self.clock) if forward else None
        return diagnose(
            number,
            forward_exists=forward is not None,
            probe=probe,
            last_error=forward.last_error if forward else None,
            viewer_address=viewer_address,
            viewer_allowed=source_allowed(viewer_address, self.config.ssh.allowed_sources),
            mesh_address=mesh,
        )

    # -- live state ------------------------------------------------------------------------

    def live_forwards(self, member: Member | None) -> list[ActiveForward]:
        """Live forwards, by port: a member's (from their own), or everyone's."""
        if member is not None:
            return self.registry.forwards_of_member(member.id)
        return self.registry.forwards()

    def tunnels(self, member: Member | None) -> list[dict[str, Any]]:
        """Live tunnels as rows for pages, by port: a member's, or everyone's."""
        return tunnel_rows(self.live_forwards(member))

    def port_states(self, ports: list[RegisteredPort]) -> list[tuple[RegisteredPort, str]]:
        """Each port with its state (``views.port_state``): whose tunnel holds it now."""
        states = []
        for registered in ports:
            forward = self.registry.forward_on(registered.port)
            holder = forward.avatar.identity.member_name if forward is not None else None
            states.append((registered, port_state(registered, holder)))
        return states

    async def connect_info(self, member: Member) -> ConnectInfo:
        mine = await self.ports(member)
        live = [f.port for f in self.registry.forwards_of_member(member.id)]
        taken: set[int] = set()
        if not mine and not live:
            # Only a member with no port of their own is suggested a free one: the
            # numbers alone, not every member's registrations.
            taken = await self._call("registered_port_numbers") | self.registry.held_ports()
        cfg = self.config
        return ConnectInfo(
            hostname=cfg.web.public_hostname,
            ssh_port=ssh_port_of(cfg.ssh.listen),
            user=cfg.ssh.user,
            port=suggest_port(mine, taken, cfg.forwarding.rules, live),
            mesh_address=cfg.forwarding.bind_address,
            host_key=self.host_key.public().toString("OPENSSH").decode("ascii"),
        )

    @property
    def host_key_fingerprint(self) -> str:
        return host_key_fingerprint(self.host_key)
