"""`chunk_attention`: each request attends to its routed chunks of the shared KV, grouped by chunk.

The shared k, v[S, Hkv, D] are cut into N = ceil(S / C) chunks; chunk c is rows [c*C, (c+1)*C).
`chunk_ids[B, Hkv, K]` lists the chunks each (request, kv head) attends to. Like MoE token
dispatch, the (request, chunk) pairs of a kv head are grouped by chunk (`group_by_chunk`, a
bincount + cumsum, no sort): the stacked query rows (T tokens x G heads) of every request that
chose chunk c form one GEMM against chunk c's K/V, cut into tiles of `block_m` rows. Each tile is
one work item of the kernels, so a chunk is read from HBM once per tile (the tiles of one chunk
are adjacent in the work list, so re-reads of a chunk that spans several tiles hit L2), and a
chunk nobody chose is never read. Each work item writes a partial (o, lse) per (request, chunk)
pair; `merge_partials` combines the K partials of each request.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import layout, merge
from pallas_kernels.backend import is_hopper, log_once, resolve_backend
from pallas_kernels.reference import chunk_attention_ref


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
    c = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), N - 1).astype(jnp.int32)
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


@dataclasses.dataclass(frozen=True)
class ChunkAttentionBlocks:
  """Tiling of one chunk-attention call (override the heuristic with an instance).

  block_m: stacked query rows per work item (tile); block_k: keys per inner step within a chunk
  (on TPU it must divide the chunk size); num_warps / num_stages: Triton knobs (GPU only);
  kernel: GPU kernel, "triton" or "mosaic" (Hopper wgmma; block_m 128, bf16/f16, chunk size and
  S multiples of block_k).
  """

  block_m: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2
  kernel: str = "triton"


# Largest TPU key block of the heuristic (keys x hb*D columns of K and of V per pipeline stage).
TPU_MAX_BLOCK_K = 512


def choose_blocks(dims: layout.AttentionDims, top_k: int, chunk_size: int, backend: str,
                  dtype=jnp.bfloat16) -> ChunkAttentionBlocks:
  """Heuristic: block_m near the rows a chosen chunk gets under uniform routing (B*K*R/N).

  Long chunks chosen by many rows on Hopper run on the Mosaic GPU wgmma kernel (one CTA per
  tile); it pays off from about 8 key tiles per chunk (measured on H100, router + chunk attention
  at 75% sparsity, B=128, correlated routing: 0.545x of dense at C=2048,
  experiments/results/sparse_attention.md; slower than the Triton kernel at C=512, where its
  pipeline fill dominates).
  """
  from pallas_kernels.gpu import shared_attention_mgpu as mgpu
  from pallas_kernels.shared_attention import MOSAIC_MIN_ROWS

  n_chunks = math.ceil(dims.S / chunk_size)
  rows = dims.B * dims.T * dims.G * top_k / n_chunks
  if (backend == "gpu" and rows >= MOSAIC_MIN_ROWS // 2 and is_hopper() and chunk_size % 128 == 0
      and chunk_size >= 1024
      and mgpu.supported(dtype, dims.D, dims.S, 128)):
    return ChunkAttentionBlocks(mgpu.ROWS_PER_CTA, 128, num_stages=4, kernel="mosaic")
  if backend == "tpu":
    block_m = min(256, max(16, 16 * math.ceil(rows / 16)))
    # A chunk of one key block keeps its K/V block resident across all of its tiles (the index
    # map does not change between them, so no re-copy); longer chunks stream 512/256/128 keys.
    block_k = chunk_size if chunk_size <= TPU_MAX_BLOCK_K else next(
        (b for b in (512, 256, 128) if chunk_size % b == 0), chunk_size)
    return ChunkAttentionBlocks(block_m, block_k)
  block_m = min(128, max(16, 1 << math.ceil(math.log2(max(rows, 1)))))
  block_k = min(64 if block_m >= 128 else 128, max(16, 1 << math.ceil(math.log2(chunk_size))))
  warps = 8 if block_m >= 128 else 4
  return ChunkAttentionBlocks(block_m, block_k, warps, 3)


def _check_blocks(blocks: ChunkAttentionBlocks, chunk_size: int, backend: str, q,
                 S: int) -> None:
  from pallas_kernels.gpu import shared_attention_mgpu as mgpu

  if blocks.kernel == "mosaic":
    if (backend != "gpu" or blocks.block_m != mgpu.ROWS_PER_CTA or chunk_size % blocks.block_k
        or not mgpu.supported(q.dtype, q.shape[-1], S, blocks.block_k)):
      raise ValueError("chunk_attention: the mosaic kernel needs backend 'gpu' (Hopper), "
                       f"blocks.block_m={mgpu.ROWS_PER_CTA}, bf16/f16, D a multiple of 64 and "
                       "chunk_size and S multiples of blocks.block_k; got "
                       f"{blocks}, dtype {q.dtype}, chunk_size={chunk_size}, S={S}")
  elif backend == "gpu":
    for name in ("block_m", "block_k"):
      x = getattr(blocks, name)
      if x < 16 or x & (x - 1):
        raise ValueError(f"chunk_attention: blocks.{name} must be a power of two >= 16 on GPU, "
                         f"got {x}")
  elif blocks.block_m % 16 or blocks.block_k % 128 or chunk_size % blocks.block_k:
    raise ValueError("chunk_attention: on TPU blocks.block_m must be a multiple of 16, blocks."
                     "block_k a multiple of 128 and chunk_size a multiple of blocks.block_k, got "
                     f"{blocks.block_m}, {blocks.block_k}, chunk_size={chunk_size}")


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_ids: jax.Array, *,
                    chunk_size: int, sm_scale: float | None = None, kv_length=None,
                    backend: str = "auto", interpret: bool = False,
                    blocks: ChunkAttentionBlocks | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each request's queries over the union of its selected chunks of the shared KV.

  Args:
    q: [B, T, Hq, D] queries; query head h reads kv head h // G.
    k, v: [S, Hkv, D] the shared keys / values; chunk c is rows [c*C, (c+1)*C) (the last chunk
      may be partial).
    chunk_ids: [B, Hkv, K] integer chunk ids per (request, kv head), duplicate-free; ids outside
      [0, N) (e.g. -1 padding from the router) select nothing.
    chunk_size: C.
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar (may be traced): only keys [0, kv_length) are valid.
    backend: "auto", "gpu", "tpu" or "xla" (as for `shared_attention`).
    interpret: run the Pallas kernel in interpret mode.
    blocks: tiling override; default `choose_blocks`.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32; rows with no valid key give o = 0,
    lse = -inf. With every chunk selected it equals `shared_attention`.
  """
  op = "chunk_attention"
  dims = layout.check_shared_kv_inputs(q, k, v, op=op)
  n_chunks = layout.check_chunk_ids(chunk_ids, dims, chunk_size, op=op)
  kv_length = layout.check_kv_length(kv_length, op=op)
  which = resolve_backend(backend, op=op, interpret=interpret)
  if which == "xla":
    return chunk_attention_ref(q, k, v, chunk_ids, chunk_size=chunk_size, sm_scale=sm_scale,
                               kv_length=kv_length)
  B, T, _, Hkv, D, S = dims
  K = chunk_ids.shape[2]
  if K == 0:
    return jnp.zeros_like(q), jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
  blocks = blocks or choose_blocks(dims, K, chunk_size, which, q.dtype)
  _check_blocks(blocks, chunk_size, which, q, S)
  log_once(f"chunk_attention: {blocks.kernel if which == 'gpu' else 'mosaic-tpu'} kernel")
  R = T * dims.G
  scale = layout.default_sm_scale(sm_scale, D)
  n = jnp.int32(S) if kv_length is None else jnp.clip(kv_length, 0, S)
  groups = group_by_chunk(chunk_ids, num_chunks=n_chunks, rows_per_pair=R, block_m=blocks.block_m)
  q_rows = layout.fold_queries(q, Hkv)  # request b owns rows [b*R, (b+1)*R)
  if which == "gpu" and blocks.kernel == "triton":
    from pallas_kernels.gpu import chunk_attention as kernel

    o, lse = kernel.chunk_attention_partials(
        q_rows, k, v, n, groups.tile_chunk, groups.rows, rows_per_pair=R,
        pairs_per_request=K, scale=scale,
        chunk_size=chunk_size, block_m=blocks.block_m, block_k=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)
  else:
    # Mosaic kernels (TPU, Hopper) copy whole blocks: gather the grouped query rows into tile
    # order, and the tile outputs back into pair order, in XLA.
    live = groups.rows >= 0
    pr = jnp.where(live, groups.rows, 0)
    q_tiles = jnp.take_along_axis(q_rows, ((pr // (K * R)) * R + pr % R)[..., None], axis=1)
    if which == "gpu":
      from pallas_kernels.gpu import shared_attention_mgpu as kernel

      start = groups.tile_chunk.T * chunk_size  # [NT, Hkv]
      end = jnp.where(groups.tile_chunk.T >= 0, jnp.minimum(start + chunk_size, n), 0)
      ranges = jnp.stack([jnp.maximum(start, 0), end], axis=-1)[:, :, None, :]
      o_t, lse_t = kernel.attention_over_ranges(q_tiles, k, v, ranges, scale=scale,
                                                block_k=blocks.block_k,
                                                num_stages=blocks.num_stages)
      o_t, lse_t = o_t[0], lse_t[0]
    else:
      from pallas_kernels.backend import tpu_interpret
      from pallas_kernels.tpu import chunk_attention as kernel

      o_t, lse_t = kernel.chunk_attention_tiles(
          q_tiles, k, v, n, groups.tile_chunk, groups.num_tiles, scale=scale,
          chunk_size=chunk_size, block_m=blocks.block_m, block_k=blocks.block_k,
          interpret=tpu_interpret(interpret))
    o = jnp.take_along_axis(o_t, groups.slots[..., None], axis=1)
    lse = jnp.take_along_axis(lse_t, groups.slots, axis=1)
  # o[Hkv, B*K*R, D], lse[Hkv, B*K*R]: rows of invalid pairs were never written.
  valid = jnp.repeat(groups.valid, R, axis=1)
  lse = jnp.where(valid, lse, -jnp.inf).reshape(Hkv, B, K, R)
  o = o.reshape(Hkv, B, K, R, D)
  o, lse = merge.merge_partials(o, lse, axis=2)
  o, lse = o.reshape(Hkv, B * R, D), lse.reshape(Hkv, B * R)
  return layout.unfold_rows(o, B, T).astype(q.dtype), layout.unfold_rows(lse, B, T)
