"""The engine: queueing beyond max_batch, page freeing, few compilations, per-request sampling
streams, prefill beside decoding, several shared contexts, the background loop, cancellation,
validation, swapping the shared store."""

import asyncio
import dataclasses
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from moska_jax.config import MoskaConfig, tiny
from moska_jax.engine import ByteTokenizer, MoskaEngine, Sampling, sample
from moska_jax.kv_cache import UniqueKVCache
from moska_jax.model import Decoder
from moska_jax.prefill import build_shared_store
from moska_jax.sampling import SamplingRows, _nucleus, branches
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
  # At most one compilation per step shape (decode only; mixed with 1 or 2 prefill lanes),
  # whatever the number of steps; engines of one model and config share them.
  assert engine.compilations() <= 3 and engine.stats["steps_decode"] > 2
  s = engine.stats  # the step's call is part of the host time
  assert 0 < s["dispatch_seconds"] <= s["host_seconds"]
  compiled = engine.compilations()
  engine.generate(prompts[::-1], 4)
  assert engine.compilations() == compiled and solo.compilations() <= 2


def test_finished_request_frees_pages_for_queued_ones(setup):
  model, store = setup
  # Room for one request at a time (64 tokens: 8 of the 15 pages each): the second waits until
  # the first frees its pages. The file's engine geometry (its compiled steps).
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                       page_size=8, prefill_chunk=8)
  results = engine.generate(["0123456789" * 6, "abcdefghij" * 6], 4)
  assert [len(r.tokens) for r in results] == [4, 4]
  assert len(engine.cache.free_pages) == 15


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
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                       page_size=8, prefill_chunk=8,
                       tokenizer=lambda text: [ord(c) % 256 for c in text])
  (r,) = engine.generate(["hi"], 2)
  assert r.prompt == [104, 105] and r.text is None and len(r.tokens) == 2
  with pytest.raises(ValueError, match="tokenizer must have encode"):
    MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=8, tokenizer=3)


def _rows(n, temperature, top_p, seed, index):
  full = lambda x, dt: np.full((n,), x, dt)
  return SamplingRows(full(temperature, np.float32), full(top_p, np.float32),
                      full(seed, np.uint32), full(index, np.int32))


def test_sampling_is_per_row_reproducible_and_respects_top_p():
  jitted = jax.jit(sample, static_argnames=("draw", "nucleus"))
  sample_jit = lambda logits, rows: jitted(logits, rows, **branches(rows))
  # NumPy logits, sliced in NumPy, and a jitted _nucleus: eagerly, each op compiles on its own.
  logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
  a = sample_jit(logits, _rows(4, 0.8, 0.9, 7, 3))
  assert np.array_equal(a, sample_jit(logits, _rows(4, 0.8, 0.9, 7, 3)))
  top1 = sample_jit(logits, _rows(4, 1.0, 1e-6, 7, 3))  # only the top token left
  assert np.array_equal(top1, np.argmax(logits, axis=-1))
  # The nucleus is the fewest tokens reaching top_p, ties or not: one logit of 3 among 1000 zeros
  # holds 2% of the mass, so top_p=0.05 keeps it and 31 of the zeros (the first by token id); a
  # top_p that is 0 in float32 keeps the top token.
  tied = jax.numpy.asarray([[3.0] + [0.0] * 1000, [0.0] * 1000 + [3.0]], "float32")
  probs = np.asarray(jax.nn.softmax(tied[0]), np.float64)
  need = int(np.searchsorted(np.cumsum(probs), 0.05, side="left")) + 1
  for top_p, count in ((0.05, need), (1e-50, 1)):
    keep = np.asarray(jax.jit(_nucleus)(tied, np.full((2,), top_p, np.float32)))
    assert keep.sum(axis=1).tolist() == [count, count]
    assert keep[0, 0] and keep[1, 1000] and keep[0, :count].all() and keep[1, :count - 1].all()
  # A row's token depends on its own logits, parameters, seed and index only: alone, or in a
  # batch whose other rows are greedy, nucleus-sampled or seeded differently.
  rows = SamplingRows(np.asarray([0.8, 0.0, 1.3, 0.8], np.float32),
                      np.asarray([1.0, 1.0, 0.5, 1.0], np.float32),
                      np.asarray([7, 1, 2, 8], np.uint32), np.asarray([3, 0, 5, 3], np.int32))
  mixed = np.asarray(sample_jit(logits, rows))
  for i in range(4):
    alone = sample_jit(logits[i:i + 1], SamplingRows(*(x[i:i + 1] for x in rows)))
    assert mixed[i] == int(alone[0])
  assert mixed[1] == int(np.argmax(logits[1]))
  # The branches decided on the host (as the engine's step does) give the tokens of the full
  # form (drawing, top_p), with no device-side branch in the program (on a GPU one makes the
  # host wait for the device).
  for r in (rows, _rows(4, 0.8, 1.0, 7, 3), _rows(4, 0.0, 0.5, 7, 3)):
    full = jitted(logits, r, draw=True, nucleus=True)
    assert np.array_equal(sample_jit(logits, r), full)
    assert "stablehlo.case" not in jitted.lower(logits, r, **branches(r)).as_text()
  assert branches(rows) == dict(draw=True, nucleus=True)
  assert branches(_rows(4, 0.0, 0.5, 7, 3)) == dict(draw=False, nucleus=False)
  draws = {int(sample_jit(logits[:1], _rows(1, 2.0, 1.0, 7, j))[0]) for j in range(40)}
  assert len(draws) > 5  # the token index moves the stream
  with pytest.raises(ValueError, match="temperature must be a number in"):
    Sampling(temperature=-1.0)
  # A temperature so small that logits / t overflows still samples the largest logit.
  big = jax.numpy.asarray([[1.0, 3.0, 2.0, -1.0], [10.0, 30.0, 29.0, 0.0]], "float32")
  assert sample_jit(big, _rows(2, 1e-38, 1.0, 7, 3)).tolist() == [1, 1]
  numpy_args = Sampling(temperature=np.float32(0.5), top_p=np.float64(0.9), seed=np.int64(3))
  assert numpy_args == Sampling(temperature=0.5, top_p=0.9, seed=3)
  assert type(numpy_args.seed) is int and type(numpy_args.temperature) is float


