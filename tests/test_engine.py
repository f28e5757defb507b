"""The engine: queueing beyond max_batch, page freeing, no recompilation, sampling, validation,
swapping the shared store."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from moska_jax.config import MoskaConfig, tiny
from moska_jax.engine import ByteTokenizer, MoskaEngine, Sampling, sample
from moska_jax.kv_cache import UniqueKVCache
from moska_jax.model import Decoder
from moska_jax.prefill import build_shared_store
from moska_jax.scheduler import Scheduler


@pytest.fixture(scope="module")
def setup():
  model = Decoder(tiny(), rngs=nnx.Rngs(0))
  shared = np.random.default_rng(0).integers(0, 256, 150)
  store = build_shared_store(model, shared, chunk_size=64, prefill_chunk=128, backend="xla")
  return model, store


def test_more_prompts_than_slots_all_complete_in_order(setup):
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                       page_size=8, prefill_chunk=8)
  prompts = ["a", "bb", "hello", "x" * 11, "MoSKA"]
  results = engine.generate(prompts, 3)
  assert [r.prompt for r in results] == [ByteTokenizer().encode(p) for p in prompts]
  assert all(len(r.tokens) == 3 for r in results)
  # Same prompts one at a time (a fresh engine) give the same greedy tokens.
  solo = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=16,
                     page_size=8, prefill_chunk=8)
  assert [r.tokens for r in results] == [solo.generate([p], 3)[0].tokens for p in prompts]
  assert len(engine.cache.free_pages) == 15 and not engine.cache.owned  # every page returned
  # The decode step compiled once and the prefill step once, whatever the number of steps.
  assert engine.compilations() == 2 and engine.stats["steps_decode"] > 2


def test_finished_request_frees_pages_for_queued_ones(setup):
  model, store = setup
  # Room for one request at a time: the second waits until the first frees its pages.
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=2, num_pages=4,
                       page_size=8, prefill_chunk=8)
  results = engine.generate(["0123456789", "abcdefghij"], 4)
  assert [len(r.tokens) for r in results] == [4, 4]
  assert len(engine.cache.free_pages) == 3


def test_eos_ends_a_request_early(setup):
  model, store = setup
  mcfg = MoskaConfig(backend="xla")
  prompts = ["first", "second", "third"]
  full = MoskaEngine(model, store, mcfg, max_batch=2, num_pages=16, page_size=8,
                     prefill_chunk=8).generate(prompts, 6)
  eos = full[0].tokens[1]  # request 0 samples it second (greedy: reproducible)
  engine = MoskaEngine(model, store, mcfg, max_batch=2, num_pages=16, page_size=8,
                       prefill_chunk=8)
  results = engine.generate(prompts, 6, eos_id=eos)
  for r, f in zip(results, full):
    stop = f.tokens.index(eos) + 1 if eos in f.tokens else 6
    assert r.tokens == f.tokens[:stop]
  assert len(results[0].tokens) == 2
  assert len(engine.cache.free_pages) == 15 and not engine.cache.owned


def test_callable_tokenizer(setup):
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=8,
                       page_size=8, tokenizer=lambda text: [ord(c) % 256 for c in text])
  (r,) = engine.generate(["hi"], 2)
  assert r.prompt == [104, 105] and r.text is None and len(r.tokens) == 2
  with pytest.raises(ValueError, match="tokenizer must have encode"):
    MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=8, tokenizer=3)


def test_sampling_is_reproducible_and_respects_top_p():
  logits = jax.numpy.asarray(np.random.default_rng(0).standard_normal((4, 50)), "float32")
  key = jax.random.key(7)
  a = sample(logits, key, Sampling(temperature=0.8, top_p=0.9))
  b = sample(logits, key, Sampling(temperature=0.8, top_p=0.9))
  assert np.array_equal(a, b)
  top1 = sample(logits, key, Sampling(temperature=1.0, top_p=1e-6))  # only the top token left
  assert np.array_equal(top1, np.argmax(logits, axis=-1))
  with pytest.raises(ValueError, match="temperature >= 0"):
    Sampling(temperature=-1.0)


def test_validation_errors(setup):
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=3,
                       page_size=4)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    engine.generate(["ok", ""], 2)
  with pytest.raises(ValueError, match="needs 12 tokens of unique cache"):
    engine.generate(["x" * 10], 2)  # 2 usable pages of 4 tokens
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    engine.generate(["ok"], 0)
  with pytest.raises(ValueError, match=r"MoskaConfig.summary must be one of \['envelope', "
                     r"'int4', 'mean'\], got 'median'"):
    MoskaConfig(mode="sparse", top_k=1, summary="median")
  with pytest.raises(ValueError, match="chunk_size=32 must match"):
    MoskaEngine(model, store, MoskaConfig(mode="sparse", top_k=1, chunk_size=32),
                max_batch=1, num_pages=3)
  other = Decoder(tiny(layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="different model config"):
    MoskaEngine(other, store, MoskaConfig(), max_batch=1, num_pages=3)


def test_set_store_swaps_the_shared_context(setup):
  model, store = setup
  other = dataclasses.replace(store, v=tuple(-v for v in store.v))  # another context, same shapes
  make = lambda s: MoskaEngine(model, s, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                               page_size=8, prefill_chunk=8)
  prompts = ["one", "three"]
  engine = make(store)
  before = engine.generate(prompts, 3, return_logits=True)
  engine.set_store(other)
  assert engine.store is other
  after = engine.generate(prompts, 3, return_logits=True)
  for got, want, old in zip(after, make(other).generate(prompts, 3, return_logits=True), before):
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(np.stack(got.logits), np.stack(want.logits))
    assert not np.allclose(np.stack(got.logits), np.stack(old.logits))
  assert engine.compilations() == 2  # the same shapes: the steps compiled for `store` serve it
  with pytest.raises(ValueError, match="different model config"):
    engine.set_store(dataclasses.replace(store, model_config=tiny(layers=1)))
  sparse = MoskaEngine(model, store, MoskaConfig(mode="sparse", top_k=1, chunk_size=64,
                                                 backend="xla"), max_batch=1, num_pages=3)
  with pytest.raises(ValueError, match="summary='mean' must match the store's summaries"):
    sparse.set_store(store.with_summaries(64, "int4"))
  with pytest.raises(ValueError, match="chunk_size=64 must match the store's chunk_size=32"):
    sparse.set_store(store.with_summaries(32))
  assert sparse.store is store  # a rejected store changes nothing


def test_scheduler_admits_batches_and_retires_on_the_host():
  cache = UniqueKVCache(tiny(), max_batch=2, num_pages=5, page_size=4, max_pages_per_request=3)
  sched = Scheduler(cache, max_batch=2, prefill_chunk=4)
  a = sched.submit([1, 2, 3, 4, 5], 2)  # 7 tokens: 2 pages
  b = sched.submit([6], 3, eos_id=9)  # 1 page
  c = sched.submit([7, 8], 5)  # 2 pages: waits until b returns its page
  sched.admit()
  assert sched.active == {0: a, 1: b} and list(sched.queue) == [c]
  batch = sched.batch()  # prefill: a's first 4 prompt tokens, b's only one
  assert batch.prefill and batch.tokens.tolist() == [[1, 2, 3, 4], [6, 0, 0, 0]]
  assert sched.advance(batch, np.array([11, 9])) == [b]  # a is still reading its prompt
  assert b.tokens == [9] and b.done and 1 not in sched.active  # eos: retired at once
  assert cache.lengths.tolist() == [4, 0] and len(cache.free_pages) == 2
  sched.admit()
  assert sched.active == {0: a, 1: c}
  batch = sched.batch()
  assert batch.prefill and batch.fed.tolist() == [1, 2]
  assert sched.advance(batch, np.array([12, 13])) == [a, c]
  batch = sched.batch()  # every slot decodes its last token
  assert not batch.prefill and batch.tokens.tolist() == [[12], [13]]
  assert sched.advance(batch, np.array([14, 15]), np.eye(2)) == [a, c]
  assert a.done and a.tokens == [12, 14] and [x.tolist() for x in a.logits] == [[1.0, 0.0]]
  assert sched.active == {1: c} and sched.busy and len(cache.free_pages) == 2
