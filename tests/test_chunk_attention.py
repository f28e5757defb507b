"""chunk_attention (GPU Triton + TPU Mosaic kernels in interpret mode, and XLA) vs float64 NumPy.

The ground truth gathers each (request, kv head)'s selected chunks and runs a float64 attention
over exactly those keys. Interpret modes fill unwritten outputs with NaN, and the poison test
fills every key / value the kernels must not read with NaN, so a missed mask or a read of an
unselected chunk shows up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import chunk_attention, shared_attention
from pallas_kernels.grouping import group_by_chunk, max_tiles
from tests import kernel_cases as kc
from tests.kernel_cases import random_ids
from tests.np_reference import chunk_attention_f64, rel_err

OP = "chunk_attention"


def _inputs(seed, B, T, G, Hkv, D, S, dtype):
  return kc.shared_inputs(seed, B, T, G, Hkv, D, S, dtype)


def _run(q, k, v, ids, **kw):
  """chunk_attention under jit with a traced kv_length."""
  n = kw.pop("kv_length", None)
  return kc.run(chunk_attention, q, k, v, ids, kv_length=None if n is None else jnp.int32(n),
                **kw)


def _check(o, lse, q, k, v, ids, C, kv_length, dtype):
  kc.check(o, lse, *chunk_attention_f64(q, k, v, ids, C, kv_length), q, dtype)


# (B, T, G, Hkv, D, S, C, top_k, kv_length, dtype, pattern); top_k None = all N chunks.
CASES = [
    (3, 1, 4, 2, 64, 1000, 128, 3, None, jnp.float32, "random"),  # partial last chunk
    (4, 1, 1, 1, 128, 640, 128, 1, 600, jnp.bfloat16, "random"),  # kv_length cuts the last chunk
    (2, 2, 8, 1, 64, 512, 128, None, 300, jnp.float32, "random"),  # all chunks, 2 past kv_length
    (5, 1, 4, 2, 64, 768, 128, 3, None, jnp.bfloat16, "shaped"),  # many / one / no request
    (3, 1, 2, 2, 80, 700, 128, 2, 650, jnp.bfloat16, "random"),  # head dim 80: padded tiles
]


def _case_id(c):
  return "B{}T{}G{}H{}D{}S{}C{}k{}n{}{}-{}".format(*c[:9], jnp.dtype(c[9]).name, c[10])


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_f64(implementation, interpret, case):
  B, T, G, Hkv, D, S, C, top_k, kv_length, dtype, pattern = case
  # Seed by position: hash(case) varies per process (str hashing, id-based dtype class hash).
  rng, q, k, v = _inputs(CASES.index(case), B, T, G, Hkv, D, S, dtype)
  N = -(-S // C)
  ids = random_ids(rng, B, Hkv, N, top_k or N, pattern)
  n = None if kv_length is None else jnp.int32(kv_length)
  kc.plan_or_skip(OP, q, k, v, ids, chunk_size=C, kv_length=n, implementation=implementation,
                  interpret=interpret)
  o, lse = _run(q, k, v, ids, chunk_size=C, kv_length=kv_length, implementation=implementation,
                interpret=interpret)
  _check(o, lse, q, k, v, ids, C, kv_length, dtype)


@pytest.mark.parametrize("implementation,config", [
    pytest.param("triton", None, marks=pytest.mark.skipif(not kc.ON_GPU, reason="needs a GPU")),
    pytest.param("mosaic_gpu", pk.MosaicGpuChunkConfig(block_k=128, num_stages=2),
                 marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper"))])
@pytest.mark.parametrize("chunk_size,K,kv_length", [(128, 5, None), (64, 3, 3000),
                                                    (512, 5, 4096), (512, 5, 3000)])
def test_compiled_gpu_matches_f64(implementation, config, chunk_size, K, kv_length):
  """The kernels as compiled on the GPU: Llama-like head_dim, shaped routing (a chunk chosen by
  every request, one by one request, one by none, -1 padding)."""
  rng, q, k, v = _inputs(chunk_size + K, 24, 1, 4, 2, 128, 4096, jnp.bfloat16)
  ids = random_ids(rng, 24, 2, 4096 // chunk_size, K, pattern="shaped")
  n = None if kv_length is None else jnp.int32(kv_length)
  kc.plan_or_skip(OP, q, k, v, ids, chunk_size=chunk_size, kv_length=n,
                  implementation=implementation, interpret=False, config=config)
  o, lse = _run(q, k, v, ids, chunk_size=chunk_size, kv_length=kv_length,
                implementation=implementation, interpret=False, config=config)
  _check(o, lse, q, k, v, ids, chunk_size, kv_length, jnp.bfloat16)


def test_gpu_odd_chunk_size_and_multi_tile_groups():
  """GPU allows any chunk size; block_m=16 < rows of a popular chunk splits it over tiles."""
  rng, q, k, v = _inputs(3, 6, 1, 4, 2, 64, 500, jnp.float32)
  ids = random_ids(rng, 6, 2, 11, 5, "shaped")  # C = 48: 11 chunks, the last has 20 keys
  o, lse = _run(q, k, v, ids, chunk_size=48, kv_length=490, implementation="triton",
                interpret=True, config=pk.TritonChunkConfig(block_m=16, block_k=16))
  _check(o, lse, q, k, v, ids, 48, 490, jnp.float32)


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
def test_one_chunk_each_and_requests_that_select_none(implementation, interpret):
  """K = 1 (no merge over pairs): a request whose one id selects nothing (-1, or N) gets o = 0
  and lse = -inf, not an unwritten row nor another request's tile slot."""
  # bf16 and whole key tiles (the kv_length cuts the last chunk): Mosaic GPU runs it too.
  rng, q, k, v = _inputs(8, 4, 1, 4, 1, 64, 512, jnp.bfloat16)
  ids = jnp.asarray([[[0]], [[-1]], [[3]], [[4]]], jnp.int32)  # N = 4 chunks of 128
  o, lse = _run(q, k, v, ids, chunk_size=128, kv_length=500, implementation=implementation,
                interpret=interpret)
  _check(o, lse, q, k, v, ids, 128, 500, jnp.bfloat16)
  assert not np.asarray(o)[[1, 3]].any() and np.all(np.asarray(lse)[[1, 3]] == -np.inf)