def test_a_sampled_request_is_a_function_of_its_prompt_sampling_and_seed(setup):
  """The same seeded request gives the same tokens alone, beside other requests, at another
  max_batch and later in the queue (issue: one key per step made each request's noise depend
  on its slot and the global step count). The engines have the geometries of the file's others
  (their compiled steps): one slot, and four."""
  model, store = setup
  mcfg = MoskaConfig(backend="xla")
  mine = Sampling(temperature=1.5, top_p=0.95, seed=1234)
  others = [Sampling(temperature=0.7, seed=5), Sampling(), Sampling(temperature=2.0, seed=6)]
  alone = MoskaEngine(model, store, mcfg, max_batch=1, num_pages=16, page_size=8,
                      prefill_chunk=8).generate(["the question"], 12, mine)[0].tokens
  engine = MoskaEngine(model, store, mcfg, max_batch=4, num_pages=40, page_size=8,
                       prefill_chunk=8, prefill_lanes=2)
  got = engine.generate(["x", "the question", "yz" * 5], 12, [others[0], mine, others[2]])
  assert got[1].tokens == alone  # slot 1, beside two sampled requests
  late = engine.generate(["a" * 9, "b", "c", "d", "the question"], 12,
                         others + [others[0], mine])
  assert late[4].tokens == alone  # fifth: queued until a slot frees, another step count
  assert got[0].tokens != alone and late[0].tokens != got[0].tokens
  with pytest.raises(ValueError, match=r"seed must be None or an int in \[0, 2\*\*32\)"):
    Sampling(temperature=1.0, seed=-1)
  drawn = engine.submit("hi", 2, Sampling(temperature=1.0))  # seed drawn and kept
  assert drawn.sampling.seed is not None


