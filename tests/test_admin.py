"""nekojump-admin: clear messages, exit status 1 and no change on bad input."""

import io
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from nekojump.admin import main
from nekojump.config import load_config
from nekojump.store import SQLiteStore
from tests.conftest import tool


@pytest.fixture
def run(tmp_path, capsys):
    data_dir = tmp_path / "data"

    def run(*argv):
        out = io.StringIO()
        code = main(["--data-dir", str(data_dir), *argv], out=out)
        return code, out.getvalue(), capsys.readouterr().err

    run.data_dir = data_dir
    return run


@pytest.fixture
def pubkey(tmp_path):
    private = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "id_ed25519.pub"
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" me@pi\n"
    )
    private_path = tmp_path / "id_ed25519"
    private_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    return path


def fingerprint(path):
    return subprocess.run(
        [tool("ssh-keygen"), "-lf", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[1]


def test_member_and_key_round_trip(run, pubkey):
    assert run("member", "add", "alice", "--tier", "plus")[0] == 0
    code, out, _ = run("key", "add", "alice", str(pubkey), "--description", "home-pi")
    assert code == 0
    assert fingerprint(pubkey) in out
    code, out, _ = run("key", "list", "alice")
    assert "home-pi" in out and fingerprint(pubkey) in out
    code, out, _ = run("member", "list")
    assert "alice" in out and "plus" in out
    assert run("key", "remove", fingerprint(pubkey))[0] == 0
    assert "no keys" in run("key", "list")[1]


def test_description_defaults_to_the_key_comment(run, pubkey):
    run("member", "add", "alice")
    run("key", "add", "alice", str(pubkey))
    assert "me@pi" in run("key", "list")[1]


def keys_in_store(data_dir):
    store = SQLiteStore.open(data_dir)
    try:
        return store.list_keys()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["key", "add", "nobody", "{pub}"], "there is no member named 'nobody'"),
        (["key", "add", "alice", "{private}"], "this is a private key"),
        (["key", "add", "alice", "{missing}"], "cannot read"),
        (["key", "add", "alice", "{garbage}"], "does not look like an SSH public key"),
        (["key", "remove", "SHA256:nope"], "no key has fingerprint SHA256:nope"),
        (["key", "list", "nobody"], "there is no member named 'nobody'"),
        (["member", "add", "alice"], "already exists"),
        (["member", "add", "bad name"], "member names are"),
        (["member", "disable", "nobody"], "there is no member named 'nobody'"),
    ],
)
def test_bad_input_exits_1_with_a_message_and_changes_nothing(run, pubkey, argv, message):
    run("member", "add", "alice")
    (pubkey.parent / "garbage.pub").write_text("hello\n")
    paths = {
        "pub": str(pubkey),
        "private": str(pubkey.with_suffix("")),
        "missing": str(pubkey.parent / "missing.pub"),
        "garbage": str(pubkey.parent / "garbage.pub"),
    }
    before = keys_in_store(run.data_dir)
    code, _out, err = run(*[arg.format(**paths) for arg in argv])
    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert keys_in_store(run.data_dir) == before


def test_duplicate_key_is_refused_even_for_another_member(run, pubkey):
    run("member", "add", "alice")
    run("member", "add", "bob")
    assert run("key", "add", "alice", str(pubkey))[0] == 0
    code, _, err = run("key", "add", "bob", str(pubkey))
    assert code == 1
    assert "already registered" in err
    assert [k.member_name for k in keys_in_store(run.data_dir)] == ["alice"]


def test_password_is_stored_hashed(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\n"))
    assert run("member", "add", "alice", "--password-stdin")[0] == 0
    raw = (run.data_dir / "nekojump.sqlite3").read_bytes()
    assert b"correct horse" not in raw
    assert b"scrypt$" in raw


def test_tunnels_without_a_server(run):
    code, out, _ = run("tunnels")
    assert code == 0
    assert "not running" in out


def test_bad_config_file_is_reported(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[ssh]\nallowed_sources = ['nope']\n")
    assert main(["--config", str(config), "member", "list"]) == 1
    assert "[ssh] allowed_sources: 'nope' is not a network" in capsys.readouterr().err


def test_console_script_is_installed_and_exits_1(tmp_path):
    result = subprocess.run(
        [tool("nekojump-admin"), "--data-dir", str(tmp_path), "key", "remove", "SHA256:x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("nekojump-admin: no key has fingerprint")


def test_check_config_validates_without_touching_anything(tmp_path, capsys):
    out = io.StringIO()
    assert main(["check-config", "etc/nekojump.toml"], out=out) == 0
    production = load_config("etc/nekojump.toml")  # parsed only, never contacted
    assert f"forwards bind on {production.forwarding.bind_address}," in out.getvalue()
    assert "OK" in out.getvalue()
    bad = tmp_path / "bad.toml"
    bad.write_text("[forwarding]\nport_min = 70000\n")
    assert main(["check-config", str(bad)], out=io.StringIO()) == 1
    assert "[forwarding] port_min: must be between 1 and 65535" in capsys.readouterr().err
    assert not (tmp_path / "nekojump-data").exists()


def test_set_tier_ports_and_audit(run, pubkey):
    run("member", "add", "alice")
    assert run("member", "set-tier", "alice", "pro")[0] == 0
    assert "pro" in run("member", "list")[1]
    assert run("member", "set-tier", "nobody", "pro")[0] == 1
    run("key", "add", "alice", str(pubkey))
    code, out, _ = run("audit", "--member", "alice")
    assert code == 0
    assert "member-added" in out and "member-tier" in out and "key-added" in out
    assert "no audit events" in run("audit", "--member", "bob")[1]
    assert run("audit", "--since", "1h")[0] == 0
    code, _out, err = run("audit", "--since", "yesterday-ish")
    assert code == 1 and "use a date" in err
    assert "no registered ports" in run("ports")[1]


def test_tunnels_kill_needs_a_running_server(run):
    run("member", "add", "alice")
    code, _out, err = run("tunnels", "kill", "alice")
    assert code == 1 and "not running" in err
    code, _out, err = run("tunnels", "kill", "nobody")
    assert code == 1 and "no member named 'nobody'" in err
