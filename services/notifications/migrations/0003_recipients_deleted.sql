-- 1: the recipient's profile was deleted (a tombstone: a late update changes nothing).
ALTER TABLE recipients ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
