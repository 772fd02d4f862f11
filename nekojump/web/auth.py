"""Who is asking: session cookies (with CSRF tokens), bearer tokens, login throttling."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import deque
from collections.abc import Callable

from attrs import define, field, frozen
from twisted.web.iweb import IRequest

from nekojump.model import Member
from nekojump.store import _NAME as MEMBER_NAME

SESSION_COOKIE = b"nekojump_session"
SESSION_LIFETIME = 14 * 24 * 3600.0
CSRF_HEADER = b"x-csrf-token"


def is_member_name(name: str) -> bool:
    """True if ``name`` could be a member's (the store's rule: 1-64 of ``A-Za-z0-9._-``)."""
    return MEMBER_NAME.fullmatch(name) is not None


@frozen
class Viewer:
    """An authenticated web user; ``csrf`` is None for bearer-token clients."""

    member: Member
    csrf: str | None
    token: str | None = None

    @property
    def needs_csrf(self) -> bool:
        return self.csrf is not None

    def csrf_ok(self, offered: str | bytes | None) -> bool:
        """True for bearer clients, or when ``offered`` matches the session's token."""
        if self.csrf is None:
            return True
        if isinstance(offered, str):
            offered = offered.encode("utf-8", "replace")
        # Bytes: compare_digest refuses str with non-ASCII characters.
        return bool(offered) and hmac.compare_digest(offered, self.csrf.encode("ascii"))


def sso_csrf_token(secret: bytes, member_name: str) -> str:
    """The CSRF token of a member signed in by the SSO proxy rather than a session:
    derived from a server secret, so nothing is stored per request, yet another site
    cannot know it."""
    digest = hmac.new(secret, b"sso-csrf\0" + member_name.encode("utf-8"), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).decode("ascii").rstrip("=")


def session_cookie(request: IRequest) -> str | None:
    value = request.getCookie(SESSION_COOKIE)
    return value.decode("ascii", "replace") if value else None


def bearer_token(request: IRequest) -> str | None:
    header = request.getHeader(b"authorization")
    if header and header[:7].lower() == b"bearer ":
        return header[7:].strip().decode("ascii", "replace")
    return None


def set_session_cookie(request: IRequest, token: str, lifetime: float) -> None:
    request.addCookie(
        SESSION_COOKIE,
        token.encode("ascii"),
        path=b"/",
        httpOnly=True,
        secure=request.isSecure(),
        sameSite="strict",
        max_age=str(int(lifetime)).encode("ascii"),
    )


def clear_session_cookie(request: IRequest) -> None:
    request.addCookie(
        SESSION_COOKIE, b"", path=b"/", httpOnly=True, sameSite="strict", max_age=b"0"
    )


class Attempt:
    """One login attempt as the throttle counts it (``succeeded`` takes it back)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at


@define
class LoginThrottle:
    """At most ``limit`` login attempts checked per source, and ``account_limit``
    per account from all sources together, in ``window`` seconds; an attempt
    counts from before its password is checked until it succeeds.

    The account's limit is ten times the source's: someone guessing a member's
    password from their own address is stopped after ``limit`` guesses and
    does not lock the member out (the member's own address has its own count),
    while guesses spread over many addresses still stop.

    Counts older than the window are swept out once per window, so names and
    addresses that never come back do not stay in memory."""

    clock: Callable[[], float]
    limit: int = 5
    window: float = 300.0
    #: None: ten times ``limit``.
    account_limit: int | None = None
    #: Successful logins one account may make in ``window``: each costs a
    #: password hash (32 MiB of scrypt) and a session to keep.
    logins_limit: int = 20
    _attempts: dict[str, deque[Attempt]] = field(factory=dict)
    _swept_at: float = 0.0

    def _keys(self, name: str | None, source: str) -> list[tuple[str, int]]:
        """The counts an attempt goes to, each with its limit."""
        keys = [(f"source:{source}", self.limit)]
        if name is not None:
            keys.append((f"member:{name}", self.account_limit or 10 * self.limit))
        return keys

    def _recent(self, key: str, now: float) -> int:
        """How many of ``key``'s attempts are inside the window (older ones are dropped)."""
        attempts = self._attempts.get(key)
        if attempts is None:
            return 0
        while attempts and attempts[0].at <= now - self.window:
            attempts.popleft()
        if not attempts:
            del self._attempts[key]
        return len(attempts)

    def _sweep(self, now: float) -> None:
        if now - self._swept_at < self.window:
            return
        self._swept_at = now
        for key in list(self._attempts):
            self._recent(key, now)

    def blocked(self, name: str | None, source: str) -> bool:
        now = self.clock()
        self._sweep(now)
        if any(self._recent(key, now) >= limit for key, limit in self._keys(name, source)):
            return True
        return name is not None and self._recent(f"logins:{name}", now) >= self.logins_limit

    def failed(self, name: str | None, source: str) -> Attempt:
        """Count an attempt against the account and the source; returns it."""
        attempt = Attempt(self.clock())
        for key, _limit in self._keys(name, source):
            self._attempts.setdefault(key, deque()).append(attempt)
        return attempt

    def reserve(self, name: str | None, source: str) -> Attempt | None:
        """Count an attempt now, before its password is checked, so guesses sent at
        once cannot all slip past the limit; None if the limit is reached.

        A failed attempt simply stays counted; ``succeeded`` takes this one back."""
        if self.blocked(name, source):
            return None
        return self.failed(name, source)

    def succeeded(
        self, name: str, source: str | None = None, attempt: Attempt | None = None
    ) -> None:
        """Forget the account's failures, and the source's count of this attempt;
        count the login against the account's ``logins_limit``."""
        self._attempts.pop(f"member:{name}", None)
        self._attempts.setdefault(f"logins:{name}", deque()).append(Attempt(self.clock()))
        key = f"source:{source}"
        attempts = self._attempts.get(key)
        if attempts is not None and attempt is not None:
            try:
                attempts.remove(attempt)
            except ValueError:
                pass  # already out of the window
            if not attempts:
                del self._attempts[key]
