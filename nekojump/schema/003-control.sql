-- nekojump schema version 3: requests from the admin CLI to the running server.

CREATE TABLE control_requests (
    id            INTEGER PRIMARY KEY,
    action        TEXT NOT NULL CHECK (action IN ('kill-port', 'kill-member')),
    target        TEXT NOT NULL,
    actor         TEXT,
    created_at    REAL NOT NULL,
    done_at       REAL
);
