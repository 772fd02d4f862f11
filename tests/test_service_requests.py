"""SERVICE_REQUEST: only ssh-userauth, and until login, as in OpenSSH (auth2.c
accepts it again and again then, for the same userauth state; paramiko asks
before every attempt); after login a request is answered UNIMPLEMENTED.

Conch's server starts a fresh service on every request: a new userauth
service would forget the failures and limits of the last one, and one started
after login could log in again over the avatar that holds the ports.  Conch's
own client asks again after every key exchange.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred

from tests.test_ssh_protocol import (
    MSG_GLOBAL_REQUEST,
    MSG_REQUEST_SUCCESS,
    MSG_USERAUTH_PK_OK,
    MSG_USERAUTH_REQUEST,
    MSG_USERAUTH_SUCCESS,
    World,
    forward_request,
)

MSG_SERVICE_REQUEST = 5
MSG_USERAUTH_FAILURE = 51


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def closed(server) -> bool:
    return bool(server.transport.disconnecting or server.transport.disconnected)


def restart_userauth(recorder) -> None:
    recorder.send(MSG_SERVICE_REQUEST, NS(b"ssh-userauth"))


def test_requesting_ssh_userauth_again_does_not_reset_max_auth_tries(world):
    recorder, pump, server = world.connect()
    tries = world.config.ssh.max_auth_tries
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    for _ in range(5):
        for _ in range(tries - 1):
            recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(stranger))
        restart_userauth(recorder)
        pump.flush()
    assert recorder.count(MSG_USERAUTH_FAILURE) < tries
    assert closed(server)


def test_requesting_ssh_userauth_again_does_not_reset_the_pk_ok_cap(world):
    """Anyone who knows a member's public key (it is public) can make the
    server look it up as often as they like on one connection, never penalised:
    PK_OK answers count against nothing."""
    recorder, pump, server = world.connect()
    tries = world.config.ssh.max_auth_tries
    for _ in range(5):
        for _ in range(tries):
            recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(world.key))
        restart_userauth(recorder)
        pump.flush()
    assert recorder.count(MSG_USERAUTH_PK_OK) <= tries
    assert closed(server)


def test_requesting_ssh_userauth_again_does_not_start_lookups_in_parallel(world):
    """The service answers one request at a time and lets a client pipeline at
    most ``max_queued`` behind it.  One request and one SERVICE_REQUEST per
    lookup sidestep both: 200 bytes per store lookup queued on the store thread,
    before authentication, from one connection."""
    pending: list[str] = []

    def lookup_that_hangs(fingerprint: str) -> Deferred:
        pending.append(fingerprint)
        return Deferred()

    world.factory.key_checker.look_up = lookup_that_hangs
    recorder, pump, _server = world.connect()
    for _ in range(50):
        recorder.send(MSG_USERAUTH_REQUEST, recorder.key_query(world.key))
        restart_userauth(recorder)
    pump.flush()
    assert len(pending) <= 1


def test_logging_in_again_does_not_leave_the_first_login_holding_its_ports(world):
    recorder, pump, server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20085))
    pump.flush()
    assert recorder.count(MSG_REQUEST_SUCCESS) == 1
    (first,) = world.registry.avatars()
    listener = world.registry.forward_on(20085).listener
    restart_userauth(recorder)
    pump.flush()
    recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(world.key))
    pump.flush()
    assert recorder.count(MSG_USERAUTH_SUCCESS) in (1, 2)

    server.transport.loseConnection()
    pump.flush()
    world.reactor.advance(1)
    assert world.registry.held_ports() == set()
    assert world.registry.avatars() == [] and first.gone
    assert listener.stopped


def test_a_logged_in_client_that_goes_back_to_userauth_and_vanishes_loses_its_ports(world):
    recorder, pump, server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20087))
    pump.flush()
    assert recorder.count(MSG_REQUEST_SUCCESS) == 1
    restart_userauth(recorder)
    pump.flush()
    # The client vanishes without a FIN: it answers nothing from here on.
    ssh = world.config.ssh
    for _ in range(ssh.client_alive_count_max + 3):
        world.reactor.advance(ssh.client_alive_interval)
    # The keepalives of the connection service find it gone.
    assert closed(server)


def test_requesting_ssh_connection_again_leaves_no_connection_counted(world):
    recorder, pump, server = world.logged_in()
    (avatar,) = world.registry.avatars()
    member = avatar.identity.member_id
    assert world.registry.connections_of(member) == 1
    recorder.send(MSG_SERVICE_REQUEST, NS(b"ssh-connection"))
    pump.flush()
    server.transport.loseConnection()
    pump.flush()
    assert world.registry.avatars() == []
    # (Each repetition would add one: max_connections_per_member would then
    # refuse the member's real connections.)
    assert world.registry.connections_of(member) == 0


def test_any_service_requested_after_login_is_unimplemented_and_changes_nothing(world):
    recorder, pump, server = world.logged_in()
    for name in (b"no-such-service", b"ssh-connection", b"ssh-userauth"):
        recorder.send(MSG_SERVICE_REQUEST, NS(name))
        pump.flush()
    assert not closed(server) and type(server.service).__name__ == "TunnelConnection"
    assert len(world.registry.avatars()) == 1


def test_a_first_service_request_for_anything_but_userauth_is_refused(world):
    """Asking for ssh-connection first would skip authentication."""
    recorder, pump, server = world.connect(request_service=False)
    recorder.send(MSG_SERVICE_REQUEST, NS(b"ssh-connection"))
    pump.flush()
    assert closed(server) and world.registry.avatars() == []


def test_a_conch_client_rekeying_after_login_does_not_put_the_server_back_in_userauth(world):
    """Conch's stock client requests ``ssh-userauth`` again after every NEWKEYS
    (it calls ``connectionSecure`` each time).  The connection must go on as it
    was, forwards and all."""
    recorder, pump, server = world.logged_in()
    recorder.send(MSG_GLOBAL_REQUEST, forward_request(20088))
    pump.flush()
    assert recorder.count(MSG_REQUEST_SUCCESS) == 1
    recorder.transport.sendKexInit()
    pump.flush()
    restart_userauth(recorder)
    pump.flush()
    assert not closed(server) and type(server.service).__name__ == "TunnelConnection"
    assert world.registry.held_ports() == {20088}


MSG_UNIMPLEMENTED = 3
MSG_SERVICE_ACCEPT = 6


def test_asking_for_ssh_userauth_again_before_login_is_accepted_as_in_openssh(world):
    """paramiko asks before every attempt, and waits for the answer."""
    recorder, pump, _server = world.connect()
    client = recorder.transport
    seen: list[int] = []
    dispatch = client.dispatchMessage

    def spy(number: int, payload: bytes) -> None:
        seen.append(number)
        dispatch(number, payload)

    client.dispatchMessage = spy
    # paramiko's first attempt: a key the server does not know.
    stranger = Key(ed25519.Ed25519PrivateKey.generate())
    recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(stranger))
    pump.flush()
    assert recorder.count(MSG_USERAUTH_FAILURE) == 1
    # Its next attempt starts with a SERVICE_REQUEST and waits for the accept.
    restart_userauth(recorder)
    pump.flush()
    assert MSG_UNIMPLEMENTED not in seen
    assert MSG_SERVICE_ACCEPT in seen
    recorder.send(MSG_USERAUTH_REQUEST, recorder.signed_auth(world.key))
    pump.flush()
    assert recorder.count(MSG_USERAUTH_SUCCESS) == 1
