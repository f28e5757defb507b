"""MoskaEngine on DeviceGroups: the disaggregated engine equals the single-device engine.

For every split (one device, 1+1, 2+6, 4+4), dense and sparse (and routing by 8-bit sketches of
principal directions with one scale per chunk, "int8-pca2", on one device and on 2+6, the split
that pads the store), greedy generation gives the same tokens and the same logits (f32
tolerance) as the engine without groups, the shared store is really split in whole chunks over
the shared devices of the span (the unique devices' rows hold the pages), a step is one program
per part that moves nothing between devices outside it, and the cross-group bytes are counted.
Mixed prefill + decode steps, sampling streams and recovery from a lost K/V memory run there too;
several contexts, reroute_every > 1 and batch-aware tiles are refused on disaggregated groups
(one device runs them). TPU interpret mode runs on a 2-device unique group with requests split
over it (it aborted when the step was partitioned by GSPMD).
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from moska_jax.config import ModelConfig, MoskaConfig
from moska_jax.engine import MoskaEngine, Sampling
from moska_jax.model import Decoder
from moska_jax.prefill import build_shared_store
from moska_jax.sharding import make_device_groups, span_sharding

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")

C = 32  # the store holds 256 rows = 8 chunks: 2+6 pads it to 12 chunks, two devices empty
SPLITS = {"single": (1, None), "1+1": (2, 1), "2+6": (8, 6), "4+4": (8, 4)}
MODES = {"dense": MoskaConfig(backend="xla"),
         "sparse": MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=C, always_include=(0,),
                               backend="xla"),
         "sparse-sketch": MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=C,
                                      summary="int8-pca2", backend="xla")}
NEW_TOKENS = 3
# Every split runs dense and routed (mean summaries); the sketch summaries, whose per-chunk arrays
# the spans place like the mean's (whole chunks per shared device) and whose projection they
# replicate, run on one device and on 2+6, the split whose store is padded past its chunks (two
# shared devices empty); and on 2+2 with the int8 scorer in
# test_mixed_steps_sampling_and_recovery_on_groups. One device runs the reference's one-device
# step on the arrays it placed (committed there: the step compiles anew), routed only by the
# sketch summaries: per-chunk arrays as the mean's, and a projection.
CASES = [(split, mode) for split in SPLITS for mode in MODES
         if (mode != "sparse-sketch" or split in ("single", "2+6"))
         and (split, mode) != ("single", "sparse")]


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig(vocab=256, layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    mlp_hidden=96, rope_theta=10000.0)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  store = build_shared_store(model, rng.integers(0, 256, 250), chunk_size=C, prefill_chunk=128,
                             backend="xla")
  prompts = [list(rng.integers(0, 256, n)) for n in (3, 8)]  # ragged unique lengths
  stores = {mode: store.with_summaries(C, mcfg.summary) for mode, mcfg in MODES.items()}
  refs = {mode: engine(model, stores[mode], mcfg).generate(prompts, NEW_TOKENS,
                                                           return_logits=True)
          for mode, mcfg in MODES.items()}
  return model, stores, prompts, refs


def engine(model, store, mcfg, groups=None):
  return MoskaEngine(model, store, mcfg, max_batch=2, num_pages=8, page_size=8, prefill_chunk=8,
                     groups=groups)


@pytest.mark.parametrize("split,mode", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_engine_on_groups_equals_single_device(split, mode, setup):
  model, stores, prompts, refs = setup
  n, num_shared = SPLITS[split]
  groups = make_device_groups(jax.devices()[:n], num_shared=num_shared)
  eng = engine(model, stores[mode], MODES[mode], groups)
  results = eng.generate(prompts, NEW_TOKENS, return_logits=True)
  for got, ref in zip(results, refs[mode]):
    assert got.tokens == ref.tokens
    np.testing.assert_allclose(np.stack(got.logits), np.stack(ref.logits), rtol=1e-5, atol=1e-5)

  # Each layer's K/V memory: R rows per span device, the store's (whole chunks) on the shared
  # devices, the page pools on the unique ones; summaries (sparse) alike. Weights everywhere.
  if groups.colocated:
    for arr in jax.tree.leaves((eng.state, eng.cache.pools, eng.shared_kv)):
      assert arr.sharding.device_set == set(groups.unique_devices)
  else:
    roles = groups.span_roles(2)
    for (k, v), layer, store_k in zip(eng.cache.pools, eng.shared_kv, stores[mode].k):
      assert layer.k is k and layer.v is v
      R = layer.rows_per_device
      assert R % C == 0 and R % 8 == 0 and R >= 8 * 8  # whole chunks, whole pages, 8 pages
      parts = [(k, R), (v, R)] + ([] if mode == "dense" else
                                  [(a, R // C) for a in layer.summaries.arrays])
      if mode == "dense":
        assert layer.summaries is None  # dense never routes: the summaries stay home
      for arr, rows in parts:
        assert arr.shape[0] == len(groups.span_devices) * rows
        assert arr.sharding == span_sharding(groups)
      for shard in k.addressable_shards:
        r = roles.shared_rank[groups.span_devices.index(shard.device)]
        if r >= 0:
          want = np.asarray(store_k)[r * R:(r + 1) * R]
          np.testing.assert_array_equal(np.asarray(shard.data)[:len(want)], want)
    for arr in jax.tree.leaves(eng.state):
      assert arr.sharding.is_fully_replicated and arr.sharding.device_set == set(
          groups.span_devices)
  # The span step: a prefill part (2 lanes x 8 tokens) and the decode part. One device runs the
  # one-device step, shared by engines of one model and MoskaConfig: the reference compiled it.
  assert eng.compilations() == (0 if groups.colocated else 2)

  # Per layer and step, every shared device gathers every other span device's block of q
  # [B, T, Hq, D] (a unique device's rows; the prefill lanes' every row, lanes run on every
  # unique device) and every unique device every other span device's partial (o, lse)
  # (float32); per step every shared device gathers the blocks of last logits [B, V] (float32)
  # that every span device samples from. Nothing moves on one device.
  cfg = model.cfg
  span = len(groups.span_devices)
  shards = groups.span_roles(2).shards
  rows = 2 * (8 + NEW_TOKENS - 1)  # 2 slots x (one prefill step of 8 tokens, then decode steps)
  blocks = 2 * 8 + 2 * (NEW_TOKENS - 1) // shards  # the rows of one device's q blocks
  last = 2 + 2 * (NEW_TOKENS - 1) // shards  # its rows of last logits: one per request and step
  expect = (groups.num_shared * (span - 1) * (
      cfg.layers * blocks * cfg.num_heads * cfg.head_dim + last * cfg.vocab) * 4,
            cfg.layers * len(groups.unique_devices) * (span - 1) * rows * cfg.num_heads
            * (cfg.head_dim + 1) * 4)
  assert (eng.stats["bytes_to_shared"], eng.stats["bytes_to_unique"]) == (
      (0, 0) if groups.colocated else expect)


def test_a_step_moves_nothing_outside_its_program(setup):
  """(On 4+4, sparse: the programs of test_engine_on_groups_equals_single_device[4+4-sparse].)"""
  model, stores, prompts, refs = setup
  groups = make_device_groups(jax.devices(), num_shared=4)
  eng = engine(model, stores["sparse"], MODES["sparse"], groups)
  with jax.transfer_guard_device_to_device("disallow_explicit"):
    results = eng.generate(prompts, NEW_TOKENS)
  assert [r.tokens for r in results] == [r.tokens for r in refs["sparse"]]


def test_tpu_interpret_mode_on_a_split_unique_group(setup):
  """Pallas TPU interpret mode on 2 unique devices with 4 requests split over them (issue: the
  process aborted when GSPMD partitioned the interpreter's callbacks, see the engine docs)."""
  _, _, prompts, _ = setup
  # One layer: the interpreted kernels compile per layer (the step's cost); the engine on
  # groups is checked on two layers above.
  cfg = dataclasses.replace(setup[0].cfg, layers=1)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  store = build_shared_store(model, np.random.default_rng(0).integers(0, 256, 250),
                             chunk_size=C, prefill_chunk=128, backend="xla")
  groups = make_device_groups(jax.devices()[:3], num_shared=1)
  mcfg = MoskaConfig(backend="tpu", interpret=True)
  four = prompts + [p[:2] for p in prompts]
  eng = MoskaEngine(model, store, mcfg, max_batch=4, num_pages=8, page_size=8,
                    prefill_chunk=8, groups=groups)
  assert groups.span_roles(4).shards == 2
  got = eng.generate(four, 1, return_logits=True)
  ref = MoskaEngine(model, store, MODES["dense"], max_batch=4, num_pages=8,
                    page_size=8, prefill_chunk=8).generate(four, 1, return_logits=True)
  for a, b in zip(got, ref):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), rtol=1e-4, atol=1e-4)