def test_scheduler_admits_plans_mixed_steps_and_retires_on_the_host():
  cache = UniqueKVCache(tiny(), max_batch=2, num_pages=5, page_size=4, max_pages_per_request=4)
  sched = Scheduler(cache, max_batch=2, prefill_chunk=4, prefill_lanes=2)
  index = {"default": 0, "other": 1}
  a = sched.submit([1, 2, 3, 4, 5], 2)  # 7 tokens: 2 pages
  b = sched.submit([6], 3, eos_id=9, context="other")  # 1 page
  c = sched.submit([7, 8], 5)  # 2 pages: waits until b returns its page
  sched.admit()
  assert sched.active == {0: a, 1: b} and list(sched.queue) == [c]
  plan = sched.plan(index)  # nobody decodes yet: two prefill lanes, a's first 4 tokens, b's one
  assert plan.decode_slots == [] and plan.lane_slots == [0, 1] and not plan.decode.fed.any()
  assert plan.lanes.tokens.tolist() == [[1, 2, 3, 4], [6, 0, 0, 0]]
  assert plan.lanes.context.tolist() == [0, 1] and plan.lanes.lengths.tolist() == [0, 0]
  assert sched.advance(plan, np.array([0, 0, 11, 9])) == [b]  # a is still reading its prompt
  assert b.tokens == [9] and b.done and b.finish_reason == "stop" and 1 not in sched.active
  assert cache.lengths.tolist() == [4, 0] and len(cache.free_pages) == 2
  sched.admit()
  assert sched.active == {0: a, 1: c}
  plan = sched.plan(index)
  assert plan.lanes.fed.tolist() == [1, 2] and plan.lanes.tables[0].tolist() == [1, 2, 0, 0]
  assert sched.advance(plan, np.array([0, 0, 12, 13])) == [a, c]
  plan = sched.plan(index, reroute_every=2)  # every slot decodes its last token
  assert not plan.prefill and plan.decode.tokens.tolist() == [[12], [13]]
  assert plan.decode.lengths.tolist() == [5, 2] and plan.reroute.tolist() == [True, True]
  assert plan.sampling.index.tolist() == [1, 1]
  assert sched.advance(plan, np.array([14, 15]), np.eye(2)) == [a, c]
  assert a.done and a.finish_reason == "length" and a.tokens == [12, 14] and a.logits == []
  assert sched.active == {1: c} and sched.busy and len(cache.free_pages) == 2
  assert sched.plan(index, reroute_every=2).reroute.tolist() == [False, False]
  assert sched.lane_bucket(1) == 1 and sched.lane_bucket(2) == 2 and sched.lane_bucket(3) == 2


def _slow_step(engine, seconds):
  """Makes every step of `engine` take at least `seconds` (to catch the loop mid-request)."""
  step = engine._run

  def run(plan):
    time.sleep(seconds)
    return step(plan)
  engine._run = run


def test_a_long_prompt_never_stops_the_decoding_requests(setup):
  """While a 200-token prompt is read in chunks of 8, the decoding request gets a token every
  step, and both requests' tokens equal those of engines serving them alone."""
  model, store = setup
  mcfg = MoskaConfig(backend="xla")
  make = lambda: MoskaEngine(model, store, mcfg, max_batch=4, num_pages=40, page_size=8,
                             prefill_chunk=8, prefill_lanes=1)  # test_many_streams' steps
  long = list(np.random.default_rng(1).integers(0, 256, 200))
  engine = make()
  short = engine.submit("decode me", 40)
  while not short.tokens:
    engine.step()
  reader = engine.submit(long, 3)
  steps = 0
  while reader.prefilling:
    before = len(short.tokens)
    engine.step()
    steps += 1
    assert len(short.tokens) == before + 1  # a token every step, prompt or not
  assert steps == 200 // 8
  while not (short.done and reader.done):
    engine.step()
  assert short.tokens == make().generate(["decode me"], 40)[0].tokens
  assert reader.tokens == make().generate([long], 3)[0].tokens


