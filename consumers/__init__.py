"""Queue consumer: validate, dedup and aggregate traffic events."""
