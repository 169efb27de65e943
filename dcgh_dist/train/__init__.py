"""Training: the per-worker loop (Ray Train) and the driver that launches it."""
