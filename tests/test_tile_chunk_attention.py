"""tile_chunk_attention (batch-aware routing's kernel) and its work-list helpers vs float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import grouping, tile_chunk_attention
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


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}G{}H{}D{}S{}C{}R{}K{}n{}".format(
    *c[:10]))
def test_matches_f64_poisoned(implementation, interpret, case):
  """Every key outside a tile's chunks (and past kv_length) is NaN: a kernel reading a chunk its
  tile did not choose shows."""
  B, T, G, Hkv, D, S, C, R, K, kv_length, dtype = case
  rng, q, k, v = kc.shared_inputs(CASES.index(case), B, T, G, Hkv, D, S, dtype)
  N = -(-S // C)
  ids = kc.random_ids(rng, B, Hkv, N, K, pattern="shaped")
  tiles = grouping.tile_union(ids, N, R)
  keep = np.zeros((S, Hkv), bool)
  n = S if kv_length is None else kv_length
  for h in range(Hkv):
    for c in np.unique(np.asarray(tiles)[:, h]):
      if c >= 0:
        keep[c * C:min((c + 1) * C, n), h] = True
  o, lse = kc.run(tile_chunk_attention, q, kc.poison_outside(k, keep),
                  kc.poison_outside(v, keep), tiles, chunk_size=C,
                  kv_length=None if kv_length is None else jnp.int32(kv_length),
                  implementation=implementation, interpret=interpret)
  kc.check(o, lse, *chunk_attention_f64(q, k, v, _per_request(tiles, B), C, kv_length), q,
           dtype)


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
  for implementation, interpret in (("xla", False), ("triton", True)):  # lists of no chunk
    o, lse = tile_chunk_attention(q, k, v, jnp.zeros((2, 1, 0), jnp.int32), chunk_size=128,
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
