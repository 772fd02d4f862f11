"""Transport hardening: AEAD and ETM ciphers, strict key exchange, rekeying.

Two halves: the real OpenSSH client forcing each algorithm against a real
nekojump, and packet-level tests in memory (iosim) that hand-craft what a
Terrapin-style attacker would send.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import MSG_CHANNEL_DATA
from twisted.conch.ssh.keys import Key
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from nekojump.config import parse_config
from nekojump.ssh import ciphers
from nekojump.ssh.auth import TunnelKeyChecker
from nekojump.ssh.factory import TunnelSSHFactory
from nekojump.ssh.packets import PacketLayerMixin
from nekojump.store import ImmediateStore, SQLiteStore
from tests.conftest import MESH_ADDRESS, exchange

CHACHA = "chacha20-poly1305@openssh.com"
AEAD = [CHACHA, "aes256-gcm@openssh.com", "aes128-gcm@openssh.com"]
CTR = ["aes128-ctr", "aes192-ctr", "aes256-ctr"]
ETM = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"]


# -- the real OpenSSH client ---------------------------------------------------------


def _kex_line(result) -> str:
    text = result.stderr.decode(errors="replace")
    return "\n".join(line for line in text.splitlines() if "kex:" in line or "strict" in line)


def host_offering(request, cipher: str):
    """The default jumphost, or for chacha20-poly1305 the one that also offers it."""
    return request.getfixturevalue("compat" if cipher == CHACHA else "running")


@pytest.mark.e2e
@pytest.mark.parametrize("cipher", AEAD)
def test_openssh_client_with_each_aead_cipher_forwards(request, keys, echo, cipher):
    running = host_offering(request, cipher)
    port = running.port_min + 60 + AEAD.index(cipher)
    process = running.ssh_background(
        keys["alice"], "-c", cipher, "-v", "-R", f"{port}:127.0.0.1:{echo.port}"
    )
    from tests.conftest import fingerprint, wait_for

    wait_for(
        lambda: process.poll() is not None or running.holder_of(port) == fingerprint(keys["alice"]),
        what=f"forward with {cipher}",
    )
    assert process.poll() is None, process.stderr.read().decode()
    payload = os.urandom(512 * 1024)
    assert exchange(MESH_ADDRESS, port, payload) == payload


@pytest.mark.e2e
@pytest.mark.parametrize("cipher", AEAD)
def test_openssh_negotiates_the_forced_cipher_with_strict_kex(request, keys, cipher):
    running = host_offering(request, cipher)
    result = running.ssh(keys["alice"], "-v", "-c", cipher, "-T", command=("true",))
    log = _kex_line(result)
    assert b"Authenticated to" in result.stderr, result.stderr
    assert f"cipher: {cipher} MAC: <implicit>" in log, log


@pytest.mark.e2e
def test_a_default_openssh_client_gets_aes_gcm(running, keys):
    """chacha20-poly1305 is not offered by default: OpenSSH clients would always pick it."""
    result = running.ssh(keys["alice"], "-v", "-T", command=("true",))
    assert "cipher: aes128-gcm@openssh.com MAC: <implicit>" in _kex_line(result), result.stderr
    refused = running.ssh(keys["alice"], "-c", CHACHA, "-T", command=("true",))
    assert b"no matching cipher found" in refused.stderr, refused.stderr


@pytest.mark.e2e
def test_with_chacha20_enabled_a_default_openssh_client_picks_it(compat, keys):
    result = compat.ssh(keys["alice"], "-v", "-T", command=("true",))
    assert f"cipher: {CHACHA} MAC: <implicit>" in _kex_line(result), result.stderr


@pytest.mark.e2e
def test_default_offers_no_ctr_and_no_plain_macs(running, keys):
    for cipher in CTR:
        result = running.ssh(keys["alice"], "-c", cipher, "-T", command=("true",))
        assert b"no matching cipher found" in result.stderr, result.stderr
    # As in OpenSSH, an AEAD cipher's direction ignores the MAC lists.
    result = running.ssh(
        keys["alice"],
        "-v",
        "-c",
        "aes128-ctr,aes256-gcm@openssh.com",
        "-m",
        "hmac-sha2-256",
        "-T",
        command=("true",),
    )
    assert "cipher: aes256-gcm@openssh.com MAC: <implicit>" in _kex_line(result), result.stderr


@pytest.mark.e2e
def test_openssh_uses_strict_kex_and_the_default_kex(running, keys):
    result = running.ssh(keys["alice"], "-vvv", "-T", command=("true",))
    text = result.stderr.decode(errors="replace")
    assert "kex: algorithm: curve25519-sha256" in text or "mlkem768x25519" in text, text
    assert "kex-strict-s-v00@openssh.com" in text, text
    assert "ssh_packet_send2_wrapped: resetting send seqnr" in text, text
    assert "ssh_packet_read_poll2: resetting read seqnr" in text, text


@pytest.mark.e2e
@pytest.mark.parametrize("cipher", CTR)
@pytest.mark.parametrize("mac", ETM)
def test_compat_ctr_with_each_etm_mac(compat, keys, echo, cipher, mac):
    result = compat.ssh(keys["alice"], "-v", "-c", cipher, "-m", mac, "-T", command=("true",))
    log = _kex_line(result)
    assert f"cipher: {cipher} MAC: {mac}" in log, result.stderr.decode(errors="replace")
    assert b"Authenticated to" in result.stderr, result.stderr


@pytest.mark.e2e
def test_compat_ctr_forward_carries_data(compat, keys, echo):
    port = compat.port_min + 70
    process = compat.ssh_background(
        keys["alice"],
        "-c",
        "aes128-ctr",
        "-m",
        "hmac-sha2-256-etm@openssh.com",
        "-R",
        f"{port}:127.0.0.1:{echo.port}",
    )
    from tests.conftest import fingerprint, wait_for

    wait_for(
        lambda: process.poll() is not None or compat.holder_of(port) == fingerprint(keys["alice"]),
        what="compat forward",
    )
    payload = os.urandom(1024 * 1024)
    assert exchange(MESH_ADDRESS, port, payload) == payload


@pytest.mark.e2e
def test_compat_still_prefers_aead_and_refuses_plain_macs(compat, keys):
    result = compat.ssh(keys["alice"], "-v", "-T", command=("true",))
    log = _kex_line(result)
    assert "MAC: <implicit>" in log, log
    result = compat.ssh(
        keys["alice"], "-c", "aes128-ctr", "-m", "hmac-sha2-256", "-T", command=("true",)
    )
    assert b"no matching MAC found" in result.stderr, result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("kex", ["curve25519-sha256", "curve25519-sha256@libssh.org"])
def test_openssh_with_each_offered_kex(running, keys, kex):
    result = running.ssh(keys["alice"], "-v", "-o", f"KexAlgorithms={kex}", "-T", command=("true",))
    assert f"kex: algorithm: {kex}" in result.stderr.decode(errors="replace")


@pytest.mark.e2e
@pytest.mark.parametrize(
    "kex",
    [
        "ecdh-sha2-nistp256",
        "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group14-sha1",
        "diffie-hellman-group14-sha256",
    ],
)
def test_openssh_cannot_use_weak_or_nist_kex(running, keys, kex):
    result = running.ssh(keys["alice"], "-o", f"KexAlgorithms={kex}", "-T", command=("true",))
    assert b"no matching key exchange method found" in result.stderr, result.stderr


# -- packets in memory ---------------------------------------------------------------


class Client(PacketLayerMixin, transport.SSHClientTransport):
    """A Conch client with nekojump's packet layer."""

    def connectionMade(self) -> None:
        self.secure = False
        super().connectionMade()

    def verifyHostKey(self, hostKey: bytes, fingerprint: str) -> Any:
        return succeed(True)

    def connectionSecure(self) -> None:
        self.secure = True


