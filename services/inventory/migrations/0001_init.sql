-- Units per product: `available` can still be sold, `reserved` is held
-- by PENDING orders. Neither is ever negative.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    available  BIGINT NOT NULL CHECK (available >= 0),
    reserved   BIGINT NOT NULL CHECK (reserved >= 0),
    updated_at TEXT NOT NULL
);

-- One reservation per order, whatever happened to it: RESERVED,
-- REJECTED (out of stock), COMMITTED (order confirmed) or RELEASED
-- (order cancelled; also written for a release that came first, so a
-- late reserve is refused).
CREATE TABLE reservations (
    order_id   TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE reservation_lines (
    order_id   TEXT NOT NULL REFERENCES reservations (order_id),
    product_id TEXT NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
