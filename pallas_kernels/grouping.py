"""The by-chunk work list of chunk_attention: (request, chunk) pairs grouped by chunk, MoE-style.

The pairs of a kv head are grouped by chunk with a bincount + cumsum (no sort): the stacked query
rows (T tokens x G heads) of every request that chose chunk c form one GEMM against chunk c's K/V,
cut into tiles of `block_m` rows, so a chunk is read once per tile and a chunk nobody chose is
never read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ChunkGroups(NamedTuple):
  """The by-chunk work list of one call (per kv head; static shapes, padded).

  Pair p = b*K + k is the k-th chunk of request b; its R = T*G query rows are the "pair rows"
  p*R + r. Tiles are `block_m` pair rows of one chunk; a chunk's rows are padded to whole tiles
  and the tile list is padded to a static count NT = cdiv(B*K*R, block_m) + min(N, B*K).

  tile_chunk: [Hkv, NT] int32, the chunk of each tile, -1 for padding tiles.
  num_tiles: [Hkv] int32, how many tiles are real (they come first).
  rows: [Hkv, NT * block_m] int32, the pair row held by each tile slot, -1 for padding slots.
  slots: [Hkv, B*K*R] int32, the tile slot of each pair row (inverse of `rows`; 0 if invalid).
  valid: [Hkv, B*K] bool, pairs whose chunk id is in [0, N).
  """

  tile_chunk: jax.Array
  num_tiles: jax.Array
  rows: jax.Array
  slots: jax.Array
  valid: jax.Array


def max_tiles(num_pairs: int, num_chunks: int, rows_per_pair: int, block_m: int) -> int:
  """Static bound on the tiles of one kv head: every chunk adds at most one partial tile."""
  return max(1, math.ceil(num_pairs * rows_per_pair / block_m) + min(num_chunks, num_pairs))


def selected_chunks(chunk_ids: jax.Array, num_chunks: int) -> jax.Array:
  """bool [..., N]: which chunks each row of chunk_ids[..., K] (e.g. [B, Hkv, K]: each (request,
  kv head)) selected; ids outside [0, N) select nothing."""
  *lead, K = chunk_ids.shape
  ids = jnp.where(chunk_ids >= 0, chunk_ids, num_chunks)  # negative ids would wrap: push past N
  n = math.prod(lead)
  mask = jnp.zeros((n, num_chunks), bool).at[jnp.arange(n)[:, None], ids.reshape(n, K)].set(
      True, mode="drop")
  return mask.reshape(*lead, num_chunks)


def _compact(mask: jax.Array, width: int) -> jax.Array:
  """The set positions of each row of mask[..., N], ascending, then -1, cut or padded to
  `width`: a running count places each (O(N), no sort)."""
  *lead, N = mask.shape
  pos = jnp.where(mask, jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, width)  # unset: dropped
  n = math.prod(lead)
  out = jnp.full((n, width), -1, jnp.int32).at[jnp.arange(n)[:, None], pos.reshape(n, N)].set(
      jnp.arange(N, dtype=jnp.int32), mode="drop")
  return out.reshape(*lead, width)


def group_by_chunk(chunk_ids: jax.Array, *, num_chunks: int, rows_per_pair: int,
                   block_m: int) -> ChunkGroups:
  """Groups the (request, chunk) pairs of each kv head by chunk into tiles of block_m rows.

  Args:
    chunk_ids: [B, Hkv, K] integer chunk ids, duplicate-free per (request, kv head); ids outside
      [0, num_chunks) (e.g. -1 padding) select nothing.
    num_chunks: N.
    rows_per_pair: R = T*G query rows per (request, kv head).
    block_m: rows per tile.

  Returns:
    A `ChunkGroups`. Within a chunk, pairs are ordered by request (a stable counting sort: the rank
    of request b in chunk c is the number of requests before b that chose c).
  """
  B, Hkv, K = chunk_ids.shape
  N, R = num_chunks, rows_per_pair
  NT = max_tiles(B * K, N, R, block_m)
  ids = chunk_ids.astype(jnp.int32).transpose(1, 0, 2).reshape(Hkv, B * K)
  valid = (ids >= 0) & (ids < N)

  def one_head(ids, valid):
    key = jnp.where(valid, ids, N)  # invalid pairs go to an extra bin N
    req = jnp.arange(B * K, dtype=jnp.int32) // K
    sel = jnp.zeros((B, N + 1), jnp.int32).at[req, key].add(1)  # [request, chunk] choice matrix
    rank = (jnp.cumsum(sel, axis=0) - sel)[req, key]  # requests before b that chose the chunk
    counts = jnp.sum(sel[:, :N], axis=0)
    pair_start = jnp.cumsum(counts) - counts
    tiles = (counts * R + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    num_tiles = tile_end[-1]
    # Pair p sits at sorted position pair_start[c] + rank; `order` is the inverse permutation.
    pos = jnp.where(valid, pair_start[jnp.minimum(key, N - 1)] + rank, B * K)
    order = jnp.zeros((B * K,), jnp.int32).at[pos].set(jnp.arange(B * K, dtype=jnp.int32),
                                                       mode="drop")
    t = jnp.arange(NT, dtype=jnp.int32)
    # The chunk of each tile: mark each chunk's first tile with its id and carry the largest
    # mark forward (a chunk with no tile shares its start with the next chunk, whose larger id
    # wins). One scan: jnp.searchsorted here, a loop of log2(N) steps, made the work list 3.7x
    # slower on an H200 (0.28 vs 0.075 ms at B=8, N=2048: results/sparse_probes.md).
    first = jnp.zeros((NT,), jnp.int32).at[tile_start].max(jnp.arange(N, dtype=jnp.int32),
                                                          mode="drop")
    c = jax.lax.cummax(first)
    real = t < num_tiles
    j = (t - tile_start[c])[:, None] * block_m + jnp.arange(block_m, dtype=jnp.int32)
    live = real[:, None] & (j < counts[c][:, None] * R)
    p = order[jnp.minimum(pair_start[c][:, None] + j // R, B * K - 1)]
    rows = jnp.where(live, p * R + j % R, -1).reshape(NT * block_m)
    c_p = jnp.minimum(key, N - 1)
    slot = (tile_start[c_p] * block_m + rank * R)[:, None] + jnp.arange(R, dtype=jnp.int32)
    slots = jnp.where(valid[:, None], slot, 0).reshape(B * K * R)
    return jnp.where(real, c, -1), num_tiles, rows, slots

  tile_chunk, num_tiles, rows, slots = jax.vmap(one_head)(ids, valid)
  return ChunkGroups(tile_chunk, num_tiles.astype(jnp.int32), rows, slots, valid)


def gather_tile_rows(q_rows: jax.Array, groups: ChunkGroups, *, pairs_per_request: int,
                     rows_per_pair: int) -> jax.Array:
  """The query rows of every tile slot, in tile order: q_rows[Hkv, B*R, D] ->
  [Hkv, NT * block_m, D] (padding slots take row 0). For kernels that copy whole blocks."""
  K, R = pairs_per_request, rows_per_pair
  pr = jnp.where(groups.rows >= 0, groups.rows, 0)
  return jnp.take_along_axis(q_rows, ((pr // (K * R)) * R + pr % R)[..., None], axis=1)


def scatter_to_pairs(o_tiles: jax.Array, lse_tiles: jax.Array,
                     groups: ChunkGroups) -> tuple[jax.Array, jax.Array]:
  """Inverse of `gather_tile_rows` for the outputs: [Hkv, NT * block_m, (D)] in tile order ->
  per pair row [Hkv, B*K*R, (D)] (rows of invalid pairs hold slot 0's values: mask them)."""
  o = jnp.take_along_axis(o_tiles, groups.slots[..., None], axis=1)
  return o, jnp.take_along_axis(lse_tiles, groups.slots, axis=1)


def compact_ids(ids: jax.Array, num_chunks: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Each row's ids in [0, N), ascending, first (padding -1 after them), cut or padded to
  `width`; and how many each row holds. ids [..., K] (duplicate-free) -> ([..., width] int32,
  [...] int32)."""
  mask = selected_chunks(ids, num_chunks)
  return _compact(mask, width), jnp.sum(mask, axis=-1, dtype=jnp.int32)


def tile_union(chunk_ids: jax.Array, num_chunks: int, requests_per_tile: int) -> jax.Array:
  """The union of the chunks of every tile of `requests_per_tile` consecutive requests:
  chunk_ids[B, Hkv, K] -> tile_ids[B / requests_per_tile, Hkv, min(N, requests_per_tile * K)],
  ascending, -1 after the tile's chunks."""
  B, Hkv, K = chunk_ids.shape
  if B % requests_per_tile:
    raise ValueError(f"tile_union: B={B} must be a multiple of requests_per_tile="
                     f"{requests_per_tile}")
  union = selected_chunks(chunk_ids, num_chunks).reshape(
      B // requests_per_tile, requests_per_tile, Hkv, num_chunks).any(axis=1)
  return _compact(union, min(num_chunks, requests_per_tile * K))
