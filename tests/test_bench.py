"""The benchmark's pure parts (the ratio column) and its bare-Conch reference server."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import echo_ok
from bench.run import Results, paired_ratio, per_round, render
from tests.conftest import (
    EchoServer,
    can_connect,
    exited_within,
    free_port,
    tool,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent


def test_a_machine_that_slows_down_between_rounds_does_not_tilt_the_ratio() -> None:
    # nekojump is 10 % faster than sshd in every round, but the machine halves
    # its speed halfway through; rounds alternate nekojump, sshd.
    nekojump = [110.0, 110.0, 55.0, 55.0, 55.0]
    sshd = [100.0, 100.0, 50.0, 50.0, 100.0]
    # The ratio of the medians (55 / 100) would say it is 45 % slower.
    assert paired_ratio(nekojump, sshd) == pytest.approx(1.1)


def test_login_turns_pair_up_by_round() -> None:
    # Two turns each per round (A B B A); nekojump needs 1.2x Conch's CPU per
    # login throughout, and the machine slows down by half after the first round.
    nekojump = [2.4, 2.4, 4.8, 4.8]
    conch = [2.0, 2.0, 4.0, 4.0]
    assert per_round(nekojump) == [2.4, 4.8]
    assert paired_ratio(per_round(nekojump), per_round(conch)) == pytest.approx(1.2)
    assert per_round([1.0, 2.0, 3.0]) == [1.5]  # an unfinished round does not count


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


def test_the_bare_conch_reference_holds_a_real_ssh_forward(tmp_path, keys, echo: EchoServer):
    """The reference the benchmark sets nekojump's login cost beside is a working
    jumphost: the real OpenSSH client logs in and its -R forward carries data."""
    host_key = tmp_path / "host_key"
    subprocess.run(
        [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
    )
    ssh_port, forward_port = free_port(), free_port("127.0.0.2")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "bench.conch_reference", "--port", str(ssh_port),
            "--host-key", str(host_key), "--authorized-key", f"{keys['alice']}.pub",
            "--user", "tunnel", "--bind", "127.0.0.2",
        ],
        cwd=REPO,
    )  # fmt: skip
    client = None
    try:
        wait_for(lambda: can_connect("127.0.0.1", ssh_port), what="the reference to listen")
        client = subprocess.Popen(
            [
                tool("ssh"), "-F", "/dev/null", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "IdentitiesOnly=yes", "-i", str(keys["alice"]), "-p", str(ssh_port),
                "-c", "aes128-ctr", "-m", "hmac-sha2-256", "-N",
                "-R", f"127.0.0.2:{forward_port}:127.0.0.1:{echo.port}", "tunnel@127.0.0.1",
            ],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(lambda: can_connect("127.0.0.2", forward_port), what="the forward")
        # As the benchmark samples tunnels: bare Conch closes on a half-close.
        assert echo_ok("127.0.0.2", forward_port)
    finally:
        for process in (client, server):
            if process is not None:
                process.terminate()
                assert exited_within(process, 10)


def test_interleaved_echoes_measure_every_target_block_by_block() -> None:
    from bench.measure import interleaved_echoes

    first, second = EchoServer(), EchoServer()
    try:
        found = interleaved_echoes(
            {"a": ("127.0.0.1", first.port), "b": ("127.0.0.1", second.port)}, count=7, block=3
        )
    finally:
        for server in (first, second):
            server.shutdown()
            server.server_close()
    assert {name: [len(block) for block in blocks] for name, blocks in found.items()} == {
        "a": [3, 3, 1],
        "b": [3, 3, 1],
    }
    assert all(0 < t < 5 for blocks in found.values() for block in blocks for t in block)


def test_server_cpu_counts_every_thread_and_child_more_finely_than_clock_ticks() -> None:
    """A server's CPU is its threads' and its children's (sshd forks one per
    connection), read to well under the 10 ms of a clock tick."""
    from bench.procs import cpu_seconds

    burner = (
        "import threading, time, subprocess, sys\n"
        "def burn():\n"
        "    end = time.thread_time() + 0.15\n"
        "    while time.thread_time() < end: pass\n"
        "threads = [threading.Thread(target=burn) for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "subprocess.run([sys.executable, '-c', 'import time\\n"
        "end = time.process_time() + 0.15\\nwhile time.process_time() < end: pass'])\n"
        "print('done', flush=True); sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", burner], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout.readline() == b"done\n"
        used = cpu_seconds(process.pid)
        # Two threads and a child, 0.15 s each, plus the interpreters starting up.
        assert 0.45 <= used < 1.5
        assert used != round(used, 2)  # not whole clock ticks
    finally:
        process.stdin.close()
        process.wait(timeout=10)
