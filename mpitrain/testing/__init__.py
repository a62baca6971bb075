"""Test beds: ``netcluster``, several emulated nodes on one machine (standard library only)."""
