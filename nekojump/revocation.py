"""Carries the admin CLI's changes to the running server.

Removed keys and disabled members lose their sessions; ``tunnels kill``
requests end the tunnels they name; a new tier applies to live connections.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from nekojump.ssh.registry import TunnelRegistry
from nekojump.store import DeferredStore

#: How often the store is asked whether anything changed; well inside the
#: one second the seed promises for "Remove Key".
POLL_INTERVAL = 0.2


class RevocationWatcher:
    """Polls the store's change counter; on a change, drops connections of unusable
    keys and gives live connections their member's current tier.

    The admin CLI and any other process write straight to SQLite, so a cheap
    ``PRAGMA data_version`` poll is what carries their changes to us.
    """

    log = Logger()

    def __init__(self, store: DeferredStore, registry: TunnelRegistry, clock: IReactorTime):
        self.store = store
        self.registry = registry
        self._version: int | None = None
        #: How many changes by other processes were seen: what was read from the
        #: store before this moved on may be out of date.
        self.changes = 0
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.check()))
        self._loop.clock = clock

    def start(self, interval: float = POLL_INTERVAL) -> None:
        self._loop.start(interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def check(self) -> int:
        """Drop connections whose key is no longer usable; return how many."""
        try:
            version = await self.store.call(self.store.store.data_version)
            if version == self._version:
                return 0
            # Counted before acting; the first poll counts too (what was read
            # before it may be older than the server's first look).
            self.changes += 1
            usable = await self.store.call(self.store.store.usable_key_ids)
            killed = self.registry.disconnect_unusable(usable, "key removed")
            for action, target in await self.store.call(self.store.store.take_control_requests):
                killed += self.registry.kill(action, target)
            self.registry.apply_tiers(await self.store.call(self.store.store.member_tiers))
        except Exception:  # noqa: BLE001 - keep watching after a bad moment
            self.log.failure("revocation check failed")
            return 0
        self._version = version  # only once this change has been acted on
        if killed:
            self.log.info("ended {count} connection(s) of removed keys", count=killed)
        return killed
