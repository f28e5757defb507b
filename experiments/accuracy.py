"""accuracy: exact-match retrieval accuracy of the trained decoder under sparse routing vs dense.

Loads the checkpoint written by `train_retrieval` (default: the committed one), puts each
document's records in a SharedKVStore, and serves `QUERY key` questions through the MoskaEngine:
dense, then sparse at every (chunk size, summary kind, always_include, sparsity) of the flags.
Routing is per token (`prefill_chunk=1`): the answer is predicted by the step that feeds the key,
whose queries choose the chunks. Beside accuracy it reports how far routing moves the attention
output: for the key token, in every layer, ||o_sparse - o_dense|| / ||o_dense|| with both
computed from the same dense hidden state (errors do not compound across layers).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import pallas_kernels as pk
from experiments import common, harness
from experiments.retrieval import RetrievalTask
from moska_jax import checkpoint, routing
from moska_jax.attention import causal_attention, shared_partial
from moska_jax.config import MoskaConfig
from moska_jax.engine import MoskaEngine
from moska_jax.model import stateless
from moska_jax.prefill import build_shared_store

flags.DEFINE_string("accuracy_checkpoint", common.package_path("checkpoints", "retrieval"),
                    "accuracy: directory written by train_retrieval.")
flags.DEFINE_integer("accuracy_length", 0,
                     "accuracy: document tokens (0: the length the checkpoint was trained at).")
flags.DEFINE_integer("accuracy_docs", 2, "accuracy: documents (one shared store each).")
flags.DEFINE_integer("accuracy_questions", 128, "accuracy: questions per document.")
flags.DEFINE_integer("accuracy_batch", 64, "accuracy: engine slots (concurrent questions).")
flags.DEFINE_list("accuracy_sparsities", ["0.5", "0.75", "0.875", "0.9375"],
                  "accuracy: sparsities of the sparse runs.")
flags.DEFINE_list("accuracy_chunks", ["64", "128", "256"], "accuracy: routing chunk sizes C.")
flags.DEFINE_string("accuracy_name", "accuracy", "accuracy: base name of the CSV/MD/PNG written.")
flags.DEFINE_list("accuracy_summaries", ["mean", "envelope", "int4"],
                  "accuracy: chunk summary kinds.")
flags.DEFINE_list("accuracy_int8_scorer", ["0"],
                  "accuracy: int8 query rows in the int4 scorer (0 and/or 1; int4 configs only).")
flags.DEFINE_list("accuracy_batch_aware", ["0"],
                  "accuracy: requests per batch-aware tile (0: per-request chunks).")
FLAGS = flags.FLAGS


def sparse_configs(backend: str, sparsities: list[float]) -> list[MoskaConfig]:
  """Every (chunk size, summary, sink, sparsity, batch-aware tile) and, for "int4", scorer."""
  return [MoskaConfig(mode="sparse", chunk_size=int(c), sparsity=s, summary=kind,
                      always_include=ai, int8_scorer=i8, batch_aware=int(tile), backend=backend)
          for c in FLAGS.accuracy_chunks for kind in FLAGS.accuracy_summaries
          for i8 in ({bool(int(x)) for x in FLAGS.accuracy_int8_scorer} if kind == "int4"
                     else {False})
          for tile in FLAGS.accuracy_batch_aware
          for ai in ((), (0,)) for s in sparsities]


def scorer_name(mcfg: MoskaConfig) -> str:
  """The router's name in results (the sparse experiment's `scorer` column)."""
  return mcfg.summary + ("-int8" if mcfg.int8_scorer else "")


def attention_errors(model, store, prompts: np.ndarray, configs: list[MoskaConfig],
                     dense: MoskaConfig) -> np.ndarray:
  """Relative error of the key token's attention output, [len(configs), layers, questions].

  All configs share one chunk size and summary kind (the store's). Every layer sees the dense
  hidden state; its unique part is causal attention over the question's own tokens.
  """
  @jax.jit
  def run(store, tokens):
    def attend(i, q, k, v, _):  # layer state out: this layer's errors [configs, questions]
      o_u, lse_u = causal_attention(q, k, v)
      layer = store.layers[i]
      o_d = pk.merge_attention_states(o_u, lse_u, *shared_partial(q, layer, dense))[0]
      ref = o_d[:, -1].astype(jnp.float32)
      last = q[:, -1:]
      per_cfg = []
      for mcfg in configs:
        o_s = pk.merge_attention_states(o_u[:, -1:], lse_u[:, -1:],
                                        *shared_partial(last, layer, mcfg))[0]
        diff = o_s[:, 0].astype(jnp.float32) - ref
        per_cfg.append(jnp.linalg.norm(diff.reshape(diff.shape[0], -1), axis=1) /
                       jnp.linalg.norm(ref.reshape(ref.shape[0], -1), axis=1))
      return o_d, jnp.stack(per_cfg)

    positions = store.length + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, errs = model.forward(tokens, positions, attend)
    return jnp.stack(errs, axis=1)

  return np.asarray(run(store, jnp.asarray(prompts, jnp.int32)))


def oracle_accuracy(model, store, prompts: np.ndarray, answers: np.ndarray, chunk_size: int,
                    sparsities: list[float], backend: str) -> list[int]:
  """Correct answers per sparsity with ORACLE routing (`routing.oracle_route`): each (request,
  kv head) keeps the chunks with the largest exact logit, maxed over its query rows and heads
  (what "int4" estimates, from the full keys: a reference, not a router to deploy). The rest of
  the path is the sparse one: chunk_attention on the kept chunks, merged with the question's own
  causal attention, in every layer."""
  N = store.summaries[0].num_chunks

  @functools.partial(jax.jit, static_argnums=2)
  def run(store, tokens, top_k):
    def attention(i, q, k, v):
      o_u, lse_u = causal_attention(q, k, v)
      layer = store.layers[i]
      ids = routing.oracle_route(q, layer.k, top_k, chunk_size=chunk_size, kv_length=layer.length)
      o_s, lse_s = pk.chunk_attention(q, layer.k, layer.v, ids, chunk_size=chunk_size,
                                      kv_length=layer.length, backend=backend)
      return pk.merge_attention_states(o_u, lse_u, o_s, lse_s)[0]

    positions = store.length + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return jnp.argmax(model.forward(tokens, positions, stateless(attention))[0][:, -1], axis=-1)

  tokens = jnp.asarray(prompts, jnp.int32)
  kept = [MoskaConfig(sparsity=s).chunks_kept(N) for s in sparsities]
  return [int(np.sum(np.asarray(run(store, tokens, k)) == answers)) for k in kept]


def main() -> None:
  bench = harness.Bench(ceilings=False, shape=False)
  path = FLAGS.accuracy_checkpoint
  with open(os.path.join(path, "retrieval.json")) as f:
    meta = json.load(f)
  task = RetrievalTask(meta["num_keys"], meta["num_values"], meta.get("value_first", False))
  length = FLAGS.accuracy_length or meta["trained_length"]
  cfg = checkpoint.saved_config(path)
  model = checkpoint.load_params(path, dataclasses.replace(cfg, dtype=FLAGS.dtype))
  backend = FLAGS.backend
  dense = MoskaConfig(backend=backend)
  sparsities = [float(x) for x in FLAGS.accuracy_sparsities]
  sparse = sparse_configs(backend, sparsities)
  chunk_sizes = sorted({m.chunk_size for m in sparse})
  rng = np.random.default_rng(FLAGS.seed)
  n_cfg = len(sparse) + 1
  hits = np.zeros((n_cfg,), np.int64)
  errs = {id(m): [] for m in sparse}
  asked = 0
  engines: dict[int, MoskaEngine] = {}  # one compiled engine per config, reused across documents
  oracle_hits = collections.Counter()
  for d in range(FLAGS.accuracy_docs):
    tokens, keys, values = task.documents(rng, 1, length)
    base = build_shared_store(model, tokens[0], chunk_size=chunk_sizes[0], backend=backend)
    prompts, idx = task.questions(keys[0], rng, FLAGS.accuracy_questions)
    answers = values[0, idx]
    # Summaries once per (chunk size, kind) of this document, shared by every config using them.
    stores = {(c, kind): base.with_summaries(c, kind)
              for c in chunk_sizes for kind in FLAGS.accuracy_summaries}
    asked += len(prompts)
    logging.info("document %d/%d: %d tokens, %d questions", d + 1, FLAGS.accuracy_docs, length,
                 len(prompts))
    for j, mcfg in enumerate([dense, *sparse]):
      store = base if mcfg.mode == "dense" else stores[mcfg.chunk_size, mcfg.summary]
      if j not in engines:
        engines[j] = MoskaEngine(model, store, mcfg, max_batch=FLAGS.accuracy_batch,
                                 num_pages=FLAGS.accuracy_batch + 1, page_size=16,
                                 prefill_chunk=1)
      engine = engines[j]
      engine.set_store(store)
      got = np.array([r.tokens[0] for r in engine.generate(prompts, 1)])
      hits[j] += int(np.sum(got == answers))
    for c in chunk_sizes:
      oracle = oracle_accuracy(model, stores[c, FLAGS.accuracy_summaries[0]], np.array(prompts),
                               answers, c, sparsities, backend)
      for j, n in enumerate(oracle):
        oracle_hits[c, j] += n
      for kind in FLAGS.accuracy_summaries:
        group = [m for m in sparse if m.chunk_size == c and m.summary == kind]
        e = attention_errors(model, stores[c, kind], np.array(prompts), group, dense)
        for m, em in zip(group, e):
          errs[id(m)].append(em)
    logging.info("document %d: dense accuracy so far %.3f", d + 1, hits[0] / asked)
  dense_acc = hits[0] / asked
  table = bench.table(FLAGS.accuracy_name,
                      "accuracy: sparse routing vs dense on the trained retrieval decoder",
                      keys=("mode", "chunk", "scorer", "batch_aware", "always_include",
                            "sparsity"), goals="accuracy")
  common_cols = dict(reuse=1)  # every answer is predicted by a step that routes afresh

  def add(mode, chunk, scorer, batch_aware, always_include, sparsity, top_k, accuracy, e):
    table.add(mode=mode, chunk=chunk, scorer=scorer, batch_aware=batch_aware, **common_cols,
              always_include=always_include, sparsity=sparsity, top_k=top_k, accuracy=accuracy,
              acc_over_dense=accuracy / max(dense_acc, 1e-9),
              attn_rel_err=float(e.mean()) if e is not None else float("nan"),
              attn_rel_err_worst=float(e.mean(1).max()) if e is not None else float("nan"))

  add("dense", 0, "-", 0, "-", 0.0, 0, dense_acc, np.zeros((1, 1)))
  S_chunks = {c: -(-base.k[0].shape[0] // c) for c in chunk_sizes}  # the store's chunk slots
  for j, m in enumerate(sparse, start=1):
    add("sparse", m.chunk_size, scorer_name(m), m.batch_aware,
        "0" if m.always_include else "-", m.sparsity, m.chunks_kept(S_chunks[m.chunk_size]),
        hits[j] / asked, np.concatenate(errs[id(m)], axis=1))  # errors [layers, questions]
  for c in chunk_sizes:
    for j, sp in enumerate(sparsities):
      add("oracle", c, "exact max logit", 0, "-", sp,
          MoskaConfig(sparsity=sp).chunks_kept(S_chunks[c]), oracle_hits[c, j] / asked, None)
  table.write(notes=(
      f"Checkpoint: {common.shown(FLAGS.accuracy_checkpoint)} ({cfg}; trained to "
      f"{meta['trained_length']} "
      f"tokens, held-out dense accuracy {meta['eval_accuracy']:.3f} at training). Documents: "
      f"{FLAGS.accuracy_docs} x {length} tokens, {asked} questions in all; chance "
      f"{1 / meta['num_values']:.4f}. accuracy: exact match of the greedy answer served by "
      f"MoskaEngine; acc_over_dense: / dense accuracy; scorer: the router (\"-int8\": int8 query "
      f"rows); batch_aware: requests per batch-aware tile (0: off); reuse: the answer is "
      f"predicted by a step that routes afresh (prefill steps always route); top_k: chunks kept "
      f"per (request, kv head, layer); attn_rel_err: mean over layers and questions of the key "
      f"token's ||o_sparse - o_dense|| / ||o_dense||; attn_rel_err_worst: the worst layer's "
      f"mean. oracle rows: routing by each chunk's exact largest logit over the group's rows "
      f"and heads (reads every key at full precision: the reference int4 approximates)."),
              plot=_plot, show=("mode", "chunk", "scorer", "batch_aware", "always_include",
                                "sparsity", "accuracy", "acc_over_dense"))


def _plot(plt, rows: list[dict]):
  """Accuracy against sparsity, one panel per summary kind, oracle and dense for reference."""
  kinds = sorted({r["scorer"] for r in rows if r["mode"] == "sparse"})
  fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.5), squeeze=False)
  dense = next(r["accuracy"] for r in rows if r["mode"] == "dense")
  for ax, kind in zip(axes[0], kinds):
    for c, tile in sorted({(r["chunk"], r["batch_aware"]) for r in rows if r["mode"] == "sparse"}):
      for ai, style in (("-", "o-"), ("0", "s--")):
        pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                     if r["scorer"] == kind and r["chunk"] == c and r["always_include"] == ai
                     and r["batch_aware"] == tile)
        if pts:
          ax.plot(*zip(*pts), style, label=f"C={c}" + (", sink" if ai == "0" else "")
                  + (f", tiles of {tile}" if tile else ""))
    for c in sorted({r["chunk"] for r in rows if r["mode"] == "oracle"}):
      pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                   if r["mode"] == "oracle" and r["chunk"] == c)
      ax.plot(*zip(*pts), "k:", lw=0.8 + c / 128, label=f"oracle C={c}")
    ax.axhline(dense, color="k", lw=0.8, label="dense")
    ax.set(title=f"router: {kind}", xlabel="sparsity", ylabel="exact-match accuracy",
           ylim=(0, 1.02))
    ax.legend(fontsize=7)
  return fig