def _world(tmp_path, **ssh: Any):
    store = SQLiteStore.open(tmp_path)
    config = parse_config({"ssh": {"login_grace_time": 30, **ssh}})
    deferred = ImmediateStore(store)
    factory = TunnelSSHFactory(
        TunnelKeyChecker(deferred, config.ssh.user),
        lambda identity: None,
        Key(ed25519.Ed25519PrivateKey.generate()),
        config,
        MemoryReactorClock(),
    )
    factory.startFactory()
    return store, factory


@pytest.fixture
def factory(tmp_path):
    # chacha20-poly1305 too: the in-memory tests cover every cipher's framing.
    store, factory = _world(tmp_path, chacha20_poly1305=True)
    yield factory
    store.close()


def connect(factory, client: Client | None = None, flush: bool = True, watch=None):
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    server = factory.buildProtocol(peer)
    if watch is not None:
        watch(server)  # before a single byte moves
    client = client or Client()
    client.factory = ClientFactory()
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, isServer=True, peerAddress=peer),
        client,
        iosim.FakeTransport(client, isServer=False),
    )
    if flush:
        pump.flush()
    return client, server, pump


def closed(server) -> bool:
    return server.transport.disconnecting or server.transport.disconnected


@pytest.mark.parametrize("cipher", [c.encode() for c in AEAD])
def test_in_memory_kex_with_each_aead_cipher(factory, cipher):
    client = Client()
    client.supportedCiphers = [cipher]
    client, server, _pump = connect(factory, client)
    assert client.secure and server.isEncrypted("both")
    assert server.currentEncryptions.outCipType == cipher
    assert server.currentEncryptions.inMACType == ciphers.IMPLICIT_MAC
    assert server._strict and client._strict


