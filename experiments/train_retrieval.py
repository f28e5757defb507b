"""train_retrieval: trains a small moska_jax decoder (optax) to retrieve values from a long context.

The task (experiments.retrieval): a document of (key, value) records, then `QUERY key` questions
whose answer is the key's value. A curriculum grows the document and the pool of keys in play
(`key_pool`) together: training stays at a length until the running answer accuracy passes
`--train_advance`, then doubles it up to `--train_length`, where it goes on until the held-out
accuracy reaches `--train_goal` or the time budget ends. The parameters are saved with orbax
(`moska_jax.checkpoint.save_params`) beside `retrieval.json` (the task, the curriculum reached,
the accuracy of the saved weights, the command), which `accuracy` reads.

Attention during training is `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU, XLA on
CPU): the plain causal decoder, the same weights MoSKA serves. With `--train_route_sparsity` (and
usually `--train_init`), the questions' attention over the document is routed as MoSKA serves it
(`routed_attend`), and the held-out accuracy is that of the routed model.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from flax import nnx

from experiments import common, harness
from experiments.retrieval import RetrievalTask
from moska_jax import checkpoint, routing
from moska_jax.config import ModelConfig, MoskaConfig
from moska_jax.model import Decoder, stateless
from pallas_kernels import grouping

flags.DEFINE_integer("train_layers", 4, "train_retrieval: decoder layers.", lower_bound=1)
flags.DEFINE_integer("train_hidden", 256, "train_retrieval: hidden size.", lower_bound=1)
flags.DEFINE_integer("train_heads", 4, "train_retrieval: query heads Hq.", lower_bound=1)
flags.DEFINE_integer("train_kv_heads", 2, "train_retrieval: kv heads Hkv.", lower_bound=1)
flags.DEFINE_integer("train_head_dim", 64, "train_retrieval: head dim D.", lower_bound=1)
flags.DEFINE_integer("train_mlp", 256, "train_retrieval: MLP hidden size.", lower_bound=1)
flags.DEFINE_float("train_rope_theta", 10000.0, "train_retrieval: RoPE base.", lower_bound=0)
flags.DEFINE_float("train_embed_std", 1.0,
                   "train_retrieval: std of the initial token embeddings (0: the model's default).",
                   lower_bound=0)
flags.DEFINE_integer("train_keys", 2048, "train_retrieval: distinct keys (>= records per doc).",
                     lower_bound=1)
flags.DEFINE_boolean("train_value_first", False,
                     "train_retrieval: records `value key` instead of `key value`.")
flags.DEFINE_integer("train_values", 128, "train_retrieval: distinct values (chance = 1/this).",
                     lower_bound=1)
flags.DEFINE_integer("train_start_length", 17, "train_retrieval: first document length.",
                     lower_bound=1)
flags.DEFINE_integer("train_length", 8192, "train_retrieval: final document length (tokens).",
                     lower_bound=1)
flags.DEFINE_integer("train_batch_tokens", 16384, "train_retrieval: tokens per step.",
                     lower_bound=1)
flags.DEFINE_integer("train_questions", 16,
                     "train_retrieval: questions per training sequence (at most a quarter of its "
                     "records).", lower_bound=1)
flags.DEFINE_float("train_lr", 1e-3, "train_retrieval: peak AdamW learning rate.", lower_bound=0)
flags.DEFINE_float("train_advance", 0.9,
                   "train_retrieval: running accuracy that doubles the length.", lower_bound=0,
                   upper_bound=1)
flags.DEFINE_float("train_goal", 0.97, "train_retrieval: held-out accuracy that ends training.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_integer("train_max_steps", 100000, "train_retrieval: step budget.", lower_bound=1)
flags.DEFINE_float("train_minutes", 8.0, "train_retrieval: time budget (minutes).",
                   lower_bound=0)
flags.DEFINE_integer("train_eval_every", 200, "train_retrieval: steps between held-out evals.",
                     lower_bound=1)
flags.DEFINE_integer("train_eval_docs", 16, "train_retrieval: held-out documents per eval.",
                     lower_bound=1)
flags.DEFINE_enum("train_attention", "auto", ["auto", "cudnn", "xla"],
                  "train_retrieval: attention implementation (auto: cuDNN on GPU, else XLA).")
flags.DEFINE_string("train_init", None,
                    "train_retrieval: start from this checkpoint (e.g. to fine-tune for routing).")
flags.DEFINE_float("train_route_sparsity", 0.0,
                   "train_retrieval: > 0 routes the questions' attention over the document as "
                   "MoSKA serves it (this sparsity) during training.")
flags.DEFINE_integer("train_route_chunk", 64, "train_retrieval: chunk size C of routed training.",
                     lower_bound=1)
flags.DEFINE_enum("train_route_summary", "mean", list(routing.SUMMARIES),
                  "train_retrieval: chunk summary kind of routed training.")
flags.DEFINE_enum("train_save_dtype", "bfloat16", ["bfloat16", "float32"],
                  "train_retrieval: dtype of the saved parameters (bfloat16 halves the file).")
flags.DEFINE_string("train_checkpoint", None,
                    "train_retrieval: where to save (default: OUT_DIR/retrieval_checkpoint).")
common.validate(("train_heads", "train_kv_heads"),
                lambda f: f["train_heads"] % f["train_kv_heads"] == 0,
                "--train_kv_heads must divide --train_heads (grouped-query attention)")
common.validate("train_init", lambda path: path is None or os.path.isdir(path),
                "must be a checkpoint directory (written by train_retrieval)")
common.fraction("train_route_sparsity")
common.validate(("train_route_sparsity", "train_start_length", "train_length",
                 "train_route_chunk"),
                lambda f: not f["train_route_sparsity"] or (
                    f["train_start_length"] == f["train_length"]
                    and f["train_length"] % f["train_route_chunk"] == 0),
                "routed training (--train_route_sparsity > 0) runs at one document length "
                "(--train_start_length == --train_length), a multiple of --train_route_chunk")
FLAGS = flags.FLAGS


def model_config(task: RetrievalTask) -> ModelConfig:
  return ModelConfig(vocab=task.vocab, layers=FLAGS.train_layers, hidden=FLAGS.train_hidden,
                     num_heads=FLAGS.train_heads, num_kv_heads=FLAGS.train_kv_heads,
                     head_dim=FLAGS.train_head_dim, mlp_hidden=FLAGS.train_mlp,
                     rope_theta=FLAGS.train_rope_theta, dtype="float32")


def flash_attend(implementation: str):
  """The decoder's `attend` for training: fused causal attention (bf16 operands on cuDNN)."""
  def attend(i, q, k, v):
    if implementation == "cudnn":
      o = jax.nn.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                       v.astype(jnp.bfloat16), is_causal=True,
                                       implementation="cudnn")
      return o.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  return attend


