"""sparse_attention: routed chunk attention (router + grouped kernel) vs dense shared attention.

One layer of --shape heads (default Llama-3.1-8B: Hq=32, Hkv=8, D=128), bf16, T=1, shared length
S. For each chunk size C, batch B, sparsity (1 - K/N) and routing regime, the same process times
the router (`moska_jax.routing.route` on --sparse_summary summaries),
`pallas_kernels.chunk_attention` on the routed ids (its default plan), and the dense
`pallas_kernels.shared_attention` over all of S; it reports the union coverage (fraction of
(kv head, chunk) tiles some request chose, i.e. of the shared KV read) and the ratio to the floor
max(bytes of the selected union / read bandwidth, sparse FLOPs / matmul rate), with the ceilings
measured in the same run. Regimes: "correlated" (each request's queries are one of
--sparse_topics topic vectors plus noise, so the batch's chunks concentrate) and "uniform"
(independent random queries: at large B the union covers nearly every chunk).
"""


from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags, logging

import pallas_kernels as pk
from experiments import harness, timing
from experiments.report import plan_note
from moska_jax import routing
from pallas_kernels import chunk_attention, shared_attention
from pallas_kernels.grouping import selected_chunks
from pallas_kernels.reference import chunk_attention_ref

flags.DEFINE_integer("sparse_length", 1048576, "sparse_attention: shared tokens S.")
flags.DEFINE_list("sparse_chunks", ["512", "128", "2048"], "sparse_attention: chunk sizes C.")
flags.DEFINE_list("sparse_batches", ["8", "128", "512"], "sparse_attention: B values.")
flags.DEFINE_list("sparse_sparsities", ["0.75", "0.9"], "sparse_attention: 1 - K/N values.")
flags.DEFINE_list("sparse_regimes", ["correlated", "uniform"], "sparse_attention: routing regimes.")
flags.DEFINE_integer("sparse_topics", 2, "sparse_attention: topics of the correlated regime.")
flags.DEFINE_float("sparse_topic_noise", 0.05,
                   "sparse_attention: query noise around its topic vector (correlated regime).")
flags.DEFINE_enum("sparse_summary", "mean", list(routing.SUMMARIES), "sparse_attention: summary.")
flags.DEFINE_string("sparse_name", "sparse_attention",
                    "sparse_attention: base name of the CSV/MD/PNG written.")
FLAGS = flags.FLAGS


def make_queries(key, regime: str, B: int, Hq: int, D: int, dtype) -> jax.Array:
  """q[B, 1, Hq, D]: independent (uniform) or topic vector + noise (correlated)."""
  kq, kt, kn = jax.random.split(key, 3)
  if regime == "uniform":
    return jax.random.normal(kq, (B, 1, Hq, D), jnp.float32).astype(dtype)
  centers = jax.random.normal(kq, (FLAGS.sparse_topics, Hq, D), jnp.float32)
  topic = jax.random.randint(kt, (B,), 0, FLAGS.sparse_topics)
  noise = jax.random.normal(kn, (B, Hq, D), jnp.float32) * FLAGS.sparse_topic_noise
  return (centers[topic] + noise)[:, None].astype(dtype)


