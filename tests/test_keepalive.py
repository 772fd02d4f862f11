"""Server keepalives with a Clock: answered clients stay, silent ones are dropped."""

from twisted.conch.error import ConchError
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nekojump.ssh.keepalive import Keepalive


def make(interval=15.0, count_max=3):
    clock = Clock()
    asks: list[Deferred] = []
    dead = []

    def send():
        d = Deferred()
        asks.append(d)
        return d

    keepalive = Keepalive(send, clock, interval, count_max, lambda: dead.append(clock.seconds()))
    keepalive.start()
    return clock, asks, dead, keepalive


def test_silent_client_is_dropped_after_count_max_unanswered_asks():
    clock, asks, dead, _ = make()
    clock.pump([15] * 10)
    assert len(asks) == 3
    assert dead == [60.0]  # like sshd: interval * (count_max + 1)


def test_any_reply_keeps_the_client_even_a_failure():
    """OpenSSH answers keepalive@openssh.com with REQUEST_FAILURE; that is a reply."""
    clock, asks, dead, _ = make()
    for _ in range(10):
        clock.advance(15)
        asks[-1].errback(ConchError("global request failed"))
    assert dead == []
    assert len(asks) == 10


def test_late_reply_resets_the_count():
    clock, asks, dead, _ = make(interval=1, count_max=2)
    clock.pump([1, 1])
    asks[0].callback(b"")
    clock.pump([1, 1])
    assert dead == []
    clock.pump([1])
    assert dead == [5.0]


def test_stop_cancels_everything():
    clock, asks, dead, keepalive = make()
    keepalive.stop()
    clock.pump([15] * 10)
    assert asks == [] and dead == []


def test_a_probe_unanswered_in_time_ends_the_client():
    clock, asks, dead, keepalive = make()
    keepalive.probe(5)
    keepalive.probe(5)  # one at a time
    assert len(asks) == 1
    clock.advance(5)
    assert dead == [5.0]
    clock.pump([15] * 10)
    assert dead == [5.0]  # ended once: the regular asks stop too


def test_a_probe_answered_in_time_keeps_the_client_and_its_count():
    clock, asks, dead, keepalive = make()
    clock.advance(15)
    clock.advance(15)  # two regular asks unanswered
    keepalive.probe(5)
    asks[-1].callback(None)
    clock.advance(5)
    assert dead == [] and keepalive.unanswered == 0
    keepalive.stop()
    clock.advance(15)
    keepalive.probe(5)
    assert len(asks) == 4
    keepalive.stop()  # cancels the probe as well
    clock.advance(10)
    assert dead == []


def test_a_client_that_just_answered_a_probe_is_not_probed_again_until_the_next_interval():
    clock, asks, _dead, keepalive = make()
    keepalive.probe(5)
    asks[-1].callback(None)
    keepalive.probe(5)
    clock.advance(14)
    keepalive.probe(5)
    assert len(asks) == 1
    clock.advance(1)  # the regular ask
    keepalive.probe(5)
    assert len(asks) == 3


def test_a_client_busy_sending_counts_as_there_while_a_probe_waits():
    """Its answer may wait behind its own data (a slow uplink, a full window)."""
    clock = Clock()
    received = [1000]
    dead: list[float] = []
    keepalive = Keepalive(Deferred, clock, 15, 3, lambda: dead.append(1), lambda: received[0])
    keepalive.probe(5)
    received[0] += 32768  # channel data, no answer yet
    clock.advance(5)
    assert dead == []
    clock.advance(15)
    keepalive.probe(5)  # silent this time
    clock.advance(5)
    assert dead == [1]


def test_a_client_busy_sending_is_kept_though_its_answers_wait_behind_its_data():
    """A slow uplink carrying a download: the answers to the asks are queued
    behind the client's own data, but data keeps coming, so it is there (as
    with sshd).  It was ended after count_max unanswered asks."""
    clock = Clock()
    asks: list[Deferred] = []
    dead: list[float] = []
    received = [0]

    def send() -> Deferred:
        asks.append(Deferred())
        return asks[-1]

    keepalive = Keepalive(
        send, clock, 15, 3, lambda: dead.append(clock.seconds()), lambda: received[0]
    )
    keepalive.start()
    for _ in range(20):  # five minutes of data and no answer
        received[0] += 32 * 1024
        clock.advance(15)
    assert dead == [] and asks == []  # nothing to ask while data arrives
    clock.pump([15] * 10)  # then silence: asked, and ended as any silent client
    assert len(asks) == 3 and dead == [60.0 + 300]
