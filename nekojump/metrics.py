"""Prometheus metrics: counters for events, and live state read at scrape time.

Byte and connection totals are not counted on the data path: each forward
keeps its own tallies, and a scrape adds the live forwards to what closed
forwards left behind.  Label values are small fixed sets (no member names),
so cardinality stays bounded however many members and tunnels there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from nekojump.ssh.registry import TunnelRegistry


class Metrics:
    """Every metric nekojump exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.auth = Counter(
            "nekojump_ssh_auth", "SSH authentication outcomes", ["result"], registry=r
        )
        self.refused_binds = Counter(
            "nekojump_refused_binds",
            "tcpip-forward requests refused, by reason",
            ["reason"],
            registry=r,
        )
        self.refused_connections = Counter(
            "nekojump_refused_connections",
            "connections refused before any byte (source not allowed, startup limits)",
            ["listener", "reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "nekojump_server_disconnects",
            "SSH connections the server ended, by reason",
            ["reason"],
            registry=r,
        )
        self.takeovers = Counter(
            "nekojump_takeovers", "ports moved to a newer connection of the same key", registry=r
        )
        self.key_removals = Counter(
            "nekojump_key_removals", "keys removed through the dashboard or API", registry=r
        )
        self.web_requests = Counter(
            "nekojump_web_requests",
            "dashboard and API responses, by status class",
            ["status"],
            registry=r,
        )

    def watch(self, tunnels: TunnelRegistry, startups: Callable[[], int]) -> None:
        """Export live state (connections, forwards, bytes) from the tunnel registry."""
        self.registry.register(LiveState(tunnels, startups))


class LiveState(Collector):
    """Gauges and totals computed from the registry when Prometheus scrapes."""

    def __init__(self, tunnels: TunnelRegistry, startups: Callable[[], int]):
        self.tunnels = tunnels
        self.startups = startups

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        connections = GaugeMetricFamily(
            "nekojump_ssh_connections", "open SSH connections by state", labels=["state"]
        )
        connections.add_metric(["authenticating"], self.startups())
        connections.add_metric(["authenticated"], len(self.tunnels.avatars()))
        yield connections
        forwards = self.tunnels.forwards()
        yield GaugeMetricFamily(
            "nekojump_forwards", "remote forwards held now", value=len(forwards)
        )
        yield GaugeMetricFamily(
            "nekojump_forwarded_connections_open",
            "mesh connections open through forwards",
            value=sum(f.open_connections for f in forwards),
        )
        totals = self.tunnels.totals()
        opened = CounterMetricFamily(
            "nekojump_forwarded_connections", "mesh connections accepted on forwarded ports"
        )
        opened.add_metric([], totals.connections)
        yield opened
        moved = CounterMetricFamily(
            "nekojump_forwarded_bytes", "bytes carried through forwards", labels=["direction"]
        )
        moved.add_metric(["to_member"], totals.bytes_to_member)
        moved.add_metric(["from_member"], totals.bytes_from_member)
        yield moved
