"""Writes one experiment's rows as CSV + a markdown table (+ optional PNG) with a header."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

from absl import logging


def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def pyplot():
  """matplotlib.pyplot on the Agg backend, or None (with a warning) without the `bench` extra."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib missing (pip install .[bench]): no plot")
    return None
  return plt


def plan_note(plan) -> str:
  """A kernel plan (`pallas_kernels.Plan`) in one short cell: implementation and config fields."""
  if plan.config is None:
    return plan.implementation
  fields = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(plan.config).items())
  return f"{plan.implementation} {fields}"


def markdown_table(rows: Sequence[dict]) -> str:
  """Rows (dicts sharing keys) as a GitHub markdown table."""
  if not rows:
    return "(no rows)\n"
  cols = list(rows[0])
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_results(out_dir: str, name: str, rows: Sequence[dict], env: dict[str, str],
                  title: str, notes: str = "") -> tuple[str, str]:
  """Writes `{name}.csv` and `{name}.md` under out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  csv_path = os.path.join(out_dir, f"{name}.csv")
  md_path = os.path.join(out_dir, f"{name}.md")
  with open(csv_path, "w", newline="") as f:
    for key, val in env.items():
      f.write(f"# {key}: {val}\n")
    if rows:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  with open(md_path, "w") as f:
    f.write(f"# {title}\n\n")
    for key, val in env.items():
      f.write(f"- {key}: `{val}`\n")
    f.write("\n" + markdown_table(rows))
    if notes:
      f.write("\n" + notes.strip() + "\n")
  logging.info("wrote %s and %s", csv_path, md_path)
  return csv_path, md_path
