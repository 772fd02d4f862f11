"""From a review of the docs: every command and config snippet a member or operator is
told to run (README.md, docs/, etc/, the dashboard's How to Connect) must work when run
as written, and every behaviour the docs quote must be what happens.

Each test failed on the code it was written against.  Servers these tests start run on
loopback only (the mesh address is conftest's 127.0.0.2); the production files in etc/
are parsed or copied with their addresses swapped, never served as they are.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.logger import Logger, formatEvent

from nekojump.config import load_config
from nekojump.service import NekojumpService
from tests.conftest import SSH_HOST, EchoServer, Jumphost, fingerprint, tool, wait_for
from tests.test_member_review import end_group, loopback_host  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


# -- README: "Both run from a clone on a fresh Debian machine as root" ---------------------


DEBIAN_PYTHON = Path("/usr/bin/python3")


def _pip_refuses_to_install_into(python: Path) -> str | None:
    """Pip's own verdict on installing into ``python`` (PEP 668), asked without
    installing anything: the message it would stop with, or None."""
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "from pip._internal.utils.misc import check_externally_managed as c; c()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode == 0:
        return None
    if "ExternallyManaged" not in probe.stderr:
        return None  # no pip at all, or an older one: not what this test is about
    return probe.stderr.strip().splitlines()[-1]


def test_readme_install_commands_work_with_debians_own_python():
    """README: ``pip install . && twistd -n nekojump`` and ``.ci/install && tox`` "both
    run from a clone on a fresh Debian machine as root". Debian 12 (the first with the
    Python >= 3.11 nekojump needs) marks its Python externally managed (PEP 668): its
    pip stops every ``pip install`` into it, root's too, with "error:
    externally-managed-environment", so the first line installed nothing and
    ``.ci/install`` stopped the same way at ``python3 -m pip install tox`` (and
    neither line installed pip, which a fresh Debian does not have).

    Now ``.ci/install`` installs pip when it is missing and tells pip it may install
    tox into such a Python (whose own venvs tox makes), and the README gives the
    venv to start from there.  Asked of this machine's Debian python3 without
    installing anything: pip's own verdict and ``.ci/install``'s."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no Debian system Python here")
    refusal = _pip_refuses_to_install_into(DEBIAN_PYTHON)
    if refusal is None:
        pytest.skip("this machine's /usr/bin/python3 is not externally managed")

    ci_install = (REPO / ".ci" / "install").read_text()
    assert "python3-pip" in ci_install
    # .ci/install's own test of the Python it runs, asked of Debian's python3.
    detection = ci_install.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    verdict = subprocess.run([str(DEBIAN_PYTHON), "-c", detection], timeout=60)
    assert verdict.returncode == 0, "on Debian's python3 .ci/install would not pass pip's check"
    assert "--break-system-packages" in ci_install

    readme = (REPO / "README.md").read_text()
    venv = "python3 -m venv .venv && . .venv/bin/activate"
    assert "PEP 668" in readme and venv in readme, (
        f"on Debian's python3 ({DEBIAN_PYTHON}) pip says {refusal!r}, and the README "
        "does not say what to do"
    )


# -- the first-start hint with the production config ---------------------------------------


def _production_config(tmp_path: Path):
    """etc/nekojump.toml as the operator installs it (parsed only: nothing is bound)."""
    copy = tmp_path / "nekojump.toml"
    copy.write_text((REPO / "etc" / "nekojump.toml").read_text())
    return load_config(copy)


class _HintProbe:
    """Just what ``NekojumpService._first_start_hint`` reads: the config and a logger."""

    def __init__(self, config, events: list[dict]):
        self.config = config
        self.log = Logger(observer=events.append)


def test_first_start_hint_with_the_production_config_names_a_host_one_can_connect_to(
    tmp_path,
):
    """The operator installs etc/nekojump.toml (``[ssh] listen =
    "tcp:2222:interface=0.0.0.0"``) and starts the unit; the journal's first-start hint
    says "then connect: ssh -N -p 2222 -R 10080:localhost:8000 -i ~/.ssh/nekotopia_jump
    tunnel@0.0.0.0". A member cannot reach 0.0.0.0, and on the jumphost itself it means
    127.0.0.1, outside ``allowed_sources = ["10.0.0.0/8"]``, so the connection is
    closed before any byte. The hint should name the host members use, as the
    dashboard's How to Connect does (``[web] public_hostname``, jump.ring.nekotopia.io).

    The SSH listener's address is what ``port.getHost()`` gives for that listen string;
    nothing here binds 0.0.0.0."""
    config = _production_config(tmp_path)
    assert config.ssh.listen == "tcp:2222:interface=0.0.0.0"
    events: list[dict] = []
    NekojumpService._first_start_hint(
        _HintProbe(config, events), [], IPv4Address("TCP", "0.0.0.0", 2222)
    )
    hint = "\n".join(formatEvent(event) for event in events)
    connect = next(line for line in hint.splitlines() if "then connect:" in line)
    assert "-p 2222" in connect
    assert "@0.0.0.0" not in connect, connect
    assert connect.rstrip().endswith(f"tunnel@{config.web.public_hostname}"), connect