def test_several_contexts_serve_one_step_like_single_context_engines(setup):
  """Two resident contexts (one step serves requests of both): tokens and logits equal two
  single-context engines', dense and sparse; loading a second context into a single-context
  engine and unloading it while serving (its steps of two contexts are both's, compiled); an
  unknown context is a clear error."""
  model, store = setup
  other = build_shared_store(model, np.random.default_rng(5).integers(0, 256, 300),
                             chunk_size=64, prefill_chunk=128, backend="xla")
  prompts = ["one", "two two", "three", "four four four"]
  names = ["manual", "code", "code", "manual"]
  for mcfg in (MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=64, backend="xla"),
               MoskaConfig(backend="xla")):  # the dense engine stays for loading / unloading
    make = lambda stores: MoskaEngine(model, stores, mcfg, max_batch=2, num_pages=16,
                                      page_size=8, prefill_chunk=8)
    both = make({"manual": store, "code": other})
    assert both.contexts == ("manual", "code") and both.default_context == "manual"
    got = both.generate(prompts, 4, context=names, return_logits=True)
    solo = {n: make({n: s}) for n, s in (("manual", store), ("code", other))}
    for n in solo:
      mine = [i for i, m in enumerate(names) if m == n]
      want = solo[n].generate([prompts[i] for i in mine], 4, return_logits=True)
      for i, w in zip(mine, want):
        assert got[i].tokens == w.tokens
        np.testing.assert_allclose(np.stack(got[i].logits), np.stack(w.logits), atol=2e-5)
  with pytest.raises(ValueError, match=r"unknown context 'nope'; resident contexts: \['code', "
                     r"'manual'\]"):
    both.generate(["x"], 2, context="nope")
  # Without a loop, an unload runs after the commands posted before it: it cancels a submit
  # that preceded it, before it returns.
  engine = solo["manual"]
  engine.load_context("code", other)
  early = engine.submit("on the code", 4, context="code")
  engine.unload_context("code")
  assert early.done and early.finish_reason == "cancelled"
  want = both.generate(["keeps running", "x"], 12)[0].tokens
  engine.start()
  try:
    _slow_step(engine, 0.02)
    running = engine.submit("keeps running", 12)
    engine.load_context("code", other)
    doomed = engine.submit("on the code", 12, context="code")
    while not doomed.tokens:
      time.sleep(0.01)
    engine.unload_context("code")
    assert doomed.done and doomed.finish_reason == "cancelled" and "unloaded" in doomed.error
    assert running.finished_event.wait(60) and running.finish_reason == "length"
    assert running.tokens == want
  finally:
    engine.stop()
  with pytest.raises(ValueError, match="'manual' is the default context"):
    engine.unload_context("manual")


def test_a_raising_callback_cancels_its_request_once(setup):
  """A request whose on_event raises on a token is cancelled, with one end event and one count
  in stats (the end was notified twice)."""
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                       page_size=8, prefill_chunk=8)
  ends = []

  def on_event(r, token):
    if token is None:
      ends.append(r.finish_reason)
    else:
      raise RuntimeError("a client's bug")

  r = engine.submit([1, 2, 3], 4, on_event=on_event)
  while not r.done:
    engine.step()
  assert ends == ["cancelled"] and engine.stats["requests_cancelled"] == 1
  assert "on_event callback raised" in r.error and r.finished_event.is_set()


def test_a_callback_that_replaces_the_context_ends_each_request_once(setup):
  """A token callback that replaces the store mid-step cancels every request of the context at
  once: none of them gets a token after its end event, and each end is counted once."""
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                       page_size=8, prefill_chunk=8)
  events = {}

  def on_event(r, token):
    events.setdefault(r.id, []).append(token)
    if token is not None and len(events[r.id]) == 2 and r.id == a.id:
      engine.set_store(store)

  a = engine.submit([1], 5, on_event=on_event)
  b = engine.submit([2], 5, on_event=on_event)
  while engine.step():
    pass
  for r in (a, b):
    assert r.finish_reason == "cancelled" and events[r.id].count(None) == 1
    assert events[r.id][-1] is None, events
  assert engine.stats["requests_cancelled"] == 2


def test_warmup_fits_the_smallest_request_budget(setup):
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=8,
                       page_size=4, prefill_chunk=4, max_request_tokens=2)
  engine.warmup()
  assert engine.generate([[3]], 1)[0].finish_reason == "length"