def test_set_store_places_the_new_store_on_the_groups(setup):
  model, stores, prompts, _ = setup
  groups = make_device_groups(jax.devices(), num_shared=4)
  mcfg = MODES["sparse"]
  store = stores["sparse"]
  other = dataclasses.replace(store, v=tuple(-v for v in store.v))  # another context
  eng = engine(model, store, mcfg, groups)
  eng.generate(prompts, NEW_TOKENS)
  eng.set_store(other)
  assert eng.store is other
  results = eng.generate(prompts, NEW_TOKENS, return_logits=True)
  for got, ref in zip(results, engine(model, other, mcfg).generate(prompts, NEW_TOKENS,
                                                                   return_logits=True)):
    assert got.tokens == ref.tokens
    np.testing.assert_allclose(np.stack(got.logits), np.stack(ref.logits), rtol=1e-5, atol=1e-5)
  roles = groups.span_roles(2)
  for layer, v in zip(eng.shared_kv, other.v):  # the new V, in whole chunks on the shared devices
    R = layer.rows_per_device
    for shard in layer.v.addressable_shards:
      r = roles.shared_rank[groups.span_devices.index(shard.device)]
      if r >= 0:
        want = np.asarray(v)[r * R:(r + 1) * R]
        np.testing.assert_array_equal(np.asarray(shard.data)[:len(want)], want)
  assert eng.compilations() == 2


