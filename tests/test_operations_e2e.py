"""What an operator relies on: structured logs without secrets, audit, retention."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from tests.conftest import MESH_ADDRESS, Jumphost, exchange, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "correct-horse-battery-staple"


def test_json_logs_carry_stable_fields_and_no_secrets(tmp_path, keys, echo):
    host = Jumphost(tmp_path)
    host.add_member("alice", keys["alice"], password=PASSWORD)
    token = host.admin("token", "create", "alice").stdout.strip()
    host.start("--logger=nekojump.logs.json_observer")
    try:
        port = host.port_min + 5
        host.forward(keys["alice"], port, echo.port)
        assert exchange(MESH_ADDRESS, port, b"x") == b"x"
        # A dashboard login and an API call with the token.
        form = urllib.parse.urlencode({"name": "alice", "password": PASSWORD}).encode()
        urllib.request.urlopen(host.web_url + "login", data=form, timeout=10).read()
        request = urllib.request.Request(
            host.web_url + "api/v1/keys", headers={"Authorization": f"Bearer {token}"}
        )
        assert json.load(urllib.request.urlopen(request, timeout=10))["keys"]
        lines = wait_for(
            lambda: (
                [line for line in host.log_text().splitlines() if line]
                if "connected from" in host.log_text()
                else None
            ),
            what="log lines",
        )
    finally:
        host.close_clients()
        host.stop()
    events = [json.loads(line) for line in lines]  # every line is one JSON event
    connected = [e for e in events if e.get("log_format", "").startswith("{member} connected")]
    assert connected and connected[0]["member"] == "alice"
    assert connected[0]["log_namespace"] == "nekojump.ssh.avatar.TunnelAvatar"
    assert connected[0]["fingerprint"].startswith("SHA256:")
    text = host.log_text()
    assert PASSWORD not in text
    assert token not in text
    assert "PRIVATE KEY" not in text


def test_old_audit_events_are_pruned_at_start(tmp_path, keys):
    host = Jumphost(tmp_path)
    host.add_member("alice", keys["alice"])
    from nekojump.store import SQLiteStore

    store = SQLiteStore.open(host.data_dir, clock=lambda: 1_000_000.0)  # 1970: very old
    store.audit("ancient-event", member="alice")
    store.close()
    assert "ancient-event" in host.admin("audit").stdout
    host.start()
    try:
        wait_for(
            lambda: "ancient-event" not in host.admin("audit").stdout,
            what="the old event to be pruned",
        )
        assert "member-added" in host.admin("audit").stdout  # recent ones stay
    finally:
        host.stop()
