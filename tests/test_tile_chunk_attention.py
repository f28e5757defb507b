"""tile_chunk_attention (batch-aware routing's kernel) and its work-list helpers vs float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import grouping, targets, tile_chunk_attention
from pallas_kernels.gpu import mosaic_attention
from tests import kernel_cases as kc
from tests.np_reference import chunk_attention_f64

OP = "tile_chunk_attention"


def _per_request(tile_ids, B):
  return np.repeat(np.asarray(tile_ids), B // tile_ids.shape[0], axis=0)


# (B, T, G, Hkv, D, S, C, requests_per_tile, K, kv_length, dtype): tiles whose rows are not a
# multiple of the row block, partial last chunks, kv_length inside a chunk.
CASES = [
    (8, 1, 4, 2, 64, 1000, 128, 4, 3, 900, jnp.float32),
    (6, 2, 1, 1, 128, 640, 128, 3, 2, None, jnp.bfloat16),
    (4, 1, 8, 2, 64, 777, 64, 1, 5, 700, jnp.float32),
    (4, 1, 2, 2, 96, 640, 128, 2, 2, 600, jnp.bfloat16),  # head dim 96: padded tiles
]


def _poisoned_run(case, implementation, interpret, seed, **kwargs):
  """Every key outside a tile's chunks is NaN, and past kv_length too (8 for mosaic_gpu, which
  reads the tile holding kv_length whole and weighs the keys past it by 0: finite, but far from
  the random keys, so any weight on them shows): a kernel reading a chunk its tile did not
  choose shows."""
  B, T, G, Hkv, D, S, C, R, K, kv_length, dtype = case
  rng, q, k, v = kc.shared_inputs(seed, B, T, G, Hkv, D, S, dtype)
  N = -(-S // C)
  ids = kc.random_ids(rng, B, Hkv, N, K, pattern="shaped")
  tiles = grouping.tile_union(ids, N, R)
  n = None if kv_length is None else jnp.int32(kv_length)
  kc.plan_or_skip(OP, q, k, v, tiles, chunk_size=C, kv_length=n, implementation=implementation,
                  interpret=interpret, **kwargs)
  keep = np.zeros((S, Hkv), bool)
  past = np.zeros((S, Hkv), bool)
  for h in range(Hkv):
    for c in np.unique(np.asarray(tiles)[:, h]):
      if c >= 0:
        keep[c * C:min((c + 1) * C, kv_length or S), h] = True
        past[c * C:min((c + 1) * C, S), h] = implementation == "mosaic_gpu"
  k_in, v_in = (jnp.where(jnp.asarray(past & ~keep)[..., None], 8.0, kc.poison_outside(x, keep))
                .astype(dtype) for x in (k, v))
  o, lse = kc.run(tile_chunk_attention, q, k_in, v_in, tiles, chunk_size=C, kv_length=n,
                  implementation=implementation, interpret=interpret, **kwargs)
  kc.check(o, lse, *chunk_attention_f64(q, k, v, _per_request(tiles, B), C, kv_length), q,
           dtype)


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}G{}H{}D{}S{}C{}R{}K{}n{}".format(
    *c[:10]))
def test_matches_f64_poisoned(implementation, interpret, case):
  _poisoned_run(case, implementation, interpret, CASES.index(case))


# Llama-like heads on the compiled kernels: tiles of 16 requests (64 rows at G = 4: one
# consumer; 128 at G = 8: a ping-pong pair), of 32 (two 128-row tiles) and of 24 (96 rows padded
# to a pair's 128), chunks longer than, equal to and shorter than a 128-key tile, kv_length
# cutting a chunk and a key tile, GQA 1 / 4 / 8, head dims 64 / 128 / 256, bf16 and float16.
GPU_CASES = [
    (32, 1, 4, 8, 128, 8192, 512, 16, 3, 7000, jnp.bfloat16),
    (48, 1, 8, 4, 128, 4096, 128, 16, 5, None, jnp.bfloat16),
    (16, 1, 1, 8, 64, 4096, 64, 16, 9, 4000, jnp.float16),
    (8, 2, 4, 2, 128, 8192, 1024, 4, 2, 8191, jnp.bfloat16),
    (64, 1, 4, 8, 128, 8192, 512, 32, 3, 7000, jnp.bfloat16),
    (48, 1, 4, 2, 128, 4096, 256, 24, 4, 4000, jnp.float16),
    (64, 1, 4, 2, 256, 4096, 256, 32, 3, 4000, jnp.bfloat16),  # D=256: 64-key tiles
]


@pytest.mark.parametrize("implementation", [
    pytest.param("triton", marks=pytest.mark.skipif(not kc.ON_GPU, reason="needs a GPU")),
    pytest.param("mosaic_gpu", marks=pytest.mark.skipif(not kc.ON_HOPPER,
                                                        reason="needs Hopper"))])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}T{}G{}H{}D{}S{}C{}R{}K{}n{}".format(
    *c[:10]))
def test_compiled_gpu_matches_f64(implementation, case):
  _poisoned_run(case, implementation, False, GPU_CASES.index(case) + 10)


@pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper")
@pytest.mark.parametrize("consumers", [1, 2])
def test_compiled_mosaic_consumers_match_f64(consumers):
  """Both schedules on the same 128-row tiles: four 64-row CTAs per kv head, or two pairs."""
  _poisoned_run(GPU_CASES[4], "mosaic_gpu", False, 20,
                config=pk.MosaicGpuTileConfig(num_splits=3, consumers=consumers))


def test_tile_union_is_a_superset_and_compact():
  rng = np.random.default_rng(3)
  B, Hkv, N, K, R = 12, 2, 9, 3, 4
  ids = np.asarray(kc.random_ids(rng, B, Hkv, N, K, pattern="shaped"))
  tiles = np.asarray(grouping.tile_union(jnp.asarray(ids), N, R))
  assert tiles.shape == (B // R, Hkv, min(N, R * K))
  for t in range(B // R):
    for h in range(Hkv):
      want = {c for c in ids[t * R:(t + 1) * R, h].ravel() if c >= 0}
      got = tiles[t, h]
      assert set(got[got >= 0]) == want and list(got[:len(want)]) == sorted(want)
      assert np.all(got[len(want):] == -1)
  with pytest.raises(ValueError, match="B=12 must be a multiple of requests_per_tile=5"):
    grouping.tile_union(jnp.asarray(ids), N, 5)


def test_empty_tile_and_traced_kv_length():
  """A tile with no chunk, and kv_length 0, give o = 0, lse = -inf."""
  rng, q, k, v = kc.shared_inputs(5, 4, 1, 4, 1, 64, 512, jnp.float32)
  tiles = jnp.asarray([[[0, 2, -1]], [[-1, -1, -1]]], jnp.int32)
  fn = jax.jit(lambda q, k, v, t, n: tile_chunk_attention(
      q, k, v, t, chunk_size=128, kv_length=n, implementation="triton", interpret=True))
  o, lse = fn(q, k, v, tiles, jnp.int32(512))
  assert np.all(np.asarray(o)[2:] == 0) and np.all(np.isneginf(np.asarray(lse)[2:]))
  kc.check(o[:2], lse[:2], *chunk_attention_f64(q[:2], k, v, _per_request(tiles, 4)[:2], 128),
           q[:2], jnp.float32)
  o, lse = fn(q, k, v, tiles, jnp.int32(0))
  assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
  bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))  # what mosaic_gpu takes
  runs = [("xla", False, (q, k, v)), ("triton", True, (q, k, v))]
  if kc.ON_HOPPER:
    runs.append(("mosaic_gpu", False, bf16))
  for implementation, interpret, args in runs:
    o, lse = tile_chunk_attention(*args, jnp.zeros((2, 1, 0), jnp.int32), chunk_size=128,
                                  implementation=implementation, interpret=interpret)
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse))), implementation


def test_validation():
  _, q, k, v = kc.shared_inputs(2, 4, 1, 4, 2, 64, 300, jnp.float32)
  with pytest.raises(ValueError, match=r"tile_chunk_ids must be an integer array of shape "
                     r"\[n_tiles, Hkv=2, U\] with n_tiles dividing B=4"):
    tile_chunk_attention(q, k, v, jnp.zeros((3, 2, 1), jnp.int32), chunk_size=128)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    tile_chunk_attention(q, k, v, jnp.zeros((2, 2, 1), jnp.int32), chunk_size=0)
  # No TPU kernel: refused, not the GPU kernel interpreted (or lowered) in its place.
  with pytest.raises(ValueError, match="batch-aware tiles have no TPU kernel yet"):
    tile_chunk_attention(q, k, v, jnp.zeros((2, 2, 1), jnp.int32), chunk_size=128,
                         backend="tpu", interpret=True)


@pytest.mark.parametrize("C,block_k,splits", [(512, 128, 3), (128, 128, 4), (64, 128, 2),
                                              (1024, 64, 5)])
def test_mosaic_list_stream_holds_exactly_the_listed_keys(C, block_k, splits):
  """The Mosaic GPU kernel's gather (it has no interpret mode): stream positions [0, length) of
  each (tile, kv head) are the listed chunks' keys below kv_length, in order; the splits cover
  them in whole key tiles; padding entries and the tile holding the end name listed chunks."""
  rng = np.random.default_rng(C + splits)
  N, U, n = 20, 9, 17 * C - C // 2 - 8  # kv_length cuts chunk 16; chunks 17-19 are past it
  lists = [rng.permutation(N)[:rng.integers(0, U + 1)] for _ in range(6)]
  ids, _ = grouping.compact_ids(jnp.asarray(np.stack(
      [np.pad(x, (0, U - len(x)), constant_values=-1) for x in lists]).reshape(3, 2, U)), N, U)
  tables, ranges, page = mosaic_attention.list_stream(ids, jnp.int32(n), chunk_size=C,
                                                      block_k=block_k, num_splits=splits)
  tables, ranges = np.asarray(tables).reshape(6, -1), np.asarray(ranges).reshape(6, splits, 2)
  for row, chunks in enumerate(lists):
    want = [key for c in sorted(chunks) for key in range(c * C, min((c + 1) * C, n))]
    stream = (tables[row][:, None] * page + np.arange(page)).ravel()  # key of each position
    starts, stops = ranges[row, :, 0], ranges[row, :, 1]
    assert np.all(starts % block_k == 0) and stops[-1] == len(want)
    got = [key for a, b in zip(starts, stops) for key in stream[a:b]]
    assert got == want
    end_tile = stream[:-(-len(want) // block_k) * block_k] // C  # chunks of every tile read
    assert set(end_tile) <= set(chunks) or not len(want)


def test_mosaic_plans_and_refusals():
  """Auto picks Mosaic GPU on Hopper where it can run, Triton elsewhere; a chunk size that is
  not whole pages of the key tile is refused by name."""
  q = jnp.zeros((32, 1, 32, 128), jnp.bfloat16)
  k = jnp.zeros((8192, 8, 128), jnp.bfloat16)
  tiles = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 8, 16))
  plan = pk.plan(OP, q, k, k, tiles, chunk_size=512, backend="gpu", target="h200")
  assert plan.implementation == "mosaic_gpu" and plan.config.num_splits >= 1
  # Tiles of 16 requests x G=4 fill one 64-row consumer; of 32 (128 rows), a ping-pong pair.
  assert plan.config.consumers == 1
  pair = pk.plan(OP, q, k, k, tiles[:1], chunk_size=512, backend="gpu", target="h200").config
  assert pair.consumers == 2 and pair.rows_per_cta == 128
  # D=256: the pair's two q tiles and its ring still fit the H200's shared memory.
  wide_q, wide_k = jnp.zeros((32, 1, 32, 256), jnp.bfloat16), jnp.zeros((8192, 8, 256),
                                                                       jnp.bfloat16)
  wide = pk.plan(OP, wide_q, wide_k, wide_k, tiles[:1], chunk_size=512, backend="gpu",
                 target="h200")
  c = wide.config
  assert wide.implementation == "mosaic_gpu" and c.consumers == 2
  assert mosaic_attention.smem_bytes_used(256, c.block_k, 2, num_stages=c.num_stages,
                                          consumers=2) <= targets.GPU_PRESETS["h200"].smem_per_block
  with pytest.raises(ValueError, match="consumers"):
    pk.MosaicGpuTileConfig(consumers=3)
  with pytest.raises(ValueError, match="split_keys must be False"):
    pk.MosaicGpuTileConfig(consumers=2, split_keys=True)
  # A list per 64 rows handed to 128-row pairs is refused, not read past its rows.
  ids = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (4, 2, 4))  # [256 / 64, Hkv, U]
  with pytest.raises(ValueError, match=r"ranges must be \[M / 128, Hkv, P, 2\]"):
    mosaic_attention.list_attention_partials(
        jnp.zeros((2, 256, 128), jnp.bfloat16), k[:, :2], k[:, :2], ids, jnp.int32(8192),
        chunk_size=512, scale=1.0, block_k=128, num_splits=1, num_stages=2, consumers=2)
  for target, dtype in (("a100", jnp.bfloat16), ("h200", jnp.float32)):
    assert pk.plan(OP, q.astype(dtype), k.astype(dtype), k.astype(dtype), tiles, chunk_size=512,
                   backend="gpu", target=target).implementation == "triton"
  with pytest.raises(ValueError, match="chunk_size a multiple of 8 that config.block_k=128 "
                     "divides or that divides it, got chunk_size=192"):
    pk.plan(OP, q, k, k, tiles, chunk_size=192, implementation="mosaic_gpu", target="h200",
            config=pk.MosaicGpuTileConfig(block_k=128, num_splits=2))
  assert pk.plan(OP, q, k, k, tiles, chunk_size=192, backend="gpu",
                 target="h200").implementation == "triton"
  # Chunks under 64 keys (a TMA copy per 8-32 keys) stay on Triton unless a config asks.
  small = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32) * 2, (2, 8, 16))
  assert pk.plan(OP, q, k, k, small, chunk_size=32, backend="gpu",
                 target="h200").implementation == "triton"
  assert pk.plan(OP, q, k, k, small, chunk_size=32, implementation="mosaic_gpu", target="h200",
                 config=pk.MosaicGpuTileConfig(num_splits=2)).implementation == "mosaic_gpu"
