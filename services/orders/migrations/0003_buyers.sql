-- Orders' replica of the buyers' profiles, fed by user.profile.* events.
CREATE TABLE buyers (
    user_id    TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    name       TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
