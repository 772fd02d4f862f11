"""The SSH server factory: host keys, services, and the source allowlist."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.keys import Key
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from nekojump.capacity import DescriptorBudget
from nekojump.config import Config
from nekojump.keys import FixedKey
from nekojump.metrics import Metrics
from nekojump.model import Identity
from nekojump.policy import source_allowed, startup_refusal
from nekojump.ssh.auth import TunnelKeyChecker, TunnelUserAuthServer
from nekojump.ssh.avatar import TunnelAvatar
from nekojump.ssh.connection import TunnelConnection
from nekojump.ssh.penalty import SourcePenalties
from nekojump.ssh.transport import TunnelServerTransport


class TunnelSSHFactory(SSHFactory):
    """Builds one ``TunnelServerTransport`` per allowed connection."""

    protocol = TunnelServerTransport
    noisy = False
    log = Logger()
    services = {
        b"ssh-userauth": TunnelUserAuthServer,
        b"ssh-connection": TunnelConnection,
    }

    def __init__(
        self,
        key_checker: TunnelKeyChecker,
        make_avatar: Callable[[Identity], TunnelAvatar],
        host_key: Key,
        config: Config,
        reactor: object,
        metrics: Metrics | None = None,
        budget: DescriptorBudget | None = None,
    ):
        self.metrics = metrics if metrics is not None else Metrics()
        self.budget = budget
        self.penalties = SourcePenalties(
            reactor.seconds, config.ssh.penalty_failures, config.ssh.penalty_seconds
        )
        #: Decides logins; ``make_avatar`` gives each login its ``TunnelAvatar``.
        self.key_checker = key_checker
        self.make_avatar = make_avatar
        self.config = config
        self.reactor = reactor
        host_key = FixedKey.of(host_key)
        self.privateKeys = {host_key.sshType(): host_key}
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.primes = None
        #: Unauthenticated connections per source address (OpenSSH's MaxStartups).
        self.startups: Counter[str] = Counter()
        self._in_startup: set[TunnelServerTransport] = set()

    def buildProtocol(self, addr: IAddress) -> TunnelServerTransport | None:
        host = getattr(addr, "host", "")
        if not source_allowed(host, self.config.ssh.allowed_sources):
            self.log.info(
                "refused SSH connection from {source}: not an allowed source", source=host
            )
            self.metrics.refused_connections.labels("ssh", "source").inc()
            return None
        # (Refused is falsy by design, so no `or` chains here.)
        refusal = self.penalties.refusal(host)
        if refusal is None:
            refusal = startup_refusal(host, self.startups, self.config.ssh.limits)
        if refusal is None and self.budget is not None:
            refusal = self.budget.refusal()
        if refusal is not None:
            self.log.info(
                "refused SSH connection from {source}: {reason}", source=host, reason=refusal.reason
            )
            self.metrics.refused_connections.labels("ssh", refusal.code).inc()
            return None
        # Factory.buildProtocol, not SSHFactory's: our transport already lists
        # only fixed-group key exchanges, and host key algorithms come from
        # the keys we hold.
        transport = Factory.buildProtocol(self, addr)
        transport.supportedPublicKeys = [
            algorithm
            for key in self.privateKeys.values()
            for algorithm in key.supportedSignatureAlgorithms()
            if algorithm != b"ssh-rsa"
        ]
        self.startups[host] += 1
        self._in_startup.add(transport)
        transport.startup_source = host
        return transport

    def preauth_ended(self, transport: TunnelServerTransport) -> None:
        """A connection authenticated or went away: it no longer counts as a startup."""
        if transport in self._in_startup:
            self._in_startup.discard(transport)
            source = transport.startup_source
            self.startups[source] -= 1
            if self.startups[source] <= 0:
                del self.startups[source]