def test_set_store_of_another_chunk_size_cancels_only_once_placed(setup):
  """Dense, a store of another chunk size replaces the context on 4+4 where the first store's
  rows per device (3 chunks of 32) are not whole chunks of the second's (64): they round up, the
  engine then equals one device on the new store (the fixture's K/V: its reference), and the
  running request is cancelled as replaced (only once the new store is placed)."""
  model, stores, prompts, refs = setup
  mcfg = MODES["dense"]
  first = build_shared_store(model, np.random.default_rng(1).integers(0, 256, 384),
                             chunk_size=C, prefill_chunk=128, backend="xla")
  other = stores["dense"].with_summaries(2 * C)
  eng = engine(model, first, mcfg, make_device_groups(jax.devices(), num_shared=4))
  assert eng._groups.rows == 3 * C
  running = eng.submit(prompts[0], NEW_TOKENS)
  eng.step()
  eng.set_store(other)
  assert running.finish_reason == "cancelled" and "was replaced" in running.error
  assert eng._groups.rows == 4 * C
  got = eng.generate(prompts, NEW_TOKENS, return_logits=True)
  for g, ref in zip(got, refs["dense"]):
    assert g.tokens == ref.tokens
    np.testing.assert_allclose(np.stack(g.logits), np.stack(ref.logits), rtol=1e-5, atol=1e-5)