def test_strict_kex_resets_sequence_numbers_after_newkeys(factory):
    client, server, pump = connect(factory)
    # Server sent KEXINIT, KEX reply, NEWKEYS (seq 0..2) then reset to 0;
    # EXT_INFO went out as seq 0 under the new keys.
    assert server.outgoingPacketSequence == 1
    # The client sent KEXINIT, KEX init, NEWKEYS: the reset makes the next one 0.
    assert server.incomingPacketSequence == 0
    client.sendIgnore(b"x")
    pump.flush()
    assert server.incomingPacketSequence == 1 and not closed(server)


def test_without_strict_kex_sequence_numbers_carry_on(factory):
    client = Client()
    client.offer_strict_kex = False
    client, server, _pump = connect(factory, client)
    assert not server._strict
    assert server.isEncrypted("both")
    assert server.incomingPacketSequence == 3
    assert server.outgoingPacketSequence == 4


def _injecting(factory, number: int, *, before: bool, strict: bool = True):
    """A client that sends message ``number`` just before or after its first KEXINIT."""
    client = Client()
    client.offer_strict_kex = strict
    original = client.sendKexInit

    def inject() -> None:
        state, client._keyExchangeState = client._keyExchangeState, client._KEY_EXCHANGE_NONE
        client.sendPacket(number, struct.pack(">L", 0) + b"\0" * 8)
        client._keyExchangeState = state

    def send_kexinit() -> None:
        first = client.sessionID is None and not getattr(client, "_injected", False)
        client._injected = True
        if first and before:
            inject()
        original()
        if first and not before:
            inject()

    client.sendKexInit = send_kexinit
    return connect(factory, client)


def test_strict_kex_refuses_a_packet_before_kexinit(factory):
    """Terrapin inserts an IGNORE before KEXINIT: strict kex must drop the connection."""
    _client, server, _pump = _injecting(factory, transport.MSG_IGNORE, before=True)
    assert closed(server)
    assert not server.isEncrypted("in")


def test_non_strict_client_may_send_ignore_before_kexinit(factory):
    _client, server, _pump = _injecting(factory, transport.MSG_IGNORE, before=True, strict=False)
    assert server.isEncrypted("both") and not closed(server)


@pytest.mark.parametrize(
    "number", [transport.MSG_IGNORE, transport.MSG_DEBUG, transport.MSG_UNIMPLEMENTED, 50, 80]
)
def test_strict_kex_refuses_non_kex_messages_during_the_first_kex(factory, number):
    _client, server, _pump = _injecting(factory, number, before=False)
    assert server._strict
    assert closed(server)
    assert not server.isEncrypted("in")


def test_non_strict_peer_may_send_ignore_during_kex(factory):
    _client, server, _pump = _injecting(factory, transport.MSG_IGNORE, before=False, strict=False)
    assert server.isEncrypted("both") and not closed(server)


