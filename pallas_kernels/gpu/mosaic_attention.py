"""Shared-KV attention for Hopper with Pallas Mosaic GPU: TMA loads, wgmma, warp specialization.

Each CTA owns 64 or 128 folded query rows of one kv head and one split of S, and runs
consumers + 1 warpgroups: a producer that TMA-copies K/V tiles into a ring of shared-memory slots,
and consumers that multiply 64 rows by tiles with wgmma and keep an online softmax. Three
schedules:
- one consumer, 64 rows (small M, bandwidth-bound: the split-S regime of flash decoding): half
  the padding rows two would multiply, more shared memory for the ring;
- two consumers on 128 rows (large M, compute-bound), each multiplying its 64 rows by every tile
  and taking turns on the tensor cores (one does its softmax while the other multiplies), the
  FlashAttention-3 "ping-pong" schedule;
- two or three consumers on the same 64 rows (`split_keys`: small M where one consumer's chain
  of wgmma, softmax and float8 widening, not HBM, limits the rate), taking turns over the key
  tiles and each writing its own partial, so that one's softmax and widening run under another's
  wgmma.
Writes normalized partials (o in the input dtype, lse float32) per split (per consumer with
split_keys).

Float8 K/V (one scale per kv head, folded in by the caller: `pallas_kernels.quant`) is copied by
TMA as stored, half the bytes of bf16. QK^T runs on the FP8 tensor cores straight from the ring
slot: the queries come as float8 terms of the K format whose sum carries about bfloat16's
precision (`quant.split_rows`: two e4m3 terms, three e5m2; a wgmma per term into one float32
accumulator) with a power-of-two scale per row that the scores are multiplied by. float8 wgmma
reads K-major operands only, which V is not (PV contracts over keys): while the QK^T wgmma runs,
each consumer widens the V tile in registers to float16 (the conversion the hardware has: e4m3 /
e5m2 -> f16x2) into its own staging tile, frees the ring slot, and PV reads the staging tile
with P in float16; the staging tile holds o at the end, returned in the queries' dtype. (Before,
the consumers widened K too and multiplied float16 queries by it: 1.1x slower at B <= 16,
1.37x at B = 64, fp8_scores.md.) V may also come widened to float16 by a pass before the kernel
(`MosaicGpuSharedConfig.widen_v`): PV then reads it from the ring, and o goes out through the
staging tile.

The key range of every CTA comes from a table, so the same kernel serves the dense split of S
(`shared_attention_partials`), the routed chunks of chunk_attention (`attention_over_ranges`:
one CTA per (tile of grouped query rows, chunk)) and, with its keys gathered page by page
(`Paged`: one TMA copy per page of a tile, a request's T * G rows per CTA, causal over its T
newest tokens), each request's own pages in unique attention (`unique_attention_partials`), and,
with the pages of a list of chunks per (row tile, kv head), the union of a batch-aware tile's
chunks in tile_chunk_attention (`list_attention_partials`).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import quant
from pallas_kernels.gpu import softmax
from pallas_kernels.numerics import LOG2E

BLOCK_Q = 64  # rows per consumer warpgroup (one wgmma M tile)
CONSUMERS = (1, 2, 3)  # consumer warpgroups per CTA; three only with split_keys
PRODUCER_REGISTERS = 40  # per thread: the producer only issues TMA copies
MAX_STAGES = 32  # ring slots: Mosaic GPU lowers at most 32 barriers per barrier array
# Float8 terms of the queries per K format (`quant.split_rows`): their sum carries about
# bfloat16's 8 significant bits.
Q_TERMS = {jnp.dtype(jnp.float8_e4m3fn): 2, jnp.dtype(jnp.float8_e5m2): 3}
# jax 0.10's plgpu.load takes the index as an argument; 0.11 deprecates it (the ref is indexed).
_LOAD_INDEX = ((),) if (inspect.signature(plgpu.load).parameters["idx"].default
                        is inspect.Parameter.empty) else ()


def consumer_registers(consumers: int) -> int:
  """Registers per consumer thread: what the producer leaves of the SM's 64K 32-bit registers,
  in multiples of 8 (setmaxnreg), at most 232 (one or two consumers; 152 for three)."""
  return min(232, (65536 // 128 - PRODUCER_REGISTERS) // consumers // 8 * 8)


def schedule_problem(consumers: int, split_keys: bool) -> str | None:
  """Why `consumers` warpgroups with this `split_keys` are no schedule of the kernel, or None."""
  if (consumers == 1 and split_keys) or (consumers == 3 and not split_keys):
    return (f"split_keys needs consumers 2 or 3, and consumers=3 needs split_keys; got "
            f"consumers={consumers}, split_keys={split_keys}")
  return None


def paging_problem(page_size: int, block_k: int) -> str | None:
  """What key tiles of block_k keys need of pages of page_size keys to be gathered from them
  (whole pages or parts of one, rows of the (8, ...) tiling), or None."""
  if page_size % 8 or (block_k % page_size and page_size % block_k):
    return (f"page_size a multiple of 8 that divides or is divided by block_k={block_k}, got "
            f"page_size={page_size}")
  return None


def rows_per_cta(consumers: int, split_keys: bool = False) -> int:
  """Query rows one CTA owns: BLOCK_Q per consumer warpgroup, or BLOCK_Q when the consumers
  split the keys."""
  return BLOCK_Q if split_keys else consumers * BLOCK_Q


class Paged(NamedTuple):
  """Keys gathered from pages: k, v are pools [P, page_size, Hkv, D], row tile m (a CTA's rows)
  reads the pages of table row m (of its kv head's table with per-head tables), and range positions
  are positions in those pages. For unique attention row tile m is request m's T * G query rows
  (row = t * G + g), and with T > 1 query t attends causally: to positions < lengths[m] - T + 1
  + t. The tile holding a range's end is read whole, from the pages its table names there: their
  keys get no weight, but they must be finite (0 * NaN is NaN)."""

  tables: jax.Array  # [M / rows, max_pages] or per kv head [M / rows, Hkv, max_pages] page ids
  lengths: jax.Array  # [M / rows] int32 tokens of each request (read only when causal)
  page_size: int  # a multiple of 8 (the shared-memory tiling's rows)
  T: int
  G: int


def swizzle_bytes(D: int, itemsize: int) -> int | None:
  """The widest shared-memory swizzle (128, 64 or 32 bytes) that divides a row of D elements
  of `itemsize` bytes, or None: wgmma and TMA read tiles of swizzle-wide row pieces, so head
  dims 80 / 96 run on 32 / 64-byte swizzles instead of padded lanes."""
  return next((s for s in (128, 64, 32) if (D * itemsize) % s == 0), None)


def smem_transforms(D: int, itemsize: int):
  """The shared-memory tiling and swizzle of tiles of rows of D elements of `itemsize` bytes."""
  swizzle = swizzle_bytes(D, itemsize)
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def max_stages(D: int, block_k: int, itemsize: int, smem_bytes: int, *, consumers: int,
               kv_dtype=None, v_dtype=None) -> int:
  """Most K/V ring slots that fit next to the consumers' q/o (and staging) tiles in
  `smem_bytes` (with slack); dtypes as for `smem_bytes_used`."""
  free = smem_bytes - smem_bytes_used(D, block_k, itemsize, num_stages=0, consumers=consumers,
                                      kv_dtype=kv_dtype, v_dtype=v_dtype)
  return max(0, free // (block_k * D * sum(_kv_itemsizes(itemsize, kv_dtype, v_dtype))))


def _kv_itemsizes(itemsize: int, kv_dtype, v_dtype) -> tuple[int, int]:
  k_itemsize = itemsize if kv_dtype is None else jnp.dtype(kv_dtype).itemsize
  return k_itemsize, k_itemsize if v_dtype is None else jnp.dtype(v_dtype).itemsize


def smem_bytes_used(D: int, block_k: int, itemsize: int, *, num_stages: int, consumers: int,
                    kv_dtype=None, v_dtype=None) -> int:
  """Shared memory of one CTA: a q/o tile per consumer (float8 K: the queries' float8 terms,
  `Q_TERMS` of the K format), the K and V rings (as stored), per consumer a float16 staging tile
  when V is float8 (or an o tile when only K is), lse rows, barriers (slack). kv_dtype None: K/V
  in the query dtype (of `itemsize` bytes); v_dtype None: V as K."""
  fp8_k = kv_dtype is not None and quant.is_fp8(kv_dtype)
  v = kv_dtype if v_dtype is None else v_dtype
  fp8_v = v is not None and quant.is_fp8(v)
  q_bytes = BLOCK_Q * D * (Q_TERMS[jnp.dtype(kv_dtype)] if fp8_k else itemsize)
  staging = consumers * D * (block_k * 2 if fp8_v else BLOCK_Q * itemsize if fp8_k else 0)
  ring = num_stages * block_k * D * sum(_kv_itemsizes(itemsize, kv_dtype, v_dtype))
  return consumers * q_bytes + ring + staging + 4096


def _key_splits(capacity, num_splits: int, block_k: int,
                ends: jax.Array) -> tuple[jax.Array, int | jax.Array]:
  """(ranges[..., num_splits, 2], run length): [0, capacity) in num_splits runs of whole
  block_k-key tiles, each cut at `ends` (the valid keys: a scalar, or [..., 1] per row tile);
  capacity a static int, or an array like `ends` (runs of each row tile's own length)."""
  split_len = pl.cdiv(pl.cdiv(capacity, num_splits), block_k) * block_k
  start = jnp.arange(num_splits, dtype=jnp.int32) * split_len
  stop = jnp.minimum(start + split_len, ends)
  return jnp.stack([jnp.broadcast_to(start, stop.shape), stop], axis=-1), split_len


def shared_attention_partials(q_rows: jax.Array, k: jax.Array, v: jax.Array,
                              kv_length: jax.Array, *, scale: float, block_k: int,
                              num_splits: int, num_stages: int, consumers: int,
                              split_keys: bool = False) -> tuple[jax.Array, jax.Array]:
  """Partial attention of q_rows[Hkv, M, D] (M a multiple of rows_per_cta(consumers,
  split_keys)) over k, v[S, Hkv, D].

  Returns o[P, Hkv, M, D] in q's dtype and lse[P, Hkv, M] float32 (natural log), P = num_splits
  (consumers * num_splits with split_keys), a partial with no valid key giving o = 0, lse = -inf.
  """
  Hkv, M, _ = q_rows.shape
  ranges, split_len = _key_splits(k.shape[0], num_splits, block_k, kv_length)
  ranges = jnp.broadcast_to(ranges, (M // rows_per_cta(consumers, split_keys), Hkv,
                                     num_splits, 2))
  return attention_over_ranges(q_rows, k, v, ranges, scale=scale, block_k=block_k,
                               num_stages=min(num_stages, split_len // block_k),
                               consumers=consumers, split_keys=split_keys)


def unique_attention_partials(q_rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, lengths: jax.Array, *, T: int, G: int,
                              scale: float, block_k: int, num_splits: int,
                              num_stages: int) -> tuple[jax.Array, jax.Array]:
  """Partial attention of each request's rows q_rows[Hkv, B, 64, D] (T * G rows, then padding)
  over its own pages of k_pages, v_pages[P, page_size, Hkv, D] (`Paged`), its tokens split in
  num_splits ranges of whole tiles, by one consumer warpgroup per CTA.

  Returns o[num_splits, Hkv, B, 64, D] in q's dtype and lse[num_splits, Hkv, B, 64] float32;
  rows past T * G hold padding.
  """
  Hkv, B, rows, D = q_rows.shape
  page_size, max_pages = k_pages.shape[1], block_tables.shape[1]
  ranges, split_len = _key_splits(max_pages * page_size, num_splits, block_k, lengths[:, None])
  ranges = jnp.broadcast_to(ranges[:, None], (B, Hkv, num_splits, 2))
  paged = Paged(block_tables, lengths, page_size, T, G)
  o, lse = attention_over_ranges(q_rows.reshape(Hkv, B * rows, D), k_pages, v_pages, ranges,
                                 scale=scale, block_k=block_k,
                                 num_stages=min(num_stages, split_len // block_k), consumers=1,
                                 paged=paged)
  return o.reshape(-1, Hkv, B, rows, D), lse.reshape(-1, Hkv, B, rows)


def list_stream(ids: jax.Array, kv_length: jax.Array, *, chunk_size: int, block_k: int,
                num_splits: int) -> tuple[jax.Array, jax.Array, int]:
  """The key stream of each list of chunks as pages: (tables[..., U * C / page] page ids of
  the keys viewed as [S / page, page, Hkv, D], ranges[..., num_splits, 2] of stream positions,
  page), page = min(C, block_k).

  ids[..., U] must be ascending, duplicate-free, -1 after the valid ones
  (`grouping.compact_ids`): the chunks below kv_length's are then whole, the one holding it is
  cut and those past it are empty, so stream positions [0, length) are exactly the list's keys
  below kv_length. They are cut into num_splits runs of equal length in whole block_k tiles.
  Padding entries name the list's first chunk: the whole tile holding the stream's end is read
  (its keys past the end weighed by 0), so only chunks the list names are read.
  """
  page = min(chunk_size, block_k)
  per_chunk = chunk_size // page
  live = jnp.where(ids >= 0, jnp.clip(kv_length - ids * chunk_size, 0, chunk_size), 0)
  length = jnp.sum(live, axis=-1, keepdims=True)
  listed = jnp.maximum(jnp.where(ids >= 0, ids, ids[..., :1]), 0)
  tables = listed[..., None] * per_chunk + jnp.arange(per_chunk, dtype=jnp.int32)
  ranges, _ = _key_splits(length, num_splits, block_k, length)
  return tables.reshape(*ids.shape[:-1], -1), ranges, page


def list_attention_partials(q_rows: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array,
                            kv_length: jax.Array, *, chunk_size: int, scale: float, block_k: int,
                            num_splits: int, num_stages: int,
                            consumers: int = 1) -> tuple[jax.Array, jax.Array]:
  """Partial attention of each row tile of q_rows[Hkv, M, D] over its own list of chunks of
  k, v[S, Hkv, D] (S a multiple of block_k): the list's keys gathered as pages (`Paged`, a TMA
  copy per page) into one stream (`list_stream`), with one online softmax, cut into num_splits
  runs. A row tile is 64 rows and one consumer, or 128 rows and a ping-pong pair
  (consumers=2), whose two warpgroups multiply every gathered K/V tile: half the reads per row.

  Args:
    ids: [M / (64 * consumers), Hkv, U] int32 chunk ids of each (row tile, kv head):
      ascending, duplicate-free, -1 after the valid ones (`grouping.compact_ids`).
    kv_length: int32 scalar, keys [0, kv_length) are valid (<= S).
    chunk_size: C, a multiple of 8 that block_k divides or that divides block_k.

  Returns:
    o[num_splits, Hkv, M, D] in q's dtype and lse[num_splits, Hkv, M] float32; a run with no
    valid key gives o = 0, lse = -inf.
  """
  tables, ranges, page = list_stream(ids, kv_length, chunk_size=chunk_size, block_k=block_k,
                                     num_splits=num_splits)
  pages = lambda x: x.reshape(x.shape[0] // page, page, *x.shape[1:])  # a view, not a copy
  # T = 1: no causal mask, so the lengths are not read.
  paged = Paged(tables, jnp.zeros(ids.shape[:1], jnp.int32), page, T=1, G=1)
  return attention_over_ranges(q_rows, pages(k), pages(v), ranges, scale=scale, block_k=block_k,
                               num_stages=num_stages, consumers=consumers, paged=paged)


def attention_over_ranges(q_rows: jax.Array, k: jax.Array, v: jax.Array, ranges: jax.Array, *,
                          scale: float, block_k: int, num_stages: int, consumers: int,
                          split_keys: bool = False,
                          paged: Paged | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each tile of R = rows_per_cta(consumers, split_keys) rows of q_rows[Hkv, M, D]
  over its own key ranges.

  Args:
    q_rows: [Hkv, M, D], M a multiple of R.
    k, v: [S, Hkv, D], S a multiple of 8 (a tile past S reads zeros: TMA's out-of-bounds
      fill; `ranges` end by S); or pools of pages with `paged`. In q's dtype or float8; V
      float8 only with float8 K, and float16 under float8 K (P, V and o multiplied in float16).
    ranges: [M // R, Hkv, P, 2] int32: tile m of kv head h attends to keys
      [ranges[m, h, p, 0], ranges[m, h, p, 1]) for partial p; starts multiples of block_k.
    consumers: consumer warpgroups per CTA (CONSUMERS).
    split_keys: the consumers (2 or 3) share the CTA's 64 rows and take turns over the key tiles
      of each range (num_stages is then rounded down to a multiple of `consumers`: each consumer
      waits on its own ring slots), each writing its own partial.
    paged: the keys come from pages (`Paged`; block_k a multiple or a divisor of page_size;
      causal pages need 64-row CTAs: not the ping-pong pair).

  Returns:
    o[P', Hkv, M, D] in q's dtype and lse[P', Hkv, M] float32, P' = P (consumers * P with
    split_keys: partial consumers * p + c is consumer c's part of range p); an empty range gives
    o = 0, lse = -inf.
  """
  Hkv, M, D = q_rows.shape
  m_tiles, _, num_parts, _ = ranges.shape
  if consumers not in CONSUMERS:
    raise ValueError(f"consumers must be one of {CONSUMERS}, got {consumers}")
  if problem := schedule_problem(consumers, split_keys):
    raise ValueError(problem)
  if any(swizzle_bytes(D, jnp.dtype(x.dtype).itemsize) is None for x in (q_rows, k, v)):
    raise ValueError(f"head dim D={D} must fill 32-byte rows of q and K/V (a multiple of 16 "
                     f"for 2-byte elements, of 32 for float8)")
  if paged is not None and split_keys:
    # On an H200 (jax 0.11.2) the first call of split_keys over pages of 16 keys did not return
    # in 4 minutes. Those configs had one ring slot per consumer, the case that deadlocked
    # before `own_slot` (below); refused until a GPU run shows that was the cause.
    raise ValueError("split_keys is not supported with paged keys")
  rows = rows_per_cta(consumers, split_keys)
  if m_tiles * rows != M or ranges.shape[1] != Hkv:
    raise ValueError(f"ranges must be [M / {rows}, Hkv, P, 2] = [{M // rows}, {Hkv}, P, 2] for "
                     f"{rows}-row CTAs over q_rows {q_rows.shape}, got {ranges.shape}")
  pair = consumers == 2 and not split_keys  # the ping-pong pair
  if paged is not None:
    if rows != BLOCK_Q and paged.T > 1:  # the causal limit is one request's, per CTA
      raise ValueError("causal paged keys (T > 1) need 64-row CTAs (one consumer)")
    if problem := paging_problem(paged.page_size, block_k):
      raise ValueError(f"paged keys need {problem}")
  # TMA copies per tile: whole pages, or one part of a page
  copies = 1 if paged is None else max(1, block_k // paged.page_size)
  causal = paged is not None and paged.T > 1  # rows see different numbers of keys
  # Key tiles from one of a consumer's tiles to its next; the partials each range writes.
  stride = parts_per_range = consumers if split_keys else 1
  out_dtype, fp8_k, fp8_v = q_rows.dtype, quant.is_fp8(k.dtype), quant.is_fp8(v.dtype)
  if fp8_v and not fp8_k:
    raise ValueError(f"float8 V needs float8 K, got k {k.dtype.name}, v {v.dtype.name}")
  if not fp8_v and v.dtype != q_rows.dtype and not (fp8_k and v.dtype == jnp.float16):
    raise ValueError(f"v must be float8, the queries' dtype {q_rows.dtype.name}, or float16 "
                     f"under float8 K; got k {k.dtype.name}, v {v.dtype.name}")
  # The dtype of P, V and o as multiplied (float8 V widens to float16 in hardware).
  dtype = jnp.dtype(jnp.float16) if fp8_v else v.dtype
  q_terms = Q_TERMS[jnp.dtype(k.dtype)] if fp8_k else 1
  q_in = quant.split_rows(q_rows, k.dtype, q_terms) if fp8_k else (q_rows,)
  stages = max(2, num_stages)  # the ring needs two slots even for a one-tile range
  if split_keys:  # consumer c reads the slots of tiles c, c + stride, ...: the same ones each lap
    stages = max(stride, stages - stages % stride)
  # One slot per consumer (split_keys with stages == consumers): a consumer's next tile goes to
  # the slot it is reading, so waiting for it before freeing that slot would never return.
  # (Float8 V is freed when widened, before PV.)
  own_slot = stages == stride and not fp8_v
  scale_log2 = scale * LOG2E

  def body(gmem, scoped):
    ranges_gmem, q_gmem, inv_gmem = gmem[0], gmem[1], gmem[2] if fp8_k else None
    k_gmem, v_gmem, *page_gmem, o_gmem, lse_gmem = gmem[1 + len(q_in):]
    (q_smem, k_smem, v_smem, lse_smem, *fp8_smem), (k_full, v_full, q_full), (k_free, v_free), \
        turn = scoped
    staging = fp8_smem[0] if fp8_k else None  # widened V tiles (float8 V), or o tiles
    mt, h, sp = lax.axis_index("m"), lax.axis_index("h"), lax.axis_index("split")
    wg = lax.axis_index("wg")
    at = ((mt * Hkv + h) * num_parts + sp) * 2
    # Starts are multiples of block_k (the caller's contract); TMA coordinates must be provably
    # aligned to the shared-memory tiling.
    start, end = pl.multiple_of(ranges_gmem[at], block_k), ranges_gmem[at + 1]
    n_keys = jnp.maximum(end - start, 0)
    steps = lax.div(n_keys + (block_k - 1), jnp.int32(block_k))
    if causal:  # tiles wholly before the newest T - 1 positions need no mask
      limit = page_gmem[1][mt] - (paged.T - 1)  # row t sees positions < limit + t
      full_steps = lax.div(jnp.maximum(jnp.minimum(end, limit) - start, 0), jnp.int32(block_k))
    else:
      full_steps = lax.div(n_keys, jnp.int32(block_k))
    # This consumer's key tiles: first, first + stride, ... below steps (the last maybe partial).
    first = wg if split_keys else jnp.int32(0)

    def mine(n):  # how many of tiles [0, n) are this consumer's
      return lax.div(jnp.maximum(n - first, 0) + (stride - 1), jnp.int32(stride))

    def take_turn():  # a ping-pong pair alternates on the tensor cores
      if pair:
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < consumers)
    def _consumer():
      plgpu.set_max_registers(consumer_registers(consumers), action="increase")
      my_q = q_smem.at[wg]
      row0 = mt * rows + (0 if split_keys else wg * BLOCK_Q)

      def widen_v(slot):
        """(float8) V tile `slot` widened into this consumer's staging tile, which PV's wgmma
        reads; the ring slot is freed once read into registers."""
        plgpu.barrier_wait(v_full.at[slot])
        wide = v_smem.at[slot][...].astype(dtype)
        plgpu.barrier_arrive(v_free.at[slot])
        staging.at[wg][...] = wide
        plgpu.commit_smem()  # generic-proxy stores, then wgmma (async proxy) reads them

      rows_at = pl.ds(row0, BLOCK_Q)
      if fp8_k:  # the queries' float8 terms, and their rows' scales in the lse slot
        for t in range(q_terms):
          plgpu.copy_gmem_to_smem(q_gmem.at[t, h, rows_at], my_q.at[t], q_full.at[wg])
        plgpu.copy_gmem_to_smem(inv_gmem.at[h, rows_at], lse_smem.at[wg], q_full.at[wg])
      else:
        plgpu.copy_gmem_to_smem(q_gmem.at[h, rows_at], my_q, q_full.at[wg])
      plgpu.barrier_wait(q_full.at[wg])
      if fp8_k:
        q_inv = plgpu.load(lse_smem.at[wg], *_LOAD_INDEX, layout=plgpu.Layout.WGMMA.reduce(1))
      carry = (
          plgpu.layout_cast(jnp.zeros((BLOCK_Q, D), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1)),
          plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
      )

      @pl.when(first < steps)
      def _():
        plgpu.barrier_wait(k_full.at[first])

      if pair:  # the second consumer waits for the first one's first QK^T
        pl.when(wg == 1)(take_turn)

      def step(j, carry, masked: bool):
        i = first + j * stride
        slot = lax.rem(i, jnp.int32(stages))

        k_tile = k_smem.at[slot].transpose((1, 0))

        def qk_scope(acc_ref):
          for t in range(q_terms):
            plgpu.wgmma(acc_ref, my_q.at[t] if fp8_k else my_q, k_tile)
          take_turn()
          if fp8_v:  # under the QK^T wgmma
            widen_v(slot)
          return acc_ref[...]

        qk = pl.run_scoped(qk_scope, plgpu.ACC((BLOCK_Q, block_k), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if fp8_k:
          qk = qk * lax.broadcast_in_dim(q_inv, qk.shape, [0])
        mask = None
        if masked:  # only the last, partial tile of a split needs a key mask
          cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_k), 1,
                                        layout=plgpu.Layout.WGMMA)
          row_end = end
          if causal:
            t = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_k), 0,
                                       layout=plgpu.Layout.WGMMA) // paged.G
            row_end = jnp.minimum(end, limit + t)
          mask = cols + (start + i * block_k) < row_end
        if mask is not None:
          qk = jnp.where(mask, qk, -jnp.inf)
        p, (acc, m, l) = softmax.step(carry, qk, scale_log2=scale_log2,
                                      rows_may_be_empty=causal)
        p_in = p.astype(dtype)
        acc, m, l, p_in = lax.optimization_barrier((acc, m, l, p_in))
        if pair:
          plgpu.barrier_arrive(turn)
        if not fp8_v:
          plgpu.barrier_wait(v_full.at[slot])
        if pair:
          plgpu.barrier_wait(turn)

        v_tile = staging.at[wg] if fp8_v else v_smem.at[slot]

        def wait_next_k():
          @pl.when(i + stride < steps)
          def _():
            plgpu.barrier_wait(k_full.at[lax.rem(i + stride, jnp.int32(stages))])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p_in, v_tile)
          if not own_slot:
            wait_next_k()

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        if not fp8_v:
          plgpu.barrier_arrive(v_free.at[slot])
        if own_slot:  # the next K lands in the slot this V tile holds: free it first
          wait_next_k()
        return acc, m, l

      my_full = mine(full_steps)
      carry = lax.fori_loop(0, my_full, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(my_full, mine(steps), functools.partial(step, masked=True),
                                carry)
      if pair:
        pl.when(wg == 0)(take_turn)

      o, lse = softmax.finish(acc, m, l)
      # o in the q tile, or (float8 terms of q) this consumer's staging tile
      o_smem = staging.at[wg, pl.ds(0, BLOCK_Q)] if fp8_k else my_q
      o_smem[...] = o.astype(dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      part = sp * parts_per_range + (wg if split_keys else 0)
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[part, h, rows_at])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[part, h, rows_at])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      def sources(i):
        """The gmem pieces of tile i and where each goes in a slot: its keys, or each page of
        the tile (or the tile's part of one page) by its id in the table. The last tile may run
        past a request's live pages (those keys are masked): the entry stays in its row and the
        id, junk there, in the pool."""
        key0 = start + i * block_k
        if paged is None:
          return [((pl.ds(key0, block_k), h), pl.ds(0, block_k))]
        size, max_pages = min(block_k, paged.page_size), paged.tables.shape[-1]
        table = mt * Hkv + h if paged.tables.ndim == 3 else mt
        out = []
        for c in range(copies):
          pos = key0 + c * size
          entry = jnp.minimum(lax.div(pos, paged.page_size), max_pages - 1)
          page = jnp.clip(page_gmem[0][table * max_pages + entry], 0, k.shape[0] - 1)
          src = (page, pl.ds(pl.multiple_of(lax.rem(pos, paged.page_size), size), size), h)
          out.append((src, pl.ds(c * size, size)))
        return out

      def issue(pieces, slot):
        for src, dst in pieces:
          plgpu.copy_gmem_to_smem(k_gmem.at[src], k_smem.at[slot, dst], k_full.at[slot])
          plgpu.copy_gmem_to_smem(v_gmem.at[src], v_smem.at[slot, dst], v_full.at[slot])

      for i in range(stages):
        pl.when(i < steps)(lambda i=i: issue(sources(i), i))

      @pl.loop(0, jnp.maximum(steps - stages, 0))
      def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        pieces = sources(i + stages)  # page ids read from gmem while the slot drains
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        issue(pieces, slot)

  def entry(*gmem):
    transforms = smem_transforms(D, jnp.dtype(dtype).itemsize)
    k_transforms = smem_transforms(D, jnp.dtype(k.dtype).itemsize)
    q_smem = (plgpu.SMEM((consumers, q_terms, BLOCK_Q, D), k.dtype, transforms=k_transforms)
              if fp8_k else plgpu.SMEM((consumers, BLOCK_Q, D), dtype, transforms=transforms))
    smem = [
        q_smem,
        plgpu.SMEM((stages, block_k, D), k.dtype, transforms=k_transforms),
        plgpu.SMEM((stages, block_k, D), v.dtype,
                   transforms=smem_transforms(D, jnp.dtype(v.dtype).itemsize)),
        plgpu.SMEM((consumers, BLOCK_Q), jnp.float32),
    ]
    if fp8_k:  # each consumer's staging tile: widened V (float16), or only o
      smem.append(plgpu.SMEM((consumers, block_k if fp8_v else BLOCK_Q, D), dtype,
                             transforms=transforms))
    pl.run_scoped(
        lambda *scoped: body(gmem, scoped),
        smem,
        # a slot is full once each of its copies has landed; q once its terms (and scales)
        (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),) * 2
        + (plgpu.Barrier(num_arrivals=q_terms + fp8_k, num_barriers=consumers),),
        # a slot is free once each consumer that reads it has
        (plgpu.Barrier(num_arrivals=1 if split_keys else consumers, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=consumers),
        collective_axes="wg",
    )

  o, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct((num_parts * parts_per_range, Hkv, M, D), dtype),
                jax.ShapeDtypeStruct((num_parts * parts_per_range, Hkv, M), jnp.float32)],
      grid=(m_tiles, Hkv, num_parts),
      grid_names=("m", "h", "split"),
      num_threads=consumers + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(ranges.astype(jnp.int32).reshape(-1), *q_in, k, v,
    *(() if paged is None else (paged.tables.astype(jnp.int32).reshape(-1),
                                paged.lengths.astype(jnp.int32))))
  return o.astype(out_dtype), lse