@pytest.mark.parametrize("implementation", ["triton", "mosaic_tpu"])
def test_reads_only_selected_chunks(implementation):
  """NaN in every key / value outside the selected chunks (and past kv_length) changes nothing."""
  rng, q, k, v = _inputs(4, 3, 1, 4, 1, 128, 1024, jnp.float32)
  ids = jnp.asarray([[[2, 5]], [[5, 7]], [[2, 6]]], jnp.int32)
  C, n = 128, 900  # chunk 7 is cut at 900
  keep = np.zeros(1024, bool)
  for c in (2, 5, 6, 7):
    keep[c * C:min((c + 1) * C, n)] = True
  o, lse = _run(q, kc.poison_outside(k, keep), kc.poison_outside(v, keep), ids, chunk_size=C,
                kv_length=n, implementation=implementation, interpret=True)
  _check(o, lse, q, k, v, ids, C, n, jnp.float32)


@pytest.mark.parametrize("implementation", ["triton", "mosaic_tpu"])
def test_all_chunks_equals_shared_attention(implementation):
  rng, q, k, v = _inputs(6, 3, 1, 4, 2, 128, 700, jnp.float32)
  N = 6  # C = 128, last chunk partial
  ids = jnp.asarray(np.stack([[rng.permutation(N) for _ in range(2)] for _ in range(3)]),
                    jnp.int32)
  o, lse = _run(q, k, v, ids, chunk_size=128, kv_length=650, implementation=implementation,
                interpret=True)
  o_s, lse_s = kc.run(shared_attention, q, k, v, kv_length=jnp.int32(650),
                      implementation=implementation, interpret=True)
  assert rel_err(o, o_s) < 1e-5
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation,config", [
    ("triton", pk.TritonChunkConfig(block_m=16, block_k=32)),
    ("mosaic_tpu", pk.MosaicTpuChunkConfig(block_m=16, block_k=128)),
])
def test_jit_traced_kv_length_and_empty(implementation, config):
  """Under jit with a traced kv_length: ordinary, cutting the first chunk, and zero keys."""
  rng, q, k, v = _inputs(5, 4, 2, 4, 1, 64, 512, jnp.float32)
  ids = random_ids(rng, 4, 1, 2, 2)  # C = 256: both chunks, each 4 requests x T*G = 8 rows
  g = group_by_chunk(ids, num_chunks=2, rows_per_pair=8, block_m=config.block_m)
  assert np.asarray(g.tile_chunk[0, :4]).tolist() == [0, 0, 1, 1]  # = 2 tiles of 16 rows each
  fn = jax.jit(lambda q, k, v, ids, n: chunk_attention(
      q, k, v, ids, chunk_size=256, kv_length=n, implementation=implementation, interpret=True,
      config=config))
  for n in (512, 100, 0):
    o, lse = fn(q, k, v, ids, jnp.int32(n))
    if n == 0:
      assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    else:
      _check(o, lse, q, k, v, ids, 256, n, jnp.float32)


