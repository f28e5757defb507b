"""unique_attention: paged ragged decode vs JAX's Pallas paged_attention and XLA, in TB/s.

One layer of Llama-3.1-8B heads (Hq=32, Hkv=8, D=128), bf16, T=1. For each unique length L, page
size and batch B, request lengths are uniform in [L/2, L] and their pages are shuffled in one pool.
The same process times: our `unique_attention` (heuristic tiling, plus a small sweep with
--unique_sweep); JAX's Pallas GPU `paged_attention` (its [Hkv, P, page_size, D] layout built once
outside the timing; errors are recorded); an XLA gather + einsum attention. Achieved bandwidth is
the bytes of the valid K/V tokens over the time, reported as a fraction of the copy bandwidth
measured in the same run. Pools smaller than --unique_rotate_mb are replicated and the calls
rotate over the copies, so the timing reads HBM, not L2.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common, report, timing
from experiments.report import plan_note
import pallas_kernels as pk
from pallas_kernels import unique_attention
from pallas_kernels.reference import unique_attention_ref

flags.DEFINE_list("unique_lengths", ["4096", "65536"], "unique_attention: L values (max length).")
flags.DEFINE_list("unique_batches", ["1", "8", "64"], "unique_attention: B values.")
flags.DEFINE_list("unique_page_sizes", ["16", "64"], "unique_attention: page sizes.")
flags.DEFINE_list("unique_baselines", ["paged", "xla"],
                  "unique_attention: baselines to time (paged, xla).")
flags.DEFINE_boolean("unique_sweep", False, "unique_attention: also time alternative tilings.")
flags.DEFINE_integer("unique_heads", 32, "unique_attention: Hq.")
flags.DEFINE_integer("unique_kv_heads", 8, "unique_attention: Hkv.")
flags.DEFINE_integer("unique_head_dim", 128, "unique_attention: D.")
flags.DEFINE_float("unique_xla_max_gb", 24.0,
                   "unique_attention: skip XLA when its gathered K/V would exceed this (GB).")
flags.DEFINE_integer("unique_rotate_mb", 512,
                     "unique_attention: replicate smaller pools to this size and rotate over the "
                     "copies so timings read HBM, not L2 (not on CPU).")
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
      q=jax.random.normal(kq, (B, 1, Hq, D), dtype),
      k_pages=jax.random.normal(kk, (P, page_size, Hkv, D), dtype),
      v_pages=jax.random.normal(kv, (P, page_size, Hkv, D), dtype),
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


def check_correctness(key) -> float:
  """Relative error of our kernel vs the f32 reference on a small ragged bf16 problem."""
  rng = np.random.default_rng(1)
  p = make_problem(key, 5, 1000, 16, (32, 8, 128), jnp.bfloat16, 0, rng)
  args = (p.q, p.k_pages, p.v_pages, p.tables[0], p.lengths)
  o, lse = jax.jit(lambda *a: unique_attention(*a, backend=FLAGS.backend))(*args)
  o_ref, lse_ref = unique_attention_ref(*args)
  err, lse_err = rel_err(o, o_ref), float(jnp.max(jnp.abs(lse - lse_ref)))
  logging.info("correctness: rel err o %.2e, max abs err lse %.2e", err, lse_err)
  if not (err < 2e-2 and lse_err < 2e-2):
    raise RuntimeError(f"unique_attention disagrees with the reference: {err=} {lse_err=}")
  return err


def main() -> None:
  env = common.environment()
  dims3 = (FLAGS.unique_heads, FLAGS.unique_kv_heads, FLAGS.unique_head_dim)
  Hq, Hkv, D = dims3
  dtype = jnp.dtype(FLAGS.dtype)
  ceil = timing.measure_ceilings()
  copy_bw = ceil.copy_bytes_per_s
  logging.info("ceilings: copy %.2f TB/s", copy_bw / 1e12)
  err = check_correctness(jax.random.key(FLAGS.seed + 1)) if FLAGS.backend != "xla" else 0.0
  on_gpu = jax.default_backend() == "gpu"
  rotate_bytes = FLAGS.unique_rotate_mb << 20 if jax.default_backend() != "cpu" else 0
  rng = np.random.default_rng(FLAGS.seed)
  key = jax.random.key(FLAGS.seed)
  rows, summary = [], []
  for L, page_size, B in itertools.product(map(int, FLAGS.unique_lengths),
                                           map(int, FLAGS.unique_page_sizes),
                                           map(int, FLAGS.unique_batches)):
    sub, key = jax.random.split(key)
    p = make_problem(sub, B, L, page_size, dims3, dtype, rotate_bytes, rng)
    times: dict[str, float] = {}
    outs: dict[str, jax.Array] = {}

    def record(impl, fn, k_pages, v_pages, note="") -> float:
      """Times fn rotating over the table copies; records and returns the time (nan: error)."""
      rot = itertools.cycle(p.tables)
      call = lambda: fn(p.q, k_pages, v_pages, next(rot), p.lengths)  # noqa: E731
      try:
        seconds = timing.time_fn(call)
        outs.setdefault(impl, fn(p.q, k_pages, v_pages, p.tables[0], p.lengths))  # same pages
      except Exception as e:  # noqa: BLE001  (a baseline that does not run is a result)
        logging.warning("L=%d ps=%d B=%d %s failed: %s", L, page_size, B, impl, e)
        rows.append(dict(L=L, page_size=page_size, B=B, impl=impl, ms=math.nan, tbps=math.nan,
                         frac_copy=math.nan, note=f"error: {type(e).__name__}: {str(e)[:200]}"))
        return math.nan
      times.setdefault(impl, seconds)
      tbps = p.valid_bytes / seconds / 1e12
      rows.append(dict(L=L, page_size=page_size, B=B, impl=impl, ms=seconds * 1e3, tbps=tbps,
                       frac_copy=tbps * 1e12 / copy_bw, note=note))
      logging.info("L=%d ps=%d B=%d %-12s %8.3f ms %6.2f TB/s %.2f of copy %s", L, page_size, B,
                   impl, seconds * 1e3, tbps, tbps * 1e12 / copy_bw, note)
      return seconds

    args = (p.q, p.k_pages, p.v_pages, p.tables[0], p.lengths)
    plans = (pk.sweep if FLAGS.unique_sweep else lambda *a, **k: [pk.plan(*a, **k)])(
        "unique_attention", *args, backend=FLAGS.backend)
    heuristic, best_plan, best = plans[0], plans[0], math.inf
    for plan in plans:
      fn = jax.jit(lambda *a, pl=plan: unique_attention(*a, implementation=pl.implementation,
                                                        config=pl.config)[0])
      t = record("ours" if plan == heuristic else "ours_sweep", fn, p.k_pages, p.v_pages,
                 note=plan_note(plan))
      if t < best:
        best, best_plan = t, plan
    if "paged" in FLAGS.unique_baselines:
      if on_gpu:
        fn, to_layout = paged_baseline()
        kp, vp = to_layout(p.k_pages), to_layout(p.v_pages)
        record("jax_paged", fn, kp, vp)
        del kp, vp
      else:
        rows.append(dict(L=L, page_size=page_size, B=B, impl="jax_paged", ms=math.nan,
                         tbps=math.nan, frac_copy=math.nan, note="skipped: needs a GPU"))
    if "xla" in FLAGS.unique_baselines:
      gathered_gb = 2 * B * L * Hkv * D * dtype.itemsize / 1e9
      if gathered_gb <= FLAGS.unique_xla_max_gb:
        record("xla_gather", jax.jit(xla_paged_attention), p.k_pages, p.v_pages)
    t_ours = times.get("ours", math.nan)
    ref = outs.get("xla_gather")
    summary.append(dict(
        L=L, page_size=page_size, B=B, ours_ms=t_ours * 1e3,
        ours_tbps=p.valid_bytes / t_ours / 1e12,
        ours_frac_copy=p.valid_bytes / t_ours / copy_bw,
        best_frac_copy=p.valid_bytes / best / copy_bw,
        paged_frac_copy=p.valid_bytes / times.get("jax_paged", math.nan) / copy_bw,
        xla_frac_copy=p.valid_bytes / times.get("xla_gather", math.nan) / copy_bw,
        paged_over_ours=times.get("jax_paged", math.nan) / t_ours,
        xla_over_ours=times.get("xla_gather", math.nan) / t_ours,
        err_vs_xla=rel_err(outs["ours"], ref) if ref is not None and "ours" in outs else math.nan,
        heuristic=plan_note(heuristic), best=plan_note(best_plan),
        rotations=len(p.tables)))
    del p
  env["ceilings"] = (f"copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul "
                     f"{ceil.matmul_flops / 1e12:.0f} TFLOP/s, measured in this run")
  env["correctness"] = (f"kernel vs f32 reference (bf16, B=5, L=1000, page 16): rel err {err:.1e}"
                        if FLAGS.backend != "xla" else "skipped (backend xla)")
  notes = ("Bytes = K + V of the valid tokens (lengths uniform in [L/2, L]); frac_copy = achieved "
           "bytes/s over the measured copy bandwidth. Blocks are (pages_per_block, num_splits, "
           "num_warps, num_stages). err_vs_xla: rel. difference of our output and the XLA one.")
  report.write_results(FLAGS.out_dir, "unique_attention_all", rows, env,
                       "unique_attention: every timing", notes=notes)
  report.write_results(FLAGS.out_dir, "unique_attention", summary, env,
                       "unique_attention: ours vs JAX paged_attention and XLA", notes=notes)
  _plot(summary, FLAGS.out_dir)
  print(report.markdown_table([{k: r[k] for k in ("L", "page_size", "B", "ours_ms", "ours_tbps",
                                                   "ours_frac_copy", "paged_frac_copy",
                                                   "xla_frac_copy", "best")} for r in summary]))


def _plot(summary, out_dir) -> None:
  plt = report.pyplot()
  if plt is None:
    return
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
  fig.tight_layout()
  fig.savefig(f"{out_dir}/unique_attention.png", dpi=120)
