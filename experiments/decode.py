"""decode: MoSKA decode tokens/s (dense, sparse) vs per-request paged decode over shared pages.

Llama-3.1-8B shapes with RANDOM weights (throughput does not depend on them), bf16, a shared
store of S tokens and a unique context of U tokens per request, B requests decoding together.
The baseline is what a prefix-caching server runs: every request attends over its own
[shared + unique] pages with a paged decode kernel (`unique_attention`), its block table pointing
at the one copy of the shared pages, so the shared KV is read once per request. The model's
layer count is a flag (the full 32 layers of KV do not fit one GPU next to the baseline's pool);
times are per step of that many layers and per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags, logging
from flax import nnx

import pallas_kernels as pk
from experiments import harness, timing
from moska_jax import routing
from moska_jax.attention import SharedLayer
from moska_jax.config import MoskaConfig, llama3_1_8b, tiny
from moska_jax.model import Decoder
from moska_jax.step import Part, SharedContext, moska_step

flags.DEFINE_enum("decode_model", "llama3_1_8b", ["llama3_1_8b", "tiny"], "decode: shapes.")
flags.DEFINE_integer("decode_layers", 1, "decode: decoder layers built (per-layer times reported).")
flags.DEFINE_integer("decode_shared", 262144, "decode: shared tokens S.")
flags.DEFINE_integer("decode_unique", 4096, "decode: unique tokens U per request.")
flags.DEFINE_list("decode_batches", ["16", "64"], "decode: B values.")
flags.DEFINE_integer("decode_chunk", 2048, "decode: routing chunk size of the sparse run.")
flags.DEFINE_float("decode_sparsity", 0.75, "decode: sparsity of the sparse run.")
flags.DEFINE_integer("decode_page", 64, "decode: page size.")
FLAGS = flags.FLAGS


def _random_kv(key, n, cfg, dtype):
  return jax.random.normal(key, (n, cfg.num_kv_heads, cfg.head_dim), dtype)


def main() -> None:
  bench = harness.Bench(ceilings=False, shape=False)
  table = bench.table("decode", "decode: MoSKA vs per-request paged decode over shared pages",
                      keys=("B", "impl"))
  dtype = jnp.dtype(FLAGS.dtype)
  make = llama3_1_8b if FLAGS.decode_model == "llama3_1_8b" else tiny
  cfg = make(dtype=FLAGS.dtype, layers=FLAGS.decode_layers)
  model = Decoder(cfg, rngs=nnx.Rngs(FLAGS.seed))
  graphdef, state = nnx.split(model)
  S, U, ps, C = FLAGS.decode_shared, FLAGS.decode_unique, FLAGS.decode_page, FLAGS.decode_chunk
  key = jax.random.key(FLAGS.seed)
  # Random shared K/V per layer (RoPE'd keys are just numbers to the kernels).
  shared = []
  for i in range(cfg.layers):
    key, kk, kv = jax.random.split(key, 3)
    k, v = _random_kv(kk, S, cfg, dtype), _random_kv(kv, S, cfg, dtype)
    shared.append(SharedLayer(k, v, routing.chunk_summaries(k, C), jnp.int32(S)))
  for B in map(int, FLAGS.decode_batches):
    pages_per_req = U // ps + 1  # room for the token written this step
    P_u = B * pages_per_req + 1  # + the scratch page 0
    unique_pools = []
    for i in range(cfg.layers):
      key, kk, kv = jax.random.split(key, 3)
      unique_pools.append((jax.random.normal(kk, (P_u, ps, cfg.num_kv_heads, cfg.head_dim), dtype),
                           jax.random.normal(kv, (P_u, ps, cfg.num_kv_heads, cfg.head_dim), dtype)))
    unique_pools = tuple(unique_pools)  # the decoder returns its state as a tuple
    tables = 1 + jnp.arange(B * pages_per_req, dtype=jnp.int32).reshape(B, pages_per_req)
    lengths = jnp.full((B,), U - 1, jnp.int32)  # one token is added by the step
    tokens = jax.random.randint(key, (B, 1), 0, cfg.vocab)

    def step(state, pools, shared, mcfg):
      top_k = mcfg.chunks_kept(-(-S // C)) if mcfg.mode == "sparse" else None
      part = Part(tokens, tables, lengths, jnp.ones((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
      (logits,), pools, _ = moska_step(nnx.merge(graphdef, state),
                                       (SharedContext(tuple(shared), top_k),), pools, (part,), mcfg)
      return logits, pools

    # Baseline pools: [shared pages | unique pages] in one pool per layer; a request's table lists
    # the shared pages (the same ids for everyone) then its own.
    n_sp = S // ps
    base_pools = tuple((jnp.concatenate([sh.k.reshape(n_sp, ps, *sh.k.shape[1:]), up[0]]),
                        jnp.concatenate([sh.v.reshape(n_sp, ps, *sh.v.shape[1:]), up[1]]))
                       for sh, up in zip(shared, unique_pools))
    base_tables = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(n_sp, dtype=jnp.int32), (B, n_sp)), n_sp + tables], axis=1)

    def baseline_step(state, pools, shared):
      del shared  # the baseline's pools hold the shared pages
      def attend(i, q, k, v, pages):
        kp, vp = pk.write_pages(*pages, base_tables, S + lengths, k, v)
        return pk.unique_attention(q, kp, vp, base_tables, S + lengths + 1,
                                   backend=FLAGS.backend)[0], (kp, vp)

      return nnx.merge(graphdef, state).forward(tokens, S + lengths[:, None], attend, pools)

    def timed(step, pools):
      """Times a step whose page pools are donated and threaded call to call (in place); the
      store is an argument (closed over, GBs of K/V would be folded into the program)."""
      fn = jax.jit(step, donate_argnums=(1,))
      held = {"pools": pools}

      def call():
        held["logits"], held["pools"] = fn(state, held["pools"], shared)
        return held["logits"]

      return timing.time_fn(call), held["pools"], held["logits"]

    dense = MoskaConfig(backend=FLAGS.backend)
    sparse = MoskaConfig(mode="sparse", sparsity=FLAGS.decode_sparsity, chunk_size=C,
                         backend=FLAGS.backend)
    times, logits = {}, {}
    times["moska_dense"], unique_pools, logits["moska_dense"] = timed(
        lambda st, p, sh: step(st, p, sh, dense), unique_pools)
    times["moska_sparse"], unique_pools, logits["moska_sparse"] = timed(
        lambda st, p, sh: step(st, p, sh, sparse), unique_pools)
    times["baseline_paged"], base_pools, logits["baseline_paged"] = timed(baseline_step,
                                                                          base_pools)
    ref = logits["baseline_paged"]
    for name, t in times.items():
      logging.info("B=%d %s: %.3f ms/step", B, name, t * 1e3)
      table.add(B=B, impl=name, layers=cfg.layers, step_ms=t * 1e3,
                ms_per_layer=t * 1e3 / cfg.layers, tokens_per_s=B / t,
                x_baseline=times["baseline_paged"] / t,
                logits_rel_diff=float(jnp.linalg.norm(logits[name] - ref)
                                      / jnp.linalg.norm(ref)))
    del unique_pools, base_pools
  bench.env["shapes"] = (f"{FLAGS.decode_model} x {cfg.layers} layers (random weights), S={S}, "
                         f"U={U}, page {ps}, chunk {C}, sparsity {FLAGS.decode_sparsity}, "
                         f"{FLAGS.dtype}")
  table.write(notes="x_baseline = baseline step time / this step time (higher is better). "
                    "logits_rel_diff: vs the baseline's logits (dense must agree up to bf16 "
                    "rounding; sparse drops chunks).", plot=_plot)


def _plot(plt, rows: list[dict]):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in ("moska_dense", "moska_sparse", "baseline_paged"):
    rs = [r for r in rows if r["impl"] == name]
    ax.plot([r["B"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=name)
  ax.set(xlabel="B", ylabel="tokens/s", yscale="log", title="decode: tokens/s")
  ax.legend(fontsize=7)
  return fig
