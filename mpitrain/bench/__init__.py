"""Benchmarks: ``python -m mpitrain bench {allreduce} ...``; each prints a table and can write JSON."""