def routed_attend(implementation: str, doc_len: int, chunk_size: int, top_k: int,
                  summary: str = "mean"):
  """`attend` with MoSKA's sparse path in the loop (fine-tuning for routing, as MoBA trains).

  Document rows attend densely and causally (the shared store is prefilled densely); question
  rows attend to their own tokens causally and to the top_k document chunks that the serving
  router (`moska_jax.routing`, this summary kind) picks for each of them, token by token as
  `accuracy` serves them. The choice carries no gradient; the keys learn to be chosen through
  the attention of the chunks that are.
  """
  dense = flash_attend(implementation)
  N = doc_len // chunk_size

  def chosen(q, k):  # one sequence: q[Tq, Hq, D], k[doc_len, Hkv, D] -> keep[Tq, Hkv, N]
    ids = routing.route(q[:, None], routing.chunk_summaries(k, chunk_size, summary=summary),
                        top_k)
    return grouping.selected_chunks(ids, N)

  def attend(i, q, k, v):
    B, T, Hq, _ = q.shape
    Hkv, G, Tq = k.shape[2], Hq // k.shape[2], T - doc_len
    o_doc = dense(i, q[:, :doc_len], k[:, :doc_len], v[:, :doc_len])
    qq = q[:, doc_len:]
    keep = jax.vmap(chosen)(jax.lax.stop_gradient(qq), jax.lax.stop_gradient(k[:, :doc_len]))
    doc_mask = jnp.repeat(keep, chunk_size, axis=-1)  # [B, Tq, Hkv, doc_len]
    own = jnp.broadcast_to(jnp.tril(jnp.ones((Tq, Tq), bool))[None, :, None, :],
                           (B, Tq, Hkv, Tq))
    mask = jnp.repeat(jnp.concatenate([doc_mask, own], -1), G, axis=2).transpose(0, 2, 1, 3)
    o_q = jax.nn.dot_product_attention(qq, k, v, mask=mask, implementation="xla")
    return jnp.concatenate([o_doc, o_q], axis=1)
  return attend


