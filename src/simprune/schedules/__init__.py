"""Pruning schedules: one-shot, iterative (hard), soft, and a measured-latency target."""

SCHEDULES = ("oneshot", "iterative", "soft")
