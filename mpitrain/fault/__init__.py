"""Fault tolerance: checkpoints and the resume policy, the watchdog, pre-emption, failure drills."""