def test_service_request_before_kex_is_refused_even_without_strict(factory):
    _client, server, _pump = _injecting(
        factory, transport.MSG_SERVICE_REQUEST, before=False, strict=False
    )
    assert closed(server)


def test_second_kexinit_during_first_kex_is_refused(factory):
    client, server, pump = connect(factory, flush=False)
    pump.pump()
    pump.pump()
    client.sendPacket(transport.MSG_KEXINIT, client.ourKexInitPayload[1:])
    pump.flush()
    assert closed(server)


def test_newkeys_before_kex_reply_is_refused(factory):
    client, server, pump = connect(factory, flush=False)
    pump.pump()
    client.sendPacket(transport.MSG_NEWKEYS, b"")
    pump.flush()
    assert closed(server)


@pytest.mark.parametrize("cipher", [c.encode() for c in AEAD])
def test_a_flipped_bit_is_a_mac_error(factory, cipher):
    client = Client()
    client.supportedCiphers = [cipher]
    client, server, pump = connect(factory, client)
    real_write = client.transport.write

    def corrupt(data: bytes) -> None:
        data = bytearray(data)
        data[-20] ^= 1
        real_write(bytes(data))

    client.transport.write = corrupt
    client.sendIgnore(b"hello" * 10)
    pump.flush()
    assert closed(server)


def _cuts(stream: bytes, boundaries: list[int], how: str) -> list[bytes]:
    """``stream`` in pieces: whole, a byte at a time, random, or split around packet
    boundaries (inside the length field, one byte before, at, after)."""
    if how == "whole":
        return [stream]
    if how == "bytes":
        return [stream[i : i + 1] for i in range(len(stream))]
    if how == "random":
        rng = random.Random(7)
        points = sorted(rng.sample(range(1, len(stream)), 60))
    else:
        points = sorted(
            {b + d for b in boundaries for d in (-1, 1, 2, 3) if 0 < b + d < len(stream)}
        )
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


@pytest.mark.parametrize("cipher", [c.encode() for c in AEAD] + [b"aes128-ctr"])
@pytest.mark.parametrize("how", ["whole", "bytes", "random", "boundaries"])
def test_packets_arrive_whole_however_the_stream_is_cut(tmp_path, cipher, how):
    store, factory = _world(tmp_path, chacha20_poly1305=True, compat_ctr_ciphers=True)
    client = Client()
    client.supportedCiphers = [cipher]
    client, server, _pump = connect(factory, client)
    server.preauth_buffer_limit = 1 << 20  # big packets before auth are the point here
    got: list[tuple[int, bytes]] = []
    dispatch = server.dispatchMessage

    def record(number: int, payload: bytes) -> None:
        got.append((number, bytes(payload)))
        dispatch(number, payload)

    server.dispatchMessage = record  # type: ignore[method-assign]
    sent: list[bytes] = []
    boundaries = []
    client.transport.write = sent.append  # type: ignore[method-assign]
    sizes = [0, 1, 15, 16, 17, 300, 5000] if how == "bytes" else [0, 1, 17, 5000, 70_000, 250_000]
    payloads = [os.urandom(size) for size in sizes]
    for payload in payloads:
        client.sendIgnore(payload)
        boundaries.append(sum(map(len, sent)))
    for piece in _cuts(b"".join(sent), boundaries, how):
        server.dataReceived(piece)
    assert got == [(transport.MSG_IGNORE, NS(payload)) for payload in payloads]
    assert not closed(server) and len(server.buf) == 0
    store.close()


def _client_recording(factory, cipher: bytes):
    """A connected client that records the CHANNEL_DATA and IGNORE messages it
    gets, and the number of every message in ``client.numbers``."""
    client = Client()
    client.supportedCiphers = [cipher]
    client, server, pump = connect(factory, client)
    got: list[tuple[int, bytes]] = []
    client.numbers = []
    dispatch = client.dispatchMessage

    def record(number: int, payload: bytes) -> None:
        client.numbers.append(number)
        if number in (MSG_CHANNEL_DATA, transport.MSG_IGNORE):
            got.append((number, bytes(payload)))
        else:
            dispatch(number, payload)

    client.dispatchMessage = record  # type: ignore[method-assign]
    return client, server, pump, got