def _multi_tile_ids(B):
  """[B, 2, 2] ids over N = 4 chunks: on head 0 chunk 0 is chosen by all B requests and chunks 1, 2
  by half each (chunk 3 by none); on head 1 chunk 3 by all, 1 and 2 by half (chunk 0 by none)."""
  ids = [[[0, 1 + b % 2], [3, 1 + b % 2]] for b in range(B)]
  return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("implementation,C,config", [
    ("triton", 256, pk.TritonChunkConfig(block_m=16, block_k=64)),
    ("mosaic_tpu", 256, pk.MosaicTpuChunkConfig(block_m=16, block_k=128)),
    ("mosaic_tpu", 384, pk.MosaicTpuChunkConfig(block_m=16, block_k=384)),  # default at C=384
])
def test_multi_block_multi_tile_chunks_poisoned(implementation, C, config):
  """Chunks that span several key blocks and several tiles (and padding tiles after them), with
  NaN in every key / value a head did not select and past kv_length: each tile must stream its
  chunk's blocks, padding tiles must compute nothing, and the hb = 2 kv heads of a TPU block must
  each use only their own columns."""
  B, T, G, Hkv, D = 6, 2, 4, 2, 64  # R = 8 rows per pair: 48 rows (3 tiles) in the popular chunks
  S, n = 4 * C, 3 * C + 32  # chunk 3 keeps 32 keys, the rest of it is past kv_length
  rng, q, k, v = _inputs(7, B, T, G, Hkv, D, S, jnp.float32)
  ids = _multi_tile_ids(B)
  g = group_by_chunk(ids, num_chunks=4, rows_per_pair=T * G, block_m=config.block_m)
  tc = np.asarray(g.tile_chunk)
  # 3 tiles for the chunk all 6 requests chose, 2 (24 rows) for each chunk 3 requests chose.
  assert [np.sum(tc[0] == 0), np.sum(tc[1] == 3), np.sum(tc == 1), np.sum(tc == 2)] == [3, 3, 4, 4]
  assert np.all(np.asarray(g.num_tiles) < tc.shape[1])  # padding tiles follow the real ones
  keep = np.zeros((S, Hkv), bool)
  for h, chunks in enumerate(([0, 1, 2], [1, 2, 3])):
    for c in chunks:
      keep[c * C:min((c + 1) * C, n), h] = True
  o, lse = _run(q, kc.poison_outside(k, keep), kc.poison_outside(v, keep), ids, chunk_size=C,
                kv_length=n, implementation=implementation, interpret=True, config=config)
  _check(o, lse, q, k, v, ids, C, n, jnp.float32)


