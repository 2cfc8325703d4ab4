-- Bumped in the same transaction as every product change, so that a cached
-- page tagged with an older version is never served again, whichever
-- replica made the change.
CREATE TABLE catalog_version (
    id BIGINT PRIMARY KEY,
    v  BIGINT NOT NULL
);
INSERT INTO catalog_version (id, v) VALUES (1, 0);
