"""Communication: the grid of communicators, the exchange interface and its all-reduce algorithms (no models here)."""
