"""moska_jax.sharding on 8 emulated CPU devices: groups, span placement and the disaggregated
step as one program.

Every group split (1+1, 2+6, 4+4, one device) must give the single-device kernels' (o, lse) to f32
tolerance, dense and sparse, with the shared K/V really split in whole chunks, the transfers
counted from the shapes, and nothing moved outside the compiled program. Run with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (as .ci/run does).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moska_jax import routing
from moska_jax.sharding import (DeviceGroups, SharedConfig, ShardingRules,
                                disaggregated_attention_program, make_device_groups,
                                place_requests, place_shared_kv, placement,
                                shared_attention_program, shared_attention_step,
                                shared_rows_per_device, span_blocks, span_sharding)
from moska_jax.sharding.groups import SPAN
from moska_jax.sharding.shared_step import hand_off, merge_over_span, span_context, span_map
from pallas_kernels import (chunk_attention, merge_attention_states, merge_partials,
                            shared_attention, unique_attention)
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


def _collectives(hlo: str) -> list[str]:
  """The collective ops of compiled HLO text, sorted (async pairs counted once, by -start)."""
  return sorted(re.findall(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|"
                           r"all-to-all)(?:-start)?\(", hlo))


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
  sparse = dict(chunk_ids=ids, chunk_size=C) if mode == "sparse" else {}
  o, lse, stats = shared_attention_step(groups, q, store.k, store.v, kv_length=store.kv_length,
                                        backend="xla", **sparse)
  if mode == "dense":
    o_ref, lse_ref = shared_attention(q, k, v, kv_length=kv_length, backend="xla")
  else:
    o_ref, lse_ref = chunk_attention(q, k, v, ids, chunk_size=C, kv_length=kv_length,
                                     backend="xla")
  assert_close(o, lse, o_ref, lse_ref)
  assert o.dtype == q.dtype and lse.dtype == jnp.float32
  assert o.sharding.device_set == set(groups.span_devices) and o.sharding.is_fully_replicated
  assert (stats.total_bytes == 0) == groups.colocated


@pytest.mark.parametrize("split", ["2+6", "single"])
def test_routing_on_the_shared_group(split, data):
  q, k, v, _ = data
  groups = groups_for(split)
  summaries, (o_ref, lse_ref) = _routed_on_one_device(q, k, v)
  store = place_shared_kv(groups, k, v, summaries, chunk_size=C, kv_length=170)
  o, lse, _ = shared_attention_step(groups, q, store.k, store.v, kv_length=store.kv_length,
                                    summaries=store.summaries, top_k=3, always_include=(12,),
                                    chunk_size=C, backend="xla")
  assert_close(o, lse, o_ref, lse_ref)


@jax.jit  # run eagerly, each op of the summaries, the router and the kernel compiles on its own
def _routed_on_one_device(q, k, v):
  """(the chunk summaries of k, (o, lse) over the top 3 chunks and chunk 12) on one device."""
  summaries = routing.chunk_summaries(k, C, kv_length=170)
  ids = routing.route(q, summaries, 3, always_include=(12,))
  return summaries, chunk_attention(q, k, v, ids, chunk_size=C, kv_length=170, backend="xla")


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_pallas_kernels_inside_the_span_program(mode, data):
  q, k, v, ids = data
  groups = groups_for("4+4")
  store = place_shared_kv(groups, k, v, chunk_size=C)
  sparse = dict(chunk_ids=ids, chunk_size=C) if mode == "sparse" else {}
  o, lse, _ = shared_attention_step(groups, q, store.k, store.v, kv_length=store.kv_length,
                                    backend="gpu", interpret=True, **sparse)
  ref = (shared_attention(q, k, v, backend="xla") if mode == "dense" else
         chunk_attention(q, k, v, ids, chunk_size=C, backend="xla"))
  assert_close(o, lse, *ref)


def eager_shared_step(groups, q, k, v, kv_length):
  """The orchestration the span program replaces: q moved to the shared mesh by device_put, a
  shard_map over "kv" there, (o, lse) moved back by device_put."""
  n = groups.num_shared
  s_pad = -(-S // (n * C)) * n * C
  pad = ((0, s_pad - S), (0, 0), (0, 0))
  rows = NamedSharding(groups.shared_mesh, P("kv"))
  k_s, v_s = jax.device_put(np.pad(k, pad), rows), jax.device_put(np.pad(v, pad), rows)
  q_s = jax.device_put(q, NamedSharding(groups.shared_mesh, P()))

  def local(q, k, v):
    s_local = k.shape[0]
    valid = jnp.clip(kv_length - jax.lax.axis_index("kv") * s_local, 0, s_local)
    return merge_partials(*shared_attention(q, k, v, kv_length=valid, backend="xla"),
                          axis_name="kv")

  o, lse = jax.jit(jax.shard_map(local, mesh=groups.shared_mesh, in_specs=(P(), P("kv"), P("kv")),
                                 out_specs=(P(), P()), check_vma=False))(q_s, k_s, v_s)
  return jax.device_put((o, lse), NamedSharding(groups.unique_mesh, P()))


@pytest.mark.parametrize("split", ["1+1", "2+6"])
def test_jitted_step_equals_the_eager_step(split, data):
  q, k, v, _ = data
  groups = groups_for(split)
  o_eager, lse_eager = eager_shared_step(groups, q, k, v, 150)
  store = place_shared_kv(groups, k, v, chunk_size=C, kv_length=150)
  o, lse, _ = shared_attention_step(groups, q, store.k, store.v, kv_length=store.kv_length,
                                    backend="xla")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_eager), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["dense", "routed"])
@pytest.mark.parametrize("split", ["1+1", "2+6", "single"])
def test_disaggregated_layer_is_one_program(split, mode, data):
  """One decode layer (unique pages + shared store, packed in one K/V memory on split groups)
  in one compiled program: equal to the one-device kernels merged, the hand-off and the return
  are one collective each inside it, and running it moves nothing outside it."""
  q, k, v, _ = data
  q = q[:, :1]  # decode
  groups = groups_for(split)
  page, pages_each = 8, 4  # every request owns 4 pages; unique lengths ragged, up to 32
  lengths = np.array([5, 32, 17, 1], np.int32)
  rng = np.random.default_rng(1)
  pool_k, pool_v = (rng.standard_normal((B * pages_each + 1, page, Hkv, D), np.float32)
                    for _ in range(2))
  tables = (1 + np.arange(B * pages_each, dtype=np.int32)).reshape(B, pages_each)
  summaries = routing.chunk_summaries(jnp.asarray(k), C, kv_length=150)
  pool_rows = -(-(B * pages_each + 1) * page // C) * C
  R = max(pool_rows, shared_rows_per_device(groups, S, C))  # every device's rows hold its role
  store = place_shared_kv(groups, k, v, summaries if mode == "routed" else None, chunk_size=C,
                          kv_length=150, rows_per_device=R)

  def pool_block(pool):  # a unique device's rows of the K/V memory: its page pool, then free
    flat = pool.reshape(-1, Hkv, D)
    return lambda i, device: np.concatenate([flat, np.zeros((R - len(flat), Hkv, D), np.float32)])

  if groups.colocated:  # one device holds both roles: pages and store are separate arrays
    k_mem, v_mem = (span_blocks(groups, pool_block(p), (R, Hkv, D), np.float32)
                    for p in (pool_k, pool_v))
  else:  # one memory per device: the unique devices' free rows of the store hold the pages
    store = place_shared_kv(groups, k, v, summaries if mode == "routed" else None, chunk_size=C,
                            kv_length=150, rows_per_device=R,
                            unique_blocks=(pool_block(pool_k), pool_block(pool_v)))
    k_mem, v_mem = store.k, store.v
  cfg = SharedConfig(mode, 3 if mode == "routed" else None, (), C if mode == "routed" else None,
                     None, "xla", False)
  program = disaggregated_attention_program(groups, B, page, cfg)
  q_s, tables_s, lengths_s = place_requests(groups, (q, tables, lengths), B)
  args = (q_s, k_mem, v_mem, tables_s, lengths_s, store.k, store.v, store.kv_length)
  args += (store.summaries,) if mode == "routed" else ()
  with jax.transfer_guard("disallow"):
    o, lse = program(*args)
    o.block_until_ready()
  o_u, lse_u = unique_attention(q, pool_k, pool_v, tables, lengths, backend="xla")
  if mode == "dense":
    o_s, lse_s = shared_attention(q, k, v, kv_length=150, backend="xla")
  else:
    ids = routing.route(jnp.asarray(q), summaries, 3)
    o_s, lse_s = chunk_attention(q, k, v, ids, chunk_size=C, kv_length=150, backend="xla")
  assert_close(o, lse, *merge_attention_states(o_u, lse_u, o_s, lse_s))
  hlo = program.lower(*args).compile().as_text()
  # The hand-off and the merge (one all-gather each), and in routed mode the scores'
  # all-gather: one collective round each way.
  routed = ["all-gather"] if mode == "routed" else []
  assert groups.colocated or _collectives(hlo) == ["all-gather"] * (2 + len(routed))


@pytest.mark.parametrize("gather", [True, False])
def test_merge_over_span_gathers_small_partials_and_reduces_large_ones(gather, monkeypatch):
  """Both forms of the (o, lse) return equal the stacked merge of every device's partial, an
  empty partial included; the decode-size form is one all_gather (and no all-reduce)."""
  if not gather:
    monkeypatch.setattr(placement, "GATHER_MAX_BYTES", 0)
  groups = groups_for("2+6")
  n = len(groups.span_devices)
  rng = np.random.default_rng(3)
  o = rng.standard_normal((n, 3, 4, D)).astype(np.float32)
  lse = rng.standard_normal((n, 3, 4)).astype(np.float32)
  lse[1, 0, 0] = -np.inf
  fn = jax.jit(span_map(lambda o, lse: merge_over_span(o[0], lse[0]), groups,
                        (P(SPAN), P(SPAN)), (P(), P())))
  out, out_lse = fn(o, lse)
  assert_close(out, out_lse, *merge_partials(jnp.asarray(o), jnp.asarray(lse), axis=0))
  hlo = fn.lower(o, lse).compile().as_text()
  assert (_collectives(hlo) == ["all-gather"]) == gather
  assert ("all-reduce" in _collectives(hlo)) != gather


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("replicated", [False, True])
def test_hand_off_gathers_small_blocks_and_reduces_large_ones(gather, replicated, monkeypatch):
  """Both forms of the q hand-off give every span device the owners' rows in request order,
  whatever the replicas and shared devices hold; the decode-size form is one all_gather."""
  if not gather:
    monkeypatch.setattr(placement, "GATHER_MAX_BYTES", 0)
  groups = make_device_groups(jax.devices(), num_shared=2, unique_mesh_shape=(3, 2))
  roles = groups.span_roles(6, replicated)
  n, rows = len(groups.span_devices), 6 // roles.shards
  x = np.random.default_rng(4).standard_normal((n, rows, 3)).astype(np.float32)
  # Unique devices in row-major (batch, model) order: the owners are model replica 0 of each
  # batch shard (positions 0, 2, 4), or position 0 alone when every device runs every request.
  want = np.concatenate([x[p] for p in ((0,) if replicated else (0, 2, 4))])
  assert roles.shards == (1 if replicated else 3)

  def body(x):
    ctx = span_context(groups, 6, replicated)
    return hand_off(ctx, x[0])[None]

  fn = jax.jit(span_map(body, groups, (P(SPAN),), P(SPAN)))
  out = np.asarray(fn(x))
  for i in range(n):
    np.testing.assert_array_equal(out[i], want)
  assert (_collectives(fn.lower(x).compile().as_text()) == ["all-gather"]) == gather


@pytest.mark.parametrize("split", list(SPLITS))
def test_shared_kv_is_split_in_whole_chunks(split, data):
  _, k, v, _ = data
  groups = groups_for(split)
  summaries = routing.chunk_summaries(jnp.asarray(k), C)
  store = place_shared_kv(groups, k, v, summaries, chunk_size=C)
  n, span = groups.num_shared, len(groups.span_devices)
  R = store.rows_per_device
  assert R % C == 0 and n * R >= S > n * R - n * C
  k_pad = np.pad(k, ((0, n * R - S), (0, 0), (0, 0)))
  vec = store.summaries.arrays[0]
  for arr, full, rows in ((store.k, k_pad, R), (store.v, None, R), (vec, None, R // C)):
    assert arr.shape[0] == span * rows and arr.sharding == span_sharding(groups)
    assert len(arr.addressable_shards) == span
    for shard in arr.addressable_shards:
      i = groups.span_devices.index(shard.device)
      r = groups.span_roles(1).shared_rank[i]
      assert shard.data.shape == (rows, *arr.shape[1:])
      if r < 0:  # a unique device: free rows (for its pages), zero
        assert not np.asarray(shard.data).any()
      elif full is not None:  # shared rank r holds exactly its chunks' rows
        np.testing.assert_array_equal(np.asarray(shard.data), full[r * rows:(r + 1) * rows])
  assert store.summaries.num_valid_chunks.sharding.is_fully_replicated
  assert int(store.kv_length) == S


def test_bytes_counted_from_shapes(data):
  q, k, v, ids = data
  groups = groups_for("2+6")
  store = place_shared_kv(groups, k, v, chunk_size=C)
  _, _, dense = shared_attention_step(groups, q, store.k, store.v, kv_length=store.kv_length,
                                      backend="xla")
  _, _, sparse = shared_attention_step(groups, q, store.k, store.v, kv_length=store.kv_length,
                                       chunk_ids=ids, chunk_size=C, backend="xla")
  # Each of the 6 shared devices gathers the 7 other devices' blocks of q (a unique device's
  # half of the requests; the shared devices' blocks are dropped on arrival); each unique
  # device gathers the 7 other devices' partial (o, lse) in float32.
  assert groups.span_roles(B).shards == 2
  assert dense.bytes_to_shared == 6 * 7 * q.nbytes // 2
  assert sparse.bytes_to_shared == dense.bytes_to_shared + 6 * 7 * ids.nbytes // 2
  assert dense.bytes_to_unique == sparse.bytes_to_unique == 2 * 7 * B * T * Hq * (D + 1) * 4
  single = groups_for("single")
  store1 = place_shared_kv(single, k, v, chunk_size=C)
  _, _, none = shared_attention_step(single, q, store1.k, store1.v, kv_length=store1.kv_length,
                                     backend="xla")
  assert none.total_bytes == 0


def test_span_roles_and_request_placement():
  groups = make_device_groups(jax.devices(), num_shared=2, unique_mesh_shape=(3, 2))
  roles = groups.span_roles(6)  # requests over "batch": 3 shards of 2; "model" replicas
  assert roles.shards == 3 and roles.shard == (0, 0, 1, 1, 2, 2, 0, 0)
  assert roles.owner == (True, False, True, False, True, False, False, False)
  assert roles.unique == (True,) * 6 + (False,) * 2 and roles.shared_rank == (-1,) * 6 + (0, 1)
  x = np.arange(6 * 3).reshape(6, 3)
  placed = place_requests(groups, x, 6)
  assert placed.shape == (8 * 2, 3) and placed.sharding == span_sharding(groups)
  for shard in placed.addressable_shards:
    i = groups.span_devices.index(shard.device)
    s = roles.shard[i]
    np.testing.assert_array_equal(np.asarray(shard.data), x[2 * s:2 * s + 2])
  replicated = groups.span_roles(4)  # 4 requests do not split 3 ways
  assert replicated.shards == 1 and replicated.owner == (True,) + (False,) * 7
  both = make_device_groups(jax.devices(), num_shared=2, unique_mesh_shape=(3, 2),
                            rules=ShardingRules(requests=P(("batch", "model"))))
  assert both.request_shards == 6 and both.span_roles(12).shard[:6] == (0, 1, 2, 3, 4, 5)
  with pytest.raises(ValueError, match="request axis B=6 first"):
    place_requests(groups, np.zeros((5, 2)), 6)


def test_span_mesh_lists_unique_then_shared():
  groups = make_device_groups(jax.devices(), num_shared=3)
  assert groups.span_devices == tuple(jax.devices())
  assert groups.span_mesh.axis_names == ("span",) and groups.span_mesh.size == 8
  single = make_device_groups(jax.devices()[:1])
  assert single.span_devices == tuple(jax.devices()[:1])
  assert single.span_roles(2) == (1, (0,), (True,), (True,), (0,))


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
  with pytest.raises(ValueError, match="every per-chunk summary array must have N=13"):
    place_shared_kv(groups, k, v, routing.ChunkSummaries((np.zeros((12, Hkv, D)),), 12, "mean",
                                                         C), chunk_size=C)
  with pytest.raises(ValueError, match="summaries must be routing.ChunkSummaries or None"):
    place_shared_kv(groups, k, v, np.zeros((13, Hkv, D)), chunk_size=C)
  with pytest.raises(ValueError, match="rows_per_device must be a multiple of chunk_size=16 and "
                                       "at least 64"):
    place_shared_kv(groups, k, v, chunk_size=C, rows_per_device=48)
  with pytest.raises(ValueError, match=r"kv_length must be in \[0, S=200\]"):
    place_shared_kv(groups, k, v, chunk_size=C, kv_length=201)
  store = place_shared_kv(groups, k, v, chunk_size=C)
  with pytest.raises(ValueError, match="whole chunks per device"):
    shared_attention_step(groups, q, store.k, store.v, chunk_ids=ids, chunk_size=24,
                          backend="xla")
  with pytest.raises(ValueError, match="place the store with place_shared_kv"):
    shared_attention_step(groups, q, jnp.asarray(k), jnp.asarray(v), backend="xla")
  summaries = routing.chunk_summaries(jnp.asarray(k), C)
  routed = place_shared_kv(groups, k, v, summaries, chunk_size=C)
  n = routed.kv_length
  with pytest.raises(ValueError, match="kv_length is required"):  # rows past S are padding
    shared_attention_step(groups, q, store.k, store.v, backend="xla")
  for bad in (-3, 10**6, True, 2.5):  # past the placed rows, negative, not an int
    with pytest.raises(ValueError, match=r"kv_length must be an int in \[0, \d+\] \(the store's S"):
      shared_attention_step(groups, q, store.k, store.v, kv_length=bad, backend="xla")
  with pytest.raises(ValueError, match=r"top_k must be an int in \[1, N=16\]"):
    shared_attention_step(groups, q, routed.k, routed.v, kv_length=n, summaries=routed.summaries,
                          top_k=17, chunk_size=C)
  with pytest.raises(ValueError, match=r"always_include must hold at most top_k=2 chunk ids"):
    shared_attention_step(groups, q, routed.k, routed.v, kv_length=n, summaries=routed.summaries,
                          top_k=2, always_include=(16,), chunk_size=C)
  with pytest.raises(ValueError, match=r"chunk_size=32 must be the summaries' chunk size, 16"):
    shared_attention_step(groups, q, routed.k, routed.v, kv_length=n, summaries=routed.summaries,
                          top_k=2, chunk_size=2 * C)
  with pytest.raises(ValueError, match="chunk_ids or"):
    shared_attention_step(groups, q, store.k, store.v, chunk_ids=ids, top_k=2, chunk_size=C)
  with pytest.raises(ValueError, match="chunk ids are routed on the shared devices"):
    disaggregated_attention_program(groups, B, 8, SharedConfig("sparse"))
  assert shared_attention_program(groups, B, SharedConfig()) is shared_attention_program(
      groups, B, SharedConfig())  # cached per (groups, batch, config)


def test_sharding_rules():
  rules = ShardingRules()
  assert (rules.requests, rules.shared_rows, rules.kv_axis) == (P("batch"), P("kv"), "kv")
  assert rules.request_axes == ("batch",)
  assert ShardingRules(requests=P(("batch", "model"))).request_axes == ("batch", "model")
  assert make_device_groups(jax.devices()).rules == rules  # the default


@pytest.mark.parametrize("kwargs, match", [
    (dict(requests=P("kv")), r"requests must be a PartitionSpec that splits one axis"),
    (dict(requests=P("batch", "model")), "requests must be a PartitionSpec that splits one"),
    (dict(requests="batch"), "requests must be a PartitionSpec"),
    (dict(shared_rows=P(None, "kv")), r"shared_rows must be PartitionSpec\('kv'\)"),
])
def test_bad_sharding_rules_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ShardingRules(**kwargs)
