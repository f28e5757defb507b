"""Experiment launcher: `python -m experiments.run --experiment=NAME [flags]`.

The same from any folder: `python -m experiments` or the `moska-experiments` command. Results
(CSV, markdown, PNG) go to --out_dir (default: out/ in the experiments package). The launcher logs
this project's progress and each kernel plan at INFO and other libraries' warnings
(--verbosity=1 shows every library's log). `--experiment=NAME --help` shows the shared flags and
that experiment's; --helpfull shows all; --list lists the experiments.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging as std_logging
import os
import sys
import tempfile

from absl import app, flags, logging

from experiments import common

# name -> module; a module is imported only to run it, so GPU-only code stays lazy.
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
    "fp8": "experiments.fp8",
    "tune": "experiments.tune",
}
# Logs written from these packages are shown at INFO; other libraries' at WARNING and above.
OWN_PACKAGES = ("experiments", "moska_jax", "pallas_kernels")
_OWN_DIRS = tuple(os.path.dirname(importlib.util.find_spec(p).origin) + os.sep
                  for p in OWN_PACKAGES)

flags.DEFINE_string("experiment", "demo", "Which experiment to run (see --list).")
flags.DEFINE_boolean("list", False, "List the experiments and exit.")
flags.adopt_module_key_flags(common)  # --help shows the shared flags
FLAGS = flags.FLAGS


def summary(name: str) -> str:
  """The one-line description of an experiment: its module docstring's first line, read without
  importing the module."""
  path = importlib.util.find_spec(EXPERIMENTS[name]).origin
  with open(path, encoding="utf-8") as f:
    doc = (ast.get_docstring(ast.parse(f.read())) or "").strip()
  return doc.splitlines()[0].removeprefix(f"{name}: ") if doc else ""


def listing() -> str:
  """Every experiment on one line: its name and description."""
  return "".join(f"  {name:18s} {summary(name)}\n" for name in EXPERIMENTS)


def _own_or_warning(record: std_logging.LogRecord) -> bool:
  """The launcher's log filter (see the module docstring)."""
  if record.levelno >= std_logging.WARNING or FLAGS["verbosity"].value >= 1:
    return True
  return record.pathname.startswith(_OWN_DIRS)


def _load_flags(argv: list[str]) -> None:
  # Experiment flags are defined at import, so import the chosen module before absl parses argv.
  # absl finds --experiment (either dash, flagfiles) in a first parse of the flags known so far;
  # app.run parses argv again with the module's flags and reports any error.
  try:
    FLAGS(argv, known_only=True)
  except flags.Error:
    pass
  name = FLAGS["experiment"].value
  FLAGS.unparse_flags()
  if name in EXPERIMENTS:
    flags.adopt_module_key_flags(importlib.import_module(EXPERIMENTS[name]))


def _unwritable(out_dir: str) -> str | None:
  """Why results cannot be written under out_dir (created if missing), or None: checked before
  an experiment runs, not found after it."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    return f"--out_dir={out_dir} is not a directory"
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-"):
      pass
  except OSError as e:
    return f"--out_dir={out_dir} is not writable: {e.strerror or e}"
  return None


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.list:
    print(listing(), end="")
    return 0
  if FLAGS.experiment not in EXPERIMENTS:
    print(f"unknown experiment {FLAGS.experiment!r}; choose one of: {', '.join(EXPERIMENTS)}",
          file=sys.stderr)
    return 2
  problem = _unwritable(FLAGS.out_dir)
  if problem:
    print(problem, file=sys.stderr)
    return 2
  logging.info("running experiment %s", FLAGS.experiment)
  importlib.import_module(EXPERIMENTS[FLAGS.experiment]).main()
  return 0


def run() -> None:
  """The launcher's entry point, with this module as __main__ (absl's --help reads its
  docstring, to which the experiment list is added)."""
  sys.modules["__main__"].__doc__ = (__doc__ + "\nExperiments:\n" + listing()).replace("%", "%%")
  logging.get_absl_handler().addFilter(_own_or_warning)
  _load_flags(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
