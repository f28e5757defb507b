"""Bad inputs get clear ValueErrors, and the engine survives exceptions inside `generate`: after
a KeyboardInterrupt, a tokenizer error or an out-of-memory-like error from the step (donated
page pools lost), the next call gives the tokens of a fresh engine and no request is left
without a finish_reason."""

import math
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from moska_jax.config import ModelConfig, MoskaConfig, tiny
from moska_jax.engine import MoskaEngine, Sampling
from moska_jax.model import Decoder
from moska_jax.prefill import build_shared_store

PROMPTS = ["first prompt", "second", "a third one"]


@pytest.fixture(scope="module")
def setup():
  model = Decoder(tiny(), rngs=nnx.Rngs(0))
  store = build_shared_store(model, np.random.default_rng(0).integers(0, 256, 150),
                             chunk_size=64, prefill_chunk=128, backend="xla")
  fresh = make(model, store).generate(PROMPTS, 5)
  return model, store, [r.tokens for r in fresh]


def make(model, store, **kw):
  args = dict(max_batch=2, num_pages=16, page_size=8, prefill_chunk=8)
  return MoskaEngine(model, store, MoskaConfig(backend="xla"), **(args | kw))


@pytest.mark.parametrize("kw,fragment", [
    (dict(page_size=0), "page_size must be an int >= 1, got 0"),
    (dict(prefill_chunk=0), "prefill_chunk must be an int >= 1, got 0"),
    (dict(prefill_chunk=-8), "prefill_chunk must be an int >= 1, got -8"),
    (dict(max_request_tokens=-5), "max_request_tokens must be an int >= 2, got -5"),
    (dict(max_request_tokens=0), "max_request_tokens must be an int >= 2, got 0"),
    (dict(max_batch=0), "max_batch must be an int >= 1, got 0"),
    (dict(num_pages=1), "num_pages must be an int >= 2, got 1"),
    (dict(prefill_lanes=-1), "prefill_lanes must be an int >= 1, got -1"),
    (dict(prefill_lanes=0), "prefill_lanes must be an int >= 1, got 0"),
    (dict(num_pages=2, page_size=1), r"\(num_pages - 1\) \* page_size, the tokens a request "
     r"may hold, must be >= 2 .*num_pages=2, page_size=1"),
    (dict(max_request_tokens=121), r"max_request_tokens must be at most \(num_pages - 1\) \* "
     r"page_size = 120, the tokens the page pool holds, got 121"),
])
def test_bad_engine_arguments(setup, kw, fragment):
  model, store, _ = setup
  with pytest.raises(ValueError, match=fragment):
    make(model, store, **kw)


