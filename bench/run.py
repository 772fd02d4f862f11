"""nekojump vs OpenSSH sshd as a tunnel-only jumphost, on loopback.

Usage (from the repository root): ``python3 -m bench [--max-tunnels N] [--json FILE]``.
Progress goes to stderr, the result table to stdout.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import measure
from bench.measure import MIB, percentile
from bench.procs import Processes, cpu_seconds, descendants, memory_kib, wait_until
from bench.servers import (
    IMPLICIT_MAC,
    KEX,
    ConchReference,
    Nekojump,
    Server,
    Sshd,
    Tunnel,
)

REPO = Path(__file__).resolve().parent.parent
NEKOJUMP_BIND = "127.0.0.2"
SSHD_BIND = "127.0.0.3"
CONCH_BIND = "127.0.0.4"
GIB = 1 << 30
#: Idle tunnels beyond this many are measured on nekojump only.
SSHD_MAX_TUNNELS = 1000
#: Echoes to one server before the other's turn in the request/response rounds.
ECHO_BLOCK = 250
#: Measurement groups, in the order they run (``--only`` picks some).
GROUPS = ("slow", "bulk", "rtt", "connect", "echo", "idle")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--max-tunnels",
        type=int,
        default=1000,
        help="largest idle-tunnel count (default 1000; at most 9500 with 20,000 open files)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per timing (median)")
    parser.add_argument("--bulk-mib", type=int, default=128, help="MiB per bulk transfer")
    parser.add_argument("--rtt-mib", type=int, default=32, help="MiB per transfer at 40 ms RTT")
    parser.add_argument("--connects", type=int, default=100, help="fresh connections per round")
    parser.add_argument("--gap-samples", type=int, default=40, help="connections after idle gap")
    parser.add_argument("--gap", type=float, default=0.5, help="idle gap in seconds")
    parser.add_argument("--echoes", type=int, default=1000, help="small echoes per round")
    parser.add_argument("--slow-seconds", type=float, default=10, help="slow-reader duration")
    parser.add_argument("--no-sshd", action="store_true", help="measure nekojump only")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy profile of nekojump during extra bulk runs"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--only",
        metavar="GROUPS",
        type=lambda text: set(text.split(",")),
        default=set(GROUPS),
        help=f"comma-separated measurement groups to run (default all: {','.join(GROUPS)})",
    )
    args = parser.parse_args(argv)
    if not args.only <= set(GROUPS):
        parser.error(f"--only takes some of {','.join(GROUPS)}")
    if not 1 <= args.max_tunnels <= 9500:
        parser.error("--max-tunnels must be between 1 and 9500")
    counts = ("repeats", "bulk_mib", "rtt_mib", "connects", "gap_samples", "echoes")
    if any(getattr(args, name) < 1 for name in counts):
        parser.error(
            "--repeats, --bulk-mib, --rtt-mib, --connects, --gap-samples and --echoes "
            "must be positive"
        )
    return args


def tunnel_sizes(largest: int) -> list[int]:
    return sorted({n for n in (100, 1000) if n <= largest} | {largest})


def read_json_line(process: subprocess.Popen, timeout: float, what: str) -> dict:
    """One JSON line from a helper's stdout, or TimeoutError."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        ready, _, _ = select.select([process.stdout], [], [], min(left, 1.0))
        if ready:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"{what}: the helper exited (code {process.poll()})")
            return json.loads(line)
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the helper exited (code {process.returncode})")


def python_module(procs: Processes, module: str, *args: str) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return procs.spawn(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )


def per_round(turns: list[float], per: int = 2) -> list[float]:
    """The mean of each round's ``per`` turns (a round runs A B B A: two turns each)."""
    return [statistics.mean(turns[i : i + per]) for i in range(0, len(turns) - per + 1, per)]


def paired_ratio(ours: list[float], theirs: list[float]) -> float | None:
    """Median of ``ours[i] / theirs[i]``: samples taken side by side, one pair at
    a time, so that the machine getting slower or faster between pairs cancels
    out.  None unless there are pairs to compare."""
    if len(ours) != len(theirs):
        return None
    pairs = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    return statistics.median(pairs) if pairs else None