def _data_messages(recipient: int, data: bytes, max_packet: int) -> list[tuple[int, bytes]]:
    pieces = [data[i : i + max_packet] for i in range(0, len(data), max_packet)]
    return [(MSG_CHANNEL_DATA, struct.pack(">2L", recipient, len(p)) + p) for p in pieces]


@pytest.mark.parametrize("cipher", [c.encode() for c in AEAD] + [b"aes128-ctr"])
def test_channel_data_sealed_in_one_pass_arrives_as_separate_packets(tmp_path, cipher):
    """A 256 KiB read leaves as 32 KiB packets sealed in one loop: the peer
    reads each one, and the packets after them still check out."""
    store, factory = _world(tmp_path, chacha20_poly1305=True, compat_ctr_ciphers=True)
    client, server, pump, got = _client_recording(factory, cipher)
    data = os.urandom(256 * 1024 + 5)
    server.send_channel_data(7, data, 32768)
    server.send_channel_data(7, b"x", 32768)
    server.sendIgnore(b"after")
    pump.flush()
    assert got == [
        *_data_messages(7, data, 32768),
        *_data_messages(7, b"x", 32768),
        (transport.MSG_IGNORE, NS(b"after")),
    ]
    assert not closed(server) and not closed(client)
    store.close()


def test_channel_data_bursts_rekey_on_time_and_queue_during_the_key_exchange(factory):
    client, server, pump, got = _client_recording(factory, b"aes128-gcm@openssh.com")
    server.rekey_packets = 3
    first_keys = server._tx
    bursts = [os.urandom(size) for size in (5 * 1000, 2500, 7000)]
    # The first burst passes the packet limit: the server starts a key
    # exchange, and the next bursts wait for it.
    for burst in bursts:
        server.send_channel_data(3, burst, 1000)
    assert server._tx is first_keys
    pump.flush()
    assert server._tx is not first_keys and not closed(server)
    assert got == [message for burst in bursts for message in _data_messages(3, burst, 1000)]
    # Between its KEXINIT and its NEWKEYS the server sends no channel data.
    kex = client.numbers[client.numbers.index(transport.MSG_KEXINIT) :]
    assert MSG_CHANNEL_DATA not in kex[: kex.index(transport.MSG_NEWKEYS)]


def test_a_forged_packet_split_across_reads_closes_and_keeps_nothing(factory):
    client, server, _pump = connect(factory)
    sent: list[bytes] = []
    client.transport.write = sent.append  # type: ignore[method-assign]
    client.sendIgnore(os.urandom(30_000))
    client.sendIgnore(os.urandom(30_000))
    forged = bytearray(sent[0])
    forged[-20] ^= 1
    server.dataReceived(bytes(forged[:10_000]))
    server.dataReceived(bytes(forged[10_000:]) + sent[1])
    assert closed(server) and len(server.buf) == 0


@pytest.mark.parametrize("cipher", [c.encode() for c in AEAD])
def test_rekeying_while_the_stream_arrives_in_small_pieces_loses_nothing(factory, cipher):
    client = Client()
    client.supportedCiphers = [cipher]
    client, server, pump = connect(factory, client)
    rng = random.Random(3)
    receive = server.dataReceived

    def in_pieces(data: bytes) -> None:
        if not data:
            receive(data)
        for start in range(0, len(data), step := rng.randint(1, 700)):
            receive(data[start : start + step])

    server.dataReceived = in_pieces  # type: ignore[method-assign]
    got: list[bytes] = []
    ssh_ignore = server.ssh_IGNORE

    def record(packet: bytes) -> None:
        got.append(packet)
        ssh_ignore(packet)

    server.ssh_IGNORE = record  # type: ignore[method-assign]
    server.rekey_packets, client.rekey_packets = 5, 7
    first_keys = server._tx
    payloads = [os.urandom(rng.randint(0, 3000)) for _ in range(40)]
    for payload in payloads:
        client.sendIgnore(payload)
        server.sendIgnore(b"x")
        pump.flush()
    assert server._tx is not first_keys and not closed(server)
    assert got == [NS(payload) for payload in payloads]


