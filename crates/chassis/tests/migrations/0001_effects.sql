CREATE TABLE effects (
    id      TEXT PRIMARY KEY,
    payload TEXT NOT NULL
);