def test_background_loop_joins_requests_cancels_and_streams(setup):
  """Requests submitted from several threads join the running batch; a cancelled request's slot
  and pages come back before the next step; generate works on top of the loop; `stream` gives
  the tokens to asyncio; the interpreter's switch interval is the loop's while it runs."""
  model, store = setup
  mcfg = MoskaConfig(backend="xla")
  engine = MoskaEngine(model, store, mcfg, max_batch=2, num_pages=16, page_size=8,
                       prefill_chunk=8)
  want = MoskaEngine(model, store, mcfg, max_batch=2, num_pages=16, page_size=8,
                     prefill_chunk=8).generate(["alpha", "beta", "gamma"], 6)
  with pytest.raises(ValueError, match="start: switch_interval must be > 0 seconds or None"):
    engine.start(switch_interval=-1.0)
  interval = sys.getswitchinterval()
  engine.start(switch_interval=1e-3)
  try:
    assert sys.getswitchinterval() == pytest.approx(1e-3)
    got = {}
    threads = [threading.Thread(target=lambda p=p: got.update({p: engine.generate([p], 6)[0]}))
               for p in ("alpha", "beta", "gamma")]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    assert [got[p].tokens for p in ("alpha", "beta", "gamma")] == [w.tokens for w in want]

    _slow_step(engine, 0.05)
    victim = engine.submit("cancel me", 50)
    while len(victim.tokens) < 2:
      time.sleep(0.01)
    steps = engine.stats["steps_decode"]
    engine.cancel(victim)
    assert victim.finished_event.wait(5) and victim.finish_reason == "cancelled"
    assert engine.stats["steps_decode"] <= steps + 1  # freed before the next step
    assert not engine.scheduler.active and len(engine.cache.free_pages) == 15

    async def consume():
      tokens = [t async for t in engine.stream("alpha", 6)]
      async with engine.stream("beta", 50) as early:  # left after 2 tokens: cancelled
        async for _ in early:
          if len(early.request.tokens) >= 2:
            break
      return tokens, early.request

    tokens, early = asyncio.run(consume())
    assert tokens == want[0].tokens
    assert early.finished_event.wait(5) and early.finish_reason == "cancelled"
  finally:
    engine.stop()
  assert not engine.running and not engine.scheduler.busy
  assert sys.getswitchinterval() == interval
  # Two loops at once: the interpreter's interval comes back when the last one stops.
  other = MoskaEngine(model, store, mcfg, max_batch=2, num_pages=16, page_size=8,
                      prefill_chunk=8)
  engine.start(switch_interval=1e-3)
  other.start(switch_interval=2e-3)
  engine.stop()
  assert sys.getswitchinterval() == pytest.approx(2e-3)
  other.stop()
  assert sys.getswitchinterval() == interval


def test_many_streams_get_generates_tokens_in_order(setup):
  """12 concurrent streams (3x max_batch: they queue) each get generate's tokens, in order,
  greedy and sampled; one left early is cancelled; each step's tokens of all streams reach the
  asyncio loop in one call_soon_threadsafe; a failed step raises in its stream."""
  model, store = setup
  make = lambda: MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=4,
                             num_pages=40, page_size=8, prefill_chunk=8)
  prompts = [f"stream {i} " * (1 + i % 3) for i in range(12)]
  samplings = [Sampling(0.9, seed=i) if i % 4 == 1 else Sampling() for i in range(12)]
  want = [r.tokens for r in make().generate(prompts, 6, samplings)]
  engine = make()

  async def consume():
    loop, calls = asyncio.get_running_loop(), [0]
    hand_over = loop.call_soon_threadsafe

    def counted(*args):
      calls[0] += 1
      return hand_over(*args)
    loop.call_soon_threadsafe = counted

    async def client(i, stream):
      async with stream:
        tokens = []
        async for token in stream:
          tokens.append(token)
          if i == 5 and len(tokens) == 2:
            break
      return tokens, stream.request

    with engine._drive:  # all queued before the first step: the steps do not depend on timing
      streams = [engine.stream(p, 6, s) for p, s in zip(prompts, samplings)]
    return await asyncio.gather(*map(client, range(12), streams)), calls[0]

  engine.start()
  try:
    got, calls = asyncio.run(consume())
    steps = engine.stats["steps_decode"] + engine.stats["steps_prefill"]
    for i, (tokens, request) in enumerate(got):
      if i == 5:
        assert tokens == want[5][:2] and request.finished_event.wait(5)
        assert request.finish_reason == "cancelled"
      else:
        assert tokens == want[i] and request.finish_reason == "length"
    assert calls <= steps + 2 < sum(map(len, want))  # a hand-over per step, not per token

    def failing(plan):
      raise RuntimeError("device lost")
    engine._run = failing

    async def doomed():
      return [t async for t in engine.stream("x", 4)]
    with pytest.raises(RuntimeError, match=r"failed: RuntimeError: device lost"):
      asyncio.run(doomed())
  finally:
    engine.stop()
  assert not engine.scheduler.busy

