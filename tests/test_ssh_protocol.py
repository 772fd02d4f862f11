"""The SSH server in memory: a Conch client and nekojump's server joined by iosim.

No sockets, no sleeps: a ``MemoryReactorClock`` stands in for the reactor (it
records listens instead of binding), and ``pump.flush()`` moves bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import common, service, transport
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from nekojump.capacity import DescriptorBudget
from nekojump.config import parse_config
from nekojump.keys import fingerprint_of_blob, parse_public_key
from nekojump.model import Identity
from nekojump.ssh.auth import TunnelKeyChecker
from nekojump.ssh.avatar import MAX_REFUSALS, TunnelAvatar
from nekojump.ssh.factory import TunnelSSHFactory
from nekojump.ssh.packets import PacketLayerMixin
from nekojump.ssh.registry import TunnelRegistry
from nekojump.store import ImmediateStore, SQLiteStore

MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_SUCCESS = 52
MSG_USERAUTH_PK_OK = 60
MSG_IGNORE = 2
MSG_DEBUG = 4
MSG_GLOBAL_REQUEST = 80
MSG_REQUEST_SUCCESS = 81
MSG_REQUEST_FAILURE = 82
MSG_CHANNEL_OPEN = 90


class Recorder(service.SSHService):
    """Client side: sends raw packets and records every message it gets back."""

    name = b"ssh-userauth"

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes]] = []

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.got.append((messageNum, packet))

    def count(self, number: int) -> int:
        return sum(1 for n, _ in self.got if n == number)

    def send(self, number: int, payload: bytes) -> None:
        self.transport.sendPacket(number, payload)

    @staticmethod
    def key_query(key: Key, user: bytes = b"tunnel") -> bytes:
        """A publickey request without signature: would this key do (PK_OK)?"""
        prefix = NS(user) + NS(b"ssh-connection") + NS(b"publickey") + b"\x00"
        return prefix + NS(b"ssh-ed25519") + NS(key.public().blob())

    def signed_auth(self, key: Key, user: bytes = b"tunnel") -> bytes:
        blob, alg, service_name = key.public().blob(), b"ssh-ed25519", b"ssh-connection"
        signed = (
            NS(self.transport.sessionID)
            + bytes((MSG_USERAUTH_REQUEST,))
            + NS(user)
            + NS(service_name)
            + NS(b"publickey")
            + b"\x01"
            + NS(alg)
            + NS(blob)
        )
        return (
            NS(user)
            + NS(service_name)
            + NS(b"publickey")
            + b"\x01"
            + NS(alg)
            + NS(blob)
            + NS(key.sign(signed))
        )


class Client(PacketLayerMixin, transport.SSHClientTransport):
    """Conch's client with nekojump's packet layer: the server offers only AEAD ciphers."""

    def verifyHostKey(self, hostKey: bytes, fingerprint: str) -> Any:
        return succeed(True)

    def receiveDebug(self, alwaysDisplay: bool, message: bytes, lang: bytes) -> None:
        self.factory.recorder.got.append((MSG_DEBUG, message))

    def connectionSecure(self) -> None:
        # Conch calls this after every key exchange; OpenSSH asks for its
        # service once, and so does this client.
        if not getattr(self, "service_requested", False):
            self.service_requested = True
            self.requestService(self.factory.recorder)


def forward_request(port: int, name: bytes = b"tcpip-forward") -> bytes:
    return NS(name) + b"\x01" + NS(b"localhost") + struct.pack(">L", port)


class Port:
    """A listening port that remembers whether it was stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stopped = False

    def stopListening(self) -> None:
        self.stopped = True


class Reactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        super().listenTCP(port, factory, backlog, interface)
        return Port(port)


