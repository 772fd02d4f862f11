"""The benchmark's ratio column: samples paired round by round, not medians divided."""

from __future__ import annotations

import argparse

import pytest

from bench.run import Results, paired_ratio, render


def test_a_machine_that_slows_down_between_rounds_does_not_tilt_the_ratio() -> None:
    # nekojump is 10 % faster than sshd in every round, but the machine halves
    # its speed halfway through; rounds alternate nekojump, sshd.
    nekojump = [110.0, 110.0, 55.0, 55.0, 55.0]
    sshd = [100.0, 100.0, 50.0, 50.0, 100.0]
    # The ratio of the medians (55 / 100) would say it is 45 % slower.
    assert paired_ratio(nekojump, sshd) == pytest.approx(1.1)


def test_unpaired_or_empty_samples_give_no_ratio() -> None:
    assert paired_ratio([1.0, 2.0], [1.0]) is None
    assert paired_ratio([], []) is None
    assert paired_ratio([1.0], [0.0]) is None


def _bench(results: Results) -> argparse.Namespace:
    """What ``render`` reads of a finished ``Bench``."""
    return argparse.Namespace(
        results=results, args=argparse.Namespace(repeats=3), negotiated={}, cipher=("c", "m"),
        notes=[],
    )  # fmt: skip


def test_the_table_shows_the_paired_ratio_where_there_is_one() -> None:
    results = Results()
    for ours, theirs in ((110.0, 100.0), (55.0, 50.0), (56.0, 100.0)):
        results.add_raw("bulk up MiB/s", "nekojump", ours)
        results.add_raw("bulk up MiB/s", "sshd", theirs)
    results.set("bulk up MiB/s", "nekojump", 56.0, "higher")
    results.set("bulk up MiB/s", "sshd", 100.0, "higher")
    results.pair("bulk up MiB/s", "bulk up MiB/s")
    results.set("memory per idle tunnel @100 KiB", "nekojump", 20.0)
    results.set("memory per idle tunnel @100 KiB", "sshd", 1600.0)

    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in render(_bench(results)).splitlines()
        if line.startswith("| ")
    }
    assert rows["bulk up MiB/s"] == ["56.0", "100", "1.10", "higher"]
    # A single measurement per server: the plain ratio of the two values.
    assert rows["memory per idle tunnel @100 KiB"] == ["20.0", "1600", "0.01", "lower"]


def test_a_server_measured_alone_gets_no_paired_ratio() -> None:
    results = Results()
    results.add_raw("rr p50", "nekojump", 0.0003)
    results.pair("64 B request/response p50 us", "rr p50")
    assert results.ratios == {}