def test_server_rekeys_after_its_packet_limit(factory):
    client, server, pump = connect(factory)
    server.rekey_packets = 5
    first_keys = server._tx
    for _ in range(10):
        client.sendIgnore(b"data")
        server.sendIgnore(b"data")
        pump.flush()
    assert server._tx is not first_keys
    assert server.isEncrypted("both") and not closed(server)
    # The strict reset happens after every NEWKEYS, not only the first.
    assert server.incomingPacketSequence < 10


def test_a_peer_that_never_rekeys_is_dropped(factory):
    client, server, pump = connect(factory)
    server.max_packets_per_key = 5
    server.rekey_packets = 10**9
    for _ in range(6):
        client.sendIgnore(b"data")
    pump.flush()
    assert closed(server)


def test_sequence_numbers_wrap_instead_of_overflowing(factory):
    client = Client()
    client.offer_strict_kex = False
    client, server, pump = connect(factory, client)
    server.incomingPacketSequence = client.outgoingPacketSequence = 0xFFFFFFFF
    server.outgoingPacketSequence = client.incomingPacketSequence = 0xFFFFFFFF
    for _ in range(3):
        client.sendIgnore(b"x")
        server.sendIgnore(b"y")
    pump.flush()
    assert server.incomingPacketSequence == 2 and server.outgoingPacketSequence == 2
    assert not closed(server)


