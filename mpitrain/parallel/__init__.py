"""Parallel trainers: how one step is split over ranks (data parallelism, pipeline stages)."""
