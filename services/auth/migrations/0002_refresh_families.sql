-- Refresh tokens descend from a login: each refresh revokes its token and
-- issues the next in the same family. A revoked token presented again
-- means it leaked; the whole family is revoked (RFC 9700 §4.14).
ALTER TABLE refresh_tokens ADD COLUMN family TEXT NOT NULL DEFAULT '';
UPDATE refresh_tokens SET family = token_hash WHERE family = '';
CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family);
