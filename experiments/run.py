"""Experiment launcher: `python -m experiments.run --experiment=NAME [flags]`.

`--list` prints the experiments. Each experiment is one module of this package with a `main()`,
its own flags (prefixed with its name) and a docstring; shared flags live in experiments.common.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging

from experiments import common  # noqa: F401  (defines the shared flags)

# name -> module; a module is imported only to run it or to list it, so GPU-only code stays lazy.
EXPERIMENTS = {
    "demo": "experiments.demo",
    "shared_attention": "experiments.shared_attention",
    "unique_attention": "experiments.unique_attention",
    "sparse_attention": "experiments.sparse_attention",
    "kernels": "experiments.kernels",
    "decode": "experiments.decode",
    "disaggregation": "experiments.disaggregation",
    "roofline": "experiments.roofline",
    "train_retrieval": "experiments.train_retrieval",
    "accuracy": "experiments.accuracy",
    "serving": "experiments.serving",
}

flags.DEFINE_string("experiment", "demo", "Which experiment to run (see --list).")
flags.DEFINE_boolean("list", False, "List the experiments and exit.")
FLAGS = flags.FLAGS


def _doc_line(module_name: str) -> str:
  doc = importlib.import_module(module_name).__doc__ or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def _load_flags(argv: list[str]) -> None:
  # Experiment flags are defined at import, so import the chosen module before absl parses argv.
  name = "demo"
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith("--experiment="):
      name = a.split("=", 1)[1]
    elif a == "--experiment" and i + 1 < len(argv):
      name = argv[i + 1]
  if name in EXPERIMENTS:
    importlib.import_module(EXPERIMENTS[name])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.list:
    for name, mod in EXPERIMENTS.items():
      print(f"{name:20s} {_doc_line(mod)}")
    return 0
  if FLAGS.experiment not in EXPERIMENTS:
    print(f"unknown experiment {FLAGS.experiment!r}; choose one of: {', '.join(EXPERIMENTS)}",
          file=sys.stderr)
    return 2
  # orbax logs every checkpoint step at INFO through absl; keep the experiments' own progress.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  logging.info("running experiment %s", FLAGS.experiment)
  importlib.import_module(EXPERIMENTS[FLAGS.experiment]).main()
  return 0


def run() -> None:
  _load_flags(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
