"""The SSH server factory: host keys, services, and the source allowlist."""

from __future__ import annotations

from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.keys import Key
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from nekojump.config import Config
from nekojump.policy import source_allowed
from nekojump.ssh.auth import TunnelUserAuthServer
from nekojump.ssh.connection import TunnelConnection
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

    def __init__(self, portal: Portal, host_key: Key, config: Config, reactor: object):
        self.portal = portal
        self.config = config
        self.reactor = reactor
        self.privateKeys = {host_key.sshType(): host_key}
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.primes = None

    def buildProtocol(self, addr: IAddress) -> TunnelServerTransport | None:
        host = getattr(addr, "host", "")
        if not source_allowed(host, self.config.ssh.allowed_sources):
            self.log.info(
                "refused SSH connection from {source}: not an allowed source", source=host
            )
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
        return transport