def test_compat_setting_adds_ctr_after_aead(tmp_path):
    store, factory = _world(tmp_path, compat_ctr_ciphers=True)
    try:
        for cipher in (b"aes128-ctr", b"aes256-ctr"):
            for mac in (b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-512-etm@openssh.com"):
                client = Client()
                client.supportedCiphers = [cipher]
                client.supportedMACs = [mac]
                client, server, pump = connect(factory, client)
                assert server.currentEncryptions.inMACType == mac
                client.sendIgnore(os.urandom(3000))
                pump.flush()
                assert not closed(server)
    finally:
        store.close()


def test_default_refuses_ctr(factory):
    client = Client()
    client.supportedCiphers = [b"aes128-ctr"]
    client, server, _pump = connect(factory, client)
    assert closed(server) and not server.isEncrypted("in")


# -- the cipher primitives -----------------------------------------------------------


def _pair(name: bytes, mac: bytes = b"hmac-sha2-256-etm@openssh.com"):
    iv, key, integrity = os.urandom(64), os.urandom(64), os.urandom(64)
    return (
        ciphers.make_direction(name, mac, iv, key, integrity, True),
        ciphers.make_direction(name, mac, iv, key, integrity, False),
    )


@pytest.mark.parametrize("name", list(ciphers.CIPHERS))
def test_seal_then_open_round_trips(name):
    tx, rx = _pair(name)
    for seq in (0, 1, 7, 0xFFFFFFFF):
        body = bytes([4]) + os.urandom(27) + b"\0" * 4
        packet = struct.pack(">L", len(body)) + body
        wire = tx.seal(seq, packet)
        assert len(wire) == len(packet) + rx.tag_size
        assert rx.length(seq, wire[:4]) == len(body)
        assert rx.open(seq, wire) == body


def test_gcm_nonce_counts_packets_not_sequence_numbers():
    tx, rx = _pair(b"aes128-gcm@openssh.com")
    body = b"\x04" + b"a" * 11 + b"\0" * 4
    packet = struct.pack(">L", len(body)) + body
    first, second = tx.seal(0, packet), tx.seal(0, packet)
    assert first != second  # the invocation counter moved
    assert rx.open(99, first) == body and rx.open(99, second) == body


def test_chacha_hides_the_length_and_binds_the_sequence_number():
    tx, rx = _pair(b"chacha20-poly1305@openssh.com")
    body = b"\x04" + b"a" * 3 + b"\0" * 4
    packet = struct.pack(">L", len(body)) + body
    wire = tx.seal(5, packet)
    assert wire[:4] != packet[:4]
    assert rx.open(6, wire) is None


def _recording(server) -> tuple[list[int], list[bytes]]:
    """Record the message numbers the server sends and the reasons it disconnects with."""
    sent: list[int] = []
    reasons: list[bytes] = []
    send, disconnect = server.sendPacket, server.sendDisconnect

    def record_send(number: int, payload: bytes) -> None:
        sent.append(number)
        send(number, payload)

    def record_disconnect(code: int, reason: bytes) -> None:
        reasons.append(reason)
        disconnect(code, reason)

    server.sendPacket, server.sendDisconnect = record_send, record_disconnect
    return sent, reasons


def test_repeated_kex_method_messages_are_refused(factory):
    """One ECDH_INIT per round: a flood of them must not buy a host-key signature each."""
    client = Client()
    original = client.sendKexInit

    def send_kexinit_then_flood() -> None:
        original()
        state, client._keyExchangeState = client._keyExchangeState, client._KEY_EXCHANGE_NONE
        for _ in range(3):
            client.sendPacket(30, NS(b"\x01" * 32))  # KEX_ECDH_INIT, again and again
        client._keyExchangeState = state

    client.sendKexInit = send_kexinit_then_flood
    records: list[tuple[list[int], list[bytes]]] = []
    connect(factory, client, watch=lambda server: records.append(_recording(server)))
    ((sent, reasons),) = records
    assert sent.count(31) <= 1  # at most one KEX_ECDH_REPLY, i.e. one signature
    assert any(b"unexpected key exchange message 30" in r for r in reasons)


def test_a_bare_newkeys_does_not_complete_a_server_rekey(factory):
    """NEWKEYS counts only after the peer's KEXINIT for this round and fresh keys."""
    client, server, pump = connect(factory)
    _sent, reasons = _recording(server)
    server.sendKexInit()  # the server asks for a rekey; the client answers NEWKEYS alone
    client.sendPacket(transport.MSG_NEWKEYS, b"")
    pump.flush()
    assert any(b"NEWKEYS before key exchange" in r for r in reasons)
    assert closed(server)


def test_forwarded_connections_stop_reading_while_keys_change(factory):
    """Data read during a key exchange would only queue up inside the server."""
    from nekojump.ssh.connection import TunnelConnection

    conn = TunnelConnection()
    conn.key_exchange_running(True)
    assert conn.reading_blocked
    conn.key_exchange_running(False)
    assert not conn.reading_blocked


def test_only_recently_busy_aes_gcm_directions_keep_an_openssl_context():
    """Thousands of idle tunnels must not each hold two AES-GCM contexts; an idle
    direction gets its context back when it next sends, and still agrees with its peer."""
    key, iv = os.urandom(16), os.urandom(12)
    pairs = [
        (ciphers.AesGcm(key, iv), ciphers.AesGcm(key, iv)) for _ in range(ciphers.MAX_LIVE_CONTEXTS)
    ]
    packet = struct.pack(">L", 28) + bytes(28)
    for seq, (sender, receiver) in enumerate(pairs):
        assert receiver.open(seq, sender.seal(seq, packet)) == packet[4:]
    live = sum(d._context is not None for pair in pairs for d in pair)
    assert live == ciphers.MAX_LIVE_CONTEXTS
    sender, receiver = pairs[0]  # idle the longest: no contexts left
    assert sender._context is None and receiver._context is None
    for seq in range(3):
        assert receiver.open(seq, sender.seal(seq, packet)) == packet[4:]


def test_a_direction_whose_keys_are_done_with_gives_its_context_up():
    direction = ciphers.AesGcm(os.urandom(16), os.urandom(12))
    direction.seal(0, struct.pack(">L", 28) + bytes(28))
    assert direction in ciphers._live
    direction.release()
    assert direction not in ciphers._live and direction._context is None


def test_in_memory_the_default_configuration_refuses_chacha20(tmp_path):
    """With the default [ssh] settings a client offering only chacha20-poly1305 gets no
    cipher, and one that lists it first still ends up on AES-GCM."""
    store, default = _world(tmp_path)
    try:
        client = Client()
        client.supportedCiphers = [b"chacha20-poly1305@openssh.com"]
        server, client, _pump = connect(default, client)
        assert server._closing  # "couldn't match all kex parts"
        client = Client()
        client.supportedCiphers = [b"chacha20-poly1305@openssh.com", b"aes128-gcm@openssh.com"]
        server, client, _pump = connect(default, client)
        assert server.currentEncryptions.outCipType == b"aes128-gcm@openssh.com"
    finally:
        store.close()
