"""The run: build a trainer from a Config, the training loop, metrics, plots."""
