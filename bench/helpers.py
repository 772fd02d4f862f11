"""Helper processes run by the benchmark (``python3 -m bench.helpers MODE``).

``services``: the member's "local services" on 127.0.0.1, in their own process so
they do not share a GIL with the measuring client:

- echo: writes back whatever it reads;
- sink: reads until EOF, then answers the byte count (8 bytes, big endian);
- source: reads an 8-byte count N, sends N bytes, closes (N = 2**62: "forever").

``delay``: a TCP proxy that holds every chunk ``--delay`` seconds in each
direction (20 ms each way = 40 ms added RTT), with a bounded queue.

Each prints one JSON line with its ports, then runs until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys

CHUNK = 1 << 20
BLOCK = memoryview(bytes(CHUNK))
WRITE_HIGH_WATER = 4 << 20


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once our writes are flushed


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(self.count.to_bytes(8, "big"))
        return False


class Source(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.header = b""
        self.left: int | None = None
        self.paused = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        if self.left is not None:
            return
        self.header += data
        if len(self.header) >= 8:
            self.left = int.from_bytes(self.header[:8], "big")
            self.fill()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.fill()

    def fill(self) -> None:
        while not self.paused and not self.lost and self.left:
            n = min(self.left, CHUNK)
            self.transport.write(BLOCK[:n])
            self.left -= n
        if self.left == 0 and not self.lost:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result(None))
    loop.add_signal_handler(signal.SIGINT, lambda: done.done() or done.set_result(None))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    waiting = asyncio.ensure_future(reader.read())
    await asyncio.wait([waiting, done], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()


async def services() -> None:
    loop = asyncio.get_running_loop()
    ports = {}
    servers = []
    for name, protocol in (("echo", Echo), ("sink", Sink), ("source", Source)):
        server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=1024)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    await _until_stdin_closes()
    for server in servers:
        server.close()


async def _delayed_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    loop = asyncio.get_running_loop()
    # At most 512 chunks of <= 64 KiB (32 MiB) in flight per direction.
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=512)

    async def pump_in() -> None:
        try:
            while data := await reader.read(65536):
                await queue.put((loop.time() + delay, data))
        except OSError:
            pass
        await queue.put((loop.time() + delay, b""))

    async def pump_out() -> None:
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass

    await asyncio.gather(pump_in(), pump_out())


async def delay_proxy(target_host: str, target_port: int, delay: float) -> None:
    tasks: set[asyncio.Task] = set()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            c_writer.close()
            return
        for w in (c_writer, u_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                _delayed_pipe(c_reader, u_writer, delay), _delayed_pipe(u_reader, c_writer, delay)
            )
        finally:
            c_writer.close()
            u_writer.close()

    def start(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(c_reader, c_writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await _until_stdin_closes()
    server.close()
    for task in tasks:
        task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.helpers")
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("services")
    proxy = sub.add_parser("delay")
    proxy.add_argument("--target", required=True, help="HOST:PORT")
    proxy.add_argument("--delay", type=float, default=0.020, help="seconds each way")
    args = parser.parse_args()
    if args.mode == "services":
        asyncio.run(services())
    else:
        host, _, port = args.target.rpartition(":")
        asyncio.run(delay_proxy(host, int(port), args.delay))


if __name__ == "__main__":
    main()
