"""MoSKA experiments: `python -m experiments.run --experiment=NAME`."""
