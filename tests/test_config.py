"""Config: defaults run on loopback; every bad value is named in one sentence."""

import ipaddress
from pathlib import Path

import pytest

from nekojump.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_run_on_loopback():
    config = parse_config({})
    assert config.ssh.listen == "tcp:2222:interface=127.0.0.1"
    assert config.forwarding.bind_address == "127.0.0.1"
    assert (config.forwarding.port_min, config.forwarding.port_max) == (10000, 60000)
    assert config.ssh.user == "tunnel"
    assert config.data_dir == Path("nekojump-data")
    assert ipaddress.ip_network("127.0.0.0/8") in config.ssh.allowed_sources


def test_production_config_parses():
    """etc/nekojump.toml is valid and carries the seed's values (parsed, never served)."""
    config = load_config(REPO / "etc" / "nekojump.toml")
    assert config.forwarding.bind_address == "10.255.9.241"  # parsed only, never bound
    assert config.ssh.listen.startswith("tcp:2222")
    assert (config.forwarding.port_min, config.forwarding.port_max) == (10000, 60000)
    assert config.web.public_hostname == "jump.ring.nekotopia.io"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"ssh": {"listn": "tcp:22"}}, "[ssh] listn: unknown key"),
        ({"sshh": {}}, "unknown section [sshh]"),
        ({"forwarding": {"port_min": "10000"}}, "[forwarding] port_min: must be an integer"),
        ({"forwarding": {"port_min": 0}}, "[forwarding] port_min: must be between 1 and 65535"),
        ({"forwarding": {"port_max": 70000}}, "[forwarding] port_max: must be between 1 and"),
        (
            {"forwarding": {"port_min": 50000, "port_max": 40000}},
            "port_min (50000) is greater than port_max (40000)",
        ),
        ({"ssh": {"allowed_sources": ["10.0.0.0/33"]}}, "[ssh] allowed_sources: '10.0.0.0/33'"),
        ({"ssh": {"allowed_sources": "127.0.0.0/8"}}, "[ssh] allowed_sources: must be a non-empty"),
        ({"ssh": {"listen": "carrier-pigeon:22"}}, "[ssh] listen: 'carrier-pigeon:22' is not"),
        ({"ssh": {"listen": "tcp:notaport"}}, "[ssh] listen:"),
        ({"forwarding": {"bind_address": "jump.example"}}, "[forwarding] bind_address:"),
        ({"forwarding": {"takeover": "always"}}, "[forwarding] takeover: must be one of"),
        ({"forwarding": {"reserved_ports": [22, "x"]}}, "[forwarding] reserved_ports:"),
        ({"ssh": {"max_auth_tries": True}}, "[ssh] max_auth_tries: must be an integer"),
        ({"ssh": "x"}, "[ssh] must be a table"),
        # TOML has nan and inf; every login failed with an AssertionError on nan.
        ({"ssh": {"login_grace_time": float("nan")}}, "[ssh] login_grace_time: must be a positive"),
        ({"ssh": {"login_grace_time": float("inf")}}, "[ssh] login_grace_time: must be a positive"),
        # Twisted can only send ASCII header names: every proxied request failed with a 500.
        (
            {"web": {"sso_header": "X-Benutzer-\u00c4", "trusted_proxies": ["127.0.0.1/32"]}},
            "[web] sso_header: 'X-Benutzer-\u00c4' is not an HTTP header name",
        ),
        (
            {"web": {"sso_header": "X User", "trusted_proxies": ["127.0.0.1/32"]}},
            "[web] sso_header: 'X User' is not an HTTP header name",
        ),
    ],
)
def test_bad_values_are_named(document, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("test.toml: ")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ssh\nlisten = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_data_dir_option_with_a_storage_key_that_is_no_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('storage = "x"\n')
    with pytest.raises(ConfigError, match=r"c.toml: \[storage\] must be a table"):
        load_config(path, data_dir=str(tmp_path / "d"))


def test_data_dir_option_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[storage]\ndata_dir = "/somewhere"\n[forwarding]\nport_min = 20000\n')
    config = load_config(path, data_dir=str(tmp_path / "d"))
    assert config.data_dir == tmp_path / "d"
    assert config.forwarding.port_min == 20000


def test_operator_guide_documents_every_config_key():
    from nekojump.config import SCHEMA

    guide = (REPO / "docs" / "operator.md").read_text()
    missing = [
        f"[{section}] {key}"
        for section, keys in SCHEMA.items()
        for key in keys
        if f"`[{section}] {key}`" not in guide
    ]
    assert missing == []


def test_production_config_sets_every_key_it_means_to():
    """The production file names the seed's values explicitly, not by accident of defaults."""
    text = (REPO / "etc" / "nekojump.toml").read_text()
    for needle in (
        'bind_address = "10.255.9.241"',  # text of etc/nekojump.toml
        "port_min = 10000",
        "port_max = 60000",
        'public_hostname = "jump.ring.nekotopia.io"',
        "tcp:2222",
    ):
        assert needle in text
