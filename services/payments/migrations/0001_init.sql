-- One payment per order, whatever happened to it: CHARGED, DECLINED,
-- REFUNDED, or VOIDED (the order was cancelled before any charge; a late
-- charge command then charges nothing).
CREATE TABLE payments (
    order_id   TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    amount     BIGINT NOT NULL,
    currency   TEXT NOT NULL,
    status     TEXT NOT NULL,
    reason     TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
