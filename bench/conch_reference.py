"""Bare Twisted Conch as a tunnel jumphost: the same-run reference for nekojump's login cost.

Run by the benchmark as ``python3 -m bench.conch_reference ...``.  One account,
one authorized key, ``tcpip-forward`` on one address and nothing else: no
store, audit, limits, metrics or logs.  After the idle tunnels, it and nekojump
take turns growing tunnels from a load generator each, so that nekojump's CPU per
tunnel setup can be set beside the framework's own, measured side by side.
"""

from __future__ import annotations

import argparse
import struct

from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.ssh import connection, factory, forwarding, keys, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from zope.interface import implementer

from bench.procs import raise_open_file_limit


class TunnelUser(ConchUser):
    """Holds remote forwards on ``bind``; no sessions, no local forwards."""

    def __init__(self, bind: str) -> None:
        super().__init__()
        self.bind = bind
        self.listeners: dict[int, IListeningPort] = {}

    def global_tcpip_forward(self, data: bytes) -> int:
        _host, rest = getNS(data)
        (port,) = struct.unpack(">L", rest[:4])
        listener_factory = forwarding.SSHListenForwardingFactory(
            self.conn, (self.bind, port), forwarding.SSHListenServerForwardingChannel
        )
        try:
            self.listeners[port] = reactor.listenTCP(port, listener_factory, interface=self.bind)
        except CannotListenError:
            return 0  # REQUEST_FAILURE, as Conch's own unix avatar answers
        return 1

    def logout(self) -> None:
        for listener in self.listeners.values():
            listener.stopListening()


@implementer(IRealm)
class Realm:
    def __init__(self, bind: str) -> None:
        self.bind = bind

    def requestAvatar(self, avatar_id: bytes, mind: object, *interfaces: object):
        user = TunnelUser(self.bind)
        return interfaces[0], user, user.logout


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.conch_reference")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--host-key", required=True, help="OpenSSH private key file")
    parser.add_argument("--authorized-key", required=True, help="OpenSSH public key file")
    parser.add_argument("--user", required=True)
    parser.add_argument("--bind", required=True, help="address the forwards listen on")
    args = parser.parse_args()
    raise_open_file_limit()

    host_key = keys.Key.fromFile(args.host_key)
    key_db = InMemorySSHKeyDB({args.user.encode(): [keys.Key.fromFile(args.authorized_key)]})

    class ReferenceFactory(factory.SSHFactory):
        publicKeys = {host_key.sshType(): host_key.public()}
        privateKeys = {host_key.sshType(): host_key}
        services = {
            b"ssh-userauth": userauth.SSHUserAuthServer,
            b"ssh-connection": connection.SSHConnection,
        }

        def getPrimes(self) -> None:
            return None  # curve25519 only: no group-exchange moduli

    ReferenceFactory.portal = Portal(Realm(args.bind), [SSHPublicKeyChecker(key_db)])
    reactor.listenTCP(args.port, ReferenceFactory(), interface=args.host)
    reactor.run()


if __name__ == "__main__":
    main()