def test_stream_interval_wakes_a_waiting_consumer_per_interval(setup):
  """With stream_interval=3 a consumer that waits is woken once 3 tokens (or the end) are
  buffered and takes them in one go: generate's tokens, in at most 6 / 3 + 1 batches; a bad
  interval is refused."""
  model, store = setup
  make = lambda: MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=4,
                             num_pages=40, page_size=8, prefill_chunk=8)
  prompts = [f"interval {i} " * (1 + i % 2) for i in range(4)]
  want = [r.tokens for r in make().generate(prompts, 6)]
  engine = make()

  async def consume():
    async def client(stream):
      batches = []
      async with stream:
        async for token in stream:
          batches.append([token, *stream.drain()])
      return batches

    with engine._drive:
      streams = [engine.stream(p, 6, stream_interval=3) for p in prompts]
    return await asyncio.gather(*map(client, streams))

  engine.start()
  try:
    for batches, tokens in zip(asyncio.run(consume()), want):
      assert sum(batches, []) == tokens and len(batches) <= 3
    with pytest.raises(ValueError, match="stream_interval must be an int >= 1, got 0"):
      asyncio.run(_stream_once(engine, stream_interval=0))
  finally:
    engine.stop()


async def _stream_once(engine, **kwargs):
  return [t async for t in engine.stream("x", 2, **kwargs)]


def test_validation_errors(setup):
  model, store = setup
  engine = MoskaEngine(model, store, MoskaConfig(backend="xla"), max_batch=1, num_pages=3,
                       page_size=4)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    engine.generate(["ok", ""], 2)
  with pytest.raises(ValueError, match="needs 12 tokens of unique cache"):
    engine.generate(["x" * 10], 2)  # 2 usable pages of 4 tokens
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
    engine.generate(["ok"], 0)
  with pytest.raises(ValueError, match=r"MoskaConfig.summary must be one of \['envelope', "
                     r"'int4', 'int4-pca2', 'int4-pca4', 'int8-pca2', 'int8-pca4', 'mean'\], "
                     r"got 'median'"):
    MoskaConfig(mode="sparse", top_k=1, summary="median")
  with pytest.raises(ValueError, match="chunk_size=32 must match"):
    MoskaEngine(model, store, MoskaConfig(mode="sparse", top_k=1, chunk_size=32),
                max_batch=1, num_pages=3)
  other = Decoder(tiny(layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="different model config"):
    MoskaEngine(other, store, MoskaConfig(), max_batch=1, num_pages=3)
  with pytest.raises(ValueError, match="reroute_every must be an int >= 1, got 0"):
    MoskaConfig(mode="sparse", top_k=1, reroute_every=0)


def test_set_store_swaps_the_shared_context(setup):
  model, store = setup
  other = dataclasses.replace(store, v=tuple(-v for v in store.v))  # another context, same shapes
  make = lambda s: MoskaEngine(model, s, MoskaConfig(backend="xla"), max_batch=2, num_pages=16,
                               page_size=8, prefill_chunk=8)
  prompts = ["one", "three"]
  engine = make(store)
  before = engine.generate(prompts, 3, return_logits=True)
  compiled = engine.compilations()
  engine.set_store(other)
  assert engine.store is other
  after = engine.generate(prompts, 3, return_logits=True)
  for got, want, old in zip(after, make(other).generate(prompts, 3, return_logits=True), before):
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(np.stack(got.logits), np.stack(want.logits))
    assert not np.allclose(np.stack(got.logits), np.stack(old.logits))
  assert engine.compilations() == compiled  # the same shapes: `store`'s steps serve it
  with pytest.raises(ValueError, match="different model config"):
    engine.set_store(dataclasses.replace(store, model_config=tiny(layers=1)))
  sparse = MoskaEngine(model, store, MoskaConfig(mode="sparse", top_k=1, chunk_size=64,
                                                 backend="xla"), max_batch=1, num_pages=3)
  with pytest.raises(ValueError, match="summary='int8-pca2' must match the store's summaries"):
    sparse.set_store(store.with_summaries(64, "int4"))
  with pytest.raises(ValueError, match="chunk_size=64 must match the store's chunk_size=32"):
    sparse.set_store(store.with_summaries(32))
  assert sparse.store is store  # a rejected store changes nothing