class World:
    def __init__(
        self,
        tmp_path,
        descriptor_limit: int | None = None,
        max_per_member: int = 1000,
        basic_limits: dict[str, int] | None = None,
    ) -> None:
        self.reactor = Reactor()
        self.data_dir = tmp_path
        self.store = SQLiteStore.open(tmp_path)
        self.key = Key(ed25519.Ed25519PrivateKey.generate())
        self.store.add_member("alice")
        self.store.add_key(
            "alice", parse_public_key(self.key.public().toString("OPENSSH").decode()), "laptop"
        )
        self.config = parse_config(
            {
                "limits": {"basic": basic_limits or {}},
                "ssh": {"login_grace_time": 30},
                "forwarding": {
                    "bind_address": "127.0.0.2",
                    "port_min": 20000,
                    "port_max": 20099,
                    "max_forwards_per_member": max_per_member,
                },
            }
        )
        self.registry = TunnelRegistry()
        deferred_store = ImmediateStore(self.store)
        self.budget = None
        if descriptor_limit is not None:
            self.budget = DescriptorBudget(
                descriptor_limit,
                lambda: self.registry.descriptors_in_use() + sum(self.factory.startups.values()),
                reserve=0,
            )

        def make_avatar(identity: Identity) -> TunnelAvatar:
            return TunnelAvatar(
                identity,
                registry=self.registry,
                config=self.config,
                store=deferred_store,
                reactor=self.reactor,
                budget=self.budget,
            )

        checker = TunnelKeyChecker(deferred_store, self.config.ssh.user)
        host_key = Key(ed25519.Ed25519PrivateKey.generate())
        self.factory = TunnelSSHFactory(
            checker, make_avatar, host_key, self.config, self.reactor, budget=self.budget
        )
        self.factory.startFactory()

    def connect(self, request_service: bool = True) -> tuple[Recorder, Any, Any]:
        """A client connected and through the key exchange, asking for
        ``ssh-userauth`` (unless ``request_service`` is False: then the
        recorder only sends what it is told to)."""
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        server = self.factory.buildProtocol(peer)
        factory = ClientFactory()
        factory.recorder = Recorder()
        client = Client()
        client.factory = factory
        if not request_service:
            client.service_requested = True
            factory.recorder.transport = client
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, peerAddress=peer),
            client,
            iosim.FakeTransport(client, isServer=False),
        )
        pump.flush()
        assert client.isEncrypted("both"), "key exchange did not finish"
        return factory.recorder, pump, server

    def logged_in(self) -> tuple[Recorder, Any, Any]:
        recorder, pump, server = self.connect()
        recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(self.key))
        pump.flush()
        assert recorder.count(MSG_USERAUTH_SUCCESS) == 1
        return recorder, pump, server

    def holding(self, port: int) -> tuple[Recorder, Any, Any]:
        """A client logged in that has asked for a forward of ``port``."""
        recorder, pump, server = self.logged_in()
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(port))
        pump.flush()
        return recorder, pump, server

    def listens(self, port: int) -> int:
        return sum(1 for p, *_ in self.reactor.tcpServers if p == port)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def test_pipelined_auth_requests_log_in_once(world):
    """Five signed requests in one burst: one success, one live connection."""
    recorder, pump, _server = world.connect()
    request = recorder.signed_auth(world.key)
    for _ in range(5):
        recorder.send(MSG_USERAUTH_REQUEST, request)
    pump.flush()
    assert recorder.count(MSG_USERAUTH_SUCCESS) == 1
    assert len(world.registry.avatars()) == 1


def test_a_key_removed_between_pk_ok_and_the_signature_loses_the_session_at_once(world):
    """Removed by another process the watcher has not seen yet: the signed request
    reuses the key PK_OK confirmed, and the re-check after login ends it."""
    recorder, pump, server = world.connect()
    blob = world.key.public().blob()
    recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(world.key))
    pump.flush()
    assert recorder.count(MSG_USERAUTH_PK_OK) == 1
    # Removed by another process (the admin CLI) before the watcher looked.
    admin_cli = SQLiteStore.open(world.data_dir)
    try:
        assert admin_cli.remove_key(fingerprint_of_blob(blob)).member_name == "alice"
    finally:
        admin_cli.close()

    recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(world.key))
    pump.flush()
    assert recorder.count(MSG_USERAUTH_SUCCESS) == 1
    assert world.registry.avatars() == [] and server.transport.disconnecting


