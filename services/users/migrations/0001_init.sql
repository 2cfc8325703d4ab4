-- Profiles: what users owns of an account (auth keeps the credentials).
CREATE TABLE profiles (
    id         TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    name       TEXT NOT NULL,
    phone      TEXT,
    address    TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
