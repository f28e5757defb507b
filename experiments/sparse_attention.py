"""sparse_attention: the sparse path's Pareto front, router + routed attention vs dense.

One layer of --shape heads (default Llama-3.1-8B: Hq=32, Hkv=8, D=128), bf16, T=1, shared length
S. For each chunk size C, batch B, sparsity (1 - K/N) and routing regime the same process times
the router (`moska_jax.routing.route` on each of --sparse_summaries; the sketch kinds run the
`chunk_scores` kernel, with int8 query rows too under --sparse_int8), the routed attention on the
first one's ids per (request, chunk) pair (`chunk_attention`) and per tile of alike requests over
the union of their chunks (`--sparse_batch_aware` requests per tile: `routing.batch_aware` +
`tile_chunk_attention`, what `MoskaConfig.batch_aware` runs), and the dense `shared_attention`
over all of S. Each row is one operating point (scorer, reuse r, batch-aware or not): total =
router / r (the selection is kept r decode steps, `MoskaConfig.reroute_every`) + routed
attention. Accuracy comes from the
`accuracy` experiment's CSV (--sparse_accuracy_csv), matched by (scorer, reuse, batch_aware,
sparsity). coverage is the union of chosen (kv head, chunk) tiles over all tiles (the share of the
shared KV read), tile_coverage the mean share one batch-aware tile reads; chunk_x_floor sets the
routed attention against max(bytes / read bandwidth, FLOPs / matmul rate): the union of the
chosen chunks read once, and the products of each pair or of each tile's rows by its listed
chunks, ceilings measured in the same run. Regimes: "correlated" (each request's
queries are one of --sparse_topics topic vectors plus noise, so the batch's chunks concentrate)
and "uniform" (independent random queries: at large B the union covers nearly every chunk).
"""


from __future__ import annotations

import csv
import itertools
import math

import jax
import jax.numpy as jnp
from absl import flags, logging

import pallas_kernels as pk
from experiments import common, harness, timing
from experiments.report import plan_note
from moska_jax import routing
from moska_jax.attention import SharedLayer, routed_attention
from moska_jax.config import MoskaConfig
from pallas_kernels import chunk_attention, shared_attention
from pallas_kernels.grouping import selected_chunks
from pallas_kernels.reference import chunk_attention_ref

REGIMES = ("correlated", "uniform")

flags.DEFINE_integer("sparse_length", 1048576, "sparse_attention: shared tokens S.", lower_bound=1)
flags.DEFINE_list("sparse_chunks", ["512", "128", "2048"], "sparse_attention: chunk sizes C.")
flags.DEFINE_list("sparse_batches", ["8", "128", "512"], "sparse_attention: B values.")
flags.DEFINE_list("sparse_sparsities", ["0.75", "0.9"], "sparse_attention: 1 - K/N values.")
flags.DEFINE_list("sparse_regimes", list(REGIMES),
                  f"sparse_attention: routing regimes ({', '.join(REGIMES)}).")
flags.DEFINE_integer("sparse_topics", 2, "sparse_attention: topics of the correlated regime.",
                     lower_bound=1)
flags.DEFINE_float("sparse_topic_noise", 0.05,
                   "sparse_attention: query noise around its topic vector (correlated regime).",
                   lower_bound=0)
flags.DEFINE_multi_enum("sparse_summaries", ["int8-pca2", "int4"], list(routing.SUMMARIES),
                        "sparse_attention: the routers' summary kinds (the routed attention runs "
                        "on the first one's choice).")
flags.DEFINE_bool("sparse_int8", False,
                  "sparse_attention: also time the sketch kinds with int8 query rows.")
flags.DEFINE_list("sparse_reuse", ["1", "4", "16"],
                  "sparse_attention: re-route every r decode steps (router cost / r).")
flags.DEFINE_list("sparse_batch_aware", ["16"],
                  "sparse_attention: requests per batch-aware tile to time (0 is always timed).")
flags.DEFINE_list("sparse_tile_implementations", [],
                  "sparse_attention: tile_chunk_attention implementations whose kernel alone is "
                  "also timed on each batch-aware row's tiles (column tile_kernel_ms).")
flags.DEFINE_bool("sparse_tile_sweep", False,
                  "sparse_attention: also time every candidate plan of tile_chunk_attention "
                  "(`pallas_kernels.sweep`) on each batch-aware row's tiles (column tile_best).")
flags.DEFINE_list("sparse_accuracy_csv", [],
                  "sparse_attention: accuracy CSVs (mode, scorer, reuse, batch_aware, sparsity, "
                  "acc_over_dense) whose sparse rows to join; a point in several rows keeps its "
                  "lowest accuracy.")
flags.DEFINE_string("sparse_name", "sparse_pareto",
                    "sparse_attention: base name of the CSV/MD/PNG written.")
