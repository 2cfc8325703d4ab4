-- A deleted product's stock is retired: nothing more can be reserved of
-- it (held units still come back or leave as their orders settle).
ALTER TABLE stock ADD COLUMN retired BIGINT NOT NULL DEFAULT 0;
