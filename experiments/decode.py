"""decode: MoSKA decode tokens/s (dense, sparse) vs per-request paged decode over shared pages.

Llama-3.1-8B shapes with RANDOM weights (throughput does not depend on them), a shared store of S
tokens and a unique context of U tokens per request, B requests decoding together. K/V are stored
in the model dtype or in float8 (`--decode_kv_dtype`) with one scale per layer and kv head: the
shared store's, which the unique pages reuse (the library's default unique scales are these with
2x headroom, `kv_cache.unique_kv_scales`), so the baseline's one pool per layer has one scale too.
The store is random K/V generated on the device, not a prefill (prefilling S tokens through the
layers is not what this measures); its routing summaries are built from the full-precision keys.
The baseline is what a prefix-caching server runs: every request attends over its own
[shared + unique] pages with a paged decode kernel (`unique_attention`), its block table pointing
at the one copy of the shared pages, so the shared KV is read once per request. MoSKA runs first;
its store and pages then become the baseline's pools (layer by layer, so both never coexist).
The sparse run re-routes every `--decode_reroute` steps: its step time is the mean of one routing
step and r - 1 steps reusing the selection. Each (U, B) that fits the device is written as soon as
it is measured.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import flags, logging
from flax import nnx

import pallas_kernels as pk
from experiments import common, harness, timing
from moska_jax import routing
from moska_jax.attention import SharedLayer
from moska_jax.config import SUMMARY_KINDS, MoskaConfig, llama3_1_8b, tiny
from moska_jax.model import Decoder
from moska_jax.step import Part, Routes, SharedContext, moska_step

flags.DEFINE_enum("decode_model", "llama3_1_8b", ["llama3_1_8b", "tiny"], "decode: shapes.")
flags.DEFINE_integer("decode_layers", 1,
                     "decode: decoder layers built (per-layer times reported).", lower_bound=1)
flags.DEFINE_integer("decode_shared", 262144, "decode: shared tokens S.", lower_bound=1)
flags.DEFINE_list("decode_unique", ["4096"], "decode: unique tokens U per request (each a run).")
flags.DEFINE_list("decode_batches", ["16", "64"], "decode: B values.")
flags.DEFINE_enum("decode_kv_dtype", "model", ["model", *(d.name for d in pk.quant.FP8_DTYPES)],
                  "decode: K/V storage ('model': --dtype; float8: one scale per layer, kv head).")
flags.DEFINE_integer("decode_chunk", 2048, "decode: routing chunk size of the sparse run.",
                     lower_bound=1)
flags.DEFINE_float("decode_sparsity", 0.75, "decode: sparsity of the sparse run.")
flags.DEFINE_enum("decode_summary", "int8-pca2", list(SUMMARY_KINDS), "decode: the sparse router.")
flags.DEFINE_boolean("decode_int8_scorer", False,
                     "decode: sketches scored with int8 query rows on the int8 units.")
flags.DEFINE_integer("decode_reroute", 16, "decode: the sparse run re-routes every r steps.",
                     lower_bound=1)
flags.DEFINE_integer("decode_batch_aware", 0,
                     "decode: requests per batch-aware tile of the sparse run (0: per-request "
                     "chunks; MoskaConfig.batch_aware).", lower_bound=0)
flags.DEFINE_integer("decode_page", 64, "decode: page size.", lower_bound=1)
flags.DEFINE_string("decode_name", "decode", "decode: base name of the files written.")
common.ints("decode_unique")
common.ints("decode_batches")
common.fraction("decode_sparsity")
common.validate(("decode_shared", "decode_page"),
                lambda f: f["decode_shared"] % f["decode_page"] == 0,
                "--decode_shared must be a multiple of --decode_page (the baseline stores the "
                "shared K/V as whole pages)")
FLAGS = flags.FLAGS
_MEASURED = ("step_ms", "ms_per_layer", "tokens_per_s", "x_baseline", "logits_rel_diff",
             "route_ms", "reuse_ms")  # the columns of a measured row


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _shared_layer(key, S: int, cfg, kv_dtype, C: int, summary: str) -> SharedLayer:
  """One layer of random shared K/V [S, Hkv, D] (RoPE'd keys are just numbers to the kernels),
  its routing summaries from the full-precision keys, stored in kv_dtype (None: the model's)."""
  kk, kv = jax.random.split(key)
  k, v = (jax.random.normal(x, (S, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
          for x in (kk, kv))
  summaries = routing.chunk_summaries(k, C, summary=summary)
  if kv_dtype is None:
    return SharedLayer(k, v, summaries, jnp.int32(S))
  (k8, ks), (v8, vs) = pk.quant.quantize(k, kv_dtype), pk.quant.quantize(v, kv_dtype)
  return SharedLayer(k8, v8, summaries, jnp.int32(S), ks, vs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unique_pages(key, shape: tuple[int, ...], cfg, kv_dtype, k_scale, v_scale):
  """Random (k_pages, v_pages) of `shape` in kv_dtype with the given scales (None: the model
  dtype, unscaled)."""
  pages = tuple(jax.random.normal(x, shape, cfg.jnp_dtype) for x in jax.random.split(key))
  if kv_dtype is None:
    return pages
  return tuple(pk.quant.quantize_with(x, sc, kv_dtype) for x, sc in zip(pages, (k_scale, v_scale)))


def _fits(cfg, S: int, pages_shape: tuple[int, ...], kv_dtype, weights_bytes: int) -> str:
  """'' when the store (K/V, scales and routing summaries), the unique pages (K and V pools of
  pages_shape, each layer) and the weights fit the device with a tenth to spare (the step's
  transients and the compiler's autotuning), else why not."""
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  layer = jax.eval_shape(lambda key: _shared_layer(key, S, cfg, kv_dtype, FLAGS.decode_chunk,
                                                   FLAGS.decode_summary), jax.random.key(0))
  itemsize = (kv_dtype or cfg.jnp_dtype).itemsize
  unique = 2 * math.prod(pages_shape) * itemsize
  need = cfg.layers * (_nbytes(layer) + unique) + weights_bytes
  if limit and need > 0.9 * limit:
    return (f"does not fit: {need / 2**30:.0f} GiB of K/V and weights, device {limit / 2**30:.0f} "
            "GiB (XLA_PYTHON_CLIENT_MEM_FRACTION sets the share JAX takes)")
  return ""


def _nbytes(tree) -> int:
  """Bytes of a tree of arrays or of their shapes (`jax.eval_shape`)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _log_memory(what: str) -> None:
  """The device's bytes in use: where a run that should fit runs out, this says which part grew."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_in_use" in stats:
    logging.info("%s: %.1f GiB in use of %.1f GiB", what, stats["bytes_in_use"] / 2**30,
                 stats.get("bytes_limit", 0) / 2**30)


def _timed(step, state, pools, *args):
  """Seconds per call of a jitted step(state, pools, *args) -> (logits, pools) whose page pools
  are donated and threaded call to call (in place), with its last logits and pools. The store is
  an argument: closed over, GBs of K/V would be folded into the program."""
  fn = jax.jit(step, donate_argnums=(1,))
  held = {"pools": pools}

  def call():
    held["logits"], held["pools"] = fn(state, held["pools"], *args)
    return held["logits"]

  return timing.time_fn(call), held["logits"], held["pools"]


def _to_baseline_pools(shared: list[SharedLayer], pools: list, page: int) -> list:
  """Per layer one pool [shared pages | unique pages]; each layer's store and pages are freed as
  soon as its pool is built, so both layouts never coexist."""
  out = []
  for i, (sh, up) in enumerate(zip(shared, pools)):
    n_sp = sh.k.shape[0] // page
    out.append(tuple(jnp.concatenate([x.reshape(n_sp, page, *x.shape[1:]), p])
                     for x, p in zip((sh.k, sh.v), up)))
    for x in (sh.k, sh.v, *up):
      x.delete()
    shared[i] = pools[i] = None
  return out


def main() -> None:
  bench = harness.Bench(ceilings=False, shape=False)
  make = llama3_1_8b if FLAGS.decode_model == "llama3_1_8b" else tiny
  cfg = make(dtype=FLAGS.dtype, layers=FLAGS.decode_layers)
  # The paper's setting (Llama-3.1-8B, all 32 layers, >= 1M shared tokens, float8 K/V) is held
  # to the paper-scale goals whatever the run is named; other runs to their name's.
  paper_scale = (FLAGS.decode_model == "llama3_1_8b" and cfg.layers == 32
                 and FLAGS.decode_shared >= 2**20 and FLAGS.decode_kv_dtype != "model")
  table = bench.table(FLAGS.decode_name,
                      "decode: MoSKA vs per-request paged decode over shared pages",
                      keys=("U", "B", "impl"), goals="paper_scale" if paper_scale else None)
  kv_dtype = None if FLAGS.decode_kv_dtype == "model" else jnp.dtype(FLAGS.decode_kv_dtype)
  kv_name = (kv_dtype or cfg.jnp_dtype).name
  model = Decoder(cfg, rngs=nnx.Rngs(FLAGS.seed))
  graphdef, state = nnx.split(model)
  weights_bytes = _nbytes(state)
  S, ps, C, r = FLAGS.decode_shared, FLAGS.decode_page, FLAGS.decode_chunk, FLAGS.decode_reroute
  Hkv, D = cfg.num_kv_heads, cfg.head_dim
  dense = MoskaConfig(backend=FLAGS.backend)
  sparse = MoskaConfig(mode="sparse", sparsity=FLAGS.decode_sparsity, chunk_size=C,
                       summary=FLAGS.decode_summary,
                       int8_scorer=(FLAGS.decode_int8_scorer
                                    and FLAGS.decode_summary in routing.SKETCH_KINDS),
                       batch_aware=FLAGS.decode_batch_aware, backend=FLAGS.backend)
  top_k = sparse.chunks_kept(-(-S // C))
  key = jax.random.key(FLAGS.seed)
  for U in map(int, FLAGS.decode_unique):
    for B in map(int, FLAGS.decode_batches):
      row = dict(U=U, B=B, S=S, kv_dtype=kv_name, layers=cfg.layers)
      pages_per_req = U // ps + 1  # room for the token written this step
      shape = (B * pages_per_req + 1, ps, Hkv, D)  # + the scratch page 0
      why = _fits(cfg, S, shape, kv_dtype, weights_bytes)
      if why:
        logging.info("U=%d B=%d: %s", U, B, why)
        table.add(impl="all", **row, **{c: math.nan for c in _MEASURED}, note=why)
        _write(bench, table, cfg, kv_name)
        continue
      key, ks, ku, kt = jax.random.split(key, 4)
      shared = [_shared_layer(k, S, cfg, kv_dtype, C, FLAGS.decode_summary)
                for k in jax.random.split(ks, cfg.layers)]
      pools = [_unique_pages(k, shape, cfg, kv_dtype, sh.k_scale, sh.v_scale)
               for k, sh in zip(jax.random.split(ku, cfg.layers), shared)]
      _log_memory(f"U={U} B={B}: store and unique pages built")
      tables = 1 + jnp.arange(B * pages_per_req, dtype=jnp.int32).reshape(B, pages_per_req)
      lengths = jnp.full((B,), U - 1, jnp.int32)  # one token is added by the step
      tokens = jax.random.randint(kt, (B, 1), 0, cfg.vocab)
      part = Part(tokens, tables, lengths, jnp.ones((B,), jnp.int32), jnp.zeros((B,), jnp.int32))

      def step(state, pools, shared, mcfg, routes=None):
        scales = None if kv_dtype is None else tuple((sh.k_scale, sh.v_scale) for sh in shared)
        top = top_k if mcfg.mode == "sparse" else None
        (logits,), pools, ids = moska_step(nnx.merge(graphdef, state),
                                           (SharedContext(tuple(shared), top),), pools, (part,),
                                           mcfg, routes=routes, unique_scales=scales)
        return (logits, ids) if routes is not None else logits, pools

      times, logits, extra = {}, {}, {}
      times["moska_dense"], logits["moska_dense"], pools = _timed(
          functools.partial(step, mcfg=dense), state, pools, shared)
      if r == 1:
        times["moska_sparse"], logits["moska_sparse"], pools = _timed(
            functools.partial(step, mcfg=sparse), state, pools, shared)
      else:  # one routing step, then steps that reuse its selection
        ids = tuple(jnp.full((B, Hkv, top_k), -1, jnp.int32) for _ in range(cfg.layers))
        t_route, (logits["moska_sparse"], ids), pools = _timed(
            lambda st, p, sh, ids: step(st, p, sh, sparse, Routes(ids, jnp.ones((B,), bool), True)),
            state, pools, shared, ids)
        t_reuse, _, pools = _timed(
            lambda st, p, sh, ids: step(st, p, sh, sparse,
                                        Routes(ids, jnp.zeros((B,), bool), False)),
            state, pools, shared, ids)
        times["moska_sparse"] = (t_route + (r - 1) * t_reuse) / r
        extra["moska_sparse"] = dict(route_ms=t_route * 1e3, reuse_ms=t_reuse * 1e3)
      base_scales = (None if kv_dtype is None else
                     [dict(k_scale=sh.k_scale, v_scale=sh.v_scale) for sh in shared])
      n_sp = S // ps
      base_tables = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(n_sp, dtype=jnp.int32), (B, n_sp)), n_sp + tables], axis=1)

      def baseline_step(state, pools):
        def attend(i, q, k, v, pages):
          scales = {} if base_scales is None else base_scales[i]
          kp, vp = pk.write_pages(*pages, base_tables, S + lengths, k, v, **scales)
          return pk.unique_attention(q, kp, vp, base_tables, S + lengths + 1, **scales,
                                     backend=FLAGS.backend)[0], (kp, vp)

        return nnx.merge(graphdef, state).forward(tokens, S + lengths[:, None], attend, pools)

      base_pools = _to_baseline_pools(shared, list(pools), ps)
      del pools
      _log_memory(f"U={U} B={B}: baseline pools built")
      times["baseline_paged"], logits["baseline_paged"], base_pools = _timed(
          baseline_step, state, tuple(base_pools))
      del base_pools
      ref = logits["baseline_paged"]
      for name, t in times.items():
        logging.info("U=%d B=%d %s: %.3f ms/step", U, B, name, t * 1e3)
        measured = dict(step_ms=t * 1e3, ms_per_layer=t * 1e3 / cfg.layers, tokens_per_s=B / t,
                        x_baseline=times["baseline_paged"] / t,
                        logits_rel_diff=float(jnp.linalg.norm(logits[name] - ref)
                                              / jnp.linalg.norm(ref)),
                        **extra.get(name, dict(route_ms=math.nan, reuse_ms=math.nan)))
        table.add(impl=name, **row, **measured, note="")
      _write(bench, table, cfg, kv_name)


def _write(bench, table, cfg, kv_name: str) -> None:
  bench.env["shapes"] = (
      f"{FLAGS.decode_model} x {cfg.layers} layers (random weights), S={FLAGS.decode_shared} "
      f"(random K/V built on the device), page {FLAGS.decode_page}, {FLAGS.dtype} compute, "
      f"K/V {kv_name}; sparse: {FLAGS.decode_summary} router"
      f"{' (int8 scorer)' if FLAGS.decode_int8_scorer else ''}, chunk {FLAGS.decode_chunk}, "
      f"sparsity {FLAGS.decode_sparsity}, re-routing every {FLAGS.decode_reroute} steps"
      + (f", batch-aware tiles of {FLAGS.decode_batch_aware} requests"
         if FLAGS.decode_batch_aware else ""))
  table.write(notes="x_baseline = baseline step time / this step time (higher is better). "
                    "logits_rel_diff: vs the baseline's logits (dense must agree up to "
                    "rounding; sparse drops chunks). moska_sparse step_ms = (route_ms + (r - 1) "
                    "reuse_ms) / r.", plot=_plot)


def _plot(plt, rows: list[dict]):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for U in dict.fromkeys(r["U"] for r in rows):
    for name in ("moska_dense", "moska_sparse", "baseline_paged"):
      rs = [r for r in rows if r["impl"] == name and r["U"] == U]
      ax.plot([r["B"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=f"{name}, U={U}")
  ax.set(xlabel="B", ylabel="tokens/s", yscale="log", title="decode: tokens/s")
  ax.legend(fontsize=7)
  return fig