def answer_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and exact-match accuracy over the positions with a target (>= 0)."""
  mask = targets >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  hit = jnp.argmax(logits, axis=-1) == targets
  n = jnp.maximum(jnp.sum(mask), 1)
  return jnp.sum(jnp.where(mask, ce, 0.0)) / n, jnp.sum(hit & mask) / n


def heldout_accuracy(evaluate, params, task: RetrievalTask, rng: np.random.Generator,
                     length: int) -> float:
  """Exact-match accuracy over `--train_eval_docs` fresh documents of `length` tokens."""
  return float(np.mean([evaluate(params, *batch_of(task, rng, 1, length))
                        for _ in range(FLAGS.train_eval_docs)]))


def questions(task: RetrievalTask, length: int) -> int:
  return min(FLAGS.train_questions, task.max_questions(length))


def key_pool(task: RetrievalTask, length: int) -> int:
  """Keys in play at a document length: 4 per record, at least 16, grown with the curriculum.

  Learning to match among all keys from the start is far slower (measured on CPU: 4-record
  documents reach 100% in 250 steps with 16 keys, 34% with 2048); once the matching circuit
  exists it carries over to keys it has not seen.
  """
  return min(task.num_keys, max(16, 4 * task.records_for(length)))


def batch_of(task: RetrievalTask, rng: np.random.Generator, batch: int, length: int):
  """A training batch padded at the end to a multiple of 64 tokens (cuDNN's fused attention
  rejects some lengths; causal attention keeps the padding out of every real position)."""
  tok, tgt = task.training_batch(rng, batch, length, questions(task, length),
                                 key_pool(task, length))
  pad = -tok.shape[1] % 64
  return np.pad(tok, ((0, 0), (0, pad))), np.pad(tgt, ((0, 0), (0, pad)), constant_values=-1)


def train(task: RetrievalTask, cfg: ModelConfig, attend, rng: np.random.Generator, seed: int):
  """Runs the curriculum; returns (model, evaluate(params, tokens, targets), log rows)."""
  if FLAGS.train_init:
    model = checkpoint.load_params(FLAGS.train_init, cfg)
  else:
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
  if FLAGS.train_embed_std > 0 and not FLAGS.train_init:
    # The default init gives token embeddings of norm ~1, while each block adds outputs of norm
    # ~sqrt(hidden): token identity, which retrieval matches on, starts drowned in the residual.
    table = model.embed.embedding
    table[...] = FLAGS.train_embed_std * jax.random.normal(jax.random.key(seed + 1), table.shape)
  graphdef, params = nnx.split(model, nnx.Param)
  # Constant after warm-up: the curriculum decides how long each length trains, so no decay
  # horizon is known in advance (a decaying rate stalled the induction phase change).
  warmup = min(100, FLAGS.train_max_steps // 10)
  schedule = optax.join_schedules([optax.linear_schedule(0.0, FLAGS.train_lr, warmup),
                                   optax.constant_schedule(FLAGS.train_lr)], [warmup])
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = opt.init(params)

  def logits_of(params, tokens):
    m = nnx.merge(graphdef, params)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return m.forward(tokens, pos, stateless(attend))[0]

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens, targets):
    def loss_fn(p):
      return answer_stats(logits_of(p, tokens), targets)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  evaluate = jax.jit(lambda p, tok, tgt: answer_stats(logits_of(p, tok), tgt)[1])
  length, running, log = FLAGS.train_start_length, 0.0, []
  t0 = time.perf_counter()
  for it in range(1, FLAGS.train_max_steps + 1):
    batch = max(1, FLAGS.train_batch_tokens // length)
    tok, tgt = batch_of(task, rng, batch, length)
    params, opt_state, loss, acc = step(params, opt_state, tok, tgt)
    running = 0.9 * running + 0.1 * float(acc)
    if running >= FLAGS.train_advance and length < FLAGS.train_length:
      length, running = min(2 * length, FLAGS.train_length), 0.0
      logging.info("step %d: running accuracy passed %.2f, document length -> %d", it,
                   FLAGS.train_advance, length)
    minutes = (time.perf_counter() - t0) / 60
    done = minutes >= FLAGS.train_minutes or it == FLAGS.train_max_steps
    if it % FLAGS.train_eval_every and not done:
      continue
    eval_acc = heldout_accuracy(evaluate, params, task, rng, length)
    log.append(dict(step=it, minutes=minutes, length=length, loss=float(loss),
                    train_acc=float(acc), eval_acc=eval_acc))
    logging.info("step %d (%.1f min): length %d, loss %.3f, train acc %.3f, held-out acc %.3f",
                 it, minutes, length, float(loss), float(acc), eval_acc)
    if done or (length == FLAGS.train_length and eval_acc >= FLAGS.train_goal):
      break
  return nnx.merge(graphdef, params), evaluate, log


def main() -> None:
  bench = harness.Bench(ceilings=False, shape=False)
  task = RetrievalTask(FLAGS.train_keys, FLAGS.train_values, FLAGS.train_value_first)
  task.records_for(FLAGS.train_length)  # validates the final length against num_keys
  cfg = model_config(task)
  impl = FLAGS.train_attention
  if impl == "auto":
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  attend = flash_attend(impl)
  if FLAGS.train_route_sparsity > 0:
    C = FLAGS.train_route_chunk
    n = FLAGS.train_length // C
    top_k = MoskaConfig(mode="sparse", sparsity=FLAGS.train_route_sparsity).chunks_kept(n)
    attend = routed_attend(impl, FLAGS.train_length, C, top_k, FLAGS.train_route_summary)
    impl += (f", routed questions: top {top_k} of {n} chunks of {C} "
             f"({FLAGS.train_route_summary} summaries)")
  logging.info("train_retrieval: %s, attention %s", cfg, impl)
  rng = np.random.default_rng(FLAGS.seed)
  model, evaluate, log = train(task, cfg, attend, rng, FLAGS.seed)
  final = log[-1]
  saved = checkpoint.cast(model, FLAGS.train_save_dtype)
  # The published accuracy is that of the saved (possibly rounded) weights.
  saved_acc = heldout_accuracy(evaluate, nnx.state(checkpoint.cast(saved, cfg.dtype), nnx.Param),
                               task, rng, final["length"])
  path = FLAGS.train_checkpoint or os.path.join(FLAGS.out_dir, "retrieval_checkpoint")
  checkpoint.save_params(path, saved)
  with open(os.path.join(path, "retrieval.json"), "w") as f:
    json.dump(dict(num_keys=task.num_keys, num_values=task.num_values,
                   value_first=task.value_first,
                   trained_length=final["length"], eval_accuracy=saved_acc,
                   steps=final["step"], minutes=round(final["minutes"], 2), **bench.env), f,
              indent=1)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"train_retrieval: {params / 1e6:.2f}M parameters, {final['step']} steps in "
        f"{final['minutes']:.1f} min, document length {final['length']}, held-out "
        f"accuracy {final['eval_acc']:.3f}, {saved_acc:.3f} with the saved "
        f"{FLAGS.train_save_dtype} weights (chance {1 / task.num_values:.3f}); saved to {path}")
  table = bench.table("train_retrieval", "train_retrieval: curriculum training of the retrieval "
                      "decoder", keys=("step", "length"))
  table.rows.extend(log)  # logged as it trained
  table.write(notes=f"Model: {cfg}. Chance = 1/{task.num_values}. eval_acc: held-out documents "
                    f"of the current length (teacher-forced questions).", plot=_plot, show=False)


def _plot(plt, log: list[dict]):
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.plot([r["step"] for r in log], [r["train_acc"] for r in log], label="train answers")
  ax.plot([r["step"] for r in log], [r["eval_acc"] for r in log], "o-", label="held-out")
  ax2 = ax.twinx()
  ax2.step([r["step"] for r in log], [r["length"] for r in log], "k:", where="post")
  ax2.set_yscale("log", base=2)
  ax2.set_ylabel("document length (dotted)")
  ax.set(xlabel="step", ylabel="exact-match accuracy", ylim=(0, 1.02))
  ax.legend(loc="lower right")
  return fig