def test_a_tier_changed_between_pk_ok_and_the_signature_applies_to_the_session(world):
    """The signing can take seconds (an agent asking, a hardware key waiting for a
    touch); a tier changed meanwhile is what the new connection gets."""
    recorder, pump, _server = world.connect()
    recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(world.key))
    pump.flush()
    assert recorder.count(MSG_USERAUTH_PK_OK) == 1
    world.store.set_member_tier("alice", "pro")

    recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(world.key))
    pump.flush()
    (avatar,) = world.registry.avatars()
    assert avatar.identity.tier == "pro"
    assert avatar.limits == world.config.limits.for_tier("pro")


def test_a_client_that_only_asks_about_a_key_is_cut_off_after_max_auth_tries(world):
    """Each PK_OK answer is a store lookup, and Conch counts no query as a failed try."""
    recorder, pump, server = world.connect()
    for _ in range(50):
        recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(world.key))
        pump.flush()
        if server.transport.disconnecting or server.transport.disconnected:
            break
    assert recorder.count(MSG_USERAUTH_PK_OK) == world.config.ssh.max_auth_tries
    assert server.transport.disconnecting or server.transport.disconnected


def test_unauthenticated_connections_count_as_startups_until_auth(world):
    _recorder, pump, server = world.connect()
    assert world.factory.startups == {"127.0.0.1": 1}
    world.logged_in()
    assert world.factory.startups == {"127.0.0.1": 1}  # only the first one now
    server.transport.loseConnection()
    pump.flush()
    assert world.factory.startups == {}


def test_grace_time_runs_from_the_first_byte(world):
    _recorder, pump, server = world.connect()
    world.reactor.advance(31)
    pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected


def test_forward_request_binds_on_the_mesh_address_and_answers(world):
    recorder, pump, _server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20080))
    pump.flush()
    assert recorder.count(MSG_REQUEST_SUCCESS) == 1
    port, _factory, _backlog, interface = world.reactor.tcpServers[-1]
    assert (port, interface) == (20080, "127.0.0.2")


def test_cancel_then_rebind_in_one_burst_reuses_the_socket(world):
    """The port is free "at once": no window where a rebind fails."""
    recorder, pump, _server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20081))
    pump.flush()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20081, b"cancel-tcpip-forward"))
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20081))
    pump.flush()
    assert recorder.count(MSG_REQUEST_SUCCESS) == 3
    assert world.listens(20081) == 1
    assert world.registry.held_ports() == {20081}
    world.reactor.advance(0)  # nothing was left parked to close
    assert not world.registry.forward_on(20081).listener.stopped


def test_released_port_closes_on_the_next_turn(world):
    recorder, pump, _server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20082))
    pump.flush()
    listener = world.registry.forward_on(20082).listener
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20082, b"cancel-tcpip-forward"))
    pump.flush()
    assert world.registry.held_ports() == set()
    assert not listener.stopped  # still parked for this turn
    world.reactor.advance(0)
    assert listener.stopped


def test_a_client_looping_on_refused_binds_is_disconnected(world):
    recorder, pump, server = world.logged_in()
    for _ in range(MAX_REFUSALS + 1):
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(80))
    pump.flush()
    assert recorder.count(MSG_REQUEST_FAILURE) == MAX_REFUSALS  # then the disconnect
    assert server.transport.disconnecting or server.transport.disconnected
    assert len(world.store.audit_events(1000)) < MAX_REFUSALS + 10


def test_a_refused_forward_says_why_before_the_bare_failure(world):
    """The failure reply carries no reason; an SSH_MSG_DEBUG just before it
    does (``ssh -v`` prints it), and only for the refused request."""
    recorder, pump, _server = world.holding(20084)
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(80))
    pump.flush()
    numbers = [number for number, _ in recorder.got]
    said = [payload for number, payload in recorder.got if number == MSG_DEBUG]
    assert len(said) == 1
    assert said[0].startswith(b"Forward refused: port 80 is outside the allowed range")
    assert numbers.index(MSG_DEBUG) == numbers.index(MSG_REQUEST_FAILURE) - 1


