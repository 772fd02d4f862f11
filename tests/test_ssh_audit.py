"""ssh-audit (PyPI) against a running nekojump: no failures, the policy passes.

Skipped when ssh-audit is not installed.  The only warnings allowed are
"not post-quantum" on the curve25519 key exchanges.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SSH_HOST, Jumphost

pytestmark = pytest.mark.e2e

POLICY = Path(__file__).resolve().parents[2] / "shared" / "security" / "ssh-audit-policy.txt"
ALLOWED_WARNINGS = {
    ("curve25519-sha256", "does not provide protection against post-quantum attacks"),
    ("curve25519-sha256@libssh.org", "does not provide protection against post-quantum attacks"),
}


def ssh_audit() -> str:
    found = shutil.which("ssh-audit")
    if found is None:
        pytest.skip("ssh-audit is not installed")
    return found


@pytest.fixture
def server(tmp_path):
    host = Jumphost(tmp_path)
    host.start()
    yield host
    host.stop()


def _findings(report: dict, level: str) -> set[tuple[str, str]]:
    found = set()
    for section in ("kex", "key", "enc", "mac"):
        for algorithm in report.get(section, []):
            for note in algorithm.get("notes", {}).get(level, []):
                found.add((algorithm["algorithm"], note))
    return found


def test_ssh_audit_finds_no_failures(server):
    result = subprocess.run(
        [ssh_audit(), "-j", "--skip-rate-test", "-p", str(server.ssh_port), SSH_HOST],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert _findings(report, "fail") == set()
    assert _findings(report, "warn") <= ALLOWED_WARNINGS
    assert result.returncode in (0, 2), result.stderr  # 2: the allowed warnings
    kex = [entry["algorithm"] for entry in report["kex"]]
    assert "kex-strict-s-v00@openssh.com" in kex
    assert not report.get("cves")
    assert [entry["algorithm"] for entry in report["key"]] == ["ssh-ed25519"]


@pytest.mark.parametrize("compat", [False, True])
def test_ssh_audit_policy_passes(tmp_path, compat):
    """Default algorithms, and with every compatibility cipher (CTR + ETM, chacha20)."""
    if not POLICY.exists():
        pytest.skip(f"{POLICY} is missing")
    flag = str(compat).lower()
    host = Jumphost(tmp_path, ssh_extra=f"compat_ctr_ciphers = {flag}\nchacha20_poly1305 = {flag}")
    host.start()
    try:
        result = subprocess.run(
            [ssh_audit(), "-P", str(POLICY), "-p", str(host.ssh_port), SSH_HOST],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        host.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout
