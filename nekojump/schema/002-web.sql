-- nekojump schema version 2: dashboard sessions and API bearer tokens.
-- Only SHA-256 hashes of session and API tokens are stored.

CREATE TABLE web_sessions (
    token_hash    TEXT PRIMARY KEY,
    member_id     INTEGER NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    csrf_token    TEXT NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL
);

CREATE TABLE api_tokens (
    id            INTEGER PRIMARY KEY,
    member_id     INTEGER NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    REAL NOT NULL,
    last_used_at  REAL,
    revoked_at    REAL
);