class Results:
    """results[metric][server] = value, plus notes."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, object]] = {}
        self.better: dict[str, str] = {}
        self.raw: dict[str, dict[str, object]] = {}
        #: nekojump / sshd per metric: the median over paired samples (rounds,
        #: request/response blocks or idle gaps; see ``pair``).
        self.ratios: dict[str, float] = {}

    def pair(self, metric: str, raw: str) -> None:
        """``metric``'s ratio from the samples in ``raw[raw]``, paired by index."""
        samples = self.raw.get(raw, {})
        ours, theirs = samples.get("nekojump"), samples.get("sshd")
        if isinstance(ours, list) and isinstance(theirs, list):
            ratio = paired_ratio(ours, theirs)
            if ratio is not None:
                self.ratios[metric] = ratio

    def set(self, metric: str, server: str, value: object, better: str = "lower") -> None:
        self.values.setdefault(metric, {})[server] = value
        self.better[metric] = better

    def add_raw(self, metric: str, server: str, value: object) -> None:
        self.raw.setdefault(metric, {}).setdefault(server, []).append(value)


class Bench:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.directory = directory
        self.procs = Processes()
        self.results = Results()
        self.servers: list[Server] = []
        self.tunnels: dict[tuple[str, str], Tunnel] = {}
        self.negotiated: dict[str, dict[str, str]] = {}
        self.notes: list[str] = []
        self.profile_summary: list[tuple[str, float]] = []
        self.cipher = ("?", "?")

    # -- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        key = self.directory / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)],
            check=True,
            timeout=30,
        )
        self.key = key
        where = subprocess.run(
            [sys.executable, "-c", "import nekojump; print(nekojump.__file__)"],
            cwd=self.directory, capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        if where:
            package = Path(where).parent
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(package.stat().st_mtime))
            self.notes.append(f"nekojump measured: {package} (installed {stamp})")
        self.services_process = python_module(self.procs, "bench.helpers", "services")
        self.services = read_json_line(self.services_process, 30, "local services")

        nj_dir = self.directory / "nekojump"
        nj_dir.mkdir()
        nekojump = Nekojump(
            "nekojump", nj_dir, self.procs, user="tunnel", bind=NEKOJUMP_BIND,
            port_min=10000, port_max=19999,
        )  # fmt: skip
        log("starting nekojump")
        nekojump.start(Path(f"{key}.pub"))
        self.servers.append(nekojump)

        why_not = "--no-sshd given" if self.args.no_sshd else Sshd.unavailable()
        if why_not is None:
            sshd_dir = self.directory / "sshd"
            sshd_dir.mkdir()
            sshd = Sshd(
                "sshd", sshd_dir, self.procs, user=_username(), bind=SSHD_BIND,
                port_min=20000, port_max=29999,
            )  # fmt: skip
            log("starting sshd")
            try:
                sshd.start(Path(f"{key}.pub"))
                self.servers.append(sshd)
            except (RuntimeError, TimeoutError, subprocess.SubprocessError) as error:
                why_not = f"sshd did not start: {error}"
                sshd.stop()
        if why_not is not None:
            self.notes.append(f"sshd column skipped: {why_not}")
            log(self.notes[-1])

        services = self.services
        every = {"echo": services["echo"], "sink": services["sink"], "source": services["source"]}
        bulk_only = {"sink": services["sink"], "source": services["source"]}
        nekojump = self.servers[0]
        # The cipher nekojump negotiates with a default OpenSSH client is the one
        # both servers are measured with (forced on sshd with -c / -m).
        log("nekojump: opening tunnels with the OpenSSH client")
        main = Tunnel(nekojump, key, every, label="main")
        found = main.negotiated()
        if "cipher" not in found:
            raise RuntimeError(f"could not read the negotiated cipher from {main.log}")
        self.cipher = (found["cipher"], found["mac"])
        self.tunnels[nekojump.name, "main"] = main
        self.negotiated[nekojump.name] = found
        for server in self.servers:
            if server is not nekojump:
                log(f"{server.name}: opening tunnels with the OpenSSH client")
                main = Tunnel(server, key, every, label="main", cipher=self.cipher)
                self.tunnels[server.name, "main"] = main
                self.negotiated[server.name] = main.negotiated()
            proxy = python_module(
                self.procs, "bench.helpers", "delay", "--target", f"127.0.0.1:{server.ssh_port}"
            )
            proxy_port = read_json_line(proxy, 30, "delay proxy")["port"]
            self.tunnels[server.name, "rtt"] = Tunnel(
                server, key, bulk_only, label="rtt", via=proxy_port, cipher=self.cipher
            )
            if isinstance(server, Sshd):
                default = Tunnel(server, key, bulk_only, label="default")
                own = default.negotiated()
                if own.get("cipher") == self.cipher[0]:
                    default.stop()  # sshd's default is the common cipher: nothing to add
                else:
                    self.tunnels[server.name, "default"] = default
                    self.negotiated["sshd (its default cipher)"] = own
        for name, negotiated in self.negotiated.items():
            log(f"{name}: negotiated {negotiated}")

    # -- throughput ----------------------------------------------------------------

    def bulk(self, kind: str, size_mib: int, label: str, cpu: bool) -> None:
        size = size_mib * MIB
        for round_ in range(self.args.repeats):
            # The two servers' transfers of one direction right after each other.
            for turn, (direction, run) in enumerate(
                (("up", measure.upload), ("down", measure.download))
            ):
                # First A up, B up, B down, A down; the next round B, A, A, B.
                for server in self._in_turn(round_ + turn):
                    tunnel = self.tunnels.get((server.name, kind))
                    if tunnel is None:
                        continue
                    port = tunnel.ports["sink" if direction == "up" else "source"]
                    before = cpu_seconds(server.pid)
                    elapsed = run(server.bind, port, size)
                    used = cpu_seconds(server.pid) - before
                    self.results.add_raw(
                        f"{label} {direction} MiB/s", server.name, size_mib / elapsed
                    )
                    if cpu:
                        self.results.add_raw(
                            f"server CPU s/GiB {direction}", server.name, used / (size / GIB)
                        )
            log(f"{label} round {round_ + 1}/{self.args.repeats} done")
        for direction in ("up", "down"):
            metrics = [(f"{label} {direction} MiB/s", "higher")]
            if cpu:
                metrics.append((f"server CPU s/GiB {direction}", "lower"))
            for metric, better in metrics:
                for server_name, samples in self.results.raw[metric].items():
                    self.results.set(metric, server_name, statistics.median(samples), better)
                self.results.pair(metric, metric)

    # -- latency -------------------------------------------------------------------

    def _in_turn(self, round_: int) -> list[Server]:
        """The servers in the order of this round: who goes first alternates, so
        that a machine drifting faster or slower favours neither."""
        return self.servers if round_ % 2 == 0 else self.servers[::-1]

    def connect_latency(self) -> None:
        for round_ in range(self.args.repeats):
            for server in self._in_turn(round_):
                port = self.tunnels[server.name, "main"].ports["echo"]
                times = [
                    measure.connect_latency(server.bind, port) for _ in range(self.args.connects)
                ]
                self.results.add_raw("b2b p50", server.name, percentile(times, 50))
                self.results.add_raw(
                    "b2b stalled", server.name, 100 * sum(t > 0.02 for t in times) / len(times)
                )
                self.results.add_raw("b2b p99", server.name, percentile(times, 99))
            log(f"back-to-back connections round {round_ + 1}/{self.args.repeats} done")
        for q in (50, 99):
            for server in self.servers:
                samples = self.results.raw[f"b2b p{q}"][server.name]
                self.results.set(
                    f"fresh connection, back-to-back p{q} ms", server.name,
                    1000 * statistics.median(samples),
                )  # fmt: skip
            self.results.pair(f"fresh connection, back-to-back p{q} ms", f"b2b p{q}")
        for server in self.servers:
            self.results.set(
                "fresh connection, back-to-back: % over 20 ms", server.name,
                statistics.median(self.results.raw["b2b stalled"][server.name]),
            )  # fmt: skip
        gap_times: dict[str, list[float]] = {s.name: [] for s in self.servers}
        for sample in range(self.args.gap_samples):
            # Every connection after a gap of its own: the machine idle, not just
            # this tunnel.  Sample i of each server is a pair, one gap apart.
            for server in self._in_turn(sample):
                time.sleep(self.args.gap)
                port = self.tunnels[server.name, "main"].ports["echo"]
                gap_times[server.name].append(measure.connect_latency(server.bind, port))
        log("connections after idle gaps done")
        for server in self.servers:
            for q in (50, 99):
                self.results.set(
                    f"fresh connection after {self.args.gap:g} s idle p{q} ms", server.name,
                    1000 * percentile(gap_times[server.name], q),
                )  # fmt: skip
            self.results.raw.setdefault("gap samples", {})[server.name] = gap_times[server.name]
        # The p50 ratio is the median over those pairs.
        self.results.pair(f"fresh connection after {self.args.gap:g} s idle p50 ms", "gap samples")

    def request_response(self) -> None:
        # Both servers in the same moments: a block of echoes to one, then to the other.
        block = min(ECHO_BLOCK, self.args.echoes)
        for round_ in range(self.args.repeats):
            targets = {
                server.name: (server.bind, self.tunnels[server.name, "main"].ports["echo"])
                for server in self._in_turn(round_)
            }
            found = measure.interleaved_echoes(targets, self.args.echoes, block)
            for name, blocks in found.items():
                times = [t for each in blocks for t in each]
                self.results.add_raw("rr p50", name, percentile(times, 50))
                self.results.add_raw("rr p99", name, percentile(times, 99))
                for each in blocks:
                    if len(each) == block:  # a short last block would weigh as much
                        self.results.add_raw("rr block p50", name, percentile(each, 50))
            log(f"request/response round {round_ + 1}/{self.args.repeats} done")
        for q in (50, 99):
            for server in self.servers:
                self.results.set(
                    f"64 B request/response p{q} us", server.name,
                    1e6 * statistics.median(self.results.raw[f"rr p{q}"][server.name]),
                )  # fmt: skip
            # p50: block against neighbouring block, the finest pairing there is.
            paired = "rr block p50" if q == 50 else f"rr p{q}"
            self.results.pair(f"64 B request/response p{q} us", paired)

    # -- memory --------------------------------------------------------------------

    def slow_reader(self) -> None:
        for server in self.servers:
            port = self.tunnels[server.name, "main"].ports["source"]
            found = measure.slow_reader(
                server.bind, port, self.args.slow_seconds,
                lambda server=server: memory_kib(server.pid)["pss_kib"],
            )  # fmt: skip
            self.results.set(
                "slow reader: server memory growth MiB", server.name, found["growth_kib"] / 1024
            )
            self.results.raw.setdefault("slow reader", {})[server.name] = found
            log(f"{server.name}: slow reader done: {found}")

    def idle_tunnels(self) -> None:
        sizes = tunnel_sizes(self.args.max_tunnels)
        for tunnel in self.tunnels.values():
            tunnel.stop()
        self.tunnels.clear()
        for server in self.servers:
            # A fresh server: earlier bulk transfers leave freed memory in its heap.
            server.restart()
            # sshd's per-connection processes exit once their clients are gone.
            wait_until(lambda server=server: not descendants(server.pid), 15,
                       f"{server.name} connections to close")  # fmt: skip
            if isinstance(server, Sshd):
                held = [size for size in sizes if size <= SSHD_MAX_TUNNELS]
                if held != sizes:
                    self.notes.append(
                        f"sshd held at most {SSHD_MAX_TUNNELS} idle tunnels: at ~1.6 MiB "
                        f"and two processes each, {sizes[-1]} would need "
                        f"~{sizes[-1] * 1.6 / 1024:.0f} GiB and {2 * sizes[-1]} processes"
                    )
            else:
                held = sizes
            steps = self._grow_tunnels(server, held, self.cipher)
            for size, found in zip(held, steps, strict=True):
                self._record_tunnels(server, size, found)
        self.conch_reference()

    #: Rounds of the login comparison with bare Conch, and tunnels per turn.
    LOGIN_ROUNDS = 4
    LOGIN_STEP = 200

    def conch_reference(self) -> None:
        """nekojump's CPU per tunnel setup beside bare Twisted Conch's
        (``bench/conch_reference.py``, the framework nekojump is built on), as a
        note.  The two take turns adding ``LOGIN_STEP`` tunnels, A B B A in one
        round and B A A B in the next; the ratio is the median over rounds, so
        the machine's speed drifting between rounds cancels out.  Optional: any
        failure only says so."""
        nekojump = self.servers[0]
        reference = ConchReference(
            "bare Conch", self.directory / "conch", self.procs, user="tunnel",
            bind=CONCH_BIND, port_min=30000, port_max=39999,
        )  # fmt: skip
        generators: list[subprocess.Popen] = []
        turns: dict[str, list[float]] = {nekojump.name: [], reference.name: []}
        have = dict.fromkeys(turns, 0)
        try:
            nekojump.restart()  # a fresh server, as for the idle tunnels
            reference.directory.mkdir()
            reference.start(Path(f"{self.key}.pub"))
            both = []
            for server, cipher in ((nekojump, self.cipher), (reference, reference.cipher)):
                generators.append(self._load_generator(server, cipher))
                both.append((server, generators[-1]))
            for round_ in range(self.LOGIN_ROUNDS):
                order = both if round_ % 2 == 0 else both[::-1]
                for server, generator in [*order, *order[::-1]]:
                    have[server.name] += self.LOGIN_STEP
                    grown, cpu = self._grow_to(server, generator, have[server.name])
                    if grown["failed"] or not grown["opened"]:
                        raise RuntimeError(f"{server.name}: {grown['first_errors']}")
                    turns[server.name].append(1000 * cpu / grown["opened"])
                log(
                    f"login round {round_ + 1}: "
                    + ", ".join(
                        f"{name} {' and '.join(f'{v:.2f}' for v in ms[-2:])} ms"
                        for name, ms in turns.items()
                    )
                )
        except Exception as error:  # noqa: BLE001 - a note, never the end of the run
            self.notes.append(f"bare Conch reference skipped: {error!r}")
            log(self.notes[-1])
            return
        finally:
            for generator in generators:
                self.procs.stop(generator)
            reference.stop()
        self.results.raw["login turns ms"] = turns
        ours, theirs = per_round(turns[nekojump.name]), per_round(turns[reference.name])
        ratio = paired_ratio(ours, theirs)
        if ratio is None:  # every round has both servers' turns: should not happen
            self.notes.append(f"bare Conch reference: no paired rounds ({turns})")
            log(self.notes[-1])
            return
        self.notes.append(
            f"bare Twisted Conch (bench/conch_reference.py: publickey login and tcpip-forward, "
            f"no store, audit, limits or logs; {'+'.join(reference.cipher)}) took "
            f"{statistics.median(theirs):.2f} ms of CPU per tunnel setup, nekojump "
            f"{statistics.median(ours):.2f} ms: {ratio:.2f}x (median of {len(ours)} rounds "
            f"in which the two took turns adding {self.LOGIN_STEP} tunnels, up to "
            f"{have[reference.name]} each)"
        )
        log(self.notes[-1])

    def _load_generator(self, server: Server, cipher: tuple[str, str]) -> subprocess.Popen:
        """A load generator for ``server``, started and ready for ``grow``."""
        generator = python_module(
            self.procs, "bench.loadgen",
            "--port", str(server.ssh_port), "--user", server.user, "--key", str(self.key),
            "--bind", server.bind, "--base-port", str(server.load_base_port),
            "--echo", str(self.services["echo"]), "--cipher", cipher[0], "--mac", cipher[1],
        )  # fmt: skip
        try:
            read_json_line(generator, 60, "load generator")
        except BaseException:
            self.procs.stop(generator)
            raise
        return generator

    @staticmethod
    def _grow_to(server: Server, generator: subprocess.Popen, size: int) -> tuple[dict, float]:
        """Have ``generator`` hold ``size`` tunnels; its report and the server CPU it took."""
        cpu_before = cpu_seconds(server.pid)
        assert generator.stdin is not None
        generator.stdin.write(f"grow {size}\n".encode())
        generator.stdin.flush()
        grown = read_json_line(generator, 60 + size * 0.05, f"{size} tunnels")
        return grown, cpu_seconds(server.pid) - cpu_before

    def _grow_tunnels(
        self, server: Server, sizes: list[int], cipher: tuple[str, str]
    ) -> list[dict]:
        """Grow one load generator's idle tunnels on ``server`` to each of
        ``sizes`` in turn; what each step took and what the server held after it."""
        generator = self._load_generator(server, cipher)
        steps = []
        try:
            # The baseline once the load generator runs: PSS splits shared pages
            # (libpython, libcrypto) among the processes that map them, so a
            # process started later lowers the server's PSS by itself.
            time.sleep(1)
            base = memory_kib(server.pid)
            self.results.raw.setdefault("baseline memory", {})[server.name] = base
            have = 0
            for size in sizes:
                grown, cpu_used = self._grow_to(server, generator, size)
                time.sleep(2)  # let the server settle before sampling memory
                memory = memory_kib(server.pid)
                sample = random.sample(range(grown["tunnels"]), min(10, grown["tunnels"]))
                answering = sum(
                    measure.echo_ok(server.bind, server.load_base_port + i) for i in sample
                )
                steps.append({
                    **grown, "memory": memory, "base": base, "cpu_seconds": cpu_used,
                    "answering": answering, "sampled": len(sample), "added": size - have,
                })  # fmt: skip
                have = size
                per_tunnel = (memory["pss_kib"] - base["pss_kib"]) / max(1, grown["tunnels"])
                log(
                    f"{server.name}: {grown['tunnels']} tunnels in {grown['seconds']:.1f}s, "
                    f"{per_tunnel:.0f} KiB each, {answering}/{len(sample)} answer"
                    + (f", errors {grown['first_errors']}" if grown["failed"] else "")
                )
            assert generator.stdin is not None
            generator.stdin.write(b"quit\n")
            generator.stdin.flush()
            read_json_line(generator, 60, "load generator to close")
        finally:
            self.procs.stop(generator)
        return steps

    def _record_tunnels(self, server: Server, size: int, found: dict) -> None:
        r = self.results
        base, memory = found["base"], found["memory"]
        per_tunnel = (memory["pss_kib"] - base["pss_kib"]) / max(1, found["tunnels"])
        rate = found["opened"] / found["seconds"] if found["seconds"] else 0
        r.set(f"memory per idle tunnel @{size} KiB", server.name, per_tunnel)
        r.set(f"server RSS with {size} tunnels MiB", server.name, memory["rss_kib"] / 1024)
        r.set(f"tunnel setup rate to {size} /s", server.name, rate, "higher")
        r.set(f"server CPU per tunnel setup to {size} ms", server.name,
              1000 * found["cpu_seconds"] / max(1, found["opened"]))  # fmt: skip
        r.set(f"tunnels up / sampled answering @{size}", server.name,
              f"{found['tunnels']}/{size} {found['answering']}/{found['sampled']}", "")  # fmt: skip
        r.raw.setdefault(f"idle @{size}", {})[server.name] = found

    # -- profile -------------------------------------------------------------------

    def profile(self, output: str) -> None:
        nekojump = self.servers[0]
        tunnel = self.tunnels[nekojump.name, "main"]
        spy = self._which("py-spy")
        if spy is None:
            self.notes.append("--profile: py-spy is not installed (pip install py-spy)")
            return
        log("profiling nekojump with py-spy during one upload and one download")
        recorder = self.procs.spawn(
            [spy, "record", "-p", str(nekojump.pid), "-o", output, "--format", "raw",
             "-r", "200", "--threads"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1)
        size = self.args.bulk_mib * MIB
        measure.upload(nekojump.bind, tunnel.ports["sink"], size)
        measure.download(nekojump.bind, tunnel.ports["source"], size)
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(recorder)
        self.profile_summary = summarize_profile(Path(output))

    @staticmethod
    def _which(name: str) -> str | None:
        from bench.servers import tool

        return tool(name)

    # -- everything ----------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        self.setup()
        only = self.args.only
        # First, while the servers' heaps hold no freed memory that a slow
        # reader's buffers could reuse without growing.
        if "slow" in only:
            log("slow reader")
            self.slow_reader()
        if "bulk" in only:
            log("bulk throughput (common cipher)")
            self.bulk("main", self.args.bulk_mib, "bulk", cpu=True)
        if "bulk" in only and any(name == "default" for _, name in self.tunnels):
            log("bulk throughput (sshd's default cipher)")
            label = "bulk, default ciphers"
            self.bulk("default", self.args.bulk_mib, label, cpu=False)
            # nekojump's default cipher is the common one: reuse its "bulk" numbers.
            for direction in ("up", "down"):
                value = self.results.values[f"bulk {direction} MiB/s"]["nekojump"]
                self.results.set(f"{label} {direction} MiB/s", "nekojump", value, "higher")
        if "rtt" in only:
            log("bulk throughput at 40 ms RTT")
            self.bulk("rtt", self.args.rtt_mib, "bulk at 40 ms RTT", cpu=False)
        if "connect" in only:
            log("fresh-connection latency")
            self.connect_latency()
        if "echo" in only:
            log("request/response latency")
            self.request_response()
        if self.args.profile:
            self.profile(self.args.profile)
        if "idle" in only:
            log("idle tunnels")
            self.idle_tunnels()
        self.elapsed = time.monotonic() - started

    def cleanup(self) -> None:
        self.procs.stop_all()
        Sshd.cleanup_privsep_dir()


def _username() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


#: Innermost frames that mean "waiting", not working: idle pool threads, epoll.
IDLE_FRAMES = ("Condition.wait", "EPollReactor.doPoll", "Queue.get")


def summarize_profile(path: Path, top: int = 15) -> list[tuple[str, float]]:
    """Share of busy samples per innermost function, from py-spy's collapsed stacks.

    Idle samples (see IDLE_FRAMES) are left out and reported as one "(idle)" line;
    a wrapper like ``untilConcludes`` (the socket syscall) is named with its caller.
    """
    counts: Counter[str] = Counter()
    idle = 0
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if leaf.startswith(IDLE_FRAMES):
            idle += int(n)
            continue
        if leaf.startswith("untilConcludes") and len(frames) > 1:
            leaf = f"{frames[-2].split(' (')[0]} -> syscall"
        counts[leaf] += int(n)
    busy = sum(counts.values()) or 1
    summary = [(frame, n / busy) for frame, n in counts.most_common(top)]
    summary.append((f"(idle samples, not counted above: {idle})", 0.0))
    return summary


def render(bench: Bench) -> str:
    names = ["nekojump", "sshd"]
    rows = [("metric", "nekojump", "sshd", "ratio", "better")]
    for metric, better in bench.results.better.items():
        values = bench.results.values[metric]
        cells = [_fmt(values.get(name)) for name in names]
        nj, ss = values.get("nekojump"), values.get("sshd")
        paired = bench.results.ratios.get(metric)
        if paired is not None:
            ratio = f"{paired:.2f}"
        elif isinstance(nj, float) and isinstance(ss, float) and ss:
            ratio = f"{nj / ss:.2f}"
        else:
            ratio = "-"
        rows.append((metric, *cells, ratio, better))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "| " + " | ".join(
                cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j])
                for j, cell in enumerate(row)
            ) + " |"
        )  # fmt: skip
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    header = [
        "nekojump vs OpenSSH sshd, tunnel-only jumphost on loopback "
        f"(medians of {bench.args.repeats} rounds; ratio = nekojump / sshd, and for rows "
        "both servers measure side by side the median of the paired ratios: per round, "
        "per request/response block (p50), per idle gap (p50); so a machine that speeds "
        "up or slows down between rounds does not tilt it)",
    ]
    for name, found in bench.negotiated.items():
        header.append(
            f"  {name}: {found.get('server_software', '?')}, kex {found.get('kex', '?')}, "
            f"cipher {found.get('cipher', '?')}, MAC {found.get('mac', '?')}"
        )
    cipher, mac = bench.cipher
    header.append(
        f"  every row uses {cipher}" + ("" if mac == IMPLICIT_MAC else f" + {mac}")
        + f" with kex {KEX} on both servers (what nekojump picks with a default OpenSSH "
        "client; forced on sshd with -c/-m), except the 'default ciphers' rows, where "
        "sshd uses its own default"
    )  # fmt: skip
    header.extend(f"  note: {note}" for note in bench.notes)
    return "\n".join([*header, "", *lines])


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="nekojump-bench-"))
    bench = Bench(args, directory)

    def terminated(signum, frame):
        raise KeyboardInterrupt

    # Also when started in the background with SIGINT ignored: always clean up.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminated)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        bench.cleanup()
        if args.keep:
            log(f"kept {directory}")
        else:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
    print(render(bench))
    if bench.profile_summary:
        print(f"\nnekojump py-spy profile ({args.profile}), top functions by own samples:")
        for frame, share in bench.profile_summary:
            print(f"  {100 * share:5.1f}%  {frame}")
    log(f"finished in {bench.elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "values": bench.results.values,
                    "ratios": bench.results.ratios,
                    "raw": bench.results.raw,
                    "negotiated": bench.negotiated,
                    "notes": bench.notes,
                    "profile_top": bench.profile_summary,
                    "args": vars(args),
                    "elapsed_seconds": bench.elapsed,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
