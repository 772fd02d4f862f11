"""Configuration: a TOML file (or nothing) to one frozen, validated ``Config``.

Every key has a default that runs nekojump on loopback with a data directory
in the working directory, so ``twistd -n nekojump`` works with no file.  A bad
file raises ``ConfigError`` with one sentence naming the key.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.endpoints import serverFromString

from nekojump.policy import ForwardRules, IPNetwork, StartupLimits, TierLimits

DEFAULT_DATA_DIR = "nekojump-data"
TAKEOVER_MODES = ("same-key", "same-member", "never")


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` says which key and why."""


@frozen
class SSHConfig:
    listen: str
    allowed_sources: tuple[IPNetwork, ...]
    user: str
    max_auth_tries: int
    login_grace_time: float
    client_alive_interval: float
    client_alive_count_max: int
    max_startups: int
    max_startups_per_source: int
    penalty_failures: int = 10
    penalty_seconds: float = 30.0
    #: Also offer aes*-ctr with ETM MACs, for clients without AEAD ciphers.
    compat_ctr_ciphers: bool = False
    #: Also offer chacha20-poly1305@openssh.com (OpenSSH clients then pick it).
    chacha20_poly1305: bool = False

    @property
    def limits(self) -> StartupLimits:
        return StartupLimits(total=self.max_startups, per_source=self.max_startups_per_source)


@frozen
class ForwardingConfig:
    bind_address: str
    port_min: int
    port_max: int
    reserved_ports: frozenset[int]
    takeover: str
    max_forwards_per_member: int

    @property
    def rules(self) -> ForwardRules:
        """The part of this section that bind policy decides on."""
        return ForwardRules(
            port_min=self.port_min,
            port_max=self.port_max,
            reserved_ports=self.reserved_ports,
            takeover=self.takeover,  # type: ignore[arg-type]
            max_per_member=self.max_forwards_per_member,
        )


@frozen
class WebConfig:
    listen: str
    public_hostname: str
    sso_header: str
    trusted_proxies: tuple[IPNetwork, ...]
    max_connections_per_source: int = 32
    request_timeout: float = 30.0


@frozen
class LimitsConfig:
    """Per-tier caps, and the ceilings that bound even "unlimited" tiers."""

    tiers: Mapping[str, TierLimits]
    max_connections_per_member: int
    max_streams_per_member: int
    #: Keys and registered ports one member may keep (the dashboard and API
    #: refuse more; ``nekojump-admin`` may exceed them).
    max_keys_per_member: int = 100
    max_registered_ports_per_member: int = 100
    #: Keys and ports one member may add or remove in an hour (each is audited).
    max_changes_per_member_per_hour: int = 300

    def for_tier(self, tier: str) -> TierLimits:
        return self.tiers.get(tier, TierLimits())


@frozen
class MetricsConfig:
    listen: str  # "" turns the Prometheus endpoint off


@frozen
class AuditConfig:
    retention_days: int


@frozen
class Config:
    """Everything nekojump reads from its config file."""

    data_dir: Path
    ssh: SSHConfig
    forwarding: ForwardingConfig
    web: WebConfig
    metrics: MetricsConfig
    audit: AuditConfig
    limits: LimitsConfig
    source: str = "built-in defaults"


# -- field checkers ------------------------------------------------------------
# Each takes the raw TOML value and returns the converted value or raises
# ValueError with a message that completes "[section] key: ...".


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _seconds(value: Any) -> float:
    # TOML has nan and inf: neither is a time to wait.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError("must be a positive number of seconds")
    return float(value)


def _endpoint(value: Any) -> str:
    text = _string(value)
    try:
        endpoint = serverFromString(None, text)
    except Exception as error:  # noqa: BLE001 - any parse failure is the user's
        raise ValueError(
            f"{text!r} is not a Twisted endpoint string "
            f'(e.g. "tcp:2222:interface=0.0.0.0"): {error}'
        ) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not a TCP port (0-65535)")
    return text


def _optional_endpoint(value: Any) -> str:
    return "" if value == "" else _endpoint(value)