def test_overlong_bind_address_is_refused(world):
    recorder, pump, _server = world.logged_in()
    payload = NS(b"tcpip-forward") + b"\x01" + NS(b"h" * 5000) + struct.pack(">L", 20083)
    recorder.send(MSG_GLOBAL_REQUEST, payload)
    pump.flush()
    assert recorder.count(MSG_REQUEST_FAILURE) == 1
    assert world.registry.held_ports() == set()


def test_malformed_channel_open_ends_only_that_connection(world):
    recorder, pump, server = world.logged_in()
    other, pump2, _ = world.logged_in()
    recorder.send(MSG_CHANNEL_OPEN, NS(b"session")[:3])
    pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected
    other.send(MSG_GLOBAL_REQUEST, forward_request(20084))
    pump2.flush()
    assert other.count(MSG_REQUEST_SUCCESS) == 1


def test_direct_tcpip_is_administratively_prohibited(world):
    recorder, pump, _server = world.logged_in()
    open_packet = (
        NS(b"direct-tcpip")
        + struct.pack(">3L", 0, 65536, 32768)
        + NS(b"127.0.0.1")
        + struct.pack(">L", 22)
        + NS(b"127.0.0.1")
        + struct.pack(">L", 1234)
    )
    recorder.send(MSG_CHANNEL_OPEN, open_packet)
    pump.flush()
    failures = [p for n, p in recorder.got if n == 92]  # CHANNEL_OPEN_FAILURE
    assert len(failures) == 1
    (_recipient, reason) = struct.unpack(">2L", failures[0][:8])
    assert reason == 1  # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
    assert b"only hold remote forwards" in common.getNS(failures[0][8:])[0]


def test_data_for_an_unknown_channel_ends_the_connection_quietly(world):
    recorder, pump, server = world.logged_in()
    recorder.send(94, struct.pack(">L", 4242) + NS(b"hello"))  # CHANNEL_DATA
    pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected


@pytest.mark.parametrize(
    ("number", "payload"),
    [
        (96, struct.pack(">L", 4242)),  # CHANNEL_EOF, unknown channel
        (97, struct.pack(">L", 4242)),  # CHANNEL_CLOSE, unknown channel
        (98, struct.pack(">L", 4242) + NS(b"x") + b"\0"),  # CHANNEL_REQUEST, unknown channel
        (91, struct.pack(">4L", 4242, 1, 1, 1)),  # OPEN_CONFIRMATION for no open
        (92, struct.pack(">2L", 4242, 1) + NS(b"") + NS(b"")),  # OPEN_FAILURE for no open
        (95, struct.pack(">2L", 4242, 1) + NS(b"x")),  # EXTENDED_DATA, unknown channel
        (MSG_REQUEST_SUCCESS, b""),  # a reply to no request
        (MSG_REQUEST_FAILURE, b""),
        (MSG_GLOBAL_REQUEST, b"\0\0"),  # truncated
        (96, b"\0"),  # truncated
    ],
)
def test_a_malformed_or_misplaced_connection_message_ends_the_connection_with_a_disconnect(
    world, logged, number, payload
):
    """Not an unhandled error in the reactor: a disconnect and one log line."""
    recorder, pump, server = world.logged_in()
    recorder.send(number, payload)
    pump.flush()  # raises if the error escaped into the reactor
    assert server.transport.disconnecting or server.transport.disconnected
    assert any("malformed message" in str(e.get("log_format", "")) for e in logged)


def test_more_data_than_the_window_closes_that_channel(world):
    recorder, pump, server = world.logged_in()
    open_session = NS(b"session") + struct.pack(">3L", 7, 65536, 32768)
    recorder.send(MSG_CHANNEL_OPEN, open_session)
    pump.flush()
    confirm = next(p for n, p in recorder.got if n == 91)  # OPEN_CONFIRMATION
    _recipient, ours, _window, max_packet = struct.unpack(">4L", confirm[:16])
    recorder.send(94, struct.pack(">L", ours) + NS(b"x" * (max_packet + 1)))
    pump.flush()
    closes = [p for n, p in recorder.got if n == 97]  # CHANNEL_CLOSE
    assert closes == [struct.pack(">L", 7)]
    assert not server.transport.disconnecting  # only the channel, not the connection


