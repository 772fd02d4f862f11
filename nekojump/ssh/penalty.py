"""Per-source penalties after repeated failed logins (like OpenSSH's PerSourcePenalties)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from nekojump.model import Refused


class SourcePenalties:
    """Refuses new connections from an address that failed too many logins recently.

    More than ``failures`` failed authentication attempts within ``window``
    seconds put the source in the penalty box for ``duration`` seconds.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        failures: int,
        duration: float,
        window: float = 60.0,
        max_sources: int = 65536,
    ):
        self.clock = clock
        self.failures = failures
        self.duration = duration
        self.window = window
        self.max_sources = max_sources
        self._recent: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def failed(self, source: str) -> None:
        """Count one failed authentication attempt from ``source``."""
        now = self.clock()
        times = self._recent.get(source)
        if times is None:
            if len(self._recent) >= self.max_sources:
                self._forget_old(now)
            times = self._recent[source] = deque()
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        if len(times) >= self.failures:
            if len(self._until) >= self.max_sources:
                self._forget_old(now)  # penalties that ran out, of sources gone for good
            self._until[source] = now + self.duration
            times.clear()

    def refusal(self, source: str) -> Refused | None:
        """None unless ``source`` is being penalised now."""
        until = self._until.get(source)
        if until is None:
            return None
        if self.clock() >= until:
            del self._until[source]
            return None
        return Refused("penalized-source", f"{source} failed to log in too often; wait a while")

    def _forget_old(self, now: float) -> None:
        for source in [s for s, t in self._recent.items() if not t or t[-1] < now - self.window]:
            del self._recent[source]
        for source in [s for s, until in self._until.items() if until <= now]:
            del self._until[source]
