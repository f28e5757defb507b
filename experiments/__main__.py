"""`python -m experiments` and the `moska-experiments` command: the launcher `experiments.run`."""

from __future__ import annotations

import runpy


def main() -> None:
  # Run experiments.run as __main__, as `python -m experiments.run` does: absl's --help reads the
  # usage text and the flags to show from the __main__ module.
  runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