def main() -> None:
  bench = harness.Bench()
  S = FLAGS.sparse_length
  Hq, Hkv, D = bench.shape.heads
  dtype = jnp.dtype(FLAGS.dtype)
  backend = FLAGS.backend
  kc, ki = jax.random.split(jax.random.key(FLAGS.seed + 1))
  bench.check("chunk kernel vs f32 reference (bf16, B=17, S=4097, C=512, K=3, kv_length=4000)",
              jax.jit(lambda q, k, v, ids: chunk_attention(q, k, v, ids, chunk_size=512,
                                                           kv_length=4000, backend=backend)),
              lambda q, k, v, ids: chunk_attention_ref(q, k, v, ids, chunk_size=512,
                                                       kv_length=4000),
              (*harness.qkv(kc, 17, 4097, bench.shape, jnp.bfloat16),
               harness.random_chunk_ids(ki, 17, Hkv, 9, 3)))
  key, kk, kv = jax.random.split(jax.random.key(FLAGS.seed), 3)
  k = harness.normal(kk, (S, Hkv, D), dtype)
  v = harness.normal(kv, (S, Hkv, D), dtype)
  itemsize = jnp.dtype(dtype).itemsize
  batches = list(map(int, FLAGS.sparse_batches))
  queries = {}  # (regime, B) -> q, shared by every chunk size and sparsity
  for regime in FLAGS.sparse_regimes:
    for B in batches:
      key, kq = jax.random.split(key)
      queries[regime, B] = make_queries(kq, regime, B, Hq, D, dtype)
  dense = {}
  for B in batches:  # dense does not depend on the regime: time it on the first one
    fn = jax.jit(lambda q, k, v: shared_attention(q, k, v, backend=backend)[0])
    dense[B] = timing.time_fn(fn, queries[FLAGS.sparse_regimes[0], B], k, v)
    logging.info("dense B=%d: %.3f ms", B, dense[B] * 1e3)
  table = bench.table(FLAGS.sparse_name,
                      "sparse_attention: router + grouped chunk attention vs dense",
                      keys=("C", "B", "sparsity", "regime"), goals="sparse_attention")
  for C in map(int, FLAGS.sparse_chunks):
    N = -(-S // C)
    summ = jax.jit(lambda k: routing.chunk_summaries(k, C, summary=FLAGS.sparse_summary))(k)
    for sparsity in map(float, FLAGS.sparse_sparsities):
      K = max(1, round((1 - sparsity) * N))
      router = jax.jit(lambda q, s: routing.route(q, s, K))
      for regime in FLAGS.sparse_regimes:
        for B in batches:
          q = queries[regime, B]
          ids = router(q, summ)
          t_route = timing.time_fn(router, q, summ)
          plan = pk.plan("chunk_attention", q, k, v, ids, chunk_size=C, backend=backend)
          t_chunk = timing.time_fn(harness.jit_plan(plan, chunk_size=C), q, k, v, ids)
          union = int(jnp.sum(selected_chunks(ids, N).any(axis=0)))  # (kv head, chunk) tiles read
          flops = 4.0 * B * Hq * K * C * D
          floor = bench.ceilings.floor_s(flops, 2.0 * union * C * D * itemsize)
          total = t_route + t_chunk
          table.add(
              C=C, B=B, sparsity=sparsity, regime=regime, K=K, coverage=union / (Hkv * N),
              router_ms=t_route * 1e3, chunk_ms=t_chunk * 1e3, dense_ms=dense[B] * 1e3,
              total_over_dense=total / dense[B], floor_ms=floor * 1e3,
              chunk_x_floor=t_chunk / floor, total_x_floor=total / floor,
              chunk_tflops=flops / t_chunk / 1e12,
              plan=plan_note(plan))
  table.write(notes="coverage = chosen (kv head, chunk) tiles / all tiles (the fraction of the "
                    "shared KV read). floor = max(2 * union tiles * C * D * bytes / read BW, "
                    "4 * B * Hq * K * C * D / matmul rate). total = router + chunk_attention; "
                    "plan = the chunk kernel and its config.", plot=_plot)


def _plot(plt, rows: list[dict]):
  """Router + chunk_attention time over dense time, against B, one panel per chunk size."""
  chunks = sorted({r["C"] for r in rows})
  fig, axes = plt.subplots(1, len(chunks), figsize=(4.5 * len(chunks), 3.6), squeeze=False)
  for ax, C in zip(axes[0], chunks):
    for sp in sorted({r["sparsity"] for r in rows}):
      for regime, style in (("correlated", "o-"), ("uniform", "s--")):
        rs = [r for r in rows if r["C"] == C and r["sparsity"] == sp and r["regime"] == regime]
        if rs:
          ax.plot([r["B"] for r in rs], [r["total_over_dense"] for r in rs], style,
                  label=f"{regime}, {sp:.0%} sparse")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="B (requests)", ylabel="(router + chunk) / dense",
           title=f"chunk size {C}")
    ax.legend(fontsize=7)
  return fig
