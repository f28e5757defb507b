"""moska_jax.sharding on 8 emulated CPU devices: groups, placement and the cross-group shared step.

Every group split (1+1, 2+6, 4+4, one device) must give the single-device kernels' (o, lse) to f32
tolerance, dense and sparse, with the shared K/V really split in whole chunks and the transfers
counted. Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (as .ci/run does).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moska_jax import routing
from moska_jax.sharding import (DeviceGroups, ShardingRules, make_device_groups, place_shared_kv,
                                place_unique, send_to_unique, shared_attention_step)
from pallas_kernels import chunk_attention, shared_attention
from tests.np_reference import rel_err

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")

B, T, Hq, Hkv, D = 4, 2, 4, 2, 16
C, S, K = 16, 200, 4  # N = 13 chunks: no split below divides it, so every store is padded
N = -(-S // C)
O_TOL, LSE_TOL = 1e-5, 2e-5

# name -> (devices taken, num_shared)
SPLITS = {"1+1": (2, 1), "2+6": (8, 6), "4+4": (8, 4), "single": (1, None)}


def groups_for(name: str) -> DeviceGroups:
  n, num_shared = SPLITS[name]
  return make_device_groups(jax.devices()[:n], num_shared=num_shared)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((B, T, Hq, D), np.float32)
  k = rng.standard_normal((S, Hkv, D), np.float32)
  v = rng.standard_normal((S, Hkv, D), np.float32)
  ids = np.stack([rng.permutation(N)[:K] for _ in range(B * Hkv)]).reshape(B, Hkv, K)
  ids[-1, :, -1] = -1  # router padding
  return q, k, v, ids.astype(np.int32)


def assert_close(o, lse, o_ref, lse_ref):
  o, lse = np.asarray(o), np.asarray(lse)
  assert not np.isnan(o).any() and not np.isnan(lse).any()
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(np.asarray(lse_ref)))
  assert rel_err(o, np.asarray(o_ref)) < O_TOL
  fin = np.isfinite(lse)
  np.testing.assert_allclose(lse[fin], np.asarray(lse_ref)[fin], atol=LSE_TOL)


# 4+4 with kv_length=150: device 2 is ragged (22 of its 64 rows), device 3 is fully past
# kv_length (partial lse = -inf); 40: only device 0 holds keys; 0: every device is empty.
CASES = ([(split, length) for split in SPLITS for length in (None, 150)]
         + [(split, length) for split in ("4+4", "single") for length in (40, 0)])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("split, kv_length", CASES)
def test_step_equals_single_device(split, kv_length, mode, data):
  q, k, v, ids = data
  groups = groups_for(split)
  store = place_shared_kv(groups, k, v, chunk_size=C, kv_length=kv_length)
  q_u = place_unique(groups, q, batch_axis=0)
  sparse = dict(chunk_ids=jnp.asarray(ids), chunk_size=C) if mode == "sparse" else {}
  o, lse, stats = shared_attention_step(groups, q_u, store.k, store.v, kv_length=store.kv_length,
                                        backend="xla", **sparse)
  if mode == "dense":
    o_ref, lse_ref = shared_attention(q, k, v, kv_length=kv_length, backend="xla")
  else:
    o_ref, lse_ref = chunk_attention(q, k, v, ids, chunk_size=C, kv_length=kv_length,
                                     backend="xla")
  assert_close(o, lse, o_ref, lse_ref)
  assert o.dtype == q.dtype and lse.dtype == jnp.float32
  assert o.sharding.device_set == set(groups.unique_devices)
  assert o.sharding.is_equivalent_to(q_u.sharding, o.ndim)
  assert (stats.total_bytes == 0) == groups.colocated


@pytest.mark.parametrize("split", ["2+6", "single"])
def test_routing_on_the_shared_group(split, data):
  q, k, v, _ = data
  groups = groups_for(split)
  summaries = routing.chunk_summaries(jnp.asarray(k), C, kv_length=170)
  store = place_shared_kv(groups, k, v, summaries, chunk_size=C, kv_length=170)
  o, lse, _ = shared_attention_step(groups, jnp.asarray(q), store.k, store.v,
                                    kv_length=store.kv_length, summaries=store.summaries,
                                    top_k=3, chunk_size=C, backend="xla")
  ids = routing.route(jnp.asarray(q), summaries, 3)
  o_ref, lse_ref = chunk_attention(q, k, v, ids, chunk_size=C, kv_length=170, backend="xla")
  assert_close(o, lse, o_ref, lse_ref)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_pallas_kernels_inside_shard_map(mode, data):
  q, k, v, ids = data
  groups = groups_for("4+4")
  store = place_shared_kv(groups, k, v, chunk_size=C)
  sparse = dict(chunk_ids=jnp.asarray(ids), chunk_size=C) if mode == "sparse" else {}
  o, lse, _ = shared_attention_step(groups, jnp.asarray(q), store.k, store.v,
                                    kv_length=store.kv_length, backend="gpu", interpret=True,
                                    **sparse)
  ref = (shared_attention(q, k, v, backend="xla") if mode == "dense" else
         chunk_attention(q, k, v, ids, chunk_size=C, backend="xla"))
  assert_close(o, lse, *ref)


@pytest.mark.parametrize("split", list(SPLITS))
def test_shared_kv_is_split_in_whole_chunks(split, data):
  _, k, v, _ = data
  groups = groups_for(split)
  summaries = routing.chunk_summaries(jnp.asarray(k), C)
  store = place_shared_kv(groups, k, v, summaries, chunk_size=C)
  n = groups.num_shared
  s_pad = store.k.shape[0]
  s_local, n_local = s_pad // n, s_pad // n // C
  assert s_pad % (n * C) == 0 and s_pad - S < n * C and store.kv_length == S
  k_pad = np.pad(k, ((0, s_pad - S), (0, 0), (0, 0)))
  vec = store.summaries.arrays[0]
  for arr, full, rows in ((store.k, k_pad, s_local), (store.v, None, s_local),
                          (vec, None, n_local)):
    assert arr.sharding == NamedSharding(groups.shared_mesh, P("kv"))
    assert arr.sharding.device_set == set(groups.shared_devices)
    assert len(arr.addressable_shards) == n
    for shard in arr.addressable_shards:
      i = groups.shared_devices.index(shard.device)
      assert shard.data.shape == (rows, *arr.shape[1:])
      assert shard.index[0].indices(arr.shape[0])[:2] == (i * rows, (i + 1) * rows)
      if full is not None:  # device i holds exactly its chunks' rows
        np.testing.assert_array_equal(np.asarray(shard.data), full[i * rows:(i + 1) * rows])
  assert store.summaries.num_valid_chunks.sharding.is_fully_replicated


def test_bytes_counted(data):
  q, k, v, ids = data
  groups = groups_for("2+6")  # unique mesh (2, 1): q sharded over "batch"
  store = place_shared_kv(groups, k, v, chunk_size=C)
  q_u = place_unique(groups, q, batch_axis=0)
  ids = jnp.asarray(ids)
  _, _, dense = shared_attention_step(groups, q_u, store.k, store.v, kv_length=store.kv_length,
                                      backend="xla")
  _, _, sparse = shared_attention_step(groups, q_u, store.k, store.v, kv_length=store.kv_length,
                                       chunk_ids=ids, chunk_size=C, backend="xla")
  # q and kv_length land on each of the 6 shared devices; o and lse come back split over "batch".
  assert dense.bytes_to_shared == 6 * (q.nbytes + 4)
  assert sparse.bytes_to_shared == dense.bytes_to_shared + 6 * ids.nbytes
  assert dense.bytes_to_unique == sparse.bytes_to_unique == q.nbytes + B * T * Hq * 4
  single = groups_for("single")
  store1 = place_shared_kv(single, k, v, chunk_size=C)
  _, _, none = shared_attention_step(single, jnp.asarray(q), store1.k, store1.v,
                                     kv_length=store1.kv_length, backend="xla")
  assert none.total_bytes == 0


def test_single_device_step_is_traceable(data):
  q, k, v, _ = data
  groups = groups_for("single")
  store = place_shared_kv(groups, k, v, chunk_size=C)

  @jax.jit
  def step(q, k, v):
    return shared_attention_step(groups, q, k, v, kv_length=store.kv_length, backend="xla")[:2]

  assert_close(*step(q, store.k, store.v), *shared_attention(q, k, v, backend="xla"))


def test_place_unique():
  groups = make_device_groups(jax.devices(), num_shared=2, unique_mesh_shape=(3, 2))
  tree = {"w": np.ones((4, 4), np.float32), "lengths": np.arange(6), "t": np.int32(3)}
  rep = place_unique(groups, tree)
  assert all(x.sharding.is_fully_replicated and x.sharding.device_set == set(groups.unique_devices)
             for x in jax.tree.leaves(rep))
  per_req = place_unique(groups, {"lengths": tree["lengths"], "t": tree["t"]}, batch_axis=0)
  assert per_req["lengths"].sharding.spec == P("batch")
  assert {s.data.shape for s in per_req["lengths"].addressable_shards} == {(2,)}
  tp = place_unique(groups, tree["w"], specs=P(None, "model"))
  assert {s.data.shape for s in tp.addressable_shards} == {(4, 2)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_shared=0), r"num_shared must be in \[1, 7\]"),
    (dict(num_shared=8), r"num_shared must be in \[1, 7\]"),
    (dict(num_shared=2.0), "num_shared must be an int"),
    (dict(num_shared=4, unique_mesh_shape=(3, 1)), "unique_mesh_shape"),
    (dict(devices=[]), "no devices"),
    (dict(devices="dup"), "lists a device twice"),
    (dict(devices="one", num_shared=2), "single device num_shared must be 1"),
])
def test_bad_group_specs_raise(kwargs, match):
  devs = jax.devices()
  if kwargs.get("devices") == "dup":
    kwargs["devices"] = [devs[0], devs[1], devs[0]]
  elif kwargs.get("devices") == "one":
    kwargs["devices"] = devs[:1]
  with pytest.raises(ValueError, match=match):
    make_device_groups(**kwargs)


def test_overlapping_groups_raise():
  g = make_device_groups(jax.devices()[:4], num_shared=2)
  other = make_device_groups(jax.devices()[1:5], num_shared=2)  # shares devices 1..3 with g
  with pytest.raises(ValueError, match="must be disjoint"):
    DeviceGroups(g.unique_devices, other.unique_devices, g.unique_mesh, g.shared_mesh)
  with pytest.raises(ValueError, match="shared_mesh must have"):
    DeviceGroups(g.unique_devices, other.shared_devices, g.unique_mesh, g.shared_mesh)


def test_bad_placement_and_step_args_raise(data):
  q, k, v, ids = data
  groups = groups_for("4+4")
  with pytest.raises(ValueError, match="every summary leaf must have N=13"):
    place_shared_kv(groups, k, v, np.zeros((12, Hkv, D)), chunk_size=C)
  store = place_shared_kv(groups, k, v, chunk_size=C)
  with pytest.raises(ValueError, match="whole chunks per device"):
    shared_attention_step(groups, q, store.k, store.v, chunk_ids=jnp.asarray(ids), chunk_size=24,
                          backend="xla")
  with pytest.raises(ValueError, match="do not split evenly"):
    shared_attention_step(groups, q, k[:198], v[:198], backend="xla")


def test_sharding_rules_place_each_role():
  rules = ShardingRules()
  assert (rules.requests, rules.weights, rules.pages, rules.shared_rows) == (
      P("batch"), P(), P(), P("kv"))
  assert rules.request_spec(2) == P(None, None, "batch") and rules.kv_axis == "kv"
  assert make_device_groups(jax.devices()).rules == rules  # the default
  # Requests over both unique axes, pools split by kv head over "model".
  custom = ShardingRules(requests=P(("batch", "model")), pages=P(None, None, "model"))
  groups = make_device_groups(jax.devices(), num_shared=2, unique_mesh_shape=(3, 2),
                              rules=custom)
  assert groups.request_shards == 6
  per_req = place_unique(groups, np.arange(12 * 3).reshape(3, 12), batch_axis=1)
  assert per_req.sharding.spec == P(None, ("batch", "model"))
  assert {s.data.shape for s in per_req.addressable_shards} == {(3, 2)}
  pool = place_unique(groups, np.zeros((5, 4, 2, 8), np.float32), specs=groups.rules.pages)
  assert {s.data.shape for s in pool.addressable_shards} == {(5, 4, 1, 8)}
  o, lse, _ = send_to_unique(groups, jnp.zeros((6, 1, 4, 8)), jnp.zeros((6, 1, 4)))
  assert o.sharding.spec == P(("batch", "model"), None, None, None)
  assert {s.data.shape for s in lse.addressable_shards} == {(1, 1, 4)}
  o, _, _ = send_to_unique(groups, jnp.zeros((4, 1, 4, 8)), jnp.zeros((4, 1, 4)))
  assert o.sharding.is_fully_replicated  # 4 requests do not split 6 ways


@pytest.mark.parametrize("kwargs, match", [
    (dict(requests=P("kv")), r"requests must be a PartitionSpec over the axes \('batch', "
                             r"'model'\)"),
    (dict(pages=P(None, "kv")), "pages must be a PartitionSpec"),
    (dict(weights="batch"), "weights must be a PartitionSpec"),
    (dict(requests=P("batch", "model")), "requests must split one axis"),
    (dict(shared_rows=P(None, "kv")), r"shared_rows must be PartitionSpec\('kv'\)"),
])
def test_bad_sharding_rules_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ShardingRules(**kwargs)