@pytest.mark.parametrize("block_k", [128, 256])
def test_tpu_kv_index_map_copies(block_k):
  """The TPU K/V index map, stepped in grid order (kv head, tile, key block): every step of a real
  tile maps into its chunk's valid blocks, padding tiles repeat the last real step's block (no
  copy), and a copy happens only where the block changes: each tile streams its chunk's valid
  blocks, and when a chunk is one key block (block_k = C) its consecutive tiles share it."""
  from pallas_kernels.tpu.mosaic_chunk import kv_block

  B, R, C, n, bm = 6, 8, 256, 3 * 256 + 32, 16
  g = group_by_chunk(_multi_tile_ids(B), num_chunks=4, rows_per_pair=R, block_m=bm)
  Hkv, NT = g.tile_chunk.shape
  bpc = C // block_k
  h, t, kb = (jnp.asarray(x) for x in np.meshgrid(np.arange(Hkv), np.arange(NT), np.arange(bpc),
                                                   indexing="ij"))
  idx = np.asarray(kv_block(h, t, kb, jnp.int32(n), g.tile_chunk.reshape(-1), g.num_tiles,
                            num_tile_slots=NT, chunk_size=C, block_k=block_k))
  for head in range(Hkv):
    nt = int(g.num_tiles[head])
    seq = idx[head].reshape(-1)
    assert np.all(seq[nt * bpc:] == seq[nt * bpc - 1])  # padding tiles: no new block index
    expected, prev = 0, None  # the pipeline: one copy per change of block index
    for tile in range(nt):
      c = int(g.tile_chunk[head, tile])
      valid = range(c * bpc, c * bpc + -(-(min((c + 1) * C, n) - c * C) // block_k))
      assert set(idx[head, tile].tolist()) == set(valid)
      for b in valid:
        expected, prev = expected + (b != prev), b
    assert 1 + np.sum(seq[1:] != seq[:-1]) == expected
    if bpc == 1:  # one copy per distinct chunk, however many tiles it has
      assert expected == len(set(np.asarray(g.tile_chunk[head, :nt]).tolist()))


def test_tpu_default_block_k():
  """Chunks up to 512 keys are one key block (resident across the chunk's tiles); longer chunks
  stream the largest of 512 / 256 / 128 that divides them."""
  q = jax.ShapeDtypeStruct((64, 1, 32, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((65536, 8, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((64, 8, 8), jnp.int32)
  got = {C: pk.plan(OP, q, k, k, ids, chunk_size=C, implementation="mosaic_tpu").config.block_k
         for C in (128, 256, 384, 512, 1536, 2048)}
  assert got == {128: 128, 256: 256, 384: 384, 512: 512, 1536: 512, 2048: 512}


@pytest.mark.parametrize("B,N,K,bm", [(9, 7, 3, 16), (3, 40, 4, 64)])  # most chunks unchosen
def test_group_by_chunk_reads_each_chunk_once_per_tile(B, N, K, bm):
  """Each pair row sits in exactly one slot, tiles hold one chunk, and a chunk gets exactly
  ceil(rows that chose it / block_m) tiles: K/V are read per tile of stacked rows, not per
  request."""
  rng = np.random.default_rng(N)
  Hkv, R = 2, 4
  ids = np.asarray(random_ids(rng, B, Hkv, N, K, "shaped"))
  g = jax.jit(lambda i: group_by_chunk(i, num_chunks=N, rows_per_pair=R, block_m=bm))(ids)
  NT = max_tiles(B * K, N, R, bm)
  assert g.tile_chunk.shape == (Hkv, NT) and g.rows.shape == (Hkv, NT * bm)
  for h in range(Hkv):
    chosen = ids[:, h].reshape(-1)
    counts = np.bincount(chosen[chosen >= 0], minlength=N)
    nt = int(g.num_tiles[h])
    tc = np.asarray(g.tile_chunk[h])
    assert np.all(tc[nt:] == -1) and np.all(np.diff(tc[:nt]) >= 0)
    for c in range(N):
      assert np.sum(tc == c) == -(-counts[c] * R // bm)
    rows = np.asarray(g.rows[h]).reshape(NT, bm)
    valid = np.asarray(g.valid[h])
    expect = {p * R + r for p in range(B * K) if valid[p] for r in range(R)}
    live = rows[rows >= 0]
    assert len(live) == len(set(live)) and set(live.tolist()) == expect
    for t in range(nt):  # every live row of a tile belongs to a pair that chose the tile's chunk
      assert np.all(chosen[rows[t][rows[t] >= 0] // R] == tc[t])
    slots = np.asarray(g.slots[h])
    for pr in expect:
      assert rows.reshape(-1)[slots[pr]] == pr


def test_validation_errors():
  _, q, k, v = _inputs(2, 2, 1, 4, 2, 64, 300, jnp.float32)
  ids = jnp.zeros((2, 2, 1), jnp.int32)
  with pytest.raises(ValueError, match=r"chunk_ids must be an integer array of shape \[B=2, Hkv=2"):
    chunk_attention(q, k, v, ids[:, :1], chunk_size=128)
  with pytest.raises(ValueError, match="chunk_ids must be an integer array"):
    chunk_attention(q, k, v, ids.astype(jnp.float32), chunk_size=128)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    chunk_attention(q, k, v, ids, chunk_size=0)
  with pytest.raises(ValueError, match="v must have the shape of k"):
    chunk_attention(q, k, v[:10], ids, chunk_size=128)
  with pytest.raises(ValueError, match="chunk_attention: q and k, v must share a dtype, got q "
                     "float32 and k, v bfloat16"):
    chunk_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), ids, chunk_size=128,
                    implementation="triton", interpret=True)
  with pytest.raises(ValueError, match="chunk_size must be a multiple of config.block_k, got "
                     "chunk_size=100, block_k=128"):
    chunk_attention(q, k, v, ids, chunk_size=100, implementation="mosaic_tpu", interpret=True)
  with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
    pk.TritonChunkConfig(block_m=24, block_k=32)
  with pytest.raises(ValueError, match="chunk_size must be a multiple of config.block_k"):
    pk.plan(OP, q, k, v, ids, chunk_size=1000, implementation="mosaic_gpu", target="h100",
            config=pk.MosaicGpuChunkConfig(block_k=128))
  o, lse = chunk_attention(q, k, v, ids[..., :0], chunk_size=128, implementation="triton",
                           interpret=True)
  assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
