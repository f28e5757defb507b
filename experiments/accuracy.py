"""accuracy: exact-match retrieval accuracy of the trained decoder under sparse routing vs dense.

Loads the checkpoint written by `train_retrieval` (default: the committed one), puts each
document's records in a SharedKVStore, and serves `QUERY key` questions through the MoskaEngine:
dense, then sparse at every (chunk size, summary kind, always_include, sparsity) of the flags,
for every K/V format of `--accuracy_kv_dtype` (the model's dtype, or float8 with per-head scales
for the shared store and, by default, the unique pages too).
Routing is per token (`prefill_chunk=1`): the answer is predicted by the step that feeds the key,
whose queries choose the chunks. Beside accuracy it reports how far routing moves the attention
output: for the key token, in every layer, ||o - o_dense|| / ||o_dense|| with o_dense the
model-dtype dense output and both computed from the same model-dtype dense hidden state (errors
do not compound across layers).
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
from pallas_kernels import quant
from experiments import common, harness
from experiments.retrieval import RetrievalTask
from moska_jax import checkpoint, routing
from moska_jax.attention import causal_attention, shared_partial
from moska_jax.config import MoskaConfig
from moska_jax.engine import MoskaEngine
from moska_jax.kv_cache import check_kv_dtype
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
flags.DEFINE_list("accuracy_always_include", ["-", "0"],
                  "accuracy: always-included chunks of the sparse runs (-: none; 0: the first).")
flags.DEFINE_list("accuracy_kv_dtype", ["model"],
                  "accuracy: K/V formats of the shared store: model (the model's dtype, the "
                  "baseline of acc_over_dense; required), float8_e4m3fn, float8_e5m2 (per-head "
                  "scales).")
flags.DEFINE_bool("accuracy_fp8_unique", True,
                  "accuracy: a float8 kv dtype stores the unique pages in it too (the engine's "
                  "unique_kv_dtype); false: the shared store only.")
FLAGS = flags.FLAGS


def sparse_configs(backend: str, sparsities: list[float]) -> list[MoskaConfig]:
  """Every (chunk size, summary, sink, sparsity, batch-aware tile) and, for "int4", scorer."""
  return [MoskaConfig(mode="sparse", chunk_size=int(c), sparsity=s, summary=kind,
                      always_include=ai, int8_scorer=i8, batch_aware=int(tile), backend=backend)
          for c in FLAGS.accuracy_chunks for kind in FLAGS.accuracy_summaries
          for i8 in ({bool(int(x)) for x in FLAGS.accuracy_int8_scorer} if kind == "int4"
                     else {False})
          for tile in FLAGS.accuracy_batch_aware
          for ai in always_include() for s in sparsities]


def always_include() -> list[tuple[int, ...]]:
  """The always_include settings of `--accuracy_always_include` ("-": none, "0": chunk 0)."""
  allowed = {"-": (), "0": (0,)}
  bad = [x for x in FLAGS.accuracy_always_include if x not in allowed]
  if bad or not FLAGS.accuracy_always_include:
    raise ValueError(f"--accuracy_always_include must be a non-empty list of {sorted(allowed)}, "
                     f"got {FLAGS.accuracy_always_include}")
  return [allowed[x] for x in FLAGS.accuracy_always_include]


def kv_dtypes() -> list[str | None]:
  """The K/V formats of `--accuracy_kv_dtype`, None for "model" (first: the baseline)."""
  names = FLAGS.accuracy_kv_dtype
  if "model" not in names or len(set(names)) != len(names):
    raise ValueError(f"--accuracy_kv_dtype must list 'model' (the baseline of acc_over_dense) "
                     f"and each format once, got {names}")
  fp8 = [check_kv_dtype(x, "accuracy", "--accuracy_kv_dtype").name for x in names if x != "model"]
  return [None, *fp8]


def scorer_name(mcfg: MoskaConfig) -> str:
  """The router's name in results (the sparse experiment's `scorer` column)."""
  return mcfg.summary + ("-int8" if mcfg.int8_scorer else "")


def error_probe(model, configs: list[MoskaConfig], dense: MoskaConfig, unique_dtype):
  """A jitted fn(ref, stores, prompts, unique_scales) -> the relative error of the key token's
  attention output, [len(configs), layers, questions].

  ref: the model-dtype store, whose dense output is the reference; stores: per config the store
  it reads (any K/V format; its chunk size and summary kind); unique_scales: per layer
  (k_scale, v_scale) [Hkv] of a float8 unique cache (`unique_dtype`), else None. Every layer
  sees the model-dtype dense hidden state; its unique part is causal attention over the
  question's own tokens, their K/V rounded through float8 as the engine's page pool stores them.
  """
  @jax.jit
  def run(ref, stores, tokens, unique_scales):
    def attend(i, q, k, v, _):  # layer state out: this layer's errors [configs, questions]
      o_u, lse_u = causal_attention(q, k, v)
      o_d = pk.merge_attention_states(o_u, lse_u, *shared_partial(q, ref.layers[i], dense))[0]
      target = o_d[:, -1].astype(jnp.float32)
      if unique_dtype is not None:
        (ks, vs), dt = unique_scales[i], k.dtype
        k, v = (quant.dequantize(quant.quantize_with(x, s, unique_dtype), s, dt)
                for x, s in ((k, ks), (v, vs)))
        o_u, lse_u = causal_attention(q, k, v)
      last = q[:, -1:]
      per_cfg = []
      for mcfg, store in zip(configs, stores, strict=True):
        o = pk.merge_attention_states(o_u[:, -1:], lse_u[:, -1:],
                                      *shared_partial(last, store.layers[i], mcfg))[0]
        diff = o[:, 0].astype(jnp.float32) - target
        per_cfg.append(jnp.linalg.norm(diff.reshape(diff.shape[0], -1), axis=1) /
                       jnp.linalg.norm(target.reshape(target.shape[0], -1), axis=1))
      return o_d, jnp.stack(per_cfg)

    positions = ref.length + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, errs = model.forward(tokens, positions, attend)
    return jnp.stack(errs, axis=1)

  return lambda ref, stores, prompts, unique_scales: np.asarray(
      run(ref, tuple(stores), jnp.asarray(prompts, jnp.int32), unique_scales))


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
  configs = [dense, *sparse_configs(backend, sparsities)]
  chunk_sizes = sorted({m.chunk_size for m in configs[1:]})
  formats = kv_dtypes()  # the shared store's K/V format; formats[0] (None): the model's dtype
  unique_formats = [kv if FLAGS.accuracy_fp8_unique else None for kv in formats]
  rng = np.random.default_rng(FLAGS.seed)
  hits = np.zeros((len(formats), len(configs)), np.int64)
  errs = [[[] for _ in configs] for _ in formats]  # per document [layers, questions]
  asked = 0
  # One compiled engine per (format, config), reused across documents: a float8 unique pool's
  # scales are fixed when its engine is made, from the first document's store.
  engines: dict[tuple[int, int], MoskaEngine] = {}
  probes = [error_probe(model, configs, dense, unique_kv) for unique_kv in unique_formats]
  oracle_hits = collections.Counter()
  for d in range(FLAGS.accuracy_docs):
    tokens, keys, values = task.documents(rng, 1, length)
    base = build_shared_store(model, tokens[0], chunk_size=chunk_sizes[0], backend=backend)
    prompts, idx = task.questions(keys[0], rng, FLAGS.accuracy_questions)
    answers = values[0, idx]
    # Summaries once per (chunk size, kind) of this document, from the model-dtype keys (a
    # float8 store keeps them, as build_shared_store(kv_dtype=) does).
    summarized = {(c, kind): base.with_summaries(c, kind)
                  for c in chunk_sizes for kind in FLAGS.accuracy_summaries}
    asked += len(prompts)
    logging.info("document %d/%d: %d tokens, %d questions", d + 1, FLAGS.accuracy_docs, length,
                 len(prompts))
    for f, (kv, unique_kv) in enumerate(zip(formats, unique_formats)):
      in_format = lambda store: store if kv is None else store.quantized(kv)
      routed = {key: in_format(store) for key, store in summarized.items()}
      stores = [in_format(base) if m.mode == "dense" else routed[m.chunk_size, m.summary]
                for m in configs]
      for j, (mcfg, store) in enumerate(zip(configs, stores)):
        if (f, j) not in engines:
          engines[f, j] = MoskaEngine(model, store, mcfg, max_batch=FLAGS.accuracy_batch,
                                      num_pages=FLAGS.accuracy_batch + 1, page_size=16,
                                      prefill_chunk=1, unique_kv_dtype=unique_kv)
        engine = engines[f, j]
        engine.set_store(store)
        got = np.array([r.tokens[0] for r in engine.generate(prompts, 1)])
        hits[f, j] += int(np.sum(got == answers))
      for j, e in enumerate(probes[f](base, stores, np.array(prompts), engines[f, 0].cache.scales)):
        errs[f][j].append(e)
      logging.info("document %d, kv %s: dense accuracy so far %.3f", d + 1, kv or "model",
                   hits[f, 0] / asked)
    for c in chunk_sizes:
      oracle = oracle_accuracy(model, summarized[c, FLAGS.accuracy_summaries[0]],
                               np.array(prompts), answers, c, sparsities, backend)
      for j, n in enumerate(oracle):
        oracle_hits[c, j] += n
  dense_acc = hits[0, 0] / asked  # the model dtype's: the baseline of every row
  table = bench.table(FLAGS.accuracy_name,
                      "accuracy: sparse routing and FP8 K/V vs dense on the trained retrieval "
                      "decoder",
                      keys=("kv_dtype", "unique_kv_dtype", "mode", "chunk", "scorer",
                            "batch_aware", "always_include", "sparsity"), goals="accuracy")
  common_cols = dict(reuse=1)  # every answer is predicted by a step that routes afresh

  def add(kv, unique_kv, mode, chunk, scorer, batch_aware, always_include, sparsity, top_k,
          accuracy, e):
    table.add(kv_dtype=kv, unique_kv_dtype=unique_kv, mode=mode, chunk=chunk, scorer=scorer,
              batch_aware=batch_aware, **common_cols, always_include=always_include,
              sparsity=sparsity, top_k=top_k, accuracy=accuracy,
              acc_over_dense=accuracy / max(dense_acc, 1e-9),
              attn_rel_err=float(e.mean()) if e is not None else float("nan"),
              attn_rel_err_worst=float(e.mean(1).max()) if e is not None else float("nan"))

  model_dtype = jnp.dtype(model.cfg.jnp_dtype).name
  S_chunks = {c: -(-base.k[0].shape[0] // c) for c in chunk_sizes}  # the store's chunk slots
  for f, (kv, unique_kv) in enumerate(zip(formats, unique_formats)):
    names = (kv or model_dtype, unique_kv or model_dtype)
    for j, m in enumerate(configs):
      e = np.concatenate(errs[f][j], axis=1)  # [layers, questions]
      if m.mode == "dense":
        add(*names, "dense", 0, "-", 0, "-", 0.0, 0, hits[f, j] / asked, e)
      else:
        add(*names, "sparse", m.chunk_size, scorer_name(m), m.batch_aware,
            "0" if m.always_include else "-", m.sparsity, m.chunks_kept(S_chunks[m.chunk_size]),
            hits[f, j] / asked, e)
  for c in chunk_sizes:
    for j, sp in enumerate(sparsities):
      add(model_dtype, model_dtype, "oracle", c, "exact max logit", 0, "-", sp,
          MoskaConfig(sparsity=sp).chunks_kept(S_chunks[c]), oracle_hits[c, j] / asked, None)
  table.write(notes=(
      f"Checkpoint: {common.shown(FLAGS.accuracy_checkpoint)} ({cfg}; trained to "
      f"{meta['trained_length']} "
      f"tokens, held-out dense accuracy {meta['eval_accuracy']:.3f} at training), run in "
      f"{model_dtype}. Documents: "
      f"{FLAGS.accuracy_docs} x {length} tokens, {asked} questions in all; chance "
      f"{1 / meta['num_values']:.4f}. kv_dtype: the shared store's K/V ({model_dtype}: the "
      f"model's dtype; float8: one scale per layer and kv head, the head's largest magnitude to "
      f"the format's largest, `SharedKVStore.quantized`; routing summaries from the {model_dtype} "
      f"keys); unique_kv_dtype: the unique pages' (float8: MoskaEngine(unique_kv_dtype=), "
      f"per-head scales fixed when the engine is made, from the first document's store with 2x "
      f"headroom, larger values saturate). accuracy: exact match of the greedy answer served by "
      f"MoskaEngine; acc_over_dense: / the {model_dtype} dense accuracy of this run; scorer: "
      f"the router (\"-int8\": int8 query "
      f"rows); batch_aware: requests per batch-aware tile (0: off); reuse: the answer is "
      f"predicted by a step that routes afresh (prefill steps always route); top_k: chunks kept "
      f"per (request, kv head, layer); attn_rel_err: mean over layers and questions of the key "
      f"token's ||o - o_dense|| / ||o_dense||, o_dense the {model_dtype} dense output (so "
      f"float8 rows include the rounding of K/V); attn_rel_err_worst: the worst layer's "
      f"mean. oracle rows: routing by each chunk's exact largest logit over the group's rows "
      f"and heads (reads every key at full precision: the reference int4 approximates)."),
              plot=_plot, show=("kv_dtype", "unique_kv_dtype", "mode", "chunk", "scorer",
                                "batch_aware", "always_include", "sparsity", "accuracy",
                                "acc_over_dense"))


def _plot(plt, rows: list[dict]):
  """Accuracy against sparsity, one panel per summary kind, one color per K/V format, oracle
  and dense for reference."""
  kinds = sorted({r["scorer"] for r in rows if r["mode"] == "sparse"})
  formats = list(dict.fromkeys((r["kv_dtype"], r["unique_kv_dtype"]) for r in rows))
  colors = dict(zip(formats, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.5), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    for fmt in formats:
      tag = fmt[0] if fmt[0] == fmt[1] else f"{fmt[0]} store, {fmt[1]} pages"
      of = [r for r in rows if (r["kv_dtype"], r["unique_kv_dtype"]) == fmt]
      for c, tile in sorted({(r["chunk"], r["batch_aware"]) for r in of
                             if r["mode"] == "sparse"}):
        for ai, style in (("-", "o-"), ("0", "s--")):
          pts = sorted((r["sparsity"], r["accuracy"]) for r in of
                       if r["scorer"] == kind and r["chunk"] == c and r["always_include"] == ai
                       and r["batch_aware"] == tile)
          if pts:
            ax.plot(*zip(*pts), style, color=colors[fmt],
                    label=f"{tag}, C={c}" + (", sink" if ai == "0" else "")
                    + (f", tiles of {tile}" if tile else ""))
      ax.axhline(next(r["accuracy"] for r in of if r["mode"] == "dense"), color=colors[fmt],
                 lw=0.8, label=f"{tag}, dense")
    for c in sorted({r["chunk"] for r in rows if r["mode"] == "oracle"}):
      pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                   if r["mode"] == "oracle" and r["chunk"] == c)
      ax.plot(*zip(*pts), "k:", lw=0.8 + c / 128, label=f"oracle C={c}")
    ax.set(title=f"router: {kind}", xlabel="sparsity", ylabel="exact-match accuracy",
           ylim=(0, 1.02))
    ax.legend(fontsize=7)
  return fig
