CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    price       BIGINT NOT NULL CHECK (price > 0),
    currency    TEXT NOT NULL,
    image_url   TEXT,
    creator     TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX products_created ON products (created_at, id);

-- One-off markers, e.g. that the demo catalog was seeded.
CREATE TABLE meta (
    key TEXT PRIMARY KEY
);