@pytest.mark.parametrize("extra", [b"padding" * 1000, b"x"])
def test_channel_data_with_bytes_after_the_data_ends_the_connection(world, extra):
    """Data is passed on as a view of its packet: bytes after the data field
    would be held in memory without counting against any window."""
    recorder, pump, server = world.logged_in()
    recorder.send(MSG_CHANNEL_OPEN, NS(b"session") + struct.pack(">3L", 7, 65536, 32768))
    pump.flush()
    confirm = next(p for n, p in recorder.got if n == 91)  # OPEN_CONFIRMATION
    ours = struct.unpack(">4L", confirm[:16])[1]
    recorder.send(94, struct.pack(">L", ours) + NS(b"y") + extra)
    pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected


def test_at_the_descriptor_limit_new_forwards_and_connections_are_refused(tmp_path):
    """Refuse cleanly rather than accept sockets the process cannot serve."""
    world = World(tmp_path, descriptor_limit=3)
    try:
        recorder, pump, _server = world.logged_in()  # 1 descriptor: the SSH connection
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20090))  # 2: a listener
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20091))  # 3: a listener
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20092))  # would be 4
        pump.flush()
        assert recorder.count(MSG_REQUEST_SUCCESS) == 2
        assert recorder.count(MSG_REQUEST_FAILURE) == 1
        assert world.registry.held_ports() == {20090, 20091}
        peer = IPv4Address("TCP", "127.0.0.1", 40001)
        assert world.factory.buildProtocol(peer) is None  # no room for another connection
    finally:
        world.store.close()


def test_the_per_member_ceiling_counts_forwards_as_they_come_and_go(tmp_path):
    world = World(tmp_path, max_per_member=2)
    try:
        recorder, pump, _server = world.logged_in()
        for port in (20070, 20071, 20072):
            recorder.send(MSG_GLOBAL_REQUEST, forward_request(port))
        pump.flush()
        assert world.registry.held_ports() == {20070, 20071}
        assert recorder.count(MSG_REQUEST_FAILURE) == 1
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20070, b"cancel-tcpip-forward"))
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20072))
        pump.flush()
        assert world.registry.held_ports() == {20071, 20072}
    finally:
        world.store.close()


def test_a_source_that_keeps_failing_logins_is_refused_for_a_while(tmp_path):
    world = World(tmp_path)
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    try:
        failures, per_connection = world.config.ssh.penalty_failures, 5
        for _ in range(-(-failures // per_connection)):  # a few connections' worth
            recorder, pump, _server = world.connect()
            for _ in range(per_connection):
                recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(stranger))
            pump.flush()
        peer = IPv4Address("TCP", "127.0.0.1", 40002)
        assert world.factory.buildProtocol(peer) is None  # penalised
        other = IPv4Address("TCP", "127.0.0.9", 40003)
        assert world.factory.buildProtocol(other) is not None  # only that source
        world.reactor.advance(world.config.ssh.penalty_seconds + 1)
        assert world.factory.buildProtocol(peer) is not None
    finally:
        world.store.close()


def test_tier_limits_cap_connections_and_forwards(tmp_path):
    world = World(tmp_path, basic_limits={"connections": 1, "forwards": 1})
    try:
        recorder, pump, _server = world.logged_in()
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20060))
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20061))
        pump.flush()
        assert world.registry.held_ports() == {20060}
        assert recorder.count(MSG_REQUEST_FAILURE) == 1
        _second, pump2, server2 = world.logged_in()  # a second connection: over the cap
        pump2.flush()
        assert server2.transport.disconnecting or server2.transport.disconnected
        assert len(world.registry.avatars()) == 1
    finally:
        world.store.close()


