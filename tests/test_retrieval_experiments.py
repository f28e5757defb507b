"""train_retrieval then accuracy, on CPU at tiny size: it learns, and routing is measured on it."""

import csv
import json
import os

import pytest

from tests.test_launcher import _run, launch

TRAIN = ["--train_layers=2", "--train_hidden=64", "--train_heads=4", "--train_kv_heads=2",
         "--train_head_dim=16", "--train_mlp=64", "--train_keys=64", "--train_values=16",
         "--train_start_length=33", "--train_length=33", "--train_batch_tokens=1024",
         "--train_lr=3e-3", "--train_max_steps=150", "--train_eval_every=150",
         "--train_eval_docs=128"]


def _written(out_dir, name):
  files = os.listdir(out_dir)
  for ext in (".csv", ".md", ".png"):
    assert f"{name}{ext}" in files, (ext, files)
  md = open(os.path.join(out_dir, f"{name}.md")).read()
  for key in ("device", "jax", "date", "command", "flags"):
    assert f"- {key}:" in md


def test_train_then_accuracy(tmp_path, monkeypatch):
  # Training runs one small program 150 times: LLVM's optimizations, which the suite turns off
  # to compile faster (conftest.py), pay for themselves here: level 1 ran it in ~0.7x the time
  # of level 0 or of the default level (which compiles it 2x as long).
  with monkeypatch.context() as m:
    m.setenv("XLA_FLAGS", " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_backend_optimization_level")]
                                   + ["--xla_backend_optimization_level=1"]))
    res = _run("--experiment=train_retrieval", f"--out_dir={tmp_path}", *TRAIN)
  assert res.returncode == 0, res.stderr[-3000:]
  _written(tmp_path, "train_retrieval")
  ckpt = tmp_path / "retrieval_checkpoint"
  meta = json.load(open(ckpt / "retrieval.json"))
  # Chance is 1/16; after 150 steps of 1024 tokens at lr 3e-3 the tiny model answers 15.6-23.4%
  # of 512 held-out questions with seeds 0-7 (2048 tokens a step: 14.5-19.5%).
  assert meta["eval_accuracy"] > 2 / 16, meta

  # The two accuracy runs below, in turn in one process (`launch`: imports paid once). Two
  # slots in the first, as the --accuracy_reuse run's engines: their prefill steps are shared.
  common = ["--experiment=accuracy", f"--out_dir={tmp_path}", f"--accuracy_checkpoint={ckpt}",
            "--dtype=float32", "--accuracy_length=129", "--accuracy_docs=1",
            "--accuracy_chunks=32", "--accuracy_always_include=-"]
  runs = launch({
      "accuracy": [*common, "--accuracy_questions=16", "--accuracy_batch=2",
                   "--accuracy_summaries=mean,int4", "--accuracy_sparsities=0,0.75",
                   "--accuracy_int8_scorer=0,1"],
      "accuracy_reuse": [*common, "--accuracy_questions=8", "--accuracy_stream_questions=4",
                         "--accuracy_summaries=int4", "--accuracy_sparsities=0.75",
                         "--accuracy_reuse=1,2", "--accuracy_name=accuracy_reuse"]})

  # Sparsity 0 keeps every chunk: it must reproduce dense exactly; 0.75 drops chunks.
  code, _, stderr = runs["accuracy"]
  assert code == 0, stderr[-3000:]
  _written(tmp_path, "accuracy")
  rows = list(csv.DictReader(l for l in open(tmp_path / "accuracy.csv") if not l.startswith("#")))
  # dense + scorers (mean, int4, int4-int8) x sparsities + oracle x sparsities
  assert len(rows) == 1 + 3 * 2 + 2
  assert {r["scorer"] for r in rows if r["mode"] == "sparse"} == {"mean", "int4", "int4-int8"}
  dense = rows[0]
  assert dense["mode"] == "dense" and [r["mode"] for r in rows[-2:]] == ["oracle"] * 2
  assert rows[-2]["accuracy"] == dense["accuracy"]  # the oracle keeping every chunk
  for r in rows[1:-2]:
    if float(r["sparsity"]) == 0.0:
      assert r["accuracy"] == dense["accuracy"] and float(r["attn_rel_err"]) < 1e-5, r
    else:
      assert float(r["attn_rel_err"]) > 1e-4, r  # routing really dropped chunks

  # --accuracy_reuse: teacher-forced question streams, answers by decode steps re-routing every
  # r steps; every engine answer equals the step-free reference's (r = 1: routing afresh).
  code, _, stderr = runs["accuracy_reuse"]
  assert code == 0, stderr[-3000:]
  _written(tmp_path, "accuracy_reuse")
  rows = list(csv.DictReader(l for l in open(tmp_path / "accuracy_reuse.csv")
                             if not l.startswith("#")))
  assert [(r["mode"], r["reuse"]) for r in rows] == [
      ("dense", "1"), ("sparse", "1"), ("sparse", "2"), ("oracle", "1"), ("oracle", "2")]
  assert all(r["answers"] == "8" for r in rows)
  assert all(float(r["agree_ref"]) == 1.0 for r in rows[:3]), rows
  fresh, reused = rows[1], rows[2]
  assert float(fresh["route_age_mean"]) == 0 and fresh["accuracy_fresh"] == fresh["accuracy"]
  assert float(reused["route_age_mean"]) == 0.5  # keys at decode steps 0, 3, 6, 9


