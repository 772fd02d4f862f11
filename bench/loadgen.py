"""Idle-tunnel load generator: many SSH connections, each holding one remote forward.

Run by the benchmark as ``python3 -m bench.loadgen ...``; one asyncssh process
stands in for thousands of ``ssh -N -R`` clients.  Commands on stdin, one JSON
answer per line on stdout:

- ``grow N``: open connections until N tunnels are up (each ``-R BIND:PORT``,
  PORT = base + index, forwarding to 127.0.0.1:ECHO) and report how long it took;
- ``quit``: close every connection and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import asyncssh

from bench.procs import raise_open_file_limit


class LoadGenerator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.connections: list[asyncssh.SSHClientConnection] = []
        self.next_index = 0
        self.options = asyncssh.SSHClientConnectionOptions(
            username=args.user,
            client_keys=[args.key],
            known_hosts=None,
            agent_path=None,
            config=[],
            preferred_auth="publickey",
            kex_algs=["curve25519-sha256"],
            encryption_algs=[args.cipher],
            mac_algs=[args.mac] if args.mac != "<implicit>" else (),
            compression_algs=["none"],
            connect_timeout=args.timeout,
            # Like the OpenSSH client's default: no client keepalives.
            keepalive_interval=0,
        )

    async def open_one(self, index: int, gate: asyncio.Semaphore) -> str | None:
        async with gate:
            try:
                conn = await asyncio.wait_for(
                    asyncssh.connect(self.args.host, self.args.port, options=self.options),
                    self.args.timeout,
                )
            except (TimeoutError, OSError, asyncssh.Error) as error:
                return f"connect: {error!r}"
            try:
                await asyncio.wait_for(
                    conn.forward_remote_port(
                        self.args.bind, self.args.base_port + index, "127.0.0.1", self.args.echo
                    ),
                    self.args.timeout,
                )
            except (TimeoutError, OSError, asyncssh.Error, asyncssh.ChannelListenError) as error:
                # A refused forward (ChannelListenError is no asyncssh.Error).
                conn.close()
                return f"forward {self.args.base_port + index}: {error!r}"
            self.connections.append(conn)
            return None

    async def grow(self, total: int) -> dict:
        gate = asyncio.Semaphore(self.args.concurrency)
        start = time.monotonic()
        wanted = range(self.next_index, max(total, self.next_index))
        self.next_index = max(total, self.next_index)
        results = await asyncio.gather(*(self.open_one(i, gate) for i in wanted))
        errors = [r for r in results if r is not None]
        return {
            "tunnels": len(self.connections),
            "opened": len(results) - len(errors),
            "failed": len(errors),
            "first_errors": errors[:3],
            "seconds": time.monotonic() - start,
        }

    async def close(self) -> None:
        for conn in self.connections:
            conn.close()
        waits = [conn.wait_closed() for conn in self.connections]
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 30)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    generator = LoadGenerator(args)
    print(json.dumps({"ready": True}), flush=True)
    try:
        while line := (await reader.readline()).decode().strip():
            command, *rest = line.split()
            if command == "grow":
                print(json.dumps(await generator.grow(int(rest[0]))), flush=True)
            elif command == "quit":
                break
    finally:
        try:
            await generator.close()
        except (TimeoutError, OSError):
            pass
    print(json.dumps({"closed": True}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--bind", required=True, help="address asked for in tcpip-forward")
    parser.add_argument("--base-port", type=int, required=True)
    parser.add_argument("--echo", type=int, required=True, help="local echo service port")
    parser.add_argument("--cipher", required=True)
    parser.add_argument("--mac", required=True, help='"<implicit>" for AEAD ciphers')
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=30.0)
    raise_open_file_limit()  # one socket per tunnel
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
