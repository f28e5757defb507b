"""shared_attention: our kernel vs cuDNN, XLA and per-request paged decode, against the roofline.

One layer of --shape heads (default Llama-3.1-8B: Hq=32, Hkv=8, D=128), bf16, T=1. For each
shared length S and batch B the same process times: our `shared_attention` (the default plan,
plus every candidate of `pallas_kernels.sweep` with --shared_sweep);
`jax.nn.dot_product_attention(implementation="cudnn")` with the queries stacked as one sequence;
an XLA einsum attention; and the per-request baseline of a prefix-caching server, JAX's Pallas
`paged_attention` with every block table pointing at the same shared pages (it re-reads the
shared KV once per request). A case that fails is a row with its error in `note`. The ceilings
(bf16 matmul rate, streaming read bandwidth) are measured in the same run; the floor is
max(KV bytes / bandwidth, FLOPs / rate).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import flags

from experiments import common, harness
from experiments.report import plan_note
from pallas_kernels import shared_attention
from pallas_kernels.reference import shared_attention_ref

BASELINES = ("cudnn", "xla", "paged")
# The paged baseline's layout: pages of PAGE tokens, split K_SPLITS ways, PAGES_PER_BLOCK pages
# per compute block, so S must be a multiple of their product.
PAGE, K_SPLITS, PAGES_PER_BLOCK = 16, 16, 8
PAGED_MULTIPLE = PAGE * K_SPLITS * PAGES_PER_BLOCK

flags.DEFINE_list("shared_lengths", ["131072", "1048576"], "shared_attention: S values.")
flags.DEFINE_list("shared_batches", ["1", "8", "32", "128", "512"], "shared_attention: B values.")
flags.DEFINE_list("shared_baselines", list(BASELINES),
                  f"shared_attention: baselines to time ({', '.join(BASELINES)}).")
flags.DEFINE_boolean("shared_sweep", False, "shared_attention: also time alternative tilings.")
flags.DEFINE_float("shared_xla_max_gb", 16.0, "shared_attention: skip XLA above this score size.",
                   lower_bound=0)
common.ints("shared_lengths")
common.ints("shared_batches")
common.choices("shared_baselines", BASELINES, empty=True)
common.validate(("shared_lengths", "shared_baselines"),
                lambda f: "paged" not in f["shared_baselines"]
                or all(int(S) % PAGED_MULTIPLE == 0 for S in f["shared_lengths"]),
                f"with the paged baseline every --shared_lengths value must be a multiple of "
                f"{PAGED_MULTIPLE} (pages of {PAGE} x {K_SPLITS} splits x {PAGES_PER_BLOCK} pages "
                "per block)")
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


def paged_baseline():
  """Per-request paged decode (JAX Pallas op) with every request's table on the shared pages."""
  from jax.experimental.pallas.ops.gpu import paged_attention as pa

  def run(q, k_pages, v_pages, tables, lengths):
    return pa.paged_attention(q[:, 0], k_pages, v_pages, tables, lengths, block_h=16,
                              pages_per_compute_block=PAGES_PER_BLOCK, k_splits=K_SPLITS)

  def pages(k):  # [S, Hkv, D] -> [Hkv, S / PAGE, PAGE, D], built once outside timing
    S, Hkv, D = k.shape
    return k.reshape(S // PAGE, PAGE, Hkv, D).transpose(2, 0, 1, 3)

  return jax.jit(run), pages


def main() -> None:
  bench = harness.Bench()
  Hq, Hkv, D = bench.shape.heads
  dtype = jnp.dtype(FLAGS.dtype)
  bench.check("kernel vs f32 reference (bf16, B=17, S=4097, kv_length=4000)",
              jax.jit(lambda q, k, v: shared_attention(q, k, v, kv_length=4000,
                                                       backend=FLAGS.backend)),
              lambda q, k, v: shared_attention_ref(q, k, v, kv_length=4000),
              harness.qkv(jax.random.key(FLAGS.seed + 1), 17, 4097, bench.shape, jnp.bfloat16))
  every = bench.table("shared_attention_all", "shared_attention: every timing",
                      keys=("S", "B", "impl"))
  summary = bench.table("shared_attention",
                        "shared_attention: ours vs baselines and the roofline floor",
                        keys=("S", "B"))
  key = jax.random.key(FLAGS.seed)
  for S in map(int, FLAGS.shared_lengths):
    kk, kv, key = jax.random.split(key, 3)
    k = harness.normal(kk, (S, Hkv, D), dtype)
    v = harness.normal(kv, (S, Hkv, D), dtype)
    kv_bytes = 2 * k.nbytes
    paged = None
    if "paged" in FLAGS.shared_baselines:
      paged_fn, to_pages = paged_baseline()
      paged = paged_fn, to_pages(k), to_pages(v)
    for B in map(int, FLAGS.shared_batches):
      kq, key = jax.random.split(key)
      q = harness.normal(kq, (B, 1, Hq, D), dtype)
      flops = 4.0 * B * Hq * S * D
      floor = bench.ceilings.floor_s(flops, kv_bytes)
      plans = harness.plans("shared_attention", q, k, v, sweep=FLAGS.shared_sweep,
                            backend=FLAGS.backend)
      cases = [("ours" if p == plans[0] else "ours_sweep", plan_note(p), harness.jit_plan(p),
                (q, k, v)) for p in plans]  # (impl, note, fn, args); the plans first
      if "cudnn" in FLAGS.shared_baselines:
        cases.append(("cudnn", "", jax.jit(cudnn_attention), (q, k, v)))
      if "xla" in FLAGS.shared_baselines and B * Hq * S * 4 / 1e9 <= FLAGS.shared_xla_max_gb:
        cases.append(("xla_einsum", "", jax.jit(xla_attention), (q, k, v)))
      if paged is not None:
        fn, kp, vp = paged
        page_size = kp.shape[2]
        tables = jnp.broadcast_to(jnp.arange(S // page_size, dtype=jnp.int32), (B, S // page_size))
        lengths = jnp.full((B,), S, jnp.int32)
        cases.append(("paged_per_request", "", fn, (q, kp, vp, tables, lengths)))
      seconds = []
      for impl, note, fn, args in cases:
        t, error = harness.time_or_error(fn, *args)
        every.add(S=S, B=B, impl=impl, ms=t * 1e3, tflops=flops / t / 1e12,
                  tbps=kv_bytes / t / 1e12, floor_ms=floor * 1e3, x_floor=t / floor,
                  note=f"{note} {error}".strip())
        seconds.append(t)
      times = {impl: t for (impl, *_), t in zip(cases, seconds)}  # "ours_sweep" unused
      t_heur = times["ours"]
      best_plan, best = min(((p, t) for p, t in zip(plans, seconds) if math.isfinite(t)),
                            key=lambda pt: pt[1], default=(plans[0], math.nan))
      summary.add(
          S=S, B=B, ours_ms=t_heur * 1e3, best_ms=best * 1e3, floor_ms=floor * 1e3,
          ours_x_floor=t_heur / floor, best_x_floor=best / floor,
          tflops=flops / t_heur / 1e12, tbps=kv_bytes / t_heur / 1e12,
          cudnn_over_ours=times.get("cudnn", math.nan) / t_heur,
          xla_over_ours=times.get("xla_einsum", math.nan) / t_heur,
          paged_over_ours=times.get("paged_per_request", math.nan) / t_heur,
          heuristic=plan_note(plans[0]), best=plan_note(best_plan))
  every.write(show=False)
  summary.write(notes="heuristic / best: the implementation and its config. "
                      "x_floor = time / max(KV bytes / read BW, FLOPs / matmul rate).",
                plot=_plot, show=("S", "B", "ours_ms", "best_ms", "floor_ms", "best_x_floor",
                                  "cudnn_over_ours", "paged_over_ours", "best"))


def _plot(plt, summary):
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
  return fig
