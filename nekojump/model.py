"""Frozen values shared by policy, storage, the SSH side and the CLI."""

from __future__ import annotations

from attrs import frozen


@frozen
class Refused:
    """An expected "no": a stable machine code plus a sentence for people.

    Codes (``port-out-of-range``, ``key-exists`` ...) are shared by the audit
    trail, the CLI, the API and the dashboard.
    """

    code: str
    reason: str

    def __bool__(self) -> bool:
        return False


@frozen
class Member:
    """A person who may hold tunnels."""

    id: int
    name: str
    tier: str
    is_admin: bool
    active: bool
    created_at: float


@frozen
class KeyRecord:
    """A stored SSH public key and the member it belongs to."""

    id: int
    member_id: int
    member_name: str
    member_active: bool
    fingerprint: str
    key_type: str
    public_key: str
    description: str
    created_at: float
    last_used_at: float | None
    member_tier: str = "basic"

    @property
    def usable(self) -> bool:
        """True if this key may log in now."""
        return self.member_active


@frozen
class Identity:
    """Who an SSH connection authenticated as: what its login was decided to be."""

    member_id: int
    member_name: str
    key_id: int
    fingerprint: str
    key_description: str
    tier: str = "basic"


@frozen
class LiveForward:
    """One remote forward a running server holds, as the CLI sees it."""

    port: int
    member_name: str
    key_fingerprint: str
    key_description: str
    bind_address: str
    requested_host: str
    source: str
    since: float
    last_error: str | None = None


@frozen
class RegisteredPort:
    """An inventory entry: a member says which service runs on a port."""

    port: int
    member_name: str
    description: str
    created_at: float


@frozen
class ApiToken:
    """An API bearer token as the operator sees it (the secret itself is not kept)."""

    id: int
    member_name: str
    created_at: float
    last_used_at: float | None
