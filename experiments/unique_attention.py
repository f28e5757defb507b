"""unique_attention: paged ragged decode vs JAX's Pallas paged_attention and XLA, in TB/s.

One layer of --shape heads (default Llama-3.1-8B: Hq=32, Hkv=8, D=128), bf16, T=1. For each
unique length L, page size and batch B, request lengths are uniform in [L/2, L] and their pages
are shuffled in one pool. The same process times: our `unique_attention` (the default plan, plus
every candidate of `pallas_kernels.sweep` with --unique_sweep); JAX's Pallas GPU
`paged_attention` (its [Hkv, P, page_size, D] layout built once outside the timing); an XLA
gather + einsum attention. A case that fails is a row with its error in `note`. Achieved
bandwidth is the bytes of the valid K/V tokens over the time, reported as a fraction of the copy
bandwidth measured in the same run. Pools smaller than --unique_rotate_mb are replicated and the
calls rotate over the copies, so the timing reads HBM, not L2.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, harness
from experiments.report import plan_note
from pallas_kernels import unique_attention
from pallas_kernels.reference import unique_attention_ref

BASELINES = ("paged", "xla")

flags.DEFINE_list("unique_lengths", ["4096", "65536"], "unique_attention: L values (max length).")
flags.DEFINE_list("unique_batches", ["1", "8", "64"], "unique_attention: B values.")
flags.DEFINE_list("unique_page_sizes", ["16", "64"], "unique_attention: page sizes.")
flags.DEFINE_list("unique_baselines", list(BASELINES),
                  f"unique_attention: baselines to time ({', '.join(BASELINES)}).")
flags.DEFINE_boolean("unique_sweep", False, "unique_attention: also time alternative tilings.")
flags.DEFINE_float("unique_xla_max_gb", 24.0,
                   "unique_attention: skip XLA when its gathered K/V would exceed this (GB).",
                   lower_bound=0)
flags.DEFINE_integer("unique_rotate_mb", 512,
                     "unique_attention: replicate smaller pools to this size and rotate over the "
                     "copies so timings read HBM, not L2 (not on CPU).", lower_bound=0)
common.ints("unique_lengths")
common.ints("unique_batches")
common.ints("unique_page_sizes")
common.choices("unique_baselines", BASELINES, empty=True)
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Problem:
  """One benchmark point: q, the pool, `copies` rotations of block tables, ragged lengths."""

  q: jax.Array
  k_pages: jax.Array
  v_pages: jax.Array
  tables: list[jax.Array]
  lengths: jax.Array
  valid_bytes: int  # K + V bytes of the valid tokens of one call


def make_problem(key, B: int, L: int, page_size: int, dims: tuple[int, int, int], dtype,
                 rotate_bytes: int, rng: np.random.Generator) -> Problem:
  """Ragged lengths uniform in [L/2, L]; each rotation owns disjoint, shuffled pages."""
  Hq, Hkv, D = dims
  lengths = rng.integers(L // 2, L + 1, B)
  n_pages = -(-lengths // page_size)
  token_bytes = 2 * Hkv * D * jnp.dtype(dtype).itemsize  # K and V
  valid_bytes = int(lengths.sum()) * token_bytes
  copies = max(1, math.ceil(rotate_bytes / (int(n_pages.sum()) * page_size * token_bytes)))
  P = copies * int(n_pages.sum())
  ids = rng.permutation(P).astype(np.int32)
  max_pages = -(-L // page_size)
  tables = []
  for c in range(copies):
    own = np.split(ids[c * int(n_pages.sum()):(c + 1) * int(n_pages.sum())],
                   np.cumsum(n_pages)[:-1])
    tables.append(jnp.asarray(
        np.stack([np.pad(p, (0, max_pages - len(p))) for p in own]), jnp.int32))
  kq, kk, kv = jax.random.split(key, 3)
  return Problem(
      q=harness.normal(kq, (B, 1, Hq, D), dtype),
      k_pages=harness.normal(kk, (P, page_size, Hkv, D), dtype),
      v_pages=harness.normal(kv, (P, page_size, Hkv, D), dtype),
      tables=tables, lengths=jnp.asarray(lengths, jnp.int32), valid_bytes=valid_bytes)


def xla_paged_attention(q, k_pages, v_pages, tables, lengths):
  """XLA baseline: gather each request's pages, then einsum attention (bf16 in, f32 softmax)."""
  B, _, Hq, D = q.shape
  Hkv = k_pages.shape[2]
  k = k_pages[tables].reshape(B, -1, Hkv, D)
  v = v_pages[tables].reshape(B, -1, Hkv, D)
  qg = q[:, 0].reshape(B, Hkv, Hq // Hkv, D)
  s = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) * D**-0.5
  s = jnp.where(jnp.arange(k.shape[1]) < lengths[:, None, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bhgs,bshd->bhgd", p, v).reshape(B, 1, Hq, D)


def paged_baseline():
  """JAX's Pallas GPU paged_attention with its defaults; pools go to its [Hkv, P, ps, D] layout."""
  from jax.experimental.pallas.ops.gpu import paged_attention as pa

  def run(q, k_pages, v_pages, tables, lengths):
    return pa.paged_attention(q[:, 0], k_pages, v_pages, tables, lengths)[:, None]

  return jax.jit(run), lambda pages: jnp.transpose(pages, (2, 0, 1, 3))


def rel_err(x, ref) -> float:
  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def cases(p: Problem, L: int, plans: list):
  """(impl, note, fn, k_pages, v_pages) to time, in order (fn None: cannot run here). A generator:
  a baseline's copy of the pool in its own layout is freed before the next case is built."""
  for plan in plans:
    yield ("ours" if plan == plans[0] else "ours_sweep", plan_note(plan), harness.jit_plan(plan),
           p.k_pages, p.v_pages)
  if "paged" in FLAGS.unique_baselines:
    if jax.default_backend() == "gpu":
      fn, to_layout = paged_baseline()
      yield "jax_paged", "", fn, to_layout(p.k_pages), to_layout(p.v_pages)
    else:
      yield "jax_paged", "skipped: needs a GPU", None, None, None
  _, _, Hkv, D = p.k_pages.shape
  gathered_gb = 2 * p.q.shape[0] * L * Hkv * D * p.k_pages.dtype.itemsize / 1e9
  if "xla" in FLAGS.unique_baselines and gathered_gb <= FLAGS.unique_xla_max_gb:
    yield "xla_gather", "", jax.jit(xla_paged_attention), p.k_pages, p.v_pages


def main() -> None:
  bench = harness.Bench()
  dtype = jnp.dtype(FLAGS.dtype)
  copy_bw = bench.ceilings.copy_bytes_per_s
  small = make_problem(jax.random.key(FLAGS.seed + 1), 5, 1000, 16, bench.shape.heads,
                       jnp.bfloat16, 0, np.random.default_rng(1))
  bench.check("kernel vs f32 reference (bf16, B=5, L=1000, page 16)",
              jax.jit(lambda *a: unique_attention(*a, backend=FLAGS.backend)),
              unique_attention_ref,
              (small.q, small.k_pages, small.v_pages, small.tables[0], small.lengths))
  rotate_bytes = FLAGS.unique_rotate_mb << 20 if jax.default_backend() != "cpu" else 0
  rng = np.random.default_rng(FLAGS.seed)
  key = jax.random.key(FLAGS.seed)
  every = bench.table("unique_attention_all", "unique_attention: every timing",
                      keys=("L", "page_size", "B", "impl"))
  summary = bench.table("unique_attention", "unique_attention: ours vs JAX paged_attention and XLA",
                        keys=("L", "page_size", "B"))
  for L, page_size, B in itertools.product(map(int, FLAGS.unique_lengths),
                                           map(int, FLAGS.unique_page_sizes),
                                           map(int, FLAGS.unique_batches)):
    sub, key = jax.random.split(key)
    p = make_problem(sub, B, L, page_size, bench.shape.heads, dtype, rotate_bytes, rng)
    plans = harness.plans("unique_attention", p.q, p.k_pages, p.v_pages, p.tables[0], p.lengths,
                          sweep=FLAGS.unique_sweep, backend=FLAGS.backend)
    timed, outs = [], {}  # (impl, seconds) in order; impl -> output on the first table
    for impl, note, fn, kp, vp in cases(p, L, plans):
      t, error = math.nan, ""
      if fn is not None:
        rot = itertools.cycle(p.tables)  # calls rotate over the table copies
        t, error = harness.time_or_error(lambda: fn(p.q, kp, vp, next(rot), p.lengths))
        if not error:
          outs.setdefault(impl, fn(p.q, kp, vp, p.tables[0], p.lengths))
      tbps = p.valid_bytes / t / 1e12
      every.add(L=L, page_size=page_size, B=B, impl=impl, ms=t * 1e3, tbps=tbps,
                frac_copy=tbps * 1e12 / copy_bw, note=f"{note} {error}".strip())
      timed.append((impl, t))
    times = dict(timed)  # "ours_sweep" unused
    t_ours = times["ours"]
    best_plan, best = min(((pl, t) for pl, (_, t) in zip(plans, timed) if math.isfinite(t)),
                          key=lambda pt: pt[1], default=(plans[0], math.nan))
    ref = outs.get("xla_gather")
    summary.add(
        L=L, page_size=page_size, B=B, ours_ms=t_ours * 1e3,
        ours_tbps=p.valid_bytes / t_ours / 1e12,
        ours_frac_copy=p.valid_bytes / t_ours / copy_bw,
        best_frac_copy=p.valid_bytes / best / copy_bw,
        paged_frac_copy=p.valid_bytes / times.get("jax_paged", math.nan) / copy_bw,
        xla_frac_copy=p.valid_bytes / times.get("xla_gather", math.nan) / copy_bw,
        paged_over_ours=times.get("jax_paged", math.nan) / t_ours,
        xla_over_ours=times.get("xla_gather", math.nan) / t_ours,
        err_vs_xla=rel_err(outs["ours"], ref) if ref is not None and "ours" in outs else math.nan,
        heuristic=plan_note(plans[0]), best=plan_note(best_plan),
        rotations=len(p.tables))
    del p
  notes = ("Bytes = K + V of the valid tokens (lengths uniform in [L/2, L]); frac_copy = achieved "
           "bytes/s over the measured copy bandwidth. heuristic / best: the implementation and "
           "its config. err_vs_xla: rel. difference of our output and the XLA one.")
  every.write(notes=notes, show=False)
  summary.write(notes=notes, plot=_plot,
                show=("L", "page_size", "B", "ours_ms", "ours_tbps", "ours_frac_copy",
                      "paged_frac_copy", "xla_frac_copy", "best"))


def _plot(plt, summary):
  fig, ax = plt.subplots(figsize=(6, 4))
  for L, ps in sorted({(r["L"], r["page_size"]) for r in summary}):
    rs = [r for r in summary if (r["L"], r["page_size"]) == (L, ps)]
    line, = ax.plot([r["B"] for r in rs], [r["ours_frac_copy"] for r in rs], "o-",
                    label=f"ours, L={L}, page {ps}")
    ax.plot([r["B"] for r in rs], [r["paged_frac_copy"] for r in rs], "s--", color=line.get_color(),
            label=f"JAX paged, L={L}, page {ps}")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set(xscale="log", xlabel="B (requests)", ylabel="achieved / copy bandwidth",
         title="unique_attention: bandwidth of the valid K/V pages")
  ax.legend(fontsize=6)
  return fig
