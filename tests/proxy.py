"""A small userspace TCP proxy for fault tests: pass, stall (blackhole) or cut.

``stall`` keeps both sockets open and forwards nothing (a laptop that went to
sleep); ``cut_clients`` closes only the client side, so the server keeps a
connection that will never speak again (a NAT box that forgot the flow).
"""

from __future__ import annotations

import socket
import threading


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket, proxy: FaultProxy):
        self.client = client
        self.upstream = upstream
        self.proxy = proxy
        self.orphaned = False
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.proxy.stalled or self.orphaned:
                    continue  # swallow: the peer hears nothing
                dst.sendall(data)
        except OSError:
            pass
        if not self.orphaned:
            for s in (self.client, self.upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut_client(self) -> None:
        self.orphaned = True
        try:
            self.client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.client.close()


class FaultProxy:
    """Listens on 127.0.0.1 and relays to ``target`` until told otherwise."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.stalled = False
        self.pairs: list[_Pair] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.pairs.append(_Pair(client, upstream, self))

    @property
    def connections(self) -> int:
        """How many client connections the proxy has relayed."""
        return len(self.pairs)

    def stall(self) -> None:
        self.stalled = True

    def cut_clients(self) -> None:
        for pair in self.pairs:
            if not pair.orphaned:
                pair.cut_client()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for pair in self.pairs:
            for s in (pair.client, pair.upstream):
                try:
                    s.close()
                except OSError:
                    pass
