"""What ships beside the code: systemd units, the container files, the installed copy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tool

REPO = Path(__file__).resolve().parent.parent


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_jumphost_unit_verifies(tmp_path):
    # The unit names the operator guide's venv; point it at this machine's twistd.
    text = (REPO / "etc" / "nekojump.service").read_text()
    assert "ExecStart=/opt/nekojump/bin/twistd" in text
    unit = tmp_path / "nekojump.service"
    unit.write_text(text.replace("/opt/nekojump/bin/twistd", tool("twistd")))
    result = verify(unit)
    assert result.returncode == 0, result.stderr
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=nekojump",
        "LimitNOFILE=",
        "Restart=always",
        "After=network-online.target wg-quick",
    ):
        assert hardening in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_member_autossh_unit_verifies_and_matches_the_seed():
    unit = REPO / "etc" / "nekotopia-tunnel.service"
    if shutil.which("autossh") is None:
        pytest.skip("autossh not installed")
    result = verify(unit)
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    for seed_line in (
        "-o ServerAliveInterval=30",
        "-o ExitOnForwardFailure=yes",
        "-p 2222 -R 10080:localhost:8000",
        "Restart=always",
        "RestartSec=10",
    ):
        assert seed_line in text


def test_container_runs_the_same_command_as_the_unit():
    dockerfile = (REPO / "Dockerfile").read_text()
    compose = (REPO / "etc" / "compose.yaml").read_text()
    assert "twistd" in dockerfile and "nekojump" in dockerfile and "--config" in dockerfile
    # The same twistd options (logging included) as etc/nekojump.service.
    unit = (REPO / "etc" / "nekojump.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    unit_options = exec_start.split()[1 : exec_start.split().index("nekojump")]
    entrypoint = next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))
    container_options = json.loads(entrypoint.split(None, 1)[1])[1:-1]
    assert container_options == unit_options
    assert "USER nekojump" in dockerfile
    assert "network_mode: host" in compose
    assert "/var/lib/nekojump" in compose


def test_installed_copy_carries_templates_schema_and_plugin():
    """A wheel install (what users get) has the files outside nekojump/ too."""
    out = subprocess.run([tool("twistd"), "--help"], capture_output=True, text=True, timeout=60)
    assert "nekojump" in out.stdout
    probe = subprocess.run(
        [
            str(Path(tool("twistd")).parent / "python"),
            "-c",
            "import nekojump.web.render as r, nekojump.store as s; "
            "print(r.assets_dir()); print(len(s.schema_scripts()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert probe.returncode == 0, probe.stderr
    assets, scripts = probe.stdout.split()
    assert "site-packages" in assets
    assert (Path(assets) / "templates" / "dashboard.html").exists()
    assert int(scripts) >= 3
