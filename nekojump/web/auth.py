"""Who is asking: session cookies (with CSRF tokens), bearer tokens, login throttling."""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Callable

from attrs import define, field, frozen
from twisted.web.iweb import IRequest

from nekojump.model import Member

SESSION_COOKIE = b"nekojump_session"
SESSION_LIFETIME = 14 * 24 * 3600.0
CSRF_HEADER = b"x-csrf-token"


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
        if isinstance(offered, bytes):
            offered = offered.decode("ascii", "replace")
        return bool(offered) and hmac.compare_digest(offered, self.csrf)


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


@define
class LoginThrottle:
    """At most ``limit`` failed logins per account and per source in ``window`` seconds."""

    clock: Callable[[], float]
    limit: int = 5
    window: float = 300.0
    _failures: dict[str, deque[float]] = field(factory=dict)

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        times = self._failures.setdefault(key, deque())
        while times and times[0] < now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return deque()
        return times

    def blocked(self, name: str, source: str) -> bool:
        return any(
            len(self._recent(key)) >= self.limit for key in (f"member:{name}", f"source:{source}")
        )

    def failed(self, name: str, source: str) -> None:
        now = self.clock()
        for key in (f"member:{name}", f"source:{source}"):
            self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, name: str) -> None:
        self._failures.pop(f"member:{name}", None)