@pytest.mark.parametrize("old_one", ["vanished", "alive", "busy"])
def test_at_the_connection_cap_a_vanished_old_connection_makes_room_within_seconds(
    tmp_path, old_one
):
    """autossh back after a blip, while its old connection has not timed out:
    refused at the cap, but the old connection must answer at once, and if it
    does not, it ends and the next try gets the port back.  One that answers
    stays, and the cap holds."""
    from nekojump.ssh.avatar import STALE_PROBE_SECONDS

    world = World(tmp_path, basic_limits={"connections": 1})
    try:
        first, pump, _server = world.logged_in()
        first.send(MSG_GLOBAL_REQUEST, forward_request(20062))
        pump.flush()
        asked_before = first.count(MSG_GLOBAL_REQUEST)
        _second, pump2, server2 = world.logged_in()  # over the cap: refused
        pump2.flush()
        pump.flush()
        assert server2.transport.disconnecting or server2.transport.disconnected
        assert first.count(MSG_GLOBAL_REQUEST) == asked_before + 1  # asked at once
        if old_one == "alive":
            first.send(MSG_REQUEST_FAILURE, b"")  # how OpenSSH answers a keepalive
        elif old_one == "busy":  # sending, its answer stuck behind its data
            first.transport.sendPacket(MSG_IGNORE, NS(b"data"))
        pump.flush()
        world.reactor.advance(STALE_PROBE_SECONDS)
        pump.flush()
        if old_one != "vanished":
            assert len(world.registry.avatars()) == 1
            assert world.registry.held_ports() == {20062}
            return
        assert world.registry.avatars() == [] and world.registry.held_ports() == set()
        third, pump3, _server3 = world.logged_in()
        third.send(MSG_GLOBAL_REQUEST, forward_request(20062))
        pump3.flush()
        assert world.registry.held_ports() == {20062}
    finally:
        world.store.close()


@pytest.mark.parametrize("holder", ["alive", "vanished"])
def test_a_port_that_just_changed_hands_is_not_taken_back_from_a_live_holder(tmp_path, holder):
    """Two live clients with one key: the second takes the port over at once,
    as after a blip; the first one's reconnect does not take it back while the
    holder answers (they would take it from each other forever), and gets it
    once the holder is gone (a second blip: the holder does not answer)."""
    from nekojump.ssh.avatar import STALE_PROBE_SECONDS

    world = World(tmp_path)
    try:
        world.holding(20063)
        second, pump2, _ = world.holding(20063)
        assert second.count(MSG_REQUEST_SUCCESS) == 1  # taken over at once
        assert len(world.registry.avatars()) == 1
        taken_by = world.registry.forward_on(20063).avatar
        asked_before = second.count(MSG_GLOBAL_REQUEST)

        again, pump3, _ = world.logged_in()  # the first one's autossh, reconnected
        again.send(MSG_GLOBAL_REQUEST, forward_request(20063))
        pump3.flush()
        pump2.flush()
        assert again.count(MSG_REQUEST_FAILURE) == 1
        assert second.count(MSG_GLOBAL_REQUEST) == asked_before + 1  # holder asked at once
        (forward,) = world.registry.forwards()
        assert "two machines" in forward.last_error
        if holder == "alive":
            second.send(MSG_REQUEST_FAILURE, b"")  # how OpenSSH answers a keepalive
            pump2.flush()
        world.reactor.advance(STALE_PROBE_SECONDS)
        pump2.flush()
        retry, pump4, _ = world.logged_in()
        retry.send(MSG_GLOBAL_REQUEST, forward_request(20063))
        pump4.flush()
        if holder == "alive":
            assert retry.count(MSG_REQUEST_FAILURE) == 1
            assert world.registry.forward_on(20063).avatar is taken_by
        else:
            assert retry.count(MSG_REQUEST_SUCCESS) == 1
            assert world.registry.forward_on(20063).avatar is not taken_by
        assert world.registry.held_ports() == {20063}
    finally:
        world.store.close()


