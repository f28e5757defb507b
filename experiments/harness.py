"""What every benchmark shares: header, ceilings, a correctness check, tables of rows, the plans.

A benchmark opens a `Bench` (the environment header, the ceilings measured in this run and the
`--shape` heads), checks the code it times against a reference (`Bench.check`), adds rows to one
`Table` per results file and writes each: CSV + markdown (header, notes, the goals of
experiments/goals.py marked met or missed), a PNG drawn by a callback, the table printed:

  bench = harness.Bench()
  Hq, Hkv, D = bench.shape.heads
  fn = jax.jit(functools.partial(pk.shared_attention, backend=FLAGS.backend))
  bench.check("kernel vs reference (B=17, S=4097)", fn, reference.shared_attention_ref,
              harness.qkv(jax.random.key(1), 17, 4097, bench.shape, jnp.bfloat16))
  table = bench.table("shared_attention", "shared_attention: ours vs the floor", keys=("S", "B"))
  for S, B in ...:
    seconds = timing.time_fn(fn, q, k, v)
    table.add(S=S, B=B, ms=seconds * 1e3, x_floor=seconds / bench.ceilings.floor_s(flops, nbytes))
  table.write(notes="x_floor = time / roofline floor.", plot=_plot, show=("S", "B", "ms"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import pallas_kernels as pk
from experiments import common, report, shapes, timing
from experiments.goals import GOALS, Goal

FLAGS = flags.FLAGS


class Agreement(NamedTuple):
  """How far an output is from the reference: relative error of o, max abs error of lse."""

  o_rel_err: float
  lse_max_err: float

  def __str__(self) -> str:
    return f"rel err o {self.o_rel_err:.1e}, max abs err lse {self.lse_max_err:.1e}"


def check_vs_reference(fn: Callable, ref_fn: Callable, args: Sequence, *,
                       tol: float = 2e-2) -> Agreement:
  """Runs fn(*args) and ref_fn(*args) (jitted: a pure-jnp reference runs op by op otherwise),
  each returning (o, lse, ...), and compares them.

  Raises:
    RuntimeError: when the relative error of o or the max abs error of lse is not below tol.
  """
  (o, lse, *_), (o_ref, lse_ref, *_) = fn(*args), jax.jit(ref_fn)(*args)
  o, o_ref = np.asarray(o, np.float32), np.asarray(o_ref, np.float32)
  agreement = Agreement(float(np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref)),
                        float(np.max(np.abs(np.asarray(lse) - np.asarray(lse_ref)))))
  if not (agreement.o_rel_err < tol and agreement.lse_max_err < tol):  # NaN fails too
    raise RuntimeError(f"output disagrees with the reference (tolerance {tol}): {agreement}")
  return agreement


def normal(key, shape: Sequence[int], dtype, sharding=None) -> jax.Array:
  """Standard normal values in dtype, generated where `sharding` puts them (no host copy)."""
  return jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32).astype(dtype),
                 out_shardings=sharding)(key)


def qkv(key, B: int, S: int, shape: shapes.Shape, dtype,
        T: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Random q[B, T, Hq, D] and shared k, v[S, Hkv, D]."""
  Hq, Hkv, D = shape.heads
  kq, kk, kv = jax.random.split(key, 3)
  return (normal(kq, (B, T, Hq, D), dtype), normal(kk, (S, Hkv, D), dtype),
          normal(kv, (S, Hkv, D), dtype))


def random_chunk_ids(key, B: int, Hkv: int, N: int, K: int) -> jax.Array:
  """ids[B, Hkv, K]: K distinct random chunks of N per (request, kv head)."""
  return jax.vmap(lambda k: jax.random.permutation(k, N)[:K])(
      jax.random.split(key, B * Hkv)).reshape(B, Hkv, K).astype(jnp.int32)


def time_or_error(fn: Callable, *args, in_program: bool = False) -> tuple[float, str]:
  """(seconds per call of fn(*args), "") or (nan, the error) when it does not compile or run:
  a case that fails is a result, not the end of the run. in_program: what a call adds inside a
  program (`timing.time_in_program`), else a program of its own per call (`timing.time_fn`)."""
  try:
    return (timing.time_in_program if in_program else timing.time_fn)(fn, *args), ""
  except Exception as e:  # noqa: BLE001
    first = (str(e).strip().splitlines() or [""])[0]
    logging.warning("failed: %s: %s", type(e).__name__, first)
    return math.nan, f"{type(e).__name__}: {first[:200]}"


