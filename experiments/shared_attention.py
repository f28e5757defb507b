"""shared_attention: our kernel vs cuDNN, XLA and per-request paged decode, against the roofline.

One layer of Llama-3.1-8B heads (Hq=32, Hkv=8, D=128), bf16, T=1. For each shared length S and
batch B the same process times: our `shared_attention` (heuristic tiling, plus a small sweep of
tilings with --shared_sweep); `jax.nn.dot_product_attention(implementation="cudnn")` with the
queries stacked as one sequence; an XLA einsum attention; and the per-request baseline of a
prefix-caching server, JAX's Pallas `paged_attention` with every block table pointing at the same
shared pages (it re-reads the shared KV once per request). The ceilings (bf16 matmul rate, copy
bandwidth) are measured in the same run; the floor is max(KV bytes / bandwidth, FLOPs / rate).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import flags, logging

import pallas_kernels as pk
from experiments import common, report, timing
from experiments.report import plan_note
from pallas_kernels import shared_attention
from pallas_kernels.reference import shared_attention_ref

flags.DEFINE_list("shared_lengths", ["131072", "1048576"], "shared_attention: S values.")
flags.DEFINE_list("shared_batches", ["1", "8", "32", "128", "512"], "shared_attention: B values.")
flags.DEFINE_list("shared_baselines", ["cudnn", "xla", "paged"],
                  "shared_attention: baselines to time (cudnn, xla, paged).")
flags.DEFINE_boolean("shared_sweep", False, "shared_attention: also time alternative tilings.")
flags.DEFINE_integer("shared_heads", 32, "shared_attention: Hq.")
flags.DEFINE_integer("shared_kv_heads", 8, "shared_attention: Hkv.")
flags.DEFINE_integer("shared_head_dim", 128, "shared_attention: D.")
flags.DEFINE_float("shared_xla_max_gb", 16.0, "shared_attention: skip XLA above this score size.")
FLAGS = flags.FLAGS


def xla_attention(q, k, v):
  """Plain XLA attention with the queries of all requests stacked (bf16 operands, f32 softmax)."""
  B, T, Hq, D = q.shape
  Hkv = k.shape[1]
  qg = q.reshape(B * T, Hkv, Hq // Hkv, D)
  s = jnp.einsum("mhgd,shd->mhgs", qg, k, preferred_element_type=jnp.float32) * D**-0.5
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("mhgs,shd->mhgd", p, v).reshape(q.shape)


def cudnn_attention(q, k, v):
  """cuDNN flash attention, the B*T queries as one sequence against the shared K/V."""
  B, T, Hq, D = q.shape
  o = jax.nn.dot_product_attention(q.reshape(1, B * T, Hq, D), k[None], v[None],
                                   implementation="cudnn")
  return o.reshape(q.shape)


def paged_baseline(page_size: int = 16):
  """Per-request paged decode (JAX Pallas op) with every request's table on the shared pages."""
  from jax.experimental.pallas.ops.gpu import paged_attention as pa

  def run(q, k_pages, v_pages, tables, lengths):
    return pa.paged_attention(q[:, 0], k_pages, v_pages, tables, lengths, block_h=16,
                              pages_per_compute_block=8, k_splits=16)

  def pages(k):  # [S, Hkv, D] -> [Hkv, S / page_size, page_size, D], built once outside timing
    S, Hkv, D = k.shape
    return k.reshape(S // page_size, page_size, Hkv, D).transpose(2, 0, 1, 3)

  return jax.jit(run), pages


def check_correctness(key) -> float:
  """Relative error of the GPU kernel vs the f32 reference on a ragged bf16 problem."""
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (17, 1, 32, 128), jnp.bfloat16)
  k = jax.random.normal(kk, (4097, 8, 128), jnp.bfloat16)
  v = jax.random.normal(kv, (4097, 8, 128), jnp.bfloat16)
  o, lse = jax.jit(lambda q, k, v: shared_attention(q, k, v, kv_length=4000))(q, k, v)
  o_ref, lse_ref = shared_attention_ref(q, k, v, kv_length=4000)
  err = float(jnp.linalg.norm((o.astype(jnp.float32) - o_ref.astype(jnp.float32)))
              / jnp.linalg.norm(o_ref.astype(jnp.float32)))
  lse_err = float(jnp.max(jnp.abs(lse - lse_ref)))
  logging.info("correctness: rel err o %.2e, max abs err lse %.2e", err, lse_err)
  if not (err < 2e-2 and lse_err < 2e-2):
    raise RuntimeError(f"GPU kernel disagrees with the reference: {err=} {lse_err=}")
  return err


