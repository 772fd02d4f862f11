"""``nekojump-admin``: manage members and keys, list live tunnels.

Works whether or not the server runs: it writes the same SQLite file, and a
running server picks changes up within a fraction of a second (a removed key
ends its sessions at once).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from nekojump.config import Config, ConfigError, load_config
from nekojump.keys import parse_public_key
from nekojump.model import Refused
from nekojump.passwords import hash_password
from nekojump.policy import plain_number
from nekojump.store import TIERS, SQLiteStore, UnusableDatabase


class CommandError(Exception):
    """A message for the operator; the command changed nothing."""


def _ok(result: object) -> object:
    if isinstance(result, Refused):
        raise CommandError(result.reason)
    return result


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on, or that would
    break a table row, written as an escape: ``\\n``, ``\\x1b``, ``\\u202e``.

    Descriptions, login names and audit details come from members and from
    anyone who tries to log in: printed raw they could forge rows or send
    escape sequences to the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _known_member(store: SQLiteStore, name: str | None) -> None:
    """Refuse a member name that names nobody (None: everyone)."""
    if name is not None and store.get_member(name) is None:
        raise CommandError(f"there is no member named {name!r}")


def _table(rows: list[list[str]], out: TextIO) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


# -- commands ------------------------------------------------------------------------


def member_add(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    password_hash = hash_password(_read_password()) if args.password_stdin else None
    member = _ok(store.add_member(args.name, args.tier, args.admin, password_hash))
    out.write(f"added member {member.name} ({member.tier}{', admin' if member.is_admin else ''})\n")


def member_password(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    password = _read_password()
    _ok(store.set_password_hash(args.name, hash_password(password)))
    out.write(f"password set for {args.name}\n")


def _read_password() -> str:
    """The password from standard input: one line, or asked for without echo at
    a terminal."""
    if sys.stdin.isatty():
        password = getpass.getpass("Dashboard password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no password on standard input")
    return password


def token_create(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    token_id, token = _ok(store.create_token(args.name))
    out.write(f"{token}\n")
    sys.stderr.write(f"token {token_id} for {args.name}; it is shown only once\n")


def token_list(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    _known_member(store, args.name)
    tokens = store.list_tokens(args.name)
    if not tokens:
        out.write("no API tokens\n")
        return
    rows = [["ID", "MEMBER", "CREATED", "LAST USED"]]
    for t in tokens:
        rows.append([str(t.id), t.member_name, _when(t.created_at), _when(t.last_used_at)])
    _table(rows, out)


def token_revoke(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    if not store.revoke_token(args.token_id):
        raise CommandError(f"no live token with id {args.token_id}")
    out.write(f"revoked token {args.token_id}\n")


def member_list(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    members = store.list_members()
    if not members:
        out.write("no members yet; add one with: nekojump-admin member add NAME\n")
        return
    rows = [["NAME", "TIER", "ADMIN", "STATE", "KEYS"]]
    for m in members:
        rows.append(
            [
                m.name,
                m.tier,
                "yes" if m.is_admin else "",
                "active" if m.active else "disabled",
                str(len(store.list_keys(m.name))),
            ]
        )
    _table(rows, out)


def member_disable(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    _ok(store.set_member_active(args.name, False))
    out.write(f"disabled {args.name}; their tunnels and dashboard sessions end now\n")
    tokens = store.list_tokens(args.name)
    if tokens:
        ids = " ".join(str(t.id) for t in tokens)
        out.write(
            f"their API tokens ({ids}) stop working while they are disabled and work again"
            f" if you enable them; to end them for good: nekojump-admin token revoke ID\n"
        )


def member_enable(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    _ok(store.set_member_active(args.name, True))
    out.write(f"enabled {args.name}\n")


def key_add(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    try:
        text = Path(args.pubkey_file).read_text("utf-8", errors="replace")
    except OSError as error:
        raise CommandError(f"cannot read {args.pubkey_file}: {error.strerror}") from None
    key = _ok(parse_public_key(text))
    record = _ok(store.add_key(args.name, key, args.description or ""))
    out.write(
        f"added {key.label} key {record.fingerprint} for {record.member_name}"
        f"{f' ({record.description})' if record.description else ''}\n"
    )


def key_list(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    _known_member(store, args.name)
    keys = store.list_keys(args.name)
    if not keys:
        out.write("no keys\n")
        return
    rows = [["MEMBER", "TYPE", "FINGERPRINT", "DESCRIPTION", "ADDED", "LAST USED"]]
    for k in keys:
        rows.append(
            [
                k.member_name,
                k.key_type,
                k.fingerprint,
                k.description,
                _when(k.created_at),
                _when(k.last_used_at),
            ]
        )
    _table(rows, out)


def key_remove(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    record = _ok(store.remove_key(args.fingerprint, actor="nekojump-admin"))
    out.write(
        f"removed key {record.fingerprint} of {record.member_name}; its live sessions end now\n"
    )


def tunnels(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    pid = store.server_pid()
    if pid is None or not _running(pid):
        out.write("the server is not running; no live tunnels\n")
        return
    forwards = store.list_live_forwards()
    if not forwards:
        out.write("no live tunnels\n")
        return
    rows = [["PORT", "MEMBER", "KEY", "FINGERPRINT", "FROM", "SINCE", "LAST ERROR"]]
    for f in forwards:
        rows.append(
            [
                f"{f.bind_address}:{f.port}",
                f.member_name,
                f.key_description,
                f.key_fingerprint,
                f.source,
                _when(f.since),
                f.last_error or "",
            ]
        )
    _table(rows, out)


def tunnels_kill(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    target = args.target
    port = plain_number(target)
    if port is not None:
        live = [f for f in store.list_live_forwards() if f.port == port]
        if not live:
            raise CommandError(f"no live tunnel on port {target}")
        action = "kill-port"
    else:
        if store.get_member(target) is None:
            raise CommandError(f"there is no member named {target!r}")
        action = "kill-member"
    pid = store.server_pid()
    if pid is None or not _running(pid):
        raise CommandError("the server is not running; there is nothing to kill")
    store.request_kill(action, target, actor="nekojump-admin")
    store.audit(
        "kill-requested",
        member=None if port is not None else target,
        actor="nekojump-admin",
        detail={"target": target},
    )
    out.write(f"asked the server to end the tunnels of {target}\n")


def member_set_tier(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    member = _ok(store.set_member_tier(args.name, args.tier))
    out.write(f"{member.name} is now {member.tier}\n")


def ports_list(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    if args.remove is not None:
        ports_remove(store, args.remove, out)
        return
    _known_member(store, args.name)
    ports = store.list_ports(args.name)
    if not ports:
        out.write("no registered ports\n")
        return
    rows = [["PORT", "MEMBER", "DESCRIPTION", "REGISTERED"]]
    for p in ports:
        rows.append([str(p.port), p.member_name, p.description, _when(p.created_at)])
    _table(rows, out)


def ports_remove(store: SQLiteStore, port: int, out: TextIO) -> None:
    owners = [p.member_name for p in store.list_ports() if p.port == port]
    if not owners:
        raise CommandError(f"port {port} is not registered")
    removed = _ok(store.remove_port(owners[0], port))
    out.write(f"removed {removed.member_name}'s registration of port {removed.port}\n")


def audit(store: SQLiteStore, args: argparse.Namespace, out: TextIO) -> None:
    since = parse_since(args.since, time.time()) if args.since else None
    events = store.audit_events(args.limit, member=args.member, since=since)
    if not events:
        out.write("no audit events\n")
        return
    rows = [["WHEN", "EVENT", "MEMBER", "ACTOR", "SOURCE", "DETAIL"]]
    for e in reversed(events):
        detail = " ".join(f"{k}={v}" for k, v in sorted(e["detail"].items()))
        rows.append(
            [
                _when(e["at"]),
                e["event"],
                e["member"] or "",
                e["actor"] or "",
                e["source"] or "",
                detail,
            ]
        )
    _table(rows, out)


def parse_since(text: str, now: float) -> float:
    """A time from ``2026-11-25``, ``2026-11-25T10:00`` (UTC) or a span: ``90m``, ``6h``, ``2d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    count = plain_number(text[:-1])
    if count is not None and text[-1:] in units:
        return now - count * units[text[-1]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"--since {text!r}: use a date (2026-11-25), a time (2026-11-25T10:00) or a span "
            "(90m, 6h, 2d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def check_config(args: argparse.Namespace, out: TextIO) -> int:
    """Validate a config file without touching its data directory."""
    path = args.file or args.config
    try:
        config = load_config(path)
    except ConfigError as error:
        sys.stderr.write(f"nekojump-admin: {error}\n")
        return 1
    fwd = config.forwarding
    out.write(
        f"{config.source}: OK\n"
        f"  SSH on {config.ssh.listen} for user {config.ssh.user!r}, "
        f"sources {', '.join(map(str, config.ssh.allowed_sources))}\n"
        f"  forwards bind on {fwd.bind_address}, ports {fwd.port_min}-{fwd.port_max}, "
        f"takeover {fwd.takeover}\n"
        f"  dashboard on {config.web.listen} as {config.web.public_hostname}\n"
        f"  data in {config.data_dir}\n"
    )
    return 0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- argument parsing ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nekojump-admin", description="Manage nekojump members, keys and tunnels."
    )
    parser.add_argument("--config", help="TOML config file (default: built-in defaults)")
    parser.add_argument("--data-dir", help="data directory (overrides [storage] data_dir)")
    topics = parser.add_subparsers(dest="topic", required=True, metavar="COMMAND")

    def command(
        sub: argparse._SubParsersAction, name: str, run: Callable[..., None], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        return p

    member = topics.add_parser("member", help="add, list, disable members")
    member_sub = member.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(member_sub, "add", member_add, "add a member")
    p.add_argument("name")
    p.add_argument("--tier", choices=TIERS, default="basic")
    p.add_argument("--admin", action="store_true", help="may manage everyone's keys")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read a dashboard password from the first line of stdin",
    )
    command(member_sub, "list", member_list, "list members")
    p = command(member_sub, "disable", member_disable, "disable a member and end their sessions")
    p.add_argument("name")
    p = command(member_sub, "enable", member_enable, "enable a disabled member")
    p.add_argument("name")

    key = topics.add_parser("key", help="add, list, remove SSH public keys")
    key_sub = key.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(key_sub, "add", key_add, "add a member's public key from a .pub file")
    p.add_argument("name")
    p.add_argument("pubkey_file")
    p.add_argument("--description", help="which machine this key is on (default: key comment)")
    p = command(key_sub, "list", key_list, "list keys, of everyone or one member")
    p.add_argument("name", nargs="?")
    p = command(
        key_sub,
        "remove",
        key_remove,
        "remove a key (SHA256:... as ssh-keygen -l prints it); ends its sessions",
    )
    p.add_argument("fingerprint")

    p = command(
        member_sub,
        "reset-password",
        member_password,
        "set a member's dashboard password from the first line of stdin",
    )
    p.add_argument("name")

    token = topics.add_parser("token", help="API bearer tokens")
    token_sub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(
        token_sub, "create", token_create, "create an API token for a member (printed once)"
    )
    p.add_argument("name")
    p = command(token_sub, "list", token_list, "list live API tokens, of everyone or one member")
    p.add_argument("name", nargs="?")
    p = command(token_sub, "revoke", token_revoke, "revoke an API token by id")
    p.add_argument("token_id", type=int)

    p = command(member_sub, "set-tier", member_set_tier, "change a member's tier")
    p.add_argument("name")
    p.add_argument("tier", choices=TIERS)

    p = command(topics, "ports", ports_list, "list registered ports, of everyone or one member")
    p.add_argument("name", nargs="?")
    p.add_argument(
        "--remove", type=int, metavar="PORT", help="forget PORT's registration, whoever made it"
    )

    p = command(topics, "audit", audit, "show the audit trail, newest last")
    p.add_argument("--member", help="only this member's events")
    p.add_argument("--since", help="2026-11-25, 2026-11-25T10:00 (UTC), or 90m / 6h / 2d")
    p.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")

    p = topics.add_parser("check-config", help="validate a config file without starting")
    p.add_argument("file", nargs="?", help="the file (default: --config)")
    p.set_defaults(run=None)

    tunnel = command(topics, "tunnels", tunnels, "list the running server's live forwards")
    tunnel_sub = tunnel.add_subparsers(dest="action", required=False, metavar="ACTION")
    p = command(tunnel_sub, "kill", tunnels_kill, "end the tunnel on PORT, or all of MEMBER's")
    p.add_argument("target", metavar="PORT|MEMBER")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Run one admin command; 0 on success, 1 with a message on bad input."""
    args = build_parser().parse_args(argv)
    if args.topic == "check-config":
        return check_config(args, out)
    try:
        config: Config = load_config(args.config, args.data_dir)
        if args.config is None and args.data_dir is None and not config.data_dir.exists():
            sys.stderr.write(
                f"nekojump-admin: no --config given: creating a new data directory "
                f"{config.data_dir.resolve()} (is that what you meant?)\n"
            )
        store = SQLiteStore.open(config.data_dir)
    except ConfigError as error:
        sys.stderr.write(f"nekojump-admin: {error}\n")
        return 1
    except (OSError, UnusableDatabase) as error:
        sys.stderr.write(f"nekojump-admin: cannot open the data directory: {error}\n")
        return 1
    try:
        args.run(store, args, out)
    except CommandError as error:
        sys.stderr.write(f"nekojump-admin: {error}\n")
        return 1
    except sqlite3.Error as error:
        # A database that opened but fails now (read-only, damaged, a full disk):
        # its transaction is rolled back, so the command changed nothing.
        sys.stderr.write(
            f"nekojump-admin: the database in {config.data_dir} failed ({error}); "
            "the command did not complete\n"
        )
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