def _ip_address(value: Any) -> str:
    text = _string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('must be a non-empty list of CIDRs, e.g. ["127.0.0.0/8"]')
    return _cidrs(value)


def _optional_networks(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of CIDRs, e.g. ["127.0.0.1/32"]')
    return _cidrs(value)


#: An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _optional_header_name(value: Any) -> str:
    text = _optional_string(value)
    if text and not _HEADER_NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not an HTTP header name (ASCII letters, digits, '-')")
    return text


def _optional_string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _cidrs(value: list[Any]) -> tuple[IPNetwork, ...]:
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network in CIDR form") from None
    return tuple(networks)


def _ports(value: Any) -> frozenset[int]:
    if not isinstance(value, list):
        raise ValueError("must be a list of port numbers")
    check = _integer(1, 65535)
    return frozenset(check(item) for item in value)


def _tier_limits(value: Any) -> TierLimits:
    if not isinstance(value, Mapping):
        raise ValueError("must be a table like { connections = 5, forwards = 10, streams = 100 }")
    unknown = set(value) - {"connections", "forwards", "streams"}
    if unknown:
        raise ValueError(
            f"unknown limit {sorted(unknown)[0]!r} (known: connections, forwards, streams)"
        )
    check = _integer(0, 1_000_000)
    try:
        return TierLimits(**{k: check(v) for k, v in value.items()})
    except ValueError as error:
        raise ValueError(f"{error}") from None


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    return check


# section -> key -> (checker, default)
SCHEMA: Mapping[str, Mapping[str, tuple[Callable[[Any], Any], Any]]] = {
    "storage": {
        "data_dir": (_string, DEFAULT_DATA_DIR),
    },
    "ssh": {
        "listen": (_endpoint, "tcp:2222:interface=127.0.0.1"),
        "allowed_sources": (_networks, ["127.0.0.0/8", "::1/128"]),
        "user": (_string, "tunnel"),
        "max_auth_tries": (_integer(1, 100), 6),
        "login_grace_time": (_seconds, 30),
        "client_alive_interval": (_seconds, 15),
        "client_alive_count_max": (_integer(1, 100), 3),
        "max_startups": (_integer(1, 100000), 100),
        "max_startups_per_source": (_integer(1, 100000), 10),
        "compat_ctr_ciphers": (_boolean, False),
        "chacha20_poly1305": (_boolean, False),
        # More failed logins than this from one address within a minute ...
        "penalty_failures": (_integer(1, 100000), 10),
        # ... and new connections from it are refused for this long.
        "penalty_seconds": (_seconds, 30),
    },
    "forwarding": {
        "bind_address": (_ip_address, "127.0.0.1"),
        "port_min": (_integer(1, 65535), 10000),
        "port_max": (_integer(1, 65535), 60000),
        "reserved_ports": (_ports, []),
        "takeover": (_choice(*TAKEOVER_MODES), "same-key"),
        "max_forwards_per_member": (_integer(1, 65535), 1000),
    },
    "web": {
        "listen": (_endpoint, "tcp:8080:interface=127.0.0.1"),
        "public_hostname": (_string, "localhost"),
        # Single sign-on: a reverse proxy at one of trusted_proxies names the
        # member in this header; the header is ignored from anyone else.
        "sso_header": (_optional_header_name, ""),
        "trusted_proxies": (_optional_networks, []),
        # Open dashboard connections one address may hold (trusted proxies, e.g. a
        # reverse proxy that carries everyone's: any),
        # and the seconds a client has to send a whole request: a client that
        # trickles bytes cannot hold sockets the SSH side needs.
        "max_connections_per_source": (_integer(1, 100_000), 32),
        "request_timeout": (_seconds, 30.0),
    },
    "metrics": {
        # Prometheus exposition at /metrics; "" turns it off.
        "listen": (_optional_endpoint, "tcp:9108:interface=127.0.0.1"),
    },
    "limits": {
        # Per tier: { connections = N, forwards = N, streams = N }; 0 or absent = no cap
        # of the tier's own (the seed promises none), under the ceilings below.
        "basic": (_tier_limits, {}),
        "plus": (_tier_limits, {}),
        "pro": (_tier_limits, {}),
        "max_connections_per_member": (_integer(1, 1_000_000), 1000),
        "max_streams_per_member": (_integer(1, 10_000_000), 10000),
        # Keys and registered ports one member may keep: one key per machine, and a
        # registration per service; far more would only crowd the directory.
        "max_keys_per_member": (_integer(1, 100_000), 100),
        "max_registered_ports_per_member": (_integer(1, 100_000), 100),
        # Keys and ports one member may add or remove in an hour on the dashboard
        # and API (each is an audit event; past it adding is refused, removing
        # never is; admins are not counted).
        "max_changes_per_member_per_hour": (_integer(1, 1_000_000), 300),
    },
    "audit": {
        # Audit events older than this are deleted (checked at start and daily).
        "retention_days": (_integer(1, 36500), 400),
    },
}


def parse_config(document: Mapping[str, Any], source: str = "built-in defaults") -> Config:
    """Validate a parsed TOML document; raise ``ConfigError`` naming the bad key."""
    values: dict[str, dict[str, Any]] = {}
    for section in document:
        if section not in SCHEMA:
            raise ConfigError(
                f"{source}: unknown section [{section}] "
                f"(known: {', '.join(f'[{s}]' for s in SCHEMA)})"
            )
        if not isinstance(document[section], Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table")
    for section, fields in SCHEMA.items():
        given = document.get(section, {})
        for key in given:
            if key not in fields:
                raise ConfigError(
                    f"{source}: [{section}] {key}: unknown key (known: {', '.join(fields)})"
                )
        values[section] = {}
        for key, (check, default) in fields.items():
            try:
                values[section][key] = check(given.get(key, default))
            except ValueError as error:
                raise ConfigError(f"{source}: [{section}] {key}: {error}") from None

    forwarding = values["forwarding"]
    if forwarding["port_min"] > forwarding["port_max"]:
        raise ConfigError(
            f"{source}: [forwarding] port_min ({forwarding['port_min']}) is greater "
            f"than port_max ({forwarding['port_max']})"
        )
    web = values["web"]
    if web["sso_header"] and not web["trusted_proxies"]:
        raise ConfigError(
            f"{source}: [web] trusted_proxies: must list the proxy addresses when sso_header is set"
        )
    return Config(
        data_dir=Path(values["storage"]["data_dir"]),
        ssh=SSHConfig(**values["ssh"]),
        forwarding=ForwardingConfig(**forwarding),
        web=WebConfig(**values["web"]),
        metrics=MetricsConfig(**values["metrics"]),
        audit=AuditConfig(**values["audit"]),
        limits=LimitsConfig(
            tiers={tier: values["limits"][tier] for tier in ("basic", "plus", "pro")},
            max_connections_per_member=values["limits"]["max_connections_per_member"],
            max_streams_per_member=values["limits"]["max_streams_per_member"],
            max_keys_per_member=values["limits"]["max_keys_per_member"],
            max_registered_ports_per_member=values["limits"]["max_registered_ports_per_member"],
            max_changes_per_member_per_hour=values["limits"]["max_changes_per_member_per_hour"],
        ),
        source=source,
    )


def load_config(path: str | Path | None = None, data_dir: str | None = None) -> Config:
    """Read ``path`` (or the defaults when None); ``data_dir`` overrides the file."""
    document: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as stream:
                document = tomllib.load(stream)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except OSError as error:
            raise ConfigError(f"{source}: cannot read: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{source}: not valid TOML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{source}: not UTF-8 (TOML files must be): byte {error.start} is "
                f"{error.object[error.start : error.start + 1]!r}"
            ) from None
    if data_dir is not None:
        storage = document.get("storage", {})
        if not isinstance(storage, dict):
            raise ConfigError(f"{source}: [storage] must be a table")
        document = {**document, "storage": {**storage, "data_dir": data_dir}}
    return parse_config(document, source)
