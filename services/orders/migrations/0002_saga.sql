-- The order saga's state: which step a PENDING order waits on
-- (`reserving`, `charging`; `done` once final) and until when.
ALTER TABLE orders ADD COLUMN saga_step TEXT NOT NULL DEFAULT 'done';
ALTER TABLE orders ADD COLUMN step_deadline TEXT NOT NULL DEFAULT '';
ALTER TABLE orders ADD COLUMN traceparent TEXT;
-- Orders left PENDING by a version without the saga time out and are compensated.
UPDATE orders SET saga_step = 'reserving' WHERE status = 'PENDING';
CREATE INDEX orders_pending ON orders (status, step_deadline);