def main() -> None:
  env = common.environment()
  Hq, Hkv, D = FLAGS.shared_heads, FLAGS.shared_kv_heads, FLAGS.shared_head_dim
  dtype = jnp.dtype(FLAGS.dtype)
  ceil = timing.measure_ceilings()
  logging.info("ceilings: matmul %.0f TFLOP/s, copy %.2f TB/s", ceil.matmul_flops / 1e12,
               ceil.copy_bytes_per_s / 1e12)
  err = check_correctness(jax.random.key(FLAGS.seed + 1)) if FLAGS.backend != "xla" else 0.0
  rows, summary = [], []
  key = jax.random.key(FLAGS.seed)
  for S in map(int, FLAGS.shared_lengths):
    kk, kv, key = jax.random.split(key, 3)
    k = jax.random.normal(kk, (S, Hkv, D), dtype)
    v = jax.random.normal(kv, (S, Hkv, D), dtype)
    kv_bytes = 2 * k.nbytes
    paged = None
    if "paged" in FLAGS.shared_baselines:
      paged_fn, to_pages = paged_baseline()
      paged = paged_fn, to_pages(k), to_pages(v)
    for B in map(int, FLAGS.shared_batches):
      kq, key = jax.random.split(key)
      q = jax.random.normal(kq, (B, 1, Hq, D), dtype)
      flops = 4.0 * B * Hq * S * D
      floor = ceil.floor_s(flops, kv_bytes)
      times: dict[str, float] = {}

      def record(impl, seconds, note=""):
        times[impl] = seconds
        rows.append(dict(S=S, B=B, impl=impl, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                         tbps=kv_bytes / seconds / 1e12, floor_ms=floor * 1e3,
                         x_floor=seconds / floor, note=note))
        logging.info("S=%d B=%d %-28s %8.3f ms  %.2fx floor", S, B, impl, seconds * 1e3,
                     seconds / floor)

      plans = (pk.sweep if FLAGS.shared_sweep else lambda *a, **k: [pk.plan(*a, **k)])(
          "shared_attention", q, k, v, backend=FLAGS.backend)
      heuristic, best_plan, best = plans[0], plans[0], math.inf
      for plan in plans:
        fn = jax.jit(lambda q, k, v, p=plan: shared_attention(
            q, k, v, implementation=p.implementation, config=p.config)[0])
        try:
          t = timing.time_fn(fn, q, k, v)
        except Exception as e:  # a sweep candidate may not compile (e.g. shared memory)
          logging.warning("plan %s failed: %s", plan, str(e).splitlines()[-1][:200])
          continue
        record("ours" if plan == heuristic else "ours_sweep", t, note=plan_note(plan))
        if t < best:
          best, best_plan = t, plan
      t_heur = times["ours"]
      if "cudnn" in FLAGS.shared_baselines:
        record("cudnn", timing.time_fn(jax.jit(cudnn_attention), q, k, v))
      if "xla" in FLAGS.shared_baselines:
        score_gb = B * Hq * S * 4 / 1e9
        if score_gb <= FLAGS.shared_xla_max_gb:
          record("xla_einsum", timing.time_fn(jax.jit(xla_attention), q, k, v))
      if paged is not None:
        fn, kp, vp = paged
        page_size = kp.shape[2]
        tables = jnp.broadcast_to(jnp.arange(S // page_size, dtype=jnp.int32), (B, S // page_size))
        lengths = jnp.full((B,), S, jnp.int32)
        record("paged_per_request", timing.time_fn(fn, q, kp, vp, tables, lengths))
      summary.append(dict(
          S=S, B=B, ours_ms=t_heur * 1e3, best_ms=best * 1e3, floor_ms=floor * 1e3,
          ours_x_floor=t_heur / floor, best_x_floor=best / floor,
          tflops=flops / t_heur / 1e12, tbps=kv_bytes / t_heur / 1e12,
          cudnn_over_ours=times.get("cudnn", math.nan) / t_heur,
          xla_over_ours=times.get("xla_einsum", math.nan) / t_heur,
          paged_over_ours=times.get("paged_per_request", math.nan) / t_heur,
          heuristic=plan_note(heuristic), best=plan_note(best_plan)))
  env["ceilings"] = (f"bf16 matmul {ceil.matmul_flops / 1e12:.0f} TFLOP/s, copy "
                     f"{ceil.copy_bytes_per_s / 1e12:.2f} TB/s (read+write), measured in this run")
  env["correctness"] = f"GPU kernel vs f32 reference (bf16, B=17, S=4097, kv_length=4000): rel err {err:.1e}"
  report.write_results(FLAGS.out_dir, "shared_attention_all", rows, env,
                       "shared_attention: every timing")
  report.write_results(FLAGS.out_dir, "shared_attention", summary, env,
                       "shared_attention: ours vs baselines and the roofline floor",
                       notes="heuristic / best: the implementation and its config. "
                             "x_floor = time / max(KV bytes / copy BW, FLOPs / matmul rate).")
  _plot(summary, FLAGS.out_dir)
  print(report.markdown_table([{k: r[k] for k in ("S", "B", "ours_ms", "best_ms", "floor_ms",
                                                   "best_x_floor", "cudnn_over_ours",
                                                   "paged_over_ours", "best")} for r in summary]))


def _plot(summary, out_dir) -> None:
  plt = report.pyplot()
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for S in sorted({r["S"] for r in summary}):
    rs = [r for r in summary if r["S"] == S]
    ax.plot([r["B"] for r in rs], [r["best_x_floor"] for r in rs], "o-", label=f"ours, S={S}")
    ax.plot([r["B"] for r in rs], [r["best_x_floor"] * r["cudnn_over_ours"] for r in rs], "s--",
            label=f"cuDNN, S={S}")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set(xscale="log", yscale="log", xlabel="B (requests)", ylabel="time / roofline floor",
         title="shared_attention vs the roofline floor")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(f"{out_dir}/shared_attention.png", dpi=120)
