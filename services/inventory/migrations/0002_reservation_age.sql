-- The sweeper finds reservations held too long by status and age.
CREATE INDEX reservations_by_age ON reservations (status, updated_at);
