"""Child processes (always stopped by PID) and /proc accounting for process trees."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_open_file_limit() -> None:
    """Let this process open as many files as the hard limit allows: a load
    generator holds one socket per tunnel, a server two (as nekojump raises its own)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # an unlimited hard limit: keep the soft one


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark itself dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


class Processes:
    """Every process the benchmark starts, so that all of them can be stopped by PID."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        #: PIDs seen as descendants of our servers (sshd's per-connection children).
        self.adopted: set[int] = set()

    def spawn(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(list(argv), preexec_fn=_die_with_parent, **kwargs)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 10.0) -> None:
        """SIGTERM one of our processes and its descendants, SIGKILL what lingers."""
        if process.poll() is None:
            children = descendants(process.pid)
            _signal(process.pid, signal.SIGTERM)
            for pid in children:
                _signal(pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
            deadline = time.monotonic() + timeout
            while children and time.monotonic() < deadline:
                children = [pid for pid in children if _alive(pid)]
                time.sleep(0.05)
            for pid in children:
                _signal(pid, signal.SIGKILL)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def stop_all(self) -> None:
        for process in reversed(self.started):
            try:
                self.stop(process)
            except Exception as error:  # noqa: BLE001 - keep cleaning up the rest
                print(f"bench: could not stop pid {process.pid}: {error}")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = _stat_fields(pid)[0]
    except OSError:
        return False
    return state != "Z"


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: fields 3.. (state, ppid, ...)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    queue = [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def tree(root: int) -> list[int]:
    return [root, *descendants(root)]


def cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and all its descendants, every thread, plus that of
    their children already reaped.

    Live threads are read from ``schedstat`` (nanoseconds): ``stat``'s clock
    ticks (10 ms) were 2-4 % of a transfer's CPU, enough to move a ratio.
    Threads and children that have ended count in ticks; between two readings
    that part rarely changes, so a difference of two readings stays fine."""
    total = 0.0
    for pid in tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # fields[11..14] are utime, stime, cutime, cstime (stat fields 14..17).
        process_ticks = int(fields[11]) + int(fields[12])
        total += (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
        live = _live_threads(pid)
        if live is None:
            total += process_ticks / CLOCK_TICKS
        else:
            seconds, ticks = live
            total += seconds + max(0, process_ticks - ticks) / CLOCK_TICKS
    return total


def _live_threads(pid: int) -> tuple[float, int] | None:
    """The live threads of ``pid``: their CPU seconds from ``schedstat`` and
    their clock ticks from ``stat``; None if they cannot be read."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    nanoseconds = ticks = 0
    for tid in threads:
        task = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{task}/schedstat") as stream:
                thread_ns = int(stream.read().split()[0])
            with open(f"{task}/stat") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # the thread ended just now
        except (OSError, ValueError, IndexError):
            return None
        nanoseconds += thread_ns
        ticks += int(fields[11]) + int(fields[12])
    return nanoseconds / 1e9, ticks


def memory_kib(root: int) -> dict[str, int]:
    """Summed Rss and Pss (KiB) of ``root``'s tree, from smaps_rollup."""
    totals = {"rss_kib": 0, "pss_kib": 0, "processes": 0}
    for pid in tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        totals["processes"] += 1
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name == "Rss":
                totals["rss_kib"] += int(rest.split()[0])
            elif name == "Pss":
                totals["pss_kib"] += int(rest.split()[0])
    return totals


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