def plans(op: str, *args, sweep: bool, backend: str, **kwargs) -> list[pk.Plan]:
  """The plan `op(*args, **kwargs)` runs by default, then with `sweep` every other candidate
  pallas_kernels lists for it (`pk.sweep`)."""
  if sweep:
    return pk.sweep(op, *args, backend=backend, **kwargs)
  return [pk.plan(op, *args, backend=backend, **kwargs)]


def jit_plan(plan: pk.Plan, **kwargs) -> Callable:
  """A jitted fn(*args) -> o of `plan.op` that runs exactly this plan; kwargs: the op's other
  static arguments (chunk_size, ...)."""
  op = getattr(pk, plan.op)
  return jax.jit(lambda *args: op(*args, implementation=plan.implementation, config=plan.config,
                                  **kwargs)[0])


class Bench:
  """One run of a benchmark: its environment header, ceilings, shape and output folder.

  ceilings: measure the matmul rates and read / copy bandwidths now (`timing.measure_ceilings`) and
    put them in the header; `self.ceilings` is None without.
  shape: put the `--shape` heads in the header; `self.shape` is the parsed shape either way.
  """

  def __init__(self, *, ceilings: bool = True, shape: bool = True):
    self.env = common.environment()
    self.out_dir = FLAGS.out_dir
    self.shape = common.shape()
    if shape:
      self.env["shape"] = str(self.shape)
    self.ceilings = timing.measure_ceilings() if ceilings else None
    if self.ceilings:
      c = self.ceilings
      self.env["ceilings"] = c.describe()
      logging.info("ceilings: %s", self.env["ceilings"])

  def check(self, what: str, fn: Callable, ref_fn: Callable, args: Sequence, *,
            tol: float = 2e-2) -> Agreement:
    """`check_vs_reference`, logged and put in the header as "correctness: {what}: ..."."""
    agreement = check_vs_reference(fn, ref_fn, args, tol=tol)
    logging.info("correctness: %s: %s", what, agreement)
    self.env["correctness"] = f"{what}: {agreement}"
    return agreement

  def table(self, name: str, title: str, *, keys: Sequence[str] = (),
            goals: str | None = None) -> Table:
    """A results table written as `{name}.csv/.md/.png`; `keys`: the columns naming a row (in
    logs and goal verdicts); `goals`: its key in `GOALS` (default: name)."""
    return Table(self, name, title, keys, GOALS.get(name if goals is None else goals, ()))


class Table:
  """The rows of one results file (see `Bench.table`). `add` logs each row; bulk rows that need
  no log (an analytic sweep) may go straight into `rows`."""

  def __init__(self, bench: Bench, name: str, title: str, keys: Sequence[str],
               goals: Sequence[Goal]):
    self.bench, self.name, self.title, self.keys, self.goals = bench, name, title, keys, goals
    self.rows: list[dict] = []

  def add(self, **row) -> dict:
    """Appends a row (columns in the order given), logs it and returns it."""
    self.rows.append(row)
    logging.info("%s: %s", self.name, " ".join(f"{k}={report.fmt(v)}" for k, v in row.items()))
    return row

  def write(self, *, notes: str = "", plot: Callable | None = None,
            show: bool | Sequence[str] = True) -> None:
    """Writes CSV + markdown (with the goals section); `plot(plt, rows)` returns a figure saved
    as `{name}.png`; prints the `show` columns (True: all) and the goals."""
    goals = report.goals_section(self.goals, self.rows, self.keys)
    report.write_results(self.bench.out_dir, self.name, self.rows, self.bench.env, self.title,
                         notes, goals)
    plt = report.pyplot() if plot is not None else None
    if plt is not None:
      fig = plot(plt, self.rows)
      fig.tight_layout()
      fig.savefig(f"{self.bench.out_dir}/{self.name}.png", dpi=120)
      plt.close(fig)
    if show:
      cols = None if show is True else show
      print(report.markdown_table([{c: r[c] for c in cols or r} for r in self.rows]))
      if goals:
        print(goals)
