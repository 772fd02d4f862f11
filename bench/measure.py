"""Client-side measurements through a forwarded port: what a mesh member sees."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable

MIB = 1 << 20
_BLOCK = memoryview(bytes(MIB))
FOREVER = 1 << 62


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def upload(host: str, port: int, size: int, timeout: float = 120) -> float:
    """Send ``size`` bytes to the sink behind the forward; seconds until it confirmed all."""
    start = time.perf_counter()
    with _connect(host, port, timeout) as s:
        left = size
        while left:
            n = min(left, MIB)
            s.sendall(_BLOCK[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8 and (chunk := s.recv(8 - len(reply))):
            reply += chunk
    elapsed = time.perf_counter() - start
    got = int.from_bytes(reply, "big") if len(reply) == 8 else -1
    if got != size:
        raise RuntimeError(f"sink received {got} of {size} bytes")
    return elapsed


def download(host: str, port: int, size: int, timeout: float = 120) -> float:
    """Ask the source behind the forward for ``size`` bytes; seconds until all arrived."""
    buffer = bytearray(MIB)
    start = time.perf_counter()
    with _connect(host, port, timeout) as s:
        s.sendall(size.to_bytes(8, "big"))
        got = 0
        while n := s.recv_into(buffer):
            got += n
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"received {got} of {size} bytes")
    return elapsed


def connect_latency(host: str, port: int, timeout: float = 10) -> float:
    """Seconds from connect() to the first echoed byte on a fresh connection."""
    start = time.perf_counter()
    with _connect(host, port, timeout) as s:
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError("echo through the forward failed")
        elapsed = time.perf_counter() - start
    return elapsed


def request_response(host: str, port: int, count: int, size: int = 64) -> list[float]:
    """Round-trip times of ``count`` small echoes on one connection."""
    with _connect(host, port, 10) as s:
        return echoes(s, count, size)


def echoes(s: socket.socket, count: int, size: int = 64) -> list[float]:
    """Round-trip times of ``count`` echoes of ``size`` bytes on the open socket ``s``."""
    payload = bytes(size)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        s.sendall(payload)
        got = 0
        while got < size:
            chunk = s.recv(size - got)
            if not chunk:
                raise RuntimeError("echo connection closed")
            got += len(chunk)
        times.append(time.perf_counter() - start)
    return times


def interleaved_echoes(
    targets: dict[str, tuple[str, int]], count: int, block: int = 250, size: int = 64
) -> dict[str, list[list[float]]]:
    """``echoes`` on one connection per target, ``block`` at a time to each in turn
    (who goes first alternating), so that every target is measured in the same
    moments of a machine whose speed drifts from one second to the next.  The
    round-trip times come back block by block: block i of each target is a pair,
    and every block but perhaps the last has ``block`` echoes."""
    blocks: dict[str, list[list[float]]] = {name: [] for name in targets}
    sockets: dict[str, socket.socket] = {}
    try:
        for name, (host, port) in targets.items():
            sockets[name] = _connect(host, port, 10)
            echoes(sockets[name], 1, size)  # the channel is open before timing starts
        order = list(sockets)
        for turn in range(math.ceil(count / block)):
            n = min(block, count - turn * block)
            for name in order if turn % 2 == 0 else reversed(order):
                blocks[name].append(echoes(sockets[name], n, size))
    finally:
        for s in sockets.values():
            s.close()
    return blocks


def echo_ok(host: str, port: int) -> bool:
    try:
        with _connect(host, port, 5) as s:
            s.sendall(b"ping")
            got = b""
            while len(got) < 4 and (chunk := s.recv(4 - len(got))):
                got += chunk
            return got == b"ping"
    except OSError:
        return False


def slow_reader(
    host: str,
    port: int,
    seconds: float,
    sample: Callable[[], int],
    rate: int = 1024,
) -> dict[str, float]:
    """Read ``rate`` bytes/s from a source that sends as fast as it can.

    ``sample`` returns the server's memory (KiB); report its growth while reading.
    """
    before = sample()
    peak = before
    read = 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(FOREVER.to_bytes(8, "big"))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tick = time.monotonic()
            chunk = s.recv(rate)
            if not chunk:
                break
            read += len(chunk)
            peak = max(peak, sample())
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        end = sample()
    return {
        "before_kib": before,
        "peak_kib": max(peak, end),
        "growth_kib": max(peak, end) - before,
        "read_bytes": read,
    }
