"""tune: sweep every plan of each op on this chip and write its tuning table.

For every shape (heads, T, dtype) and B, times each plan `pallas_kernels.sweep` lists (every
candidate config of every implementation of the platform that can run the call; the heuristic's
plan first, planned with any installed table ignored) by what one call adds inside a program
(`timing.time_in_program`: a program of one call would time the host's dispatch, which is
longer than a small-batch kernel) and keeps the fastest, checked against the XLA reference.
Writes the winners as a tuning table for this chip (`pallas_kernels.tuning_table`) to
--out_dir/<chip>.json, and with --tune_install into pallas_kernels/tuning_tables/, where "auto"
finds it; or point $PALLAS_KERNELS_TUNING at the file. The results table says per case the
heuristic's time, the winner's, and the best time of each implementation (where each wins).

On a new GPU: `python -m experiments.run --experiment=tune --tune_install` (on an H200 about 80 s
per (shape, B, op) case, two compiled programs per candidate: half an hour at the defaults). On
a CPU backend there are only XLA plans, nothing to tune: the run stops.
"""

from __future__ import annotations

import math
import os

import jax
from absl import app, flags, logging

from experiments import common, harness, kernels, timing
from experiments.report import plan_note
from pallas_kernels import dispatch, reference, tuning_table

flags.DEFINE_list("tune_ops", list(tuning_table.OPS), "tune: ops to sweep.")
flags.DEFINE_list("tune_shapes", ["llama3_1_8b/1/bfloat16"],
                  "tune: HEADS/T/dtype of each shape (as --kernels_shapes).")
flags.DEFINE_list("tune_batches", [str(1 << i) for i in range(10)], "tune: B values.")
flags.DEFINE_integer("tune_shared", 131072, "tune: shared keys S.", lower_bound=1)
flags.DEFINE_integer("tune_unique", 4096, "tune: unique tokens U per request.", lower_bound=1)
flags.DEFINE_integer("tune_page", 16, "tune: page size of the unique cache.", lower_bound=1)
flags.DEFINE_float("tune_budget_s", 0.3,
                   "tune: seconds of timing per program (two per candidate).", lower_bound=0)
flags.DEFINE_boolean("tune_install", False,
                     "tune: also write the table into pallas_kernels/tuning_tables/.")
common.choices("tune_ops", tuning_table.OPS)
common.validate_items("tune_shapes", kernels.parse_shape, kernels.SHAPE_SPECS)
common.ints("tune_batches")
FLAGS = flags.FLAGS

_REFERENCES = {"shared_attention": reference.shared_attention_ref,
               "unique_attention": reference.unique_attention_ref}


def _time(plan, c: kernels.Case) -> tuple[float, str]:
  fn = harness.jit_plan(plan, **c.static)
  try:
    return timing.time_in_program(fn, *c.args, budget_s=FLAGS.tune_budget_s), ""
  except Exception as e:  # noqa: BLE001  (a candidate that fails is a result)
    return math.nan, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"


def main() -> None:
  import pallas_kernels as pk

  if jax.default_backend() == "cpu":  # no kernel plan to tune: the table would be empty
    raise app.UsageError("tune sweeps the kernel plans of a GPU or TPU; this run's backend is "
                         "cpu (no tuning table to write)")
  bench = harness.Bench(ceilings=False, shape=False)
  chip = jax.devices()[0].device_kind
  bench.env["chip"] = chip
  bench.env["sizes"] = (f"S={FLAGS.tune_shared}, U={FLAGS.tune_unique} (page "
                        f"{FLAGS.tune_page})")
  table = bench.table("tune_" + tuning_table.file_stem(chip),
                      f"tune: the fastest plan of each case on {chip}",
                      keys=("op", "Hq", "Hkv", "D", "T", "dtype", "B"))
  entries = []
  names = [n for op in FLAGS.tune_ops for n in pk.implementations(op) if n != "xla"]
  key = jax.random.key(FLAGS.seed)
  for shape, T, dtype in kernels.parse_shapes(FLAGS.tune_shapes):
    Hq, Hkv, D = shape.heads
    for B in map(int, FLAGS.tune_batches):
      for op in FLAGS.tune_ops:
        key, sub = jax.random.split(key)
        c = kernels.case(op, sub, B, shape, T, dtype, S=FLAGS.tune_shared, U=FLAGS.tune_unique,
                         page_size=FLAGS.tune_page, chunk_size=1, sparsity=0.0)
        with tuning_table.ignored():
          plans = pk.sweep(op, *c.args, backend=FLAGS.backend, **c.static)
        times = [_time(p, c) for p in plans]
        ok = [(t, p) for (t, _), p in zip(times, plans) if not math.isnan(t)]
        row = dict(op=op, Hq=Hq, Hkv=Hkv, D=D, T=T, dtype=dtype.name, B=B,
                   heuristic_ms=times[0][0] * 1e3, heuristic=plan_note(plans[0]))
        for name in dict.fromkeys(names):
          row[f"{name}_ms"] = min((t for t, p in ok if p.implementation == name),
                                  default=math.nan) * 1e3
        failed = sum(math.isnan(t) for t, _ in times)
        if not ok:
          table.add(**row, best_ms=math.nan, x_heuristic=math.nan, best="", o_rel_err=math.nan,
                    failed=failed, error=times[0][1])
          continue
        best_s, best = min(ok, key=lambda tp: tp[0])
        run = jax.jit(lambda *a, best=best, op=op, c=c: getattr(pk, op)(
            *a, implementation=best.implementation, config=best.config, **c.static))
        try:
          err = harness.check_vs_reference(run, _REFERENCES[op], c.args).o_rel_err
        except RuntimeError as e:  # a wrong winner is a finding, never a table entry
          table.add(**row, best_ms=best_s * 1e3, x_heuristic=times[0][0] / best_s,
                    best=plan_note(best), o_rel_err=math.nan, failed=failed, error=str(e)[:200])
          continue
        if best.implementation != "xla":  # a table holds kernel plans
          problem = dispatch.OPS[op].problem(*c.args, **c.static)
          entries.append(tuning_table.entry(op, problem, best.implementation, best.config,
                                            ms=best_s * 1e3, heuristic_ms=times[0][0] * 1e3))
        table.add(**row, best_ms=best_s * 1e3, x_heuristic=times[0][0] / best_s,
                  best=plan_note(best), o_rel_err=err, failed=failed,
                  error="")
  header = dict(jax=jax.__version__, sizes=bench.env["sizes"], date=bench.env.get("date", ""))
  path = os.path.join(FLAGS.out_dir, tuning_table.file_stem(chip) + ".json")
  tuning_table.write(path, chip, entries, **header)
  logging.info("tune: wrote %d entries to %s", len(entries), path)
  if FLAGS.tune_install:
    tuning_table.TABLES_DIR.mkdir(exist_ok=True)
    installed = tuning_table.TABLES_DIR / os.path.basename(path)
    tuning_table.write(installed, chip, entries, **header)
    logging.info("tune: installed %s", installed)
  table.write(notes="heuristic: the plan 'auto' makes without a table; best: the fastest "
                    "candidate of `pallas_kernels.sweep` (what a call adds inside a program, "
                    "`timing.time_in_program`, --tune_budget_s per program); "
                    "<implementation>_ms: the best candidate of that implementation; failed: "
                    "candidates that did not compile or run.")
