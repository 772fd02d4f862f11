-- nekojump schema version 1: members, their keys, registered ports, audit
-- trail, and the live forwards a running server publishes for the CLI.

CREATE TABLE members (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    tier          TEXT NOT NULL DEFAULT 'basic' CHECK (tier IN ('basic', 'plus', 'pro')),
    is_admin      INTEGER NOT NULL DEFAULT 0,
    active        INTEGER NOT NULL DEFAULT 1,
    password_hash TEXT,
    created_at    REAL NOT NULL
);

CREATE TABLE keys (
    id            INTEGER PRIMARY KEY,
    member_id     INTEGER NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    fingerprint   TEXT NOT NULL UNIQUE,
    key_type      TEXT NOT NULL,
    public_key    TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    last_used_at  REAL
);
CREATE INDEX keys_member ON keys (member_id);

CREATE TABLE ports (
    port          INTEGER PRIMARY KEY,
    member_id     INTEGER NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    description   TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL
);

CREATE TABLE audit (
    id            INTEGER PRIMARY KEY,
    at            REAL NOT NULL,
    event         TEXT NOT NULL,
    member        TEXT,
    actor         TEXT,
    source        TEXT,
    detail        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_at ON audit (at);

CREATE TABLE live_forwards (
    port            INTEGER PRIMARY KEY,
    member          TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    key_description TEXT NOT NULL,
    bind_address    TEXT NOT NULL,
    requested_host  TEXT NOT NULL,
    source          TEXT NOT NULL,
    since           REAL NOT NULL,
    last_error      TEXT
);

CREATE TABLE server_state (
    name          TEXT PRIMARY KEY,
    value         TEXT NOT NULL
);
