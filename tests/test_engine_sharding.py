"""MoskaEngine on DeviceGroups: the disaggregated engine equals the single-device engine.

For every split (one device, 1+1, 2+6, 4+4), dense and sparse, greedy generation gives the same
tokens and the same logits (f32 tolerance) as the engine without groups, the shared store is
really split in whole chunks over the shared group, and the cross-group bytes are counted.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moska_jax.config import ModelConfig, MoskaConfig
from moska_jax.engine import MoskaEngine
from moska_jax.model import Decoder
from moska_jax.prefill import build_shared_store
from moska_jax.sharding import make_device_groups

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")

C = 32  # the store holds 256 rows = 8 chunks: 2+6 pads it to 12 chunks, two devices empty
SPLITS = {"single": (1, None), "1+1": (2, 1), "2+6": (8, 6), "4+4": (8, 4)}
MODES = {"dense": MoskaConfig(backend="xla"),
         "sparse": MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=C, always_include=(0,),
                               backend="xla"),
         "sparse-int4": MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=C, summary="int4",
                                    backend="xla")}
NEW_TOKENS = 3


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


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("split", list(SPLITS))
def test_engine_on_groups_equals_single_device(split, mode, setup):
  model, stores, prompts, refs = setup
  n, num_shared = SPLITS[split]
  groups = make_device_groups(jax.devices()[:n], num_shared=num_shared)
  eng = engine(model, stores[mode], MODES[mode], groups)
  results = eng.generate(prompts, NEW_TOKENS, return_logits=True)
  for got, ref in zip(results, refs[mode]):
    assert got.tokens == ref.tokens
    np.testing.assert_allclose(np.stack(got.logits), np.stack(ref.logits), rtol=1e-5, atol=1e-5)

  # The engine's shared K/V (and summaries) are split in whole chunks over the shared group.
  s_pad = 384 if split == "2+6" else 256  # 8 chunks; 2+6 pads them to 12, 2 per device
  for layer in eng.shared_kv:
    parts = [(layer.k, s_pad), (layer.v, s_pad)]
    if mode != "dense":
      parts += [(a, s_pad // C) for a in layer.summaries.arrays]
    else:
      assert layer.summaries is None  # dense never routes: the summaries stay home
    for arr, rows in parts:
      assert arr.shape[0] == rows and arr.sharding == NamedSharding(groups.shared_mesh, P("kv"))
      shards = {s.device: s.data.shape for s in arr.addressable_shards}
      assert set(shards) == set(groups.shared_devices)
      assert set(shards.values()) == {(rows // groups.num_shared, *arr.shape[1:])}
  # The weights and the page pools stay on the unique group; nothing recompiled per step.
  for arr in jax.tree.leaves(eng.state) + jax.tree.leaves(eng.cache.pools):
    assert arr.sharding.device_set == set(groups.unique_devices)
  assert eng.compilations() == 2  # the unique program: prefill and decode

  # Per layer and step, q lands on every shared device and (o, lse) come back: split over
  # "batch" when max_batch (2) divides it, else one copy per unique device (4+4). Nothing moves
  # on one device.
  cfg = model.cfg
  rows = 2 * (8 + NEW_TOKENS - 1)  # 2 slots x (one prefill step of 8 tokens, then decode steps)
  copies = 1 if 2 % groups.unique_mesh.shape["batch"] == 0 else len(groups.unique_devices)
  q_bytes = rows * cfg.num_heads * cfg.head_dim * 4
  expect = (cfg.layers * groups.num_shared * q_bytes,
            cfg.layers * copies * rows * cfg.num_heads * (cfg.head_dim + 1) * 4)
  assert (eng.stats["bytes_to_shared"], eng.stats["bytes_to_unique"]) == (
      (0, 0) if groups.colocated else expect)


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
  for layer, v in zip(eng.shared_kv, other.v):  # the new V, split in whole chunks over "kv"
    assert layer.v.sharding == NamedSharding(groups.shared_mesh, P("kv"))
    np.testing.assert_array_equal(np.asarray(layer.v)[:v.shape[0]], np.asarray(v))
  assert eng.compilations() == 2
