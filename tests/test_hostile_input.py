"""Property-based tests: hostile bytes never crash a parser or the server.

Whatever a client sends, nekojump answers with a refusal or a disconnect,
never an exception escaping into the reactor.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from nekojump.config import ConfigError, parse_config
from nekojump.keys import PublicKey, parse_public_key
from nekojump.model import Identity, Refused
from nekojump.policy import source_allowed
from nekojump.ssh.avatar import TunnelAvatar
from nekojump.ssh.factory import TunnelSSHFactory
from nekojump.ssh.registry import TunnelRegistry

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(st.text())
def test_any_pasted_text_is_a_key_or_a_refusal(text):
    assert isinstance(parse_public_key(text), PublicKey | Refused)


@SETTINGS
@given(st.binary(max_size=600).map(lambda b: b.decode("latin-1")))
def test_key_like_text_is_a_key_or_a_refusal(junk):
    for prefix in (
        "ssh-ed25519 ",
        "ssh-rsa AAAA",
        "ecdsa-sha2-nistp256 ",
        "sk-ssh-ed25519@openssh.com ",
    ):
        assert isinstance(parse_public_key(prefix + junk), PublicKey | Refused)


@SETTINGS
@given(st.text(max_size=60))
def test_any_peer_address_is_allowed_or_not(host):
    assert source_allowed(host, parse_config({}).ssh.allowed_sources) in (True, False)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["ssh", "forwarding", "web", "storage", "metrics", "x"]),
        st.dictionaries(
            st.text(max_size=12),
            st.one_of(
                st.integers(),
                st.text(max_size=20),
                st.booleans(),
                st.lists(st.text(max_size=20), max_size=3),
                st.floats(),
            ),
        ),
        max_size=3,
    )
)
def test_any_config_document_is_a_config_or_one_clear_error(document):
    try:
        parse_config(document, "fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml: ")


class _Conn:
    """Just enough of a connection for forward requests."""

    def __init__(self):
        self.transport = type(
            "T",
            (),
            {
                "sendDisconnect": lambda *a: None,
                "sendDebug": lambda *a, **k: None,
                "transport": StringTransport(),
            },
        )()


def _avatar(tmp_path_factory) -> TunnelAvatar:
    from nekojump.store import ImmediateStore, SQLiteStore

    store = SQLiteStore.open(tmp_path_factory.mktemp("fuzz"))
    config = parse_config({"forwarding": {"port_min": 20000, "port_max": 20009}})
    avatar = TunnelAvatar(
        Identity(1, "alice", 1, "SHA256:x", "laptop"),
        registry=TunnelRegistry(),
        config=config,
        store=ImmediateStore(store),
        reactor=MemoryReactorClock(),
    )
    avatar.conn = _Conn()  # type: ignore[assignment]
    return avatar


@SETTINGS
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.tuples(st.binary(max_size=300), st.integers(0, 2**32 - 1)).map(
            lambda t: NS(t[0]) + struct.pack(">L", t[1])
        ),
    )
)
def test_any_forward_request_is_answered_without_raising(tmp_path_factory, payload):
    avatar = _avatar(tmp_path_factory)
    for name in (
        b"tcpip-forward",
        b"cancel-tcpip-forward",
        b"streamlocal-forward@openssh.com",
        b"no-more-sessions@openssh.com",
    ):
        answer: Any = avatar.gotGlobalRequest(name, payload)
        assert answer in (0, 1) or (isinstance(answer, tuple) and answer[0] == 1)
    for port in avatar.forwards:
        assert 20000 <= port <= 20009


@SETTINGS
@given(st.binary(min_size=1, max_size=4000))
def test_random_bytes_after_the_banner_end_in_a_disconnect_not_a_crash(tmp_path_factory, junk):
    config = parse_config({})
    # Random bytes never get past the key exchange: no checker or avatars needed.
    factory = TunnelSSHFactory(
        None, None, Key(ed25519.Ed25519PrivateKey.generate()), config, MemoryReactorClock()
    )
    factory.startFactory()
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    wire = StringTransport()
    server.makeConnection(wire)
    server.dataReceived(b"SSH-2.0-fuzzer\r\n" + junk)  # must not raise
    server.dataReceived(junk)
