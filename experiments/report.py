"""Writes one experiment's rows as CSV + a markdown table with a header, notes and goals."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

from absl import logging

from experiments.goals import Goal


def fmt(x) -> str:
  """A cell: floats to 4 significant digits, anything else as str."""
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
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A goal evaluated on a table: "met", "missed" or "not measured" (no matching finite value)."""

  goal: Goal
  verdict: str
  measured: str


def evaluate(goal: Goal, rows: Sequence[dict], keys: Sequence[str] = ()) -> Verdict:
  """The goal on the rows it applies to. The value reported is the worst row for over="each",
  the best for over="any", named by its `keys` columns, with how many rows met the goal."""
  found = [(r[goal.column], r) for r in rows
           if goal.matches(r) and math.isfinite(r.get(goal.column, math.nan))]
  if not found:
    return Verdict(goal, "not measured", "no row it applies to was measured")
  met = [goal.met_by(v) for v, _ in found]
  worst_first = sorted(found, key=lambda vr: vr[0], reverse=goal.op.startswith("<"))
  value, row = worst_first[0] if goal.over == "each" else worst_first[-1]
  ok = all(met) if goal.over == "each" else any(met)
  at = " ".join(f"{k}={fmt(row[k])}" for k in keys if k in row)
  measured = (f"{'worst' if goal.over == 'each' else 'best'} {fmt(value)}"
              + (f" ({at})" if at else "") + f"; {sum(met)} of {len(met)} rows met")
  return Verdict(goal, "met" if ok else "missed", measured)


def goals_section(goals: Sequence[Goal], rows: Sequence[dict], keys: Sequence[str] = ()) -> str:
  """A markdown "Goals" section: each goal, its target, what was measured and the verdict."""
  if not goals:
    return ""
  table = [dict(goal=v.goal.description, target=f"{v.goal.column} {v.goal.op} "
                f"{fmt(v.goal.threshold)}", measured=v.measured, verdict=v.verdict)
           for v in (evaluate(g, rows, keys) for g in goals)]
  return "## Goals\n\n" + markdown_table(table)


def write_results(out_dir: str, name: str, rows: Sequence[dict], env: dict[str, str],
                  title: str, notes: str = "", goals_md: str = "") -> tuple[str, str]:
  """Writes `{name}.csv` and `{name}.md` under out_dir; returns their paths.

  goals_md: the markdown `goals_section` of the rows, appended after the notes.
  """
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
    if goals_md:
      f.write("\n" + goals_md)
  logging.info("wrote %s and %s", csv_path, md_path)
  return csv_path, md_path
