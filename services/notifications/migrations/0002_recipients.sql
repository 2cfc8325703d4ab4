-- Notifications' replica of profiles, fed by user.profile.* events: the
-- name a notification greets and the address it goes to.
CREATE TABLE recipients (
    user_id    TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    name       TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
