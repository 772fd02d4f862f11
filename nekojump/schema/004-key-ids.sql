-- nekojump schema version 4: a removed key's id is never given to another key.
--
-- The running server tells keys apart by id (which sessions to end when a key
-- is removed, whose connection may take over a held port).  Without
-- AUTOINCREMENT SQLite gives a new key the id of the newest key removed, so a
-- key added before the server noticed a removal made the removed key's
-- sessions look usable again.  SQLite cannot change a column's definition in
-- place: the table is copied into one that declares it.

CREATE TABLE keys_v4 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    member_id     INTEGER NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    fingerprint   TEXT NOT NULL UNIQUE,
    key_type      TEXT NOT NULL,
    public_key    TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    last_used_at  REAL
);
INSERT INTO keys_v4 (id, member_id, fingerprint, key_type, public_key, description,
                     created_at, last_used_at)
    SELECT id, member_id, fingerprint, key_type, public_key, description,
           created_at, last_used_at
    FROM keys;
DROP TABLE keys;
ALTER TABLE keys_v4 RENAME TO keys;
CREATE INDEX keys_member ON keys (member_id);