def test_bad_prompts_sampling_and_corpus(setup):
  model, store, _ = setup
  engine = make(model, store)
  with pytest.raises(ValueError, match="prompts must be a list of prompts, got one str"):
    engine.generate("text", 3)
  with pytest.raises(ValueError, match=r"prompt 1: token id 300 at position 2 is outside the "
                     r"vocabulary \[0, 256\)"):
    engine.generate([[1, 2], [3, 4, 300]], 3)
  with pytest.raises(ValueError, match=r"token id -1 at position 0 is outside the vocabulary"):
    engine.submit([-1, 5], 3)
  with pytest.raises(ValueError, match="on_event must be callable or None, got str"):
    engine.submit([1, 5], 3, on_event="print")
  with pytest.raises(ValueError, match="return_logits must be a bool, got 'no'"):
    engine.generate([[1, 5]], 3, return_logits="no")
  with pytest.raises(ValueError, match="prompt 0 must be a str or a sequence of token ids, got "
                     "int"):
    engine.generate([5], 3)
  with pytest.raises(ValueError, match="token ids must be ints"):
    engine.generate([[1.5, 2.0]], 3)
  with pytest.raises(ValueError, match=r"eos_id: token id 256 at position 0 is outside"):
    engine.generate(["ok"], 3, eos_id=256)
  for bad in (math.nan, math.inf, -0.5, 1e39, 10**400):  # 1e39: inf in the rows' float32
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0, float32 max\]"):
      Sampling(temperature=bad)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\), got one beyond int64"):
    engine.submit([1, 2**63], 3)
  with pytest.raises(ValueError, match="prompt must be a str or a sequence of token ids, got "
                     "ndarray"):
    engine.submit(np.array(5), 3)
  with pytest.raises(ValueError, match="generate: sampling must be one for every prompt or a "
                     "sequence of one per prompt, got None"):
    engine.generate(["a"], 2, sampling=None)
  with pytest.raises(ValueError, match="generate: context must be one .* got 5"):
    engine.generate(["a"], 2, context=5)
  with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
    Sampling(top_p=math.nan)
  with pytest.raises(ValueError, match=r"the shared corpus: token id 256 at position 3 is "
                     r"outside the vocabulary \[0, 256\)"):
    build_shared_store(model, [1, 2, 3, 256], chunk_size=64, backend="xla")
  with pytest.raises(ValueError, match="the shared corpus is empty"):
    build_shared_store(model, [], chunk_size=64, backend="xla")
  with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
    build_shared_store(model, [1, 2], chunk_size=0, backend="xla")
  with pytest.raises(ValueError, match="build_shared_store: summary must be one of"):
    build_shared_store(model, [1, 2], chunk_size=64, summary="foo", backend="xla")
  with pytest.raises(ValueError, match=r"tokens must be one sequence \[S\] .*shape \(2, 3\)"):
    build_shared_store(model, np.ones((2, 3), np.int32), chunk_size=64, backend="xla")
  # Text through the byte tokenizer on a model of a smaller vocabulary.
  small = Decoder(ModelConfig(vocab=100, layers=1, hidden=32, num_heads=2, num_kv_heads=1,
                              head_dim=16, mlp_hidden=32), rngs=nnx.Rngs(0))
  small_store = build_shared_store(small, [1, 2, 3], chunk_size=64, backend="xla")
  with pytest.raises(ValueError, match=r"token id 122 at position 0 is outside the vocabulary "
                     r"\[0, 100\)"):
    MoskaEngine(small, small_store, MoskaConfig(backend="xla"), max_batch=1,
                num_pages=4).generate(["z"], 2)
  assert not engine.scheduler.busy and engine._inbox.empty()  # nothing half-submitted
  # A bad sampling of a later prompt refuses the call before any prompt is submitted.
  with pytest.raises(ValueError, match="sampling must be a Sampling, got str"):
    engine.generate(["a", "b"], 2, [Sampling(), "x"])
  assert not engine.scheduler.busy and engine._inbox.empty()
  with pytest.raises(TypeError, match="cancel: request must be a Request .*got NoneType"):
    engine.cancel(None)
  assert engine._inbox.empty()


@pytest.mark.parametrize("kw,fragment", [
    (dict(chunk_size=64.0), "chunk_size must be an int >= 1, got 64.0"),
    (dict(mode="sparse", top_k=2.5), "top_k must be an int >= 1, got 2.5"),
    (dict(mode="sparse", sparsity="0.5"), r"sparsity must be a number in \[0, 1\), got '0.5'"),
    (dict(mode="sparse", sparsity=1.0), r"sparsity must be a number in \[0, 1\), got 1.0"),
    (dict(top_k=2), "give mode='sparse' with them .*top_k=2"),
    (dict(sparsity=0.5), "give mode='sparse' with them"),
    (dict(mode="sparse", top_k=2, always_include="0"), "always_include must be distinct chunk "
     "ids >= 0"),
    (dict(mode="sparse", top_k=2, always_include=(0, 0)), "always_include must be distinct"),
    (dict(mode="sparse", top_k=2, always_include=(-1,)), "always_include must be distinct"),
    (dict(mode="sparse", top_k=1, always_include=(0, 1)), "holds 2 ids, more than top_k=1"),
    (dict(interpret="yes"), "interpret must be True or False, got 'yes'"),
    (dict(interpret=1), "interpret must be True or False, got 1"),
    (dict(backend="xla", interpret=True), "backend 'xla' has none"),
])
def test_bad_moska_configs(kw, fragment):
  with pytest.raises(ValueError, match=fragment):
    MoskaConfig(**kw)


def test_always_include_is_a_tuple_within_the_store(setup):
  model, store, _ = setup  # 150 tokens in chunks of 64: ids 0, 1, 2
  assert MoskaConfig(mode="sparse", top_k=2, always_include=[np.int64(2)]).always_include == (2,)
  with pytest.raises(ValueError, match=r"always_include=\(3,\) names chunks past the store's 3 "
                     r"chunks of 64 tokens \(ids in \[0, 3\)\)"):
    MoskaEngine(model, store, MoskaConfig(mode="sparse", top_k=2, chunk_size=64,
                                          always_include=(3,), backend="xla"),
                max_batch=1, num_pages=8)