@pytest.mark.parametrize("summary", ["mean", "int4"])
def test_routed_training_attention_keeps_every_chunk_when_top_k_is_all(summary):
  """Routed training attention: with every chunk kept it is plain causal attention; with one
  chunk kept only the question rows change, and they see exactly the router's chunk."""
  import jax
  import numpy as np

  from experiments.train_retrieval import routed_attend
  from moska_jax import routing

  rng = np.random.default_rng(0)
  B, doc, Tq, Hq, Hkv, D, C = 2, 64, 16, 4, 2, 16, 16
  q, k, v = (rng.standard_normal((B, doc + Tq, h, D)).astype("float32") for h in (Hq, Hkv, Hkv))
  # Jitted, on NumPy inputs sliced in NumPy: run eagerly, each op would compile on its own.
  attention = jax.jit(jax.nn.dot_product_attention,
                      static_argnames=("is_causal", "implementation"))
  causal = np.asarray(attention(q, k, v, is_causal=True, implementation="xla"))
  routed = lambda top_k: np.asarray(jax.jit(routed_attend("xla", doc, C, top_k, summary),
                                            static_argnums=0)(0, q, k, v))
  np.testing.assert_allclose(routed(doc // C), causal, atol=1e-5)
  one = routed(1)
  np.testing.assert_allclose(one[:, :doc], causal[:, :doc], atol=1e-5)
  assert np.abs(one[:, doc:] - causal[:, doc:]).max() > 1e-2
  # Question row t attends to its own tokens <= t and the one chunk the router picks for it.
  t = 5
  pick = jax.jit(lambda q, k: routing.route(q, routing.chunk_summaries(k, C, summary=summary), 1))
  c = int(pick(q[1:2, doc + t:doc + t + 1], k[1, :doc])[0, 0, 0])  # kv head 0: heads 0, 1
  rows = np.r_[c * C:(c + 1) * C, doc:doc + t + 1]
  want = attention(q[1:2, doc + t:doc + t + 1, :2], k[1:2, rows, :1], v[1:2, rows, :1],
                   implementation="xla")
  np.testing.assert_allclose(one[1, doc + t, :2], np.asarray(want)[0, 0], atol=1e-5)


def test_forced_decode_through_the_engine_equals_the_step_free_reference():
  """Teacher-forced streams through MoskaEngine: with routes reused every r decode steps the
  logits are those of one forward in which each position attends with the route computed r-wise
  (`stream_reference`); r = 1 is routing afresh, and reuse really changes them."""
  import numpy as np
  from flax import nnx

  from experiments import accuracy
  from moska_jax.config import MoskaConfig, tiny
  from moska_jax.engine import MoskaEngine
  from moska_jax.model import Decoder
  from moska_jax.prefill import build_shared_store
  from moska_jax.step import store_top_k

  cfg = tiny()
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  store = build_shared_store(model, rng.integers(0, cfg.vocab, 200), chunk_size=16,
                             summary="int4", backend="xla")
  streams = rng.integers(0, cfg.vocab, (3, 13)).astype(np.int32)
  np.testing.assert_array_equal(accuracy.route_sources(9, 1, 3), [0, 1, 1, 1, 4, 4, 4, 7, 7])
  refs = {}
  for r in (1, 3):
    mcfg = MoskaConfig(mode="sparse", chunk_size=16, sparsity=0.75, summary="int4",
                       reroute_every=r, backend="xla")
    engine = MoskaEngine(model, store, mcfg, max_batch=3, num_pages=4, page_size=16,
                         prefill_chunk=1, prefill_lanes=3)
    predicted, logits = accuracy.forced_decode(engine, streams, 1, return_logits=True)
    refs[r] = accuracy.stream_reference(model, mcfg, store_top_k(store, mcfg),
                                        accuracy.route_sources(13, 1, r))(store, streams)[:, :-1]
    np.testing.assert_allclose(logits, refs[r], atol=1e-4)
    np.testing.assert_array_equal(predicted, logits.argmax(-1))
  assert np.abs(refs[3] - refs[1]).max() > 0.1