common.ints("sparse_chunks")
common.ints("sparse_batches")
common.fractions("sparse_sparsities")
common.choices("sparse_regimes", REGIMES)
common.ints("sparse_reuse")
common.ints("sparse_batch_aware", empty=True)  # tile 0 (per-pair chunks) is always timed
common.choices("sparse_tile_implementations", pk.implementations("tile_chunk_attention"),
               empty=True)
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


def _accuracy(paths: list[str]) -> dict[tuple, float]:
  """(scorer, reuse, batch_aware, sparsity) -> accuracy over dense, from the sparse rows of
  accuracy CSVs that match what this experiment times (no forced chunks; K/V in the model's
  dtype, not float8). A point measured in several rows keeps its lowest accuracy: a speed goal
  counts it as accurate only if every measurement of it is."""
  out = {}
  for path in paths:
    with open(path) as f:
      rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for r in rows:
      if (r.get("mode") != "sparse" or r.get("always_include", "-") != "-"
          or any("float8" in r.get(col, "") for col in ("kv_dtype", "unique_kv_dtype"))):
        continue
      acc = float(r.get("acc_over_dense") or "nan")
      if not math.isnan(acc):
        key = (r["scorer"], int(r["reuse"]), int(r["batch_aware"]), float(r["sparsity"]))
        out[key] = min(out.get(key, math.inf), acc)
  return out


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
  accuracy = _accuracy(FLAGS.sparse_accuracy_csv)
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
  table = bench.table(FLAGS.sparse_name, "sparse_attention: the sparse path against dense",
                      keys=("scorer", "reuse", "batch_aware", "chunk", "sparsity", "regime", "B"),
                      goals="sparse_attention")
  kinds = FLAGS.sparse_summaries
  # scorer name (as the accuracy experiment writes it) -> (summary kind, int8 query rows)
  scorers = {f"{kind}{'-int8' if i8 else ''}": (kind, i8) for kind in kinds
             for i8 in ((False, True) if FLAGS.sparse_int8 and kind in routing.SKETCH_KINDS
                        else (False,))}
  tiles = [0, *map(int, FLAGS.sparse_batch_aware)]
  for C in map(int, FLAGS.sparse_chunks):
    N = -(-S // C)
    summ = {kind: jax.block_until_ready(jax.jit(
        lambda k, kind=kind: routing.chunk_summaries(k, C, summary=kind))(k)) for kind in kinds}
    logging.info("C=%d: summaries built", C)
    shared = SharedLayer(k, v, summ[kinds[0]], jnp.int32(S))
    for sparsity in map(float, FLAGS.sparse_sparsities):
      K = max(1, round((1 - sparsity) * N))
      routers = {scorer: jax.jit(lambda q, s, i8=int8: routing.route(q, s, K, int8=i8,
                                                                    backend=backend))
                 for scorer, (_, int8) in scorers.items()}
      for regime in FLAGS.sparse_regimes:
        for B in batches:
          q = queries[regime, B]
          t_route = {}
          for scorer, (kind, int8) in scorers.items():
            t_route[scorer] = timing.time_fn(routers[scorer], q, summ[kind])
            logging.info("C=%d B=%d %s router: %.3f ms", C, B, scorer, t_route[scorer] * 1e3)
          ids = routers[kinds[0]](q, summ[kinds[0]])  # the first kind's bf16-row router
          t_attn, kernels, tile_plans, best, listed, products = {}, {}, {}, {}, {}, {}
          for R in tiles:
            mcfg = MoskaConfig(mode="sparse", top_k=K, chunk_size=C, summary=kinds[0],
                               batch_aware=R, backend=backend)
            # The store is an argument, not a closed-over constant (GBs folded into the program).
            fn = jax.jit(lambda q, ids, shared, m=mcfg: routed_attention(q, shared, ids, m)[0])
            t_attn[R], err = harness.time_or_error(fn, q, ids, shared)
            logging.info("C=%d B=%d batch_aware=%d: %.3f ms %s", C, B, R, t_attn[R] * 1e3, err)
            if R:
              kernels[R], tile_plans[R], best[R], listed[R], products[R] = _tile_kernels(
                  q, ids, shared, N, R, C, backend)
          union = int(jnp.sum(selected_chunks(ids, N).any(axis=0)))  # (kv head, chunk) tiles read
          # Each chosen (kv head, chunk) read once (tiles that list the same chunk may share it
          # through L2); the products: K chunks per request, or each tile's listed chunks for
          # its real requests' rows.
          floor = {R: bench.ceilings.floor_s(
              4.0 * (B * Hq * K if R == 0 else (Hq // Hkv) * products[R]) * C * D,
              2.0 * union * C * D * itemsize) for R in tiles}
          plan = pk.plan("chunk_attention", q, k, v, ids, chunk_size=C, backend=backend)
          for scorer, R, reuse in itertools.product(scorers, tiles,
                                                    map(int, FLAGS.sparse_reuse)):
            total = t_route[scorer] / reuse + t_attn[R]
            table.add(scorer=scorer, reuse=reuse, batch_aware=R, chunk=C, sparsity=sparsity,
                      regime=regime, B=B,
                      acc_over_dense=accuracy.get((scorer, reuse, R, sparsity), math.nan),
                      total_over_dense=total / dense[B], router_ms=t_route[scorer] * 1e3,
                      chunk_ms=t_attn[R] * 1e3, dense_ms=dense[B] * 1e3, K=K,
                      coverage=union / (Hkv * N),
                      tile_coverage=listed[R] / (-(-B // R) * Hkv * N) if R else math.nan,
                      chunk_x_floor=t_attn[R] / floor[R],
                      plan=plan_note(plan) if R == 0 else f"tiles of {R} requests: {tile_plans[R]}",
                      tile_kernel_ms=kernels.get(R, ""), tile_best=best.get(R, ""))
  table.write(notes="total = router / reuse + routed attention (per-pair chunk_attention, or "
                    "batch-aware tiles of `batch_aware` requests); coverage = chosen (kv head, "
                    "chunk) tiles / all tiles; tile_coverage (batch-aware rows) = the mean "
                    "share of the chunks one (tile, kv head) reads. chunk_x_floor = "
                    "chunk_ms / max(bytes / read BW, FLOPs / matmul rate), bytes 2 * union "
                    "tiles * C * D * itemsize (each chosen (kv head, chunk) read once), FLOPs "
                    "4 * B * Hq * K * C * D per pair, 4 * G * C * D * the sum over tiles of "
                    "real requests x listed (kv head, chunk) batch-aware. acc_over_dense: the "
                    "accuracy experiment on the trained retrieval model (its own chunk size), "
                    "NaN where not measured. tile_kernel_ms: tile_chunk_attention alone on "
                    "the row's tiles, per implementation "
                    "(--sparse_tile_implementations); tile_best: the fastest plan of the "
                    "sweep (--sparse_tile_sweep); chunk_ms of batch-aware rows adds the "
                    "tiling (routing.batch_aware) and the reordering of the queries.", plot=_plot)


def _tile_kernels(q, ids, shared: SharedLayer, N: int, R: int, C: int,
                  backend: str) -> tuple[str, str, str, int, int]:
  """tile_chunk_attention alone on the batch-aware tiles of `ids`: ("impl ms; ..." for each of
  --sparse_tile_implementations, the plan "auto" runs, "ms plan" of the sweep's fastest, the
  (tile, kv head, chunk) triples the tiles list, and the sum over tiles of real requests x
  listed (kv head, chunk) pairs: the requests past B that pad the last tile multiply nothing)."""
  order, tile_ids = routing.batch_aware(ids, N, R)
  per_tile = jnp.sum(tile_ids >= 0, axis=(1, 2))
  real = jnp.sum((order < q.shape[0]).reshape(-1, R), axis=1)
  listed, products = int(jnp.sum(per_tile)), int(jnp.sum(per_tile * real))
  q_tiled = jnp.pad(q, ((0, order.shape[0] - q.shape[0]),) + ((0, 0),) * 3)[order]
  args, kwargs = (q_tiled, shared.k, shared.v, tile_ids), dict(chunk_size=C,
                                                                 kv_length=shared.length)

  def time(**how) -> float:
    fn = jax.jit(lambda q, k, v, t: pk.tile_chunk_attention(q, k, v, t, **how, **kwargs)[0])
    t, err = harness.time_or_error(fn, *args)
    logging.info("C=%d batch_aware=%d tile kernel %s: %.3f ms %s", C, R, how, t * 1e3, err)
    return t * 1e3

  timed = "; ".join(f"{impl} {time(implementation=impl):.4g}"
                    for impl in FLAGS.sparse_tile_implementations)
  best = ""
  if FLAGS.sparse_tile_sweep:
    swept = [(time(implementation=p.implementation, config=p.config), plan_note(p))
             for p in pk.sweep("tile_chunk_attention", *args, backend=backend, **kwargs)]
    ms, note = min(swept, key=lambda x: x[0] if math.isfinite(x[0]) else math.inf)
    best = f"{ms:.4g} {note}"
  plan = pk.plan("tile_chunk_attention", *args, backend=backend, **kwargs)
  return timed, plan_note(plan), best, listed, products


def _plot(plt, rows: list[dict]):
  """Accuracy (where measured) or sparsity against time over dense, at each B: the Pareto front."""
  batches = sorted({r["B"] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
  for ax, B in zip(axes[0], batches):
    for regime, marker in (("correlated", "o"), ("uniform", "s")):
      rs = [r for r in rows if r["B"] == B and r["regime"] == regime]
      y = [r["acc_over_dense"] if math.isfinite(r["acc_over_dense"]) else 1 - r["sparsity"]
           for r in rs]
      ax.scatter([r["total_over_dense"] for r in rs], y, marker=marker, s=12, label=regime)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="(router / r + routed attention) / dense",
           ylabel="accuracy over dense (or 1 - sparsity)", title=f"B={B}")
    ax.legend(fontsize=7)
  return fig
