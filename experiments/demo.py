"""demo: end-to-end MoSKA on CPU: shared store, save/reload, dense and sparse serving, exactness.

Builds the `tiny` decoder, prefills a shared context of a few thousand tokens into a
SharedKVStore (chunked), saves and reloads it with orbax, serves a batch of requests through the
MoskaEngine with dense and with sparse (routed) shared attention, and checks MoSKA-dense logits
against a plain full-attention decoder over [shared + unique]. It runs in float32 (the exactness
check compares at float32 tolerance): its results header says --dtype=float32, and another
--dtype is an error. It prints the kernels that ran (`pallas_kernels.plans_used()`).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import app, flags
from flax import nnx

import pallas_kernels as pk
from experiments import common, report
from moska_jax.config import MoskaConfig, tiny
from moska_jax.engine import MoskaEngine
from moska_jax.kv_cache import load_shared_store, save_shared_store
from moska_jax.model import Decoder, plain_logits
from moska_jax.prefill import build_shared_store

flags.DEFINE_integer("demo_shared", 3000, "demo: shared-context tokens.", lower_bound=1)
flags.DEFINE_integer("demo_requests", 6, "demo: requests served.", lower_bound=1)
flags.DEFINE_integer("demo_batch", 4, "demo: concurrent requests (engine slots).", lower_bound=1)
flags.DEFINE_integer("demo_new_tokens", 8, "demo: tokens generated per request.", lower_bound=1)
flags.DEFINE_integer("demo_chunk", 256, "demo: routing chunk size.", lower_bound=1)
flags.DEFINE_float("demo_sparsity", 0.75, "demo: sparsity of the sparse run.")
common.fraction("demo_sparsity")
FLAGS = flags.FLAGS

PROMPTS = ["What does the manual say about", "Summarize section", "Q: who wrote", "Translate:",
           "List the steps of", "Find the clause on", "Explain", "Compare"]


def main() -> None:
  if FLAGS["dtype"].present and FLAGS.dtype != "float32":
    raise app.UsageError(f"demo runs float32 (its exactness check compares at float32 "
                         f"tolerance), got --dtype={FLAGS.dtype}")
  env = common.environment(fixed={"dtype": "float32"})
  backend = FLAGS.backend
  cfg = tiny()
  model = Decoder(cfg, rngs=nnx.Rngs(FLAGS.seed))
  shared = np.random.default_rng(FLAGS.seed).integers(0, cfg.vocab, FLAGS.demo_shared)
  store = build_shared_store(model, shared, chunk_size=FLAGS.demo_chunk, backend=backend)
  with tempfile.TemporaryDirectory() as tmp:
    save_shared_store(os.path.join(tmp, "store"), store)
    store = load_shared_store(os.path.join(tmp, "store"), cfg)
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(FLAGS.demo_requests)]
  print(f"moska-jax demo on {env['device']} (jax {env['jax']}): tiny decoder, {cfg.layers} layers, "
        f"Hq={cfg.num_heads}, Hkv={cfg.num_kv_heads}")
  print(f"  shared store: {FLAGS.demo_shared} tokens prefilled in chunks, saved and reloaded "
        f"(orbax); {store.summaries[0].num_chunks} routing chunks of {FLAGS.demo_chunk}")
  rows = []
  for mode, mcfg in (("dense", MoskaConfig(backend=backend)),
                     ("sparse", MoskaConfig(mode="sparse", sparsity=FLAGS.demo_sparsity,
                                            chunk_size=FLAGS.demo_chunk, always_include=(0,),
                                            backend=backend))):
    engine = MoskaEngine(model, store, mcfg, max_batch=FLAGS.demo_batch, num_pages=64,
                         page_size=16, prefill_chunk=16)
    engine.warmup()  # compile every step shape outside the timing
    engine.stats.clear()
    results = engine.generate(prompts, FLAGS.demo_new_tokens, return_logits=(mode == "dense"))
    tok_s = engine.stats["tokens"] / engine.stats["seconds"]
    row = dict(mode=mode, requests=len(prompts), tokens=engine.stats["tokens"],
               tokens_per_s=tok_s, decode_steps=engine.stats["steps_decode"],
               prefill_steps=engine.stats["steps_prefill"], max_logit_diff=float("nan"))
    if mode == "dense":  # MoSKA-dense vs the plain decoder over [shared + unique]
      diffs = []
      for r, ref in zip(results, plain_logits(model, [list(shared) + r.prompt + r.tokens[:-1]
                                                      for r in results])):
        start = len(shared) + len(r.prompt) - 1
        diffs += [np.abs(lg - ref[start + j]).max() for j, lg in enumerate(r.logits)]
      row["max_logit_diff"] = float(max(diffs))
    rows.append(row)
    print(f"  {mode:6s}: {len(prompts)} requests, {FLAGS.demo_batch} at a time -> "
          f"{tok_s:.1f} tokens/s; first reply (random weights, so noise): {results[0].text!r}")
  print(f"  max |logits(MoSKA dense) - logits(plain decoder over shared+unique)| = "
        f"{rows[0]['max_logit_diff']:.2e}")
  kernels = ", ".join(f"{op}: {p.implementation}" for op, p in sorted(pk.plans_used().items()))
  print(f"  kernels that ran (pallas_kernels.plans_used()): {kernels}")
  report.write_results(FLAGS.out_dir, "demo", rows, env, "demo: end-to-end MoSKA on the tiny model")
  print(f"  results: {os.path.join(FLAGS.out_dir, 'demo.md')} (.csv, .png)")
  plt = report.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar([r["mode"] for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set(ylabel="tokens/s", title=f"tiny model, {env['device']}")
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out_dir, "demo.png"), dpi=100)
