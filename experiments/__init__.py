"""MoSKA experiments: `python -m experiments.run --experiment=NAME` (or `moska-experiments`).

Installed with the project (`pip install -e .`), so the launcher runs from any folder; default
paths (the output folder, the published checkpoint) resolve inside this package.
"""
