"""nekojump-admin: clear messages, exit status 1 and no change on bad input."""

import io
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from nekojump.admin import main
from nekojump.config import load_config
from nekojump.policy import ForwardRules
from nekojump.store import SQLiteStore
from tests.conftest import tool

RULES = ForwardRules(port_min=10000, port_max=60000)


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


def test_text_from_members_and_strangers_cannot_forge_rows_or_drive_the_terminal(run, pubkey):
    """Descriptions, ports and audit details are member input, and a failed login
    stores whatever name was typed: the operator's terminal gets them escaped."""
    run("member", "add", "alice")
    store = SQLiteStore.open(run.data_dir)
    try:
        store.add_port("alice", 10081, "web\r10022  root    operator SSH\x1b]0;pwned\x07", RULES)
        store.audit("login-failed", actor="x\n2026-11-26 04:00:00  member-disabled  root")
    finally:
        store.close()
    run("key", "add", "alice", str(pubkey), "--description", "\x1b[31mred\x1b[0m\u202elaptop")
    for argv in (["ports"], ["audit"], ["key", "list"]):
        code, out, _ = run(*argv)
        assert code == 0
        assert not any(c in out for c in "\r\x1b\x07\u202e"), argv
        assert all(line.isprintable() for line in out.splitlines()), argv
    assert "\\r10022" in run("ports")[1]
    assert "x\\n2026-11-26" in run("audit")[1]
    assert "\\x1b[31mred\\x1b[0m\\u202elaptop" in run("key", "list")[1]


@pytest.mark.parametrize("argv", [["audit", "--since", "²d"], ["tunnels", "kill", "²"]])
def test_digits_that_are_not_ascii_are_no_number(run, argv):
    """'²'.isdigit() is true, but it is no count of days and no port."""
    code, _out, err = run(*argv)
    assert code == 1
    assert "Traceback" not in err and err.startswith("nekojump-admin: ")


def test_password_reset_and_disabling_end_dashboard_sessions_for_good(run, monkeypatch):
    run("member", "add", "alice")
    store = SQLiteStore.open(run.data_dir)
    try:
        before_reset, _ = store.create_session("alice", 3600)
        monkeypatch.setattr("sys.stdin", io.StringIO("new password\n"))
        assert run("member", "reset-password", "alice")[0] == 0
        assert store.session_member(before_reset) is None
        before_disable, _ = store.create_session("alice", 3600)
        token_id, token = store.create_token("alice")
        code, out, _ = run("member", "disable", "alice")
        assert code == 0 and f"API tokens ({token_id})" in out
        assert run("member", "enable", "alice")[0] == 0
        assert store.session_member(before_disable) is None
        assert store.token_member(token).name == "alice"  # kept, as the message says
    finally:
        store.close()


def test_tokens_can_be_listed_to_find_the_one_to_revoke(run):
    run("member", "add", "alice")
    run("member", "add", "bob")
    assert "no API tokens" in run("token", "list")[1]
    assert run("token", "create", "alice")[0] == 0
    assert run("token", "create", "bob")[0] == 0
    code, out, _ = run("token", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "MEMBER", "CREATED", "LAST", "USED"]
    assert [line.split()[:2] for line in lines[1:]] == [["1", "alice"], ["2", "bob"]]
    assert [line.split()[1] for line in run("token", "list", "bob")[1].splitlines()[1:]] == ["bob"]
    assert run("token", "revoke", "1")[0] == 0
    assert "alice" not in run("token", "list")[1]
    code, _out, err = run("token", "list", "nobody")
    assert code == 1 and "no member named 'nobody'" in err


def test_operator_removes_any_members_registered_port(run):
    run("member", "add", "alice")
    store = SQLiteStore.open(run.data_dir)
    try:
        store.add_port("alice", 10081, "wiki", RULES)
    finally:
        store.close()
    code, out, _ = run("ports", "--remove", "10081")
    assert code == 0 and "alice's registration of port 10081" in out
    assert "no registered ports" in run("ports")[1]
    code, _out, err = run("ports", "--remove", "10081")
    assert code == 1 and "port 10081 is not registered" in err
