CREATE TABLE orders (
    id                TEXT PRIMARY KEY,
    -- The id of the message that asked for this order: a redelivered
    -- request finds its order instead of creating a second one.
    request_id        TEXT NOT NULL UNIQUE,
    user_id           TEXT NOT NULL,
    user_email        TEXT NOT NULL,
    total             BIGINT NOT NULL,
    currency          TEXT NOT NULL,
    status            TEXT NOT NULL,
    cancel_reason     TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX orders_by_user ON orders (user_id, created_at, id);

CREATE TABLE order_items (
    order_id   TEXT NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    position   BIGINT NOT NULL,
    product_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    unit_price BIGINT NOT NULL,
    quantity   BIGINT NOT NULL,
    PRIMARY KEY (order_id, position)
);