def test_mixed_steps_sampling_and_recovery_on_groups(setup):
  """The engine's steps on 2+2 groups: a request decodes while another's prompt is read (the
  step's parts run one span program each), per-request sampling streams, the int8 scorer; the
  tokens and logits equal the one-device engine's. A step that lost its donated K/V memory ends
  its requests, and the memory is rebuilt (zero pages, the store's rows) for the next call."""
  model, stores, _, _ = setup
  groups = make_device_groups(jax.devices()[:4], num_shared=2)
  mcfg = dataclasses.replace(MODES["sparse-sketch"], int8_scorer=True)
  store = stores["sparse-sketch"]
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, 256, n)) for n in (21, 3, 12)]
  sampling = [Sampling(temperature=0.8, seed=s) for s in (5, 6, 7)]

  def make(groups=None):
    return MoskaEngine(model, store, mcfg, max_batch=2, num_pages=8, page_size=8,
                       prefill_chunk=8, prefill_lanes=1, groups=groups)

  ref = make().generate(prompts, NEW_TOKENS, sampling, return_logits=True)
  eng = make(groups)
  seen = []
  run = eng._run
  eng._run = lambda plan: (seen.append(bool(plan.decode_slots and plan.lane_slots)), run(plan))[1]
  got = eng.generate(prompts, NEW_TOKENS, sampling, return_logits=True)
  assert any(seen)  # some step decoded beside a prefill
  for a, b in zip(got, ref):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), rtol=1e-5, atol=1e-5)

  calls = [0]

  def failing(plan):
    calls[0] += 1
    out = run(plan)
    if calls[0] == 2:
      for x in jax.tree.leaves(eng.cache.pools):
        x.delete()
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return out

  eng._run = failing
  with pytest.raises(RuntimeError, match="out of memory"):
    eng.generate(prompts, NEW_TOKENS, sampling)
  eng._run = run
  assert not eng.scheduler.busy and not any(x.is_deleted()
                                            for x in jax.tree.leaves(eng.cache.pools))
  assert [r.tokens for r in eng.generate(prompts, NEW_TOKENS, sampling)] == [r.tokens
                                                                             for r in ref]


def test_what_disaggregated_groups_refuse(setup):
  model, stores, _, _ = setup
  groups = make_device_groups(jax.devices()[:2], num_shared=1)
  store, sparse = stores["sparse"], MODES["sparse"]
  with pytest.raises(ValueError, match=r"MoskaConfig.reroute_every=2 .* not supported on "
                     r"disaggregated DeviceGroups"):
    engine(model, store, dataclasses.replace(sparse, reroute_every=2), groups)
  with pytest.raises(ValueError, match=r"MoskaConfig.batch_aware=2 is not supported on "
                     r"disaggregated DeviceGroups"):
    engine(model, store, dataclasses.replace(sparse, batch_aware=2), groups)
  with pytest.raises(ValueError, match=r"shared_store holds 2 contexts \(\['a', 'b'\]\); "
                     r"disaggregated DeviceGroups serve one"):
    engine(model, {"a": store, "b": store}, sparse, groups)
  eng = engine(model, store, sparse, groups)
  with pytest.raises(ValueError, match=r"disaggregated DeviceGroups serve one context "
                     r"\('default'.*a second one, 'other'"):
    eng.load_context("other", store)
  assert eng.contexts == ("default",)
  # One device runs the one-device step: every option, several contexts.
  single = make_device_groups(jax.devices()[:1])
  eng = engine(model, {"a": store, "b": store}, dataclasses.replace(sparse, reroute_every=2),
               single)
  assert eng.contexts == ("a", "b")


def test_prefill_lanes_that_are_not_slots_on_two_unique_devices(setup):
  """A prefill lane is not its request's slot: with requests split over two unique devices,
  lanes that moved (a prompt finishing before another, one lane of several) once wrote pages
  on one device that the decode rows read on the other. Equal to one device."""
  model, stores, _, _ = setup
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(0, 256, n)) for n in (5, 20, 7, 4)]
  make = lambda groups: MoskaEngine(model, stores["dense"], MODES["dense"], max_batch=4,
                                    num_pages=16, page_size=8, prefill_chunk=8, prefill_lanes=2,
                                    groups=groups)
  groups = make_device_groups(jax.devices()[:3], num_shared=1)
  assert groups.request_shards == 2
  got = make(groups).generate(prompts, NEW_TOKENS, return_logits=True)
  for a, b in zip(got, make(None).generate(prompts, NEW_TOKENS, return_logits=True)):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), rtol=1e-5, atol=1e-5)
