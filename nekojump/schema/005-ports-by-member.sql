-- nekojump schema version 5: a member's registered ports are found by index.
--
-- Every member's dashboard asks for its own registered ports every 2 s (the
-- Live tunnels refresh), on the one store thread that SSH logins wait for too.
-- Without an index SQLite read every registration to find them: 30,000
-- registrations (300 members at the limit of 100) took 3.4 ms per look-up.

CREATE INDEX IF NOT EXISTS ports_by_member ON ports (member_id);
