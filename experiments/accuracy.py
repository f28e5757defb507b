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

`--accuracy_reuse=1,4,16` measures routing reuse instead (`MoskaConfig.reroute_every`: a decoding
request routes on every r-th decode step and keeps its selection in between): each request is a
stream of questions `QUERY k1 v1 QUERY k2 v2 ...` whose first token is the prompt and whose
other tokens decode steps feed, teacher-forced (`forced_decode`), so every answer is predicted
by a decode step whose route may be up to r - 1 steps old, chosen by another token's queries.
Dense and the oracle router run on the same streams; every engine row is checked against a
step-free reference that applies the same reuse in one forward (`stream_reference`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import pallas_kernels as pk
from pallas_kernels import quant
from experiments import common, harness
from experiments.retrieval import QUERY, RetrievalTask
from moska_jax import checkpoint, routing
from moska_jax.attention import causal_attention, routed_attention, shared_partial
from moska_jax.config import SUMMARY_KINDS, MoskaConfig
from moska_jax.engine import MoskaEngine
from moska_jax.kv_cache import KV_DTYPES
from moska_jax.model import stateless
from moska_jax.prefill import build_shared_store
from moska_jax.step import store_top_k

flags.DEFINE_string("accuracy_checkpoint", common.package_path("checkpoints", "retrieval"),
                    "accuracy: directory written by train_retrieval.")
flags.DEFINE_integer("accuracy_length", 0,
                     "accuracy: document tokens (0: the length the checkpoint was trained at).",
                     lower_bound=0)
flags.DEFINE_integer("accuracy_docs", 2, "accuracy: documents (one shared store each).",
                     lower_bound=1)
flags.DEFINE_integer("accuracy_questions", 128, "accuracy: questions per document.",
                     lower_bound=1)
flags.DEFINE_integer("accuracy_batch", 64, "accuracy: engine slots (concurrent questions).",
                     lower_bound=1)
flags.DEFINE_list("accuracy_sparsities", ["0.5", "0.75", "0.875", "0.9375"],
                  "accuracy: sparsities of the sparse runs.")
flags.DEFINE_list("accuracy_chunks", ["64", "128", "256"], "accuracy: routing chunk sizes C.")
flags.DEFINE_string("accuracy_name", "accuracy", "accuracy: base name of the CSV/MD/PNG written.")
flags.DEFINE_list("accuracy_summaries", ["mean", "envelope", "int4"],
                  "accuracy: chunk summary kinds.")
flags.DEFINE_list("accuracy_int8_scorer", ["0"],
                  "accuracy: int8 query rows in the sketch scorer (0 and/or 1; sketch kinds only).")
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
flags.DEFINE_list("accuracy_reuse", [],
                  "accuracy: re-routing intervals r (MoskaConfig.reroute_every) to measure on "
                  "teacher-forced question streams instead of single questions (empty: single "
                  "questions, each answered by a step that routes afresh).")
flags.DEFINE_integer("accuracy_stream_questions", 16,
                     "accuracy (--accuracy_reuse): questions per stream (train_retrieval trains "
                     "on 16); --accuracy_questions per document is a multiple of it, and a "
                     "document's streams run together (engine slots: one per stream).",
                     lower_bound=1)
ALWAYS_INCLUDE = {"-": (), "0": (0,)}  # --accuracy_always_include: none, the first chunk
KV_FORMATS = ("model", *filter(None, KV_DTYPES))  # --accuracy_kv_dtype names
common.validate("accuracy_checkpoint",
                lambda path: os.path.isfile(os.path.join(path, "retrieval.json")),
                "must be a directory written by train_retrieval (with retrieval.json)")
common.fractions("accuracy_sparsities")
common.ints("accuracy_chunks")
common.choices("accuracy_summaries", SUMMARY_KINDS)
common.choices("accuracy_int8_scorer", ("0", "1"))
common.ints("accuracy_batch_aware", 0)
common.choices("accuracy_always_include", tuple(ALWAYS_INCLUDE))
common.validate("accuracy_kv_dtype",
                lambda names: "model" in names and len(set(names)) == len(names)
                and set(names) <= set(KV_FORMATS),
                f"must list 'model' (the baseline of acc_over_dense) and each other format once, "
                f"among: {', '.join(KV_FORMATS)}")
common.validate("accuracy_reuse",
                lambda rs: all(int(r) >= 1 for r in rs) and len(set(map(int, rs))) == len(rs),
                "must be empty or a comma-separated list of distinct integers >= 1")
common.validate(("accuracy_reuse", "accuracy_questions", "accuracy_stream_questions"),
                lambda f: not f["accuracy_reuse"]
                or f["accuracy_questions"] % f["accuracy_stream_questions"] == 0,
                "with --accuracy_reuse, --accuracy_questions must be a multiple of "
                "--accuracy_stream_questions")
common.validate(("accuracy_reuse", "accuracy_kv_dtype", "accuracy_batch_aware"),
                lambda f: not f["accuracy_reuse"] or (
                    f["accuracy_kv_dtype"] == ["model"]
                    and not any(int(x) for x in f["accuracy_batch_aware"])),
                "--accuracy_reuse measures per-request routing in the model's dtype: "
                "--accuracy_kv_dtype must be model and --accuracy_batch_aware 0")
FLAGS = flags.FLAGS


def sparse_configs(backend: str, sparsities: list[float]) -> list[MoskaConfig]:
  """Every (chunk size, summary, sink, sparsity, batch-aware tile) and, for the sketch kinds,
  scorer."""
  return [MoskaConfig(mode="sparse", chunk_size=int(c), sparsity=s, summary=kind,
                      always_include=ai, int8_scorer=i8, batch_aware=int(tile), backend=backend)
          for c in FLAGS.accuracy_chunks for kind in FLAGS.accuracy_summaries
          for i8 in ({bool(int(x)) for x in FLAGS.accuracy_int8_scorer}
                     if kind in routing.SKETCH_KINDS else {False})
          for tile in FLAGS.accuracy_batch_aware
          for ai in always_include() for s in sparsities]


def _label(m: MoskaConfig) -> str:
  """A config in a progress line: "dense", or "sparse C=64 int8-pca2 0.75"."""
  if m.mode == "dense":
    return "dense"
  return f"sparse C={m.chunk_size} {m.summary} {m.sparsity if m.top_k is None else m.top_k}"


def always_include() -> list[tuple[int, ...]]:
  """The always_include settings of `--accuracy_always_include` ("-": none, "0": chunk 0)."""
  return [ALWAYS_INCLUDE[x] for x in FLAGS.accuracy_always_include]


def kv_dtypes() -> list[str | None]:
  """The K/V formats of `--accuracy_kv_dtype`, None for "model" (first: the baseline)."""
  return [None, *(x for x in FLAGS.accuracy_kv_dtype if x != "model")]


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
  kept = [MoskaConfig(mode="sparse", sparsity=s).chunks_kept(N) for s in sparsities]
  return [int(np.sum(np.asarray(run(store, tokens, k)) == answers)) for k in kept]


def question_streams(keys: np.ndarray, values: np.ndarray, rng: np.random.Generator,
                     streams: int, questions: int) -> tuple[np.ndarray, np.ndarray]:
  """`streams` streams of `questions` questions about distinct records of one document, each
  `QUERY k1 v1 QUERY k2 v2 ...` (train_retrieval's question format) -> (tokens [n, 3 Q] int32,
  answers [n, Q]: the value following each key)."""
  if streams * questions > keys.shape[0]:
    raise ValueError(f"accuracy: {streams} streams x {questions} questions ask more than the "
                     f"document's {keys.shape[0]} records; ask fewer (--accuracy_questions) or "
                     f"give a longer document (--accuracy_length)")
  idx = rng.choice(keys.shape[0], size=streams * questions, replace=False)
  qk, qv = keys[idx].reshape(streams, questions), values[idx].reshape(streams, questions)
  tokens = np.stack([np.full_like(qk, QUERY), qk, qv], axis=2).reshape(streams, -1)
  return tokens.astype(np.int32), qv


def route_sources(length: int, prompt: int, reroute_every: int) -> np.ndarray:
  """[length] the position whose step computed the route that position t's step attends with:
  prompt tokens are prefilled, each routing for itself; the decode step feeding position
  t >= prompt is its request's (t - prompt)-th and keeps the route of its last re-routing step
  (`MoskaConfig.reroute_every`: steps 0, r, 2r, ...)."""
  t = np.arange(length)
  return np.where(t < prompt, t, prompt + (t - prompt) // reroute_every * reroute_every)


def forced_decode(engine: MoskaEngine, streams: np.ndarray, prompt: int, *,
                  return_logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
  """Teacher-forced decoding of token streams [n, L] through `engine`: each stream's first
  `prompt` tokens are its request's prompt, the rest are fed by decode steps, always the true
  next token (the engine feeds a decoding request's last token at its next step,
  `Scheduler.plan`, so the token callback swaps the sampled one for it). The requests run
  together (give the engine n slots) and route, or reuse routes, as the engine's MoskaConfig says.

  Returns:
    the greedy predictions [n, L - prompt] (column t: after the step feeding position
    prompt - 1 + t) and, with return_logits, their logits [n, L - prompt, vocab] float32.
  """
  n, L = streams.shape
  predicted = np.full((n, L - prompt), -1, np.int64)

  def forcing(i):
    def on_event(request, token):
      if token is not None:
        t = len(request.tokens) - 1
        predicted[i, t] = token
        request.tokens[-1] = int(streams[i, prompt + t])
    return on_event

  requests = [engine.submit(s[:prompt].tolist(), L - prompt, on_event=forcing(i),
                            return_logits=return_logits) for i, s in enumerate(streams)]
  while not all(r.done for r in requests):
    engine.step()
  failed = [r for r in requests if r.finish_reason != "length"]
  if failed:
    raise RuntimeError(f"forced_decode: {len(failed)} of {n} streams ended early "
                       f"({failed[0].finish_reason}: {failed[0].error})")
  logits = np.stack([np.stack(r.logits) for r in requests]) if return_logits else None
  return predicted, logits


def stream_reference(model, mcfg: MoskaConfig, top_k: int | None, sources: np.ndarray, *,
                     oracle: bool = False):
  """The step-free reference of `forced_decode`: a jitted fn(store, streams [n, L]) -> logits
  [n, L, vocab] of ONE forward over the whole streams. Per layer, causal attention over the
  stream merged with its shared half: dense, or (sparse) each position's own chunk selection of
  top_k chunks (`routing.route` with mcfg's router, as a decode row routes alone; or, with
  `oracle`, `routing.oracle_route`), of which position t attends with position sources[t]'s
  (`route_sources`): what a step reusing that route attends with, since every layer's queries
  are the ones its steps computed."""
  sparse = mcfg.mode == "sparse"

  @jax.jit
  def run(store, streams):
    def attention(i, q, k, v):
      o_u, lse_u = causal_attention(q, k, v)
      layer = store.layers[i]
      if not sparse:
        return pk.merge_attention_states(o_u, lse_u, *shared_partial(q, layer, mcfg))[0]
      B, T, Hq, D = q.shape
      rows = q.reshape(B * T, 1, Hq, D)  # one request per position: each routes alone
      if oracle:
        ids = routing.oracle_route(rows, layer.k, top_k, chunk_size=mcfg.chunk_size,
                                   kv_length=layer.length, always_include=mcfg.always_include)
      else:
        ids = routing.route(rows, layer.summaries, top_k, always_include=mcfg.always_include,
                            int8=mcfg.int8_scorer, backend=mcfg.backend,
                            interpret=mcfg.interpret)
      ids = ids.reshape(B, T, *ids.shape[1:])[:, sources].reshape(ids.shape)
      o_s, lse_s = routed_attention(rows, layer, ids, mcfg)
      return pk.merge_attention_states(o_u, lse_u, o_s.reshape(q.shape),
                                       lse_s.reshape(B, T, Hq))[0]

    positions = store.length + jnp.broadcast_to(jnp.arange(streams.shape[1]), streams.shape)
    return model.forward(streams, positions, stateless(attention))[0]

  return lambda store, streams: np.asarray(run(store, jnp.asarray(streams, jnp.int32)))


def load_checkpoint():
  """(meta, task, document length, saved model config, model in --dtype) of
  --accuracy_checkpoint."""
  path = FLAGS.accuracy_checkpoint
  with open(os.path.join(path, "retrieval.json")) as f:
    meta = json.load(f)
  task = RetrievalTask(meta["num_keys"], meta["num_values"], meta.get("value_first", False))
  length = FLAGS.accuracy_length or meta["trained_length"]
  cfg = checkpoint.saved_config(path)
  model = checkpoint.load_params(path, dataclasses.replace(cfg, dtype=FLAGS.dtype))
  return meta, task, length, cfg, model


def main() -> None:
  if FLAGS.accuracy_reuse:
    return reuse_main()
  bench = harness.Bench(ceilings=False, shape=False)
  meta, task, length, cfg, model = load_checkpoint()
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
      # counts of every config, so that a run cut short still says what it measured
      logging.info("document %d, kv %s: answered so far of %d: %s", d + 1, kv or "model", asked,
                   ", ".join(f"{_label(m)} {hits[f, j]}" for j, m in enumerate(configs)))
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
      kept = MoskaConfig(mode="sparse", sparsity=sp).chunks_kept(S_chunks[c])
      add(model_dtype, model_dtype, "oracle", c, "exact max logit", 0, "-", sp, kept,
          oracle_hits[c, j] / asked, None)
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


PROMPT = 1  # a stream's prompt is its first QUERY token: decode steps predict every answer


def reuse_main() -> None:
  """--accuracy_reuse: accuracy when decode steps that may reuse a route predict the answers,
  on teacher-forced question streams (see the module docstring)."""
  intervals = [int(x) for x in FLAGS.accuracy_reuse]
  Q = FLAGS.accuracy_stream_questions
  bench = harness.Bench(ceilings=False, shape=False)
  meta, task, length, cfg, model = load_checkpoint()
  backend = FLAGS.backend
  sparsities = [float(x) for x in FLAGS.accuracy_sparsities]
  sparse = sparse_configs(backend, sparsities)
  runs = [MoskaConfig(backend=backend)] + [dataclasses.replace(m, reroute_every=r)
                                           for m in sparse for r in intervals]
  oracles = [dataclasses.replace(m, reroute_every=r) for m in dict.fromkeys(
      MoskaConfig(mode="sparse", chunk_size=m.chunk_size, sparsity=m.sparsity,
                  summary=FLAGS.accuracy_summaries[0], backend=backend) for m in sparse)
             for r in intervals]
  chunk_sizes = sorted({m.chunk_size for m in sparse})
  n, L = FLAGS.accuracy_questions // Q, 3 * Q  # streams per document, tokens per stream
  at = 3 * np.arange(Q) + 1  # the positions of the keys, whose steps predict the answers
  ages = lambda r: (at - PROMPT) % r  # decode steps since the route in use was computed
  rng = np.random.default_rng(FLAGS.seed)
  correct = [[] for _ in runs + oracles]  # per document [n, Q] bool
  agree = [[] for _ in runs]
  engines: dict[int, MoskaEngine] = {}
  references: dict[int, Callable] = {}
  for d in range(FLAGS.accuracy_docs):
    tokens, keys, values = task.documents(rng, 1, length)
    base = build_shared_store(model, tokens[0], chunk_size=chunk_sizes[0], backend=backend)
    streams, answers = question_streams(keys[0], values[0], rng, n, Q)
    summarized = {(c, kind): base.with_summaries(c, kind)
                  for c in chunk_sizes for kind in FLAGS.accuracy_summaries}
    for j, m in enumerate(runs + oracles):
      oracle = j >= len(runs)
      store = base if m.mode == "dense" else summarized[m.chunk_size, m.summary]
      if j not in references:
        references[j] = stream_reference(model, m, store_top_k(store, m),
                                         route_sources(L, PROMPT, m.reroute_every),
                                         oracle=oracle)
      ref = references[j](store, streams)[:, at].argmax(-1)
      if oracle:
        correct[j].append(ref == answers)
        continue
      if j not in engines:
        engines[j] = MoskaEngine(model, store, m, max_batch=n, num_pages=n * -(-L // 16) + 1,
                                 page_size=16, prefill_chunk=1, prefill_lanes=n)
      engines[j].set_store(store)
      got = forced_decode(engines[j], streams, PROMPT)[0][:, at - (PROMPT - 1)]
      correct[j].append(got == answers)
      agree[j].append(got == ref)
    logging.info("document %d/%d: %d streams of %d questions, dense accuracy so far %.3f",
                 d + 1, FLAGS.accuracy_docs, n, Q, np.mean(correct[0]))
  asked = FLAGS.accuracy_docs * n * Q
  dense_acc = float(np.mean(correct[0]))
  table = bench.table(FLAGS.accuracy_name,
                      "accuracy: routing reuse (re-route every r decode steps) vs dense on the "
                      "trained retrieval decoder, teacher-forced question streams",
                      keys=("mode", "chunk", "scorer", "always_include", "sparsity", "reuse"),
                      goals="accuracy_reuse")
  by_age = []
  for j, m in enumerate(runs + oracles):
    hit = np.concatenate(correct[j])
    mode = "dense" if m.mode == "dense" else "oracle" if j >= len(runs) else "sparse"
    age = np.broadcast_to(ages(m.reroute_every), hit.shape)
    routed = mode != "dense"
    share = lambda sel: float(hit[sel].mean()) if routed and sel.any() else float("nan")
    table.add(mode=mode, chunk=m.chunk_size if routed else 0,
              scorer=("exact max logit" if mode == "oracle" else scorer_name(m)) if routed
              else "-", batch_aware=0, always_include="0" if m.always_include else "-",
              sparsity=m.sparsity if routed else 0.0, reuse=m.reroute_every,
              top_k=m.chunks_kept(-(-length // m.chunk_size)) if routed else 0,
              answers=hit.size, accuracy=float(hit.mean()),
              acc_over_dense=float(hit.mean()) / max(dense_acc, 1e-9),
              accuracy_fresh=share(age == 0), accuracy_stale=share(age > 0),
              route_age_mean=float(age.mean()) if routed else float("nan"),
              agree_ref=float(np.concatenate(agree[j]).mean()) if j < len(runs)
              else float("nan"))
    if routed and m.reroute_every > 1:
      router = scorer_name(m) if mode == "sparse" else "oracle"
      by_age.append(f"{router} C={m.chunk_size} sparsity {m.sparsity} r={m.reroute_every}: "
                    + ", ".join(f"{a}: {hit[age == a].mean():.3f}"
                                for a in range(m.reroute_every)))
  counts = "; ".join(f"r={r}: {np.bincount(ages(r), minlength=r).tolist()} per stream"
                     for r in intervals)
  model_dtype = jnp.dtype(model.cfg.jnp_dtype).name
  table.write(notes=(
      f"Checkpoint: {common.shown(FLAGS.accuracy_checkpoint)} ({cfg}; trained to "
      f"{meta['trained_length']} tokens, held-out dense accuracy {meta['eval_accuracy']:.3f} at "
      f"training), run in {model_dtype}. Documents: {FLAGS.accuracy_docs} x {length} tokens, "
      f"each read by {n} streams of {Q} questions about distinct records (`QUERY k1 v1 QUERY k2 "
      f"v2 ...`, the training format), {asked} answers in all; chance "
      f"{1 / meta['num_values']:.4f}. A stream's prompt is its first QUERY token (prefilled); "
      f"every later token is fed by a decode step of MoskaEngine, teacher-forced (the true "
      f"token, not the sampled one, is fed next), and every answer is the greedy token after "
      f"its key's step. reuse: MoskaConfig.reroute_every = r, the engine routes a request on "
      f"its decode steps 0, r, 2r, ... and the steps between attend with that route, so the "
      f"answer at the step feeding the key of question i (decode step 3i) attends with a route "
      f"3i mod r steps old (route_age_mean), chosen by another token's queries when that is "
      f"> 0. Route ages of the answers, by age 0..r-1: {counts}. accuracy_fresh / "
      f"accuracy_stale: over the answers whose route is 0 / > 0 steps old; acc_over_dense: / "
      f"the dense accuracy on the same streams; top_k: chunks kept per (request, kv head, "
      f"layer). agree_ref: the share of answers equal to a step-free reference's (one forward "
      f"over each stream, each position routing alone and attending with the route of the step "
      f"that computed its route: `stream_reference`); oracle rows are that reference with "
      f"routing by each chunk's exact largest logit (reads every key at full precision: the "
      f"reference int4 approximates) and the same reuse. Accuracy by route age: "
      + ("; ".join(by_age) or "-") + "."),
              plot=_plot_reuse, show=("mode", "chunk", "scorer", "sparsity", "reuse",
                                      "accuracy", "acc_over_dense", "accuracy_fresh",
                                      "accuracy_stale", "agree_ref"))


def _plot_reuse(plt, rows: list[dict]):
  """Accuracy against the re-routing interval r, one line per router and sparsity, dense for
  reference."""
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for line in dict.fromkeys((r["mode"], r["scorer"], r["chunk"], r["always_include"],
                             r["sparsity"]) for r in rows if r["mode"] != "dense"):
    mode, scorer, c, ai, sp = line
    pts = sorted((r["reuse"], r["accuracy"]) for r in rows
                 if (r["mode"], r["scorer"], r["chunk"], r["always_include"], r["sparsity"])
                 == line)
    ax.plot(*zip(*pts), "k:" if mode == "oracle" else "o-",
            label=f"{scorer}, C={c}, sparsity {sp}" + (", sink" if ai == "0" else ""))
  ax.axhline(next(r["accuracy"] for r in rows if r["mode"] == "dense"), color="gray", lw=0.8,
             label="dense")
  ax.set(xscale="log", xlabel="re-route every r decode steps", ylabel="exact-match accuracy",
         ylim=(0, 1.02))
  ax.legend(fontsize=7)
  return fig


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