def test_replacing_a_context_cancels_its_running_requests(setup):
  """Their unique K/V attended to the old store at its positions; a queued request (not yet
  prefilled) starts on the new store and equals a fresh engine's."""
  model, store, _ = setup
  other = build_shared_store(model, np.random.default_rng(1).integers(0, 256, 90),
                             chunk_size=64, prefill_chunk=128, backend="xla")
  engine = make(model, store, max_batch=1)
  running, queued = engine.submit("hello", 6), engine.submit("later", 3)
  for _ in range(3):
    engine.step()
  assert running.tokens and not running.done and queued in engine.scheduler.queue
  engine.set_store(other)
  while engine.step():
    pass
  assert running.finish_reason == "cancelled" and "was replaced" in running.error
  assert queued.tokens == make(model, other).generate(["later"], 3)[0].tokens


def _fail_on_call(engine, n, make_error, lose_pools=False):
  """The engine's n-th step raises make_error() (after running, with its pools deleted when
  lose_pools: a step that consumed its donated pools and then failed)."""
  run, calls = engine._run, [0]

  def failing(plan):
    calls[0] += 1
    if calls[0] != n:
      return run(plan)
    run(plan)
    if lose_pools:
      for x in jax.tree.leaves(engine.cache.pools):
        x.delete()
    raise make_error()

  engine._run = failing
  return lambda: setattr(engine, "_run", run)


@pytest.mark.parametrize("error,lose_pools", [
    (KeyboardInterrupt, False),
    (lambda: RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 12 GiB"), True),
])
def test_generate_survives_an_exception_inside_a_step(setup, error, lose_pools):
  model, store, fresh = setup
  engine = make(model, store)
  restore = _fail_on_call(engine, 4, error, lose_pools)
  with pytest.raises(KeyboardInterrupt if error is KeyboardInterrupt else RuntimeError):
    engine.generate(PROMPTS, 5)
  restore()
  assert not engine.scheduler.busy and len(engine.cache.free_pages) == 15
  assert not any(x.is_deleted() for x in jax.tree.leaves(engine.cache.pools))
  assert [r.tokens for r in engine.generate(PROMPTS, 5)] == fresh


def test_a_tokenizer_error_leaves_the_engine_clean(setup):
  model, store, fresh = setup

  class Flaky:
    def encode(self, text):
      if "boom" in text:
        raise UnicodeError("cannot encode")
      return list(text.encode())

    def decode(self, tokens):
      raise UnicodeError("cannot decode")

  engine = make(model, store, tokenizer=Flaky())
  with pytest.raises(UnicodeError, match="cannot encode"):
    engine.generate(["fine", "boom"], 5)
  with pytest.raises(UnicodeError, match="cannot decode"):
    engine.generate(PROMPTS, 5)
  assert not engine.scheduler.busy
  engine._decode = None
  assert [r.tokens for r in engine.generate(PROMPTS, 5)] == fresh


def test_the_background_loop_survives_a_failed_step(setup):
  """In the loop a failed step ends its requests with an error (generate raises it) and the
  loop serves the next requests."""
  model, store, fresh = setup
  engine = make(model, store)
  restore = _fail_on_call(engine, 2, lambda: RuntimeError("device lost"), lose_pools=True)
  engine.start()
  try:
    with pytest.raises(RuntimeError, match="ended with error: RuntimeError: device lost"):
      engine.generate(PROMPTS, 5)
    restore()
    assert [r.tokens for r in engine.generate(PROMPTS, 5)] == fresh
  finally:
    engine.stop()
  assert engine.stats["requests_error"] >= 1 and not engine.scheduler.busy


def test_a_command_posted_as_the_loop_stops_still_runs(setup):
  """A load_context that saw the loop running, and whose command the loop never took (it
  stopped first), runs on the caller's thread instead of waiting for a later start()."""
  model, store, _ = setup
  engine = make(model, store)
  engine.start()
  post = engine._post

  def loop_ends_then_post(command):
    engine._stopping = True
    engine._wake.set()
    engine._thread.join()
    post(command)

  engine._post = loop_ends_then_post
  caller = threading.Thread(target=engine.load_context, args=("late", store), daemon=True)
  caller.start()
  caller.join(timeout=30)
  engine._post = post
  engine.stop()
  assert not caller.is_alive() and "late" in engine.contexts
