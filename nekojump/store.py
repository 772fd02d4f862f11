"""Storage of members, keys, registered ports, audit events and live forwards.

``SQLiteStore`` is synchronous and is what the admin CLI uses directly.  The
server reaches it through ``DeferredStore``, which runs every call on one
dedicated thread so the reactor never waits on the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from nekojump.keys import PublicKey, key_description
from nekojump.model import ApiToken, KeyRecord, LiveForward, Member, Refused, RegisteredPort
from nekojump.policy import ForwardRules, port_refusal

DB_NAME = "nekojump.sqlite3"
TOKEN_AUDIT_INTERVAL = 3600.0
TIERS = ("basic", "plus", "pro")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

P = ParamSpec("P")
T = TypeVar("T")


#: A store call waiting for the store thread: method, args, kwargs, its result.
_Call = tuple[Callable[..., Any], tuple, dict, Deferred]


class _StoreReactor(IReactorFromThreads, IReactorTime):
    """What ``DeferredStore`` needs of a reactor."""


def schema_scripts() -> list[tuple[int, str]]:
    """The numbered migration scripts shipped in ``nekojump/schema``, in order."""
    scripts = []
    for entry in resources.files("nekojump").joinpath("schema").iterdir():
        match = re.match(r"^(\d+)-.*\.sql$", entry.name)
        if match:
            scripts.append((int(match.group(1)), entry.read_text("utf-8")))
    return sorted(scripts)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 10000")
    return db


#: Seconds a request from the CLI to the running server is kept once done.
DONE_REQUESTS_KEPT = 24 * 3600


class UnusableDatabase(Exception):
    """The data directory's database cannot be used: damaged, not SQLite, in a
    place SQLite cannot write, or from a newer release of nekojump."""


def _migrate(db: sqlite3.Connection) -> None:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    known = max(version for version, _ in schema_scripts())
    if current > known:
        raise UnusableDatabase(
            f"its schema version is {current}, and this release of nekojump knows only up "
            f"to {known}: it was made by a newer release (roll back the database too, "
            "or upgrade nekojump)"
        )
    for version, script in schema_scripts():
        if version <= current:
            continue
        db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")


#: Dashboard sessions one member keeps: a new login past it ends the oldest
#: (each browser that logs in is one; a loop of logins would keep thousands).
MAX_SESSIONS_PER_MEMBER = 20

#: What ``_over_limit`` counts, and how a refusal names it.
_COUNTED = {"keys": "keys", "ports": "registered ports"}


def _over_limit(
    db: sqlite3.Connection, table: str, member_id: int, limit: int | None
) -> Refused | None:
    """Why a member holding ``limit`` rows of ``table`` may not add one (None if they may)."""
    if limit is None:
        return None
    held = db.execute(f"SELECT COUNT(*) FROM {table} WHERE member_id = ?", (member_id,))
    count = held.fetchone()[0]
    if count < limit:
        return None
    return Refused(
        f"too-many-{table}",
        f"you have {count} {_COUNTED[table]} (the limit is {limit}); remove one first",
    )


class SQLiteStore:
    """All persistent state, in one SQLite file in the data directory."""

    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time):
        self._db = db
        self._clock = clock
        #: Changes made through this object to who may log in and with what
        #: tier (a key removed, a member disabled or re-tiered).  Other
        #: processes' changes show in ``data_version`` instead.
        self.login_changes = 0

    @classmethod
    def open(cls, data_dir: Path, clock: Callable[[], float] = time.time) -> SQLiteStore:
        """Open (creating and migrating as needed) the store in ``data_dir``.

        A data directory made here is private to the server's user (0700), and
        so is a new database file (0600): it holds password hashes.  Raises
        OSError for a directory it cannot make, and ``UnusableDatabase`` for
        a database SQLite cannot use."""
        if not data_dir.is_dir():
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / DB_NAME
        try:
            if not path.exists():
                # Build a new database beside the real name and rename it into
                # place, so a crash never leaves a half-made file behind.
                scratch = path.with_suffix(".new")
                scratch.unlink(missing_ok=True)
                scratch.touch(mode=0o600)
                db = _connect(scratch)
                _migrate(db)
                db.close()
                os.replace(scratch, path)
            db = _connect(path)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                _migrate(db)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as error:
            raise UnusableDatabase(f"{path}: {error}") from error
        except UnusableDatabase as error:
            raise UnusableDatabase(f"{path}: {error}") from None
        return cls(db, clock)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements of the block commit together, or none does.

        Inside another ``transaction`` block it is a savepoint: its own
        statements roll back on an error, the outer block's stay.  Some
        errors (a full disk) make SQLite roll back the whole transaction: the
        outer block then gets the error too, and the connection is left out of
        any transaction whatever fails."""
        db = self._db
        if db.in_transaction:
            db.execute("SAVEPOINT nested")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK TO nested")
                    db.execute("RELEASE nested")
                raise
            db.execute("RELEASE nested")
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def data_version(self) -> int:
        """A number that changes whenever another process commits a change."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # -- members ---------------------------------------------------------------

    def add_member(
        self,
        name: str,
        tier: str = "basic",
        is_admin: bool = False,
        password_hash: str | None = None,
    ) -> Member | Refused:
        """Create a member; refused if the name is taken or unusable."""
        if not _NAME.match(name):
            return Refused(
                "member-name-invalid",
                "member names are 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        if tier not in TIERS:
            return Refused("tier-invalid", f"tier must be one of {', '.join(TIERS)}")
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO members (name, tier, is_admin, password_hash, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, tier, int(is_admin), password_hash, self._clock()),
                )
                self._audit(db, "member-added", member=name, detail={"tier": tier})
        except sqlite3.IntegrityError:
            return Refused("member-exists", f"a member named {name!r} already exists")
        member = self.get_member(name)
        assert member is not None
        return member

    def get_member(self, name: str) -> Member | None:
        """The member called ``name``, or None."""
        row = self._db.execute("SELECT * FROM members WHERE name = ?", (name,)).fetchone()
        return _member(row) if row else None

    def list_members(self) -> list[Member]:
        """Every member, by name."""
        return [_member(r) for r in self._db.execute("SELECT * FROM members ORDER BY name")]

    def set_member_active(self, name: str, active: bool) -> Member | Refused:
        """Enable or disable a member; a disabled member's keys stop working and
        their dashboard sessions end (enabling them again does not bring those back)."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE members SET active = ? WHERE name = ?", (int(active), name)
            ).rowcount
            if changed:
                event = "member-enabled" if active else "member-disabled"
                self._audit(db, event, member=name)
                if not active:
                    self._end_sessions_of(db, name)
        self.login_changes += 1
        member = self.get_member(name)
        if not changed or member is None:
            return Refused("no-such-member", f"there is no member named {name!r}")
        return member

    # -- keys ------------------------------------------------------------------

    def add_key(
        self, member_name: str, key: PublicKey, description: str = "", limit: int | None = None
    ) -> KeyRecord | Refused:
        """Store ``key`` for a member; refused if the member or key is unknown/taken,
        or the member holds ``limit`` keys already."""
        member = self.get_member(member_name)
        if member is None:
            return Refused("no-such-member", f"there is no member named {member_name!r}")
        description = key_description(description, key.comment)
        try:
            with self.transaction() as db:
                full = _over_limit(db, "keys", member.id, limit)
                if full is not None:
                    return full
                db.execute(
                    "INSERT INTO keys (member_id, fingerprint, key_type, public_key,"
                    " description, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        member.id,
                        key.fingerprint,
                        key.key_type,
                        key.openssh,
                        description,
                        self._clock(),
                    ),
                )
                self._audit(
                    db, "key-added", member=member_name, detail={"fingerprint": key.fingerprint}
                )
        except sqlite3.IntegrityError:
            return Refused("key-exists", "this key is already registered")
        record = self.find_key(key.fingerprint)
        assert record is not None
        return record

    def find_key(self, fingerprint: str) -> KeyRecord | None:
        """The key with this ``SHA256:`` fingerprint, whatever its member's state."""
        row = self._db.execute(_KEY_SELECT + " WHERE k.fingerprint = ?", (fingerprint,)).fetchone()
        return _key(row) if row else None

    def list_keys(self, member_name: str | None = None) -> list[KeyRecord]:
        """All keys, or one member's, oldest first."""
        if member_name is None:
            rows = self._db.execute(_KEY_SELECT + " ORDER BY m.name, k.id")
        else:
            rows = self._db.execute(_KEY_SELECT + " WHERE m.name = ? ORDER BY k.id", (member_name,))
        return [_key(r) for r in rows]

    def remove_key(self, fingerprint: str, actor: str | None = None) -> KeyRecord | Refused:
        """Delete a key; its live sessions must then be ended by the server."""
        record = self.find_key(fingerprint)
        if record is None:
            return Refused("no-such-key", f"no key has fingerprint {fingerprint}")
        with self.transaction() as db:
            db.execute("DELETE FROM keys WHERE id = ?", (record.id,))
            self._audit(
                db,
                "key-removed",
                member=record.member_name,
                actor=actor,
                detail={"fingerprint": fingerprint},
            )
        self.login_changes += 1
        return record

    def usable_key_ids(self) -> frozenset[int]:
        """Ids of the keys that may log in now (key stored, member active)."""
        rows = self._db.execute(
            "SELECT k.id FROM keys k JOIN members m ON m.id = k.member_id WHERE m.active"
        )
        return frozenset(row[0] for row in rows)

    def member_tiers(self) -> dict[int, str]:
        """Every member's tier, by member id."""
        return dict(self._db.execute("SELECT id, tier FROM members"))

    def confirm_login(self, key_id: int) -> str | None:
        """Record a login with this key; its member's tier now, or None if the key
        may no longer log in."""
        changed = self._db.execute(
            "UPDATE keys SET last_used_at = ? WHERE id = ? AND member_id IN"
            " (SELECT id FROM members WHERE active)",
            (self._clock(), key_id),
        ).rowcount
        return self.login_tier(key_id) if changed == 1 else None

    def login_tier(self, key_id: int) -> str | None:
        """The tier of the member whose key this is, or None if the key may no
        longer log in (removed, or its member disabled).  Only reads."""
        row = self._db.execute(
            "SELECT m.tier FROM keys k JOIN members m ON m.id = k.member_id"
            " WHERE k.id = ? AND m.active",
            (key_id,),
        ).fetchone()
        return row[0] if row else None

    # -- registered ports (inventory only) -------------------------------------

    def add_port(
        self,
        member_name: str,
        port: int,
        description: str,
        rules: ForwardRules,
        limit: int | None = None,
    ) -> RegisteredPort | Refused:
        """Record that a member runs a service on ``port``; refused if unusable or
        taken, or the member has registered ``limit`` ports already."""
        member = self.get_member(member_name)
        if member is None:
            return Refused("no-such-member", f"there is no member named {member_name!r}")
        refusal = port_refusal(port, rules)
        if refusal is not None:
            return refusal
        description = description.strip()
        if len(description) > 200:
            return Refused("description-too-long", "keep the description under 200 characters")
        try:
            with self.transaction() as db:
                full = _over_limit(db, "ports", member.id, limit)
                if full is not None:
                    return full
                db.execute(
                    "INSERT INTO ports (port, member_id, description, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (port, member.id, description, self._clock()),
                )
                self._audit(db, "port-registered", member=member_name, detail={"port": port})
        except sqlite3.IntegrityError:
            return Refused("port-registered", f"port {port} is already registered")
        return RegisteredPort(port, member_name, description, self._clock())

    def registered_port_numbers(self) -> set[int]:
        """Every registered port's number (whoever registered it)."""
        return {row[0] for row in self._db.execute("SELECT port FROM ports")}

    def list_ports(
        self, member_name: str | None = None, *, active_only: bool = False
    ) -> list[RegisteredPort]:
        """Registered ports of one member, or of everyone (or every active
        member), by port."""
        query = (
            "SELECT p.*, m.name AS member_name FROM ports p JOIN members m ON m.id = p.member_id"
        )
        if member_name is None:
            where = " WHERE m.active" if active_only else ""
            rows = self._db.execute(query + where + " ORDER BY p.port")
        else:
            rows = self._db.execute(query + " WHERE m.name = ? ORDER BY p.port", (member_name,))
        return [
            RegisteredPort(r["port"], r["member_name"], r["description"], r["created_at"])
            for r in rows
        ]

    def directory(self) -> list[RegisteredPort]:
        """Registered ports of active members, by port: what members find in the
        Service Directory (a disabled member's services cannot be up, and their
        registrations come back when the member is enabled again)."""
        return self.list_ports(active_only=True)

    def remove_port(
        self, member_name: str, port: int, actor: str | None = None
    ) -> RegisteredPort | Refused:
        """Forget a registration; only its member's (admins pass the owner's name,
        and their own as ``actor``)."""
        mine = [p for p in self.list_ports(member_name) if p.port == port]
        if not mine:
            return Refused("no-such-port", f"you have not registered port {port}")
        with self.transaction() as db:
            db.execute("DELETE FROM ports WHERE port = ?", (port,))
            self._audit(
                db, "port-unregistered", member=member_name, actor=actor, detail={"port": port}
            )
        return mine[0]

    # -- dashboard sessions and API tokens ----------------------------------------

    def password_hash(self, name: str) -> tuple[str | None, bool] | None:
        """A member's dashboard password hash and whether they are active, or None
        if there is no such member."""
        row = self._db.execute(
            "SELECT password_hash, active FROM members WHERE name = ?", (name,)
        ).fetchone()
        return (row[0], bool(row[1])) if row else None

    def set_password_hash(self, name: str, password_hash: str) -> Member | Refused:
        """A new dashboard password; every session logged in with the old one ends."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE members SET password_hash = ? WHERE name = ?", (password_hash, name)
            ).rowcount
            if changed:
                self._audit(db, "password-set", member=name)
                self._end_sessions_of(db, name)
        member = self.get_member(name)
        if not changed or member is None:
            return Refused("no-such-member", f"there is no member named {name!r}")
        return member

    def create_session(self, member_name: str, lifetime: float) -> tuple[str, str]:
        """A new dashboard session: (cookie token, CSRF token)."""
        member = self.get_member(member_name)
        assert member is not None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = self._clock()
        with self.transaction() as db:
            db.execute("DELETE FROM web_sessions WHERE expires_at < ?", (now,))
            db.execute(
                "INSERT INTO web_sessions VALUES (?, ?, ?, ?, ?)",
                (_digest(token), member.id, csrf, now, now + lifetime),
            )
            # The member's oldest sessions past MAX_SESSIONS_PER_MEMBER end.
            db.execute(
                "DELETE FROM web_sessions WHERE member_id = ? AND token_hash NOT IN"
                " (SELECT token_hash FROM web_sessions WHERE member_id = ?"
                "  ORDER BY created_at DESC, rowid DESC LIMIT ?)",
                (member.id, member.id, MAX_SESSIONS_PER_MEMBER),
            )
            self._audit(db, "login", member=member_name)
        return token, csrf

    def session_member(self, token: str) -> tuple[Member, str] | None:
        """The active member behind a session cookie, with its CSRF token."""
        row = self._db.execute(
            "SELECT m.*, s.csrf_token FROM web_sessions s JOIN members m ON m.id = s.member_id"
            " WHERE s.token_hash = ? AND s.expires_at > ? AND m.active",
            (_digest(token), self._clock()),
        ).fetchone()
        return (_member(row), row["csrf_token"]) if row else None

    def end_session(self, token: str) -> None:
        self._db.execute("DELETE FROM web_sessions WHERE token_hash = ?", (_digest(token),))

    @staticmethod
    def _end_sessions_of(db: sqlite3.Connection, member_name: str) -> None:
        db.execute(
            "DELETE FROM web_sessions WHERE member_id = (SELECT id FROM members WHERE name = ?)",
            (member_name,),
        )

    def create_token(self, member_name: str) -> tuple[int, str] | Refused:
        """A new API bearer token for a member: (id, token); only its hash is kept."""
        member = self.get_member(member_name)
        if member is None:
            return Refused("no-such-member", f"there is no member named {member_name!r}")
        token = "nkj_" + secrets.token_urlsafe(32)
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO api_tokens (member_id, token_hash, created_at) VALUES (?, ?, ?)",
                (member.id, _digest(token), self._clock()),
            )
            self._audit(
                db, "token-created", member=member_name, detail={"token_id": cursor.lastrowid}
            )
        return cursor.lastrowid, token

    def revoke_token(self, token_id: int) -> bool:
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), token_id),
            ).rowcount
            if changed:
                self._audit(db, "token-revoked", detail={"token_id": token_id})
        return bool(changed)

    def list_tokens(self, member_name: str | None = None) -> list[ApiToken]:
        """Live (unrevoked) API tokens, of everyone or one member, oldest first."""
        query = (
            "SELECT t.id, m.name, t.created_at, t.last_used_at FROM api_tokens t"
            " JOIN members m ON m.id = t.member_id WHERE t.revoked_at IS NULL"
        )
        if member_name is None:
            rows = self._db.execute(query + " ORDER BY t.id")
        else:
            rows = self._db.execute(query + " AND m.name = ? ORDER BY t.id", (member_name,))
        return [ApiToken(*row) for row in rows]

    def token_member(self, token: str) -> Member | None:
        """The active member a bearer token belongs to, if the token is live."""
        row = self._db.execute(
            "SELECT m.*, t.id AS token_id, t.last_used_at FROM api_tokens t"
            " JOIN members m ON m.id = t.member_id"
            " WHERE t.token_hash = ? AND t.revoked_at IS NULL AND m.active",
            (_digest(token),),
        ).fetchone()
        if row is None:
            return None
        now = self._clock()
        try:
            with self.transaction() as db:
                if row["last_used_at"] is None or now - row["last_used_at"] > TOKEN_AUDIT_INTERVAL:
                    # Audit token use, but not every request: once an hour per token.
                    detail = {"token_id": row["token_id"]}
                    self._audit(db, "token-used", member=row["name"], detail=detail)
                db.execute(
                    "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, row["token_id"])
                )
        except sqlite3.OperationalError:
            pass  # bookkeeping only: a full disk must not lock scripts out of reading
        return _member(row)

    # -- requests from the CLI to the running server --------------------------------

    def request_kill(self, action: str, target: str, actor: str | None = None) -> int:
        """Ask the running server to end tunnels (``kill-port`` or ``kill-member``)."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO control_requests (action, target, actor, created_at)"
                " VALUES (?, ?, ?, ?)",
                (action, target, actor, self._clock()),
            )
        return cursor.lastrowid

    def take_control_requests(self) -> list[tuple[str, str]]:
        """Pending requests, oldest first, marked done as they are handed out
        (and forgotten a day after: the audit trail keeps what was done)."""
        now = self._clock()
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, action, target FROM control_requests WHERE done_at IS NULL ORDER BY id"
            ).fetchall()
            db.executemany(
                "UPDATE control_requests SET done_at = ? WHERE id = ?",
                [(now, row["id"]) for row in rows],
            )
            db.execute(
                "DELETE FROM control_requests WHERE done_at < ?", (now - DONE_REQUESTS_KEPT,)
            )
        return [(row["action"], row["target"]) for row in rows]

    def set_member_tier(self, name: str, tier: str) -> Member | Refused:
        if tier not in TIERS:
            return Refused("tier-invalid", f"tier must be one of {', '.join(TIERS)}")
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE members SET tier = ? WHERE name = ?", (tier, name)
            ).rowcount
            if changed:
                self._audit(db, "member-tier", member=name, detail={"tier": tier})
        self.login_changes += 1
        member = self.get_member(name)
        if not changed or member is None:
            return Refused("no-such-member", f"there is no member named {name!r}")
        return member

    # -- audit -----------------------------------------------------------------

    def audit(
        self,
        event: str,
        member: str | None = None,
        actor: str | None = None,
        source: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one event to the audit trail."""
        self._audit(self._db, event, member, actor, source, detail)

    def _audit(
        self,
        db: sqlite3.Connection,
        event: str,
        member: str | None = None,
        actor: str | None = None,
        source: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, event, member, actor, source, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self._clock(), event, member, actor, source, json.dumps(detail or {}, sort_keys=True)),
        )

    def audit_events(
        self, limit: int = 100, member: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """The newest audit events (of one member, after a time), newest first."""
        query, args = "SELECT * FROM audit WHERE 1", []
        if member is not None:
            query += " AND member = ?"
            args.append(member)
        if since is not None:
            query += " AND at >= ?"
            args.append(since)
        rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    def prune_audit(self, older_than: float) -> int:
        """Forget audit events before a time; returns how many."""
        return self._db.execute("DELETE FROM audit WHERE at < ?", (older_than,)).rowcount

    # -- live forwards (written by the running server) -------------------------

    def start_server(self, pid: int) -> None:
        """Forget forwards left by a previous server and record who runs now."""
        with self.transaction() as db:
            db.execute("DELETE FROM live_forwards")
            db.execute("INSERT OR REPLACE INTO server_state VALUES ('pid', ?)", (str(pid),))

    def stop_server(self) -> None:
        """Mark the server stopped: no live forwards remain."""
        with self.transaction() as db:
            db.execute("DELETE FROM live_forwards")
            db.execute("DELETE FROM server_state WHERE name = 'pid'")

    def server_pid(self) -> int | None:
        """The pid the running server recorded, if any."""
        row = self._db.execute("SELECT value FROM server_state WHERE name = 'pid'").fetchone()
        return int(row[0]) if row else None

    def put_live_forward(self, forward: LiveForward) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO live_forwards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                forward.port,
                forward.member_name,
                forward.key_fingerprint,
                forward.key_description,
                forward.bind_address,
                forward.requested_host,
                forward.source,
                forward.since,
                forward.last_error,
            ),
        )

    def drop_live_forward(self, port: int) -> None:
        self._db.execute("DELETE FROM live_forwards WHERE port = ?", (port,))

    def list_live_forwards(self) -> list[LiveForward]:
        """The forwards the running server holds, by port."""
        rows = self._db.execute("SELECT * FROM live_forwards ORDER BY port")
        return [
            LiveForward(
                port=r["port"],
                member_name=r["member"],
                key_fingerprint=r["key_fingerprint"],
                key_description=r["key_description"],
                bind_address=r["bind_address"],
                requested_host=r["requested_host"],
                source=r["source"],
                since=r["since"],
                last_error=r["last_error"],
            )
            for r in rows
        ]


_KEY_SELECT = (
    "SELECT k.*, m.name AS member_name, m.active AS member_active, m.tier AS member_tier"
    " FROM keys k JOIN members m ON m.id = k.member_id"
)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _member(row: sqlite3.Row) -> Member:
    return Member(
        id=row["id"],
        name=row["name"],
        tier=row["tier"],
        is_admin=bool(row["is_admin"]),
        active=bool(row["active"]),
        created_at=row["created_at"],
    )


def _key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        member_id=row["member_id"],
        member_name=row["member_name"],
        member_active=bool(row["member_active"]),
        member_tier=row["member_tier"],
        fingerprint=row["fingerprint"],
        key_type=row["key_type"],
        public_key=row["public_key"],
        description=row["description"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )


class DeferredStore:
    """Runs store calls off the reactor thread, one at a time, in order.

    Calls made while the store thread is busy (or before it picks up the
    last job) go over together: one hop to the thread and one back per
    batch instead of per call, which matters when hundreds of tunnels log
    in at once.

    Writes that need not happen at once (audit events, live forwards,
    last-used times) go through ``write_later``: those made within
    ``WRITE_DELAY`` of each other commit in one transaction.  A login makes
    four such writes; a commit of its own for each cost the store thread
    more than the writes themselves.
    """

    #: How long a ``write_later`` write may wait for others to share its commit.
    WRITE_DELAY = 0.02

    def __init__(self, store: SQLiteStore, reactor: _StoreReactor, pool: ThreadPool):
        self.store = store
        self._reactor = reactor
        self._pool = pool
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._job_pending = False
        self._writes: list[_Call] = []
        self._flush: IDelayedCall | None = None

    @classmethod
    def with_own_thread(cls, store: SQLiteStore, reactor: _StoreReactor) -> DeferredStore:
        """A store with its own single worker thread (start/stop it with the service)."""
        return cls(store, reactor, ThreadPool(minthreads=1, maxthreads=1, name="nekojump-store"))

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """Commit the writes still waiting, then end the thread once its work is done."""
        try:
            self.flush_writes()
        finally:
            self._pool.stop()
        # A stopped pool drops the batches still queued behind the last one:
        # run them here (the store thread is gone, so nothing races).
        while self._queue:
            self._deliver(self._run_calls(self._take_batch()[0]))

    def write_later(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run the write ``method`` on the store thread within ``WRITE_DELAY``,
        in one transaction with the other writes made meanwhile.  Each write
        still succeeds or fails on its own; a failed commit fails them all."""
        result: Deferred[T] = Deferred()
        self._writes.append((method, args, kwargs, result))
        if self._flush is None:
            self._flush = self._reactor.callLater(self.WRITE_DELAY, self.flush_writes)
        return result

    def flush_writes(self) -> None:
        """Send the waiting ``write_later`` writes to the store thread now."""
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None
        writes, self._writes = self._writes, []
        if writes:
            together: Deferred[list[tuple[bool, object]]] = Deferred()
            together.addBoth(_hand_out, [result for _, _, _, result in writes])
            self._enqueue(_write_together, (self.store, writes), {}, together)

    def call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run ``method`` (a method of ``self.store``) on the store thread.

        It may overtake ``write_later`` writes still waiting for company
        (by at most ``WRITE_DELAY``): nothing the server looks up depends
        on them."""
        result: Deferred[T] = Deferred()
        self._enqueue(method, args, kwargs, result)
        return result

    def _enqueue(
        self, method: Callable[..., Any], args: tuple, kwargs: dict, result: Deferred
    ) -> None:
        with self._lock:
            self._queue.append((method, args, kwargs, result))
            start_job = not self._job_pending
            self._job_pending = True
        if start_job:
            self._start_job()

    def _start_job(self) -> None:
        try:
            self._pool.callInThread(self._run_batch)
        except BaseException:
            with self._lock:
                self._job_pending = False
            raise

    def _run_batch(self) -> None:
        """On the store thread: up to BATCH queued calls, then their results back at once."""
        batch, more = self._take_batch()
        if more:
            self._pool.callInThread(self._run_batch)
        self._reactor.callFromThread(self._deliver, self._run_calls(batch))

    def _take_batch(self) -> tuple[list[_Call], bool]:
        """The next calls to run, and whether more wait behind them."""
        with self._lock:
            batch, self._queue = self._queue[: self.BATCH], self._queue[self.BATCH :]
            self._job_pending = more = bool(self._queue)
        return batch, more

    @staticmethod
    def _run_calls(
        batch: list[_Call],
    ) -> list[tuple[Deferred, bool, object]]:
        outcomes: list[tuple[Deferred, bool, object]] = []
        for method, args, kwargs, result in batch:
            try:
                outcomes.append((result, True, method(*args, **kwargs)))
            except BaseException:  # noqa: BLE001 - it goes to the caller's errback
                outcomes.append((result, False, Failure()))
        return outcomes

    #: Calls per trip: a quick lookup waits behind at most this many others.
    BATCH = 32

    @staticmethod
    def _deliver(outcomes: list[tuple[Deferred, bool, object]]) -> None:
        for result, ok, value in outcomes:
            if result.called:  # cancelled by its caller meanwhile
                continue
            if ok:
                result.callback(value)
            else:
                result.errback(value)


def _write_together(store: SQLiteStore, writes: list[_Call]) -> list[tuple[bool, object]]:
    """On the store thread: run ``writes`` in one transaction, each one's outcome
    its own.  An error that undoes the whole transaction fails the group."""
    outcomes: list[tuple[bool, object]] = []
    with store.transaction() as db:
        for method, args, kwargs, _ in writes:
            try:
                with store.transaction():  # a write that fails takes back all of itself
                    outcomes.append((True, method(*args, **kwargs)))
            except Exception:  # it goes to that write's errback
                if not db.in_transaction:  # SQLite undid the whole group
                    raise
                outcomes.append((False, Failure()))
    return outcomes


def _hand_out(outcomes: list[tuple[bool, object]] | Failure, results: list[Deferred]) -> None:
    """Fire each write's ``Deferred`` with its own outcome (all fail if the commit did)."""
    for i, result in enumerate(results):
        if result.called:  # cancelled by its caller meanwhile
            continue
        if isinstance(outcomes, Failure):
            result.errback(outcomes)
        else:
            ok, value = outcomes[i]
            if ok:
                result.callback(value)
            else:
                result.errback(value)


class ImmediateStore(DeferredStore):
    """A ``DeferredStore`` that runs calls at once: for protocol tests."""

    def __init__(self, store: SQLiteStore):
        self.store = store

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return succeed(method(*args, **kwargs))

    write_later = call
