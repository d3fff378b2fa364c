"""Experiments: one module per paper table, all launched by `python -m experiments.run`."""
