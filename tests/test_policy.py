"""The pure decisions: sources, channels, binds, takeover and port 0."""

import ipaddress
import random

import pytest

from nekojump import policy
from nekojump.model import Refused
from nekojump.policy import Bind, ForwardRules, Holder, Takeover

RULES = ForwardRules(port_min=10000, port_max=60000, reserved_ports=frozenset({10022}))
ME = Holder(key_id=1, member_id=1, connection_id=10)
MY_OLD_CONNECTION = Holder(key_id=1, member_id=1, connection_id=9)
MY_OTHER_KEY = Holder(key_id=2, member_id=1, connection_id=8)
SOMEONE_ELSE = Holder(key_id=3, member_id=2, connection_id=7)

MESH = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.2", True),
        ("128.0.0.1", False),
        ("::2", False),
        ("not-an-address", False),
        ("", False),
    ],
)
def test_source_allowed(host, allowed):
    """Only peers inside the configured networks may connect."""
    assert policy.source_allowed(host, MESH) is allowed


@pytest.mark.parametrize(
    "channel_type",
    [b"direct-tcpip", b"direct-streamlocal@openssh.com", b"x11", b"auth-agent@openssh.com"],
)
def test_channels_other_than_session_are_refused(channel_type):
    """ssh -L/-D/-W, streamlocal, X11 and agent channels are prohibited."""
    refusal = policy.channel_allowed(channel_type)
    assert isinstance(refusal, Refused)
    assert refusal.code == "channel-prohibited"


def test_session_channel_is_allowed():
    assert policy.channel_allowed(b"session") is None


@pytest.mark.parametrize(
    ("port", "code"),
    [
        (9999, "port-out-of-range"),
        (60001, "port-out-of-range"),
        (80, "port-out-of-range"),
        (10022, "port-reserved"),
    ],
)
def test_bind_refusals(port, code):
    """Ports outside the range, or reserved, are refused with a stable code."""
    decision = policy.decide_bind(port, ME, None, RULES)
    assert isinstance(decision, Refused)
    assert decision.code == code
    assert str(port) in decision.reason


@pytest.mark.parametrize("port", [10000, 10080, 60000])
def test_free_port_in_range_is_bound(port):
    assert policy.decide_bind(port, ME, None, RULES) == Bind(port)


@pytest.mark.parametrize(
    ("mode", "holder", "expected"),
    [
        ("same-key", MY_OLD_CONNECTION, "takeover"),
        ("same-key", MY_OTHER_KEY, "port-in-use"),
        ("same-key", SOMEONE_ELSE, "port-in-use"),
        ("same-member", MY_OLD_CONNECTION, "takeover"),
        ("same-member", MY_OTHER_KEY, "takeover"),
        ("same-member", SOMEONE_ELSE, "port-in-use"),
        ("never", MY_OLD_CONNECTION, "port-in-use"),
        ("never", SOMEONE_ELSE, "port-in-use"),
        ("same-key", ME, "port-in-use"),
    ],
)
def test_held_port(mode, holder, expected):
    """A held port moves only to a newer connection of the same key (or member)."""
    rules = ForwardRules(port_min=10000, port_max=60000, takeover=mode)
    decision = policy.decide_bind(10080, ME, holder, rules)
    if expected == "takeover":
        assert decision == Takeover(10080, holder)
    else:
        assert isinstance(decision, Refused)
        assert decision.code == expected


def test_port_zero_allocates_inside_range_skipping_held_and_reserved():
    rules = ForwardRules(port_min=20000, port_max=20009, reserved_ports=frozenset({20003}))
    held = {20000, 20001, 20002, 20004, 20005, 20006, 20007, 20008}
    port = policy.allocate_port(rules, held, lambda p: True, random.Random(1))
    assert port == 20009


def test_port_zero_skips_ports_taken_outside_nekojump():
    """A port some other process holds is passed over, not reported as ours."""
    rules = ForwardRules(port_min=20000, port_max=20004)
    busy = {20000, 20001, 20002, 20003}
    tried = []

    def try_bind(port):
        tried.append(port)
        return port not in busy

    assert policy.allocate_port(rules, set(), try_bind, random.Random(2)) == 20004
    assert all(20000 <= p <= 20004 for p in tried)


def test_port_zero_refused_when_range_is_full():
    rules = ForwardRules(port_min=20000, port_max=20002)
    result = policy.allocate_port(rules, {20000, 20001, 20002}, lambda p: True, random.Random(3))
    assert isinstance(result, Refused)
    assert result.code == "no-free-port"


def test_port_zero_gives_up_after_bounded_tries():
    rules = ForwardRules(port_min=10000, port_max=60000)
    calls = []
    result = policy.allocate_port(
        rules, set(), lambda p: calls.append(p) and False, random.Random(4), max_tries=5
    )
    assert isinstance(result, Refused)
    assert len(calls) == 5


@pytest.mark.parametrize(
    ("in_use", "needed", "refused"),
    [(0, 1, False), (935, 1, False), (936, 1, True), (900, 40, True)],
)
def test_capacity_keeps_a_reserve_of_descriptors(in_use, needed, refused):
    result = policy.capacity_refusal(in_use, limit=1000, needed=needed, reserve=64)
    assert (result is not None) is refused
    if refused:
        assert result.code == "server-full"


def test_penalties_that_ran_out_are_forgotten_when_the_box_fills():
    from nekojump.ssh.penalty import SourcePenalties

    now = [0.0]
    box = SourcePenalties(lambda: now[0], failures=1, duration=30, max_sources=100)
    for n in range(1000):
        box.failed(f"198.51.{n // 250}.{n % 250}")
        now[0] += 1.0
    assert len(box._until) <= 100 + 1
    assert box.refusal("198.51.3.249") is not None  # the latest is still in the box


def test_a_takeover_is_contested_for_a_while_after_a_port_changes_hands():
    from nekojump.policy import CONTEST_SECONDS, takeover_contested

    assert not takeover_contested(None, 1000.0)  # never changed hands: at once
    assert takeover_contested(1000.0, 1000.0 + CONTEST_SECONDS - 1)
    assert not takeover_contested(1000.0, 1000.0 + CONTEST_SECONDS)
    assert CONTEST_SECONDS > 600  # autossh's slowest retry: two live clients settle


def test_a_change_budget_counts_per_member_over_a_sliding_window():
    from nekojump.policy import ChangeBudget

    budget = ChangeBudget(window=3600)
    for minute in range(3):
        assert budget.refusal(1, minute * 60, limit=3) is None
        budget.spend(1, minute * 60)
    refused = budget.refusal(1, 180, limit=3)
    assert refused is not None and refused.code == "too-many-changes"
    assert "3 changes in the last 60 minutes (the limit is 3)" in refused.reason
    assert budget.refusal(2, 180, limit=3) is None  # another member is not held up
    assert budget.refusal(1, 3600, limit=3) is None  # the first change left the window
    assert budget.used(1, 3600 + 120) == 0  # and then all three
