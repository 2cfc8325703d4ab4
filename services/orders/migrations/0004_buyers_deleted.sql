-- 1: the buyer's profile was deleted (a tombstone: a late update changes nothing).
ALTER TABLE buyers ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