# -- etc/ssh_config.example: "or autossh -M 0 -N nekotopia-tunnel" -------------------------


@pytest.mark.e2e
def test_ssh_config_examples_autossh_line_retries_a_refused_port(
    loopback_host: Jumphost,  # noqa: F811
    keys: dict[str, Path],
    echo: EchoServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
):
    """etc/ssh_config.example: "add to ~/.ssh/config, then run ``ssh -N
    nekotopia-tunnel`` (or ``autossh -M 0 -N nekotopia-tunnel``)". The member runs that
    autossh line while the port is still refused (another member's tunnel holds it; the
    same happens when the network is not up yet at boot): ssh exits at once and autossh
    quits for good ("ssh exited prematurely with status 255; autossh exiting": its
    first-run gate, AUTOSSH_GATETIME, is 30 s), so the tunnel never comes up once the
    port is free. docs/member.md says the autossh line sets AUTOSSH_GATETIME=0 for
    exactly this; How to Connect's line does, this one does not."""
    host = loopback_host
    example = (REPO / "etc" / "ssh_config.example").read_text()
    command = re.search(r"\(or `([^`]*autossh[^`]*)`\)", example).group(1)
    assert command.endswith("nekotopia-tunnel"), command

    port = host.port_min + 40
    block = (
        example.replace("jump.ring.nekotopia.io", SSH_HOST)
        .replace("Port 2222", f"Port {host.ssh_port}")
        .replace("~/.ssh/nekotopia_jump", str(keys["alice"]))
        .replace(
            "RemoteForward 10080 localhost:8000", f"RemoteForward {port} 127.0.0.1:{echo.port}"
        )
    )
    assert f"RemoteForward {port} " in block and f"Port {host.ssh_port}" in block
    config = tmp_path / "ssh_config"
    # ~/.ssh/config as the member has it, plus what keeps the test off ~/.ssh.
    config.write_text(
        block
        + "    BatchMode yes\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
    )
    ssh_wrapper = tmp_path / "ssh"  # autossh runs $AUTOSSH_PATH with its arguments
    ssh_wrapper.write_text(f'#!/bin/sh\nexec {tool("ssh")} -F {config} "$@"\n')
    ssh_wrapper.chmod(0o755)

    bob = host.forward(keys["bob"], port, echo.port)  # the port is refused for now

    home = tmp_path / "member-home"
    home.mkdir()
    autossh = subprocess.Popen(
        ["bash", "-c", command],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "LC_ALL": "C.UTF-8",
            "AUTOSSH_PATH": str(ssh_wrapper),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    request.addfinalizer(lambda: end_group(autossh))
    time.sleep(4)  # ssh is refused within a second; autossh must still be there
    assert autossh.poll() is None, (
        f"{command!r} gave up instead of retrying: "
        + autossh.stderr.read().decode(errors="replace")
    )

    bob.terminate()
    bob.wait(timeout=10)
    wait_for(
        lambda: host.holder_of(port) == fingerprint(keys["alice"]),
        timeout=20,
        what="autossh to get the port once it was free",
    )


# -- docs/operator.md, Metrics: nekojump_ssh_auth_total{result=...} -------------------------


@pytest.mark.e2e
def test_auth_metric_counts_an_openssh_login_with_an_unknown_key_or_user(running, keys):
    """docs/operator.md lists ``nekojump_ssh_auth_total`` with ``result`` =
    ``success``, ``unknown_key_or_user``, ``bad_signature``. A member's ssh offers a key
    that was never uploaded (the seed's "Permission denied (publickey)"), or logs in as
    root: the log says "login failed from 127.0.0.1: 1 failed attempt(s) ...", but
    ``unknown_key_or_user`` stays at nothing. OpenSSH first asks whether a key would do
    and signs only after a yes, and only signed requests were counted, so an operator
    watching the metric for failed logins sees none from OpenSSH clients at all."""
    before = running.metrics()
    label = 'nekojump_ssh_auth_total{result="unknown_key_or_user"}'
    stranger = running.ssh(keys["stranger"], "-N")
    wrong_user = running.ssh(keys["alice"], "-N", user="root")
    for result in (stranger, wrong_user):
        assert b"Permission denied (publickey)." in result.stderr
    wait_for(
        lambda: running.log_text().count("login failed from") >= 2,
        what="the failed logins' log lines",
    )
    after = running.metrics()
    assert after.get(label, 0) - before.get(label, 0) >= 2, (
        f"two refused OpenSSH logins, yet {label} = {after.get(label, 0)}; "
        f"auth samples: { {k: v for k, v in after.items() if 'auth_total' in k} }"
    )