def test_refused_logins_in_a_row_do_not_ask_the_same_connections_again_and_again(tmp_path):
    """Each refused login probes the member's connections: one that just
    answered is not asked again (a member holding many connections would get
    that many packets out of the server per refused login)."""
    world = World(tmp_path, basic_limits={"connections": 2})
    try:
        held = [world.logged_in() for _ in range(2)]
        before = [recorder.count(MSG_GLOBAL_REQUEST) for recorder, _, _ in held]
        for _ in range(10):  # within one clock instant
            _refused, pump, _server = world.logged_in()
            pump.flush()
            for recorder, held_pump, _ in held:
                held_pump.flush()
                recorder.send(MSG_REQUEST_FAILURE, b"")  # answer, as OpenSSH does
                held_pump.flush()
        asked = [
            recorder.count(MSG_GLOBAL_REQUEST) - b
            for (recorder, _, _), b in zip(held, before, strict=True)
        ]
        assert len(world.registry.avatars()) == 2  # both alive, both stay
        assert asked == [1, 1]
    finally:
        world.store.close()


@pytest.mark.parametrize("request_type", [b"exec", b"shell"])
def test_a_session_with_a_zero_maximum_packet_is_refused_and_the_server_goes_on(
    world, request_type
):
    """Conch cuts what a session writes into maxPacket-sized packets: with 0 it
    looped forever (exec) or raised (shell), and every tunnel stopped with it."""
    recorder, pump, _server = world.logged_in()
    recorder.send(MSG_CHANNEL_OPEN, NS(b"session") + struct.pack(">3L", 7, 65536, 0))
    recorder.send(98, struct.pack(">L", 0) + NS(request_type) + b"\x01" + NS(b"id"))
    pump.flush()
    assert recorder.count(92) == 1  # CHANNEL_OPEN_FAILURE
    assert recorder.count(91) == 0
    other, pump2, _ = world.logged_in()
    other.send(MSG_GLOBAL_REQUEST, forward_request(20085))
    pump2.flush()
    assert other.count(MSG_REQUEST_SUCCESS) == 1


def test_a_login_for_any_service_but_ssh_connection_is_refused(world):
    """Another next service would skip where limits, keepalives and revocation
    take hold of a connection."""
    recorder, pump, server = world.connect()
    signed = recorder.signed_auth(world.key)
    user_len = struct.unpack(">L", signed[:4])[0]
    service_end = 4 + user_len + 4 + len(b"ssh-connection")
    recorder.send(
        MSG_USERAUTH_REQUEST, signed[: 4 + user_len] + NS(b"ssh-userauth") + signed[service_end:]
    )
    pump.flush()
    assert recorder.count(MSG_USERAUTH_SUCCESS) == 0
    assert server.transport.disconnecting or server.transport.disconnected
    assert world.registry.avatars() == []


def test_members_whose_client_asks_about_other_keys_first_are_not_penalised(tmp_path):
    """OpenSSH asks about each key it has (agent, ~/.ssh/id_*) before the one
    that works; only connections that never log in count against the source."""
    world = World(tmp_path)
    strangers = [Key(ed25519.Ed25519PrivateKey.generate()) for _ in range(3)]
    try:
        for _ in range(2 * world.config.ssh.penalty_failures):
            recorder, pump, server = world.connect()
            for stranger in strangers:
                recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(stranger))
            recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(world.key))
            pump.flush()
            assert recorder.count(MSG_USERAUTH_SUCCESS) == 1
            server.transport.loseConnection()
            pump.flush()
        peer = IPv4Address("TCP", "127.0.0.1", 40002)
        assert world.factory.buildProtocol(peer) is not None
        # Connections that only ask, and leave without logging in, do count.
        for _ in range(world.config.ssh.penalty_failures // len(strangers) + 1):
            recorder, pump, server = world.connect()
            for stranger in strangers:
                recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(stranger))
            pump.flush()
            server.transport.loseConnection()
            pump.flush()
        assert world.factory.buildProtocol(peer) is None
    finally:
        world.store.close()


def test_malformed_forward_requests_count_as_refusals(world):
    recorder, pump, server = world.logged_in()
    for _ in range(MAX_REFUSALS + 5):
        recorder.send(MSG_GLOBAL_REQUEST, NS(b"tcpip-forward") + b"\x01" + b"\xff\xff")
    pump.flush()
    assert server.transport.disconnecting or server.transport.disconnected


def test_a_connection_looping_on_bind_and_cancel_is_ended(world, monkeypatch):
    """Each bind and unbind is an audit row: a loop must not write them forever."""
    monkeypatch.setattr("nekojump.ssh.avatar.MAX_FORWARD_CHANGES", 40)
    recorder, pump, server = world.logged_in()
    for _ in range(30):
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20086))
        recorder.send(MSG_GLOBAL_REQUEST, forward_request(20086, b"cancel-tcpip-forward"))
        pump.flush()
        if server.transport.disconnecting or server.transport.disconnected:
            break
    assert server.transport.disconnecting or server.transport.disconnected
    assert len(world.store.audit_events(1000)) < 50


def test_many_connections_of_one_member_each_opening_its_tunnel_are_not_held_up(world, monkeypatch):
    """The member's hourly count of forward changes leaves out each connection's
    first forward: thousands of machines (or autossh reconnecting all day) with
    one member's keys each get their tunnel, however many there are."""
    monkeypatch.setattr("nekojump.ssh.avatar.MAX_FORWARD_CHANGES", 5)
    for port in range(20040, 20052):
        recorder, _pump, server = world.holding(port)
        assert recorder.count(MSG_REQUEST_SUCCESS) == 1
        assert not server.transport.disconnecting
    assert world.registry.held_ports() == set(range(20040, 20052))


def test_a_session_closed_by_a_client_that_gave_no_window_is_closed_and_freed(world):
    """A client opens sessions with a window of 0, asks for exec (whose refusal
    then waits for window) and closes each: every CLOSE is answered and the
    connection can go on opening sessions (they were stuck until the cap)."""
    recorder, pump, server = world.logged_in()
    for channel in range(12):
        recorder.send(MSG_CHANNEL_OPEN, NS(b"session") + struct.pack(">3L", channel, 0, 32768))
        pump.flush()
        confirm = [p for n, p in recorder.got if n == 91][-1]  # OPEN_CONFIRMATION
        recipient, ours = struct.unpack(">2L", confirm[:8])
        assert recipient == channel
        recorder.send(98, struct.pack(">L", ours) + NS(b"exec") + b"\x01" + NS(b"ls"))
        pump.flush()
        world.reactor.advance(0)  # the refusal is written, and waits for window
        recorder.send(97, struct.pack(">L", ours))  # CHANNEL_CLOSE
        pump.flush()
        assert [p for n, p in recorder.got if n == 97][-1] == struct.pack(">L", channel)
    assert server.service.channels == {}


def test_the_exec_refusal_reaches_a_client_short_of_window_before_the_eof(world):
    """The refusal waits for window; exit-status, EOF and CLOSE come after it
    (data after EOF would be dropped by the client)."""
    recorder, pump, _server = world.logged_in()
    recorder.send(MSG_CHANNEL_OPEN, NS(b"session") + struct.pack(">3L", 5, 0, 32768))
    pump.flush()
    confirm = [p for n, p in recorder.got if n == 91][-1]  # OPEN_CONFIRMATION
    ours = struct.unpack(">2L", confirm[:8])[1]
    recorder.send(98, struct.pack(">L", ours) + NS(b"exec") + b"\x00" + NS(b"ls"))
    pump.flush()
    world.reactor.advance(0)
    pump.flush()
    assert not [n for n, _ in recorder.got if n in (95, 96, 97)]  # nothing before window
    recorder.send(93, struct.pack(">2L", ours, 65536))  # WINDOW_ADJUST
    pump.flush()
    order = [n for n, _ in recorder.got if n in (95, 96, 97, 98)]
    # EXTENDED_DATA (the refusal), REQUEST exit-status, EOF, CLOSE
    assert order == [95, 98, 96, 97]
