-- A renewal's period: the change pays the period starting here.
ALTER TABLE changes ADD COLUMN period_start BIGINT;
