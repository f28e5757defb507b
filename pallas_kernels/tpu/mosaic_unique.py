"""Unique-KV (paged, ragged) decode attention on TPU (Mosaic): the GPU kernel's split scheme.

Grid (requests, kv-head groups, row tiles, splits, blocks per split), the last axis sequential: a
program holds block_m of a request's T*G query rows (one tile in decode, several for a prefill
chunk, each stopping at the keys its own last query sees). The pool is
viewed as [P * page_size, Hkv * D] so one page of hb kv heads is a lane-dense (page_size, hb * D)
block (hb * D a multiple of 128, or all heads). A compute block of `pages_per_block` pages is
that many K (and V) inputs, each an index map reading its page id from the scalar-prefetched
block table; the pages are stacked in VMEM into one [block_k, D] tile per kv head.

Each request's blocks are cut into `num_splits` equal runs that follow its own length. Grid steps
past the end of a run are skipped in the kernel, and their index maps (like those of pages past
the length inside the last block) are clamped to the last valid page, so the pipeline sees an
unchanged block index and issues no copy: a short request costs its pages, not the padded grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import layout, quant
from pallas_kernels.numerics import matmul_precision
from pallas_kernels.tpu import softmax
from pallas_kernels.tpu.tuning import cost, heads_per_block, nbytes


def _kernel(len_ref, tab_ref, q_ref, *refs, scale: float, T: int, G: int, page_size: int,
            pages_per_block: int, num_splits: int, hb: int, precision):
  k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block:]
  b, tile, split, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  R, d = q_ref.shape[1:]
  block_k = pages_per_block * page_size
  length = len_ref[b]
  first, end, _ = layout.tile_split_range(length, split, tile * R, R, T=T, G=G,
                                          page_size=page_size, pages_per_block=pages_per_block,
                                          num_splits=num_splits)

  @pl.when(t == 0)
  def _init():
    softmax.init(m_sc, l_sc, acc_sc)

  @pl.when(first + t < end)
  def _block():
    start = (first + t) * block_k
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    key_rows = start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    row = tile * R + jax.lax.broadcasted_iota(jnp.int32, (R, 1), 0)
    # Row r is query r // G at position length - T + r // G; pos <= that <=> (pos-length+T)*G <= r
    # (no vector integer division). Padded rows (r >= T*G) need the plain length bound too.
    visible = (cols < length) & ((cols - length + T) * G <= row)
    for j in range(hb):  # static unroll over the kv heads of this block
      cut = slice(j * d, (j + 1) * d)
      k = quant.widen(jnp.concatenate([r[:, cut] for r in k_refs], axis=0), q_ref.dtype)
      # The tail of the last page (and interpret mode's NaN fill) must not reach p @ v.
      v = jnp.where(key_rows < length, quant.widen(jnp.concatenate([r[:, cut] for r in v_refs],
                                                                   axis=0), q_ref.dtype), 0)
      s = jnp.where(visible, softmax.scores(q_ref[j], k, scale, precision), -jnp.inf)
      softmax.update(m_sc.at[j], l_sc.at[j], acc_sc.at[j], s, v, precision)

  @pl.when(t == pl.num_programs(4) - 1)
  def _finish():
    softmax.finish(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def unique_attention_partials(q_rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, lengths: jax.Array, *, T: int, G: int,
                              scale: float, pages_per_block: int, num_splits: int,
                              block_m: int, interpret=False,
                              vmem_limit_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Partial attention of q_rows[Hkv, B, R, D] over each request's pages.

  Same contract as the GPU kernel (row r of request b is its query token r // G; R >= T*G, a
  multiple of block_m, itself a multiple of 16: a program holds block_m rows), returning
  o[num_splits, Hkv, B, R, D] and lse[num_splits, Hkv, B, R] float32.
  page_size must be a multiple of 8 (sublane tiling of a page block). vmem_limit_bytes: Mosaic's
  VMEM limit for the kernel (None: the default scoped VMEM).
  """
  Hkv, B, R, D = q_rows.shape
  P, page_size = k_pages.shape[:2]
  max_pages = block_tables.shape[1]
  hb = heads_per_block(Hkv, D)
  blocks_per_split = pl.cdiv(pl.cdiv(max_pages, pages_per_block), num_splits)
  k2 = k_pages.reshape(P * page_size, Hkv * D)
  v2 = v_pages.reshape(P * page_size, Hkv * D)

  tiles, rem = divmod(R, block_m)
  assert not rem, f"q_rows' {R} rows are not whole tiles of block_m={block_m}"
  tile_range = functools.partial(layout.tile_split_range, tile_rows=block_m, T=T, G=G,
                                 page_size=page_size, pages_per_block=pages_per_block,
                                 num_splits=num_splits)

  def page_map(j: int):
    def index_map(b, hg, r, s, t, len_ref, tab_ref):
      first, end, num_pages = tile_range(len_ref[b], s, r * block_m)
      block = jnp.minimum(first + t, end - 1)  # steps past the run repeat its last block
      page = jnp.clip(block * pages_per_block + j, 0, jnp.maximum(num_pages - 1, 0))
      return jnp.clip(tab_ref[b * max_pages + page], 0, P - 1), hg  # junk ids never reach DMA
    return index_map

  page_specs = [pl.BlockSpec((page_size, hb * D), page_map(j)) for j in range(pages_per_block)]
  kernel = functools.partial(
      _kernel, scale=scale, T=T, G=G, page_size=page_size, pages_per_block=pages_per_block,
      num_splits=num_splits, hb=hb,
      precision=matmul_precision(q_rows.dtype))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, Hkv // hb, tiles, num_splits, blocks_per_split),
      in_specs=[
          pl.BlockSpec((hb, None, block_m, D), lambda b, hg, r, s, t, n, tab: (hg, b, r, 0)),
          *page_specs,
          *page_specs,
      ],
      out_specs=[
          pl.BlockSpec((None, hb, None, block_m, D),
                       lambda b, hg, r, s, t, n, tab: (s, hg, b, r, 0)),
          pl.BlockSpec((None, hb, None, block_m, 1),
                       lambda b, hg, r, s, t, n, tab: (s, hg, b, r, 0)),
      ],
      scratch_shapes=softmax.scratch(hb, rows=block_m, d=D),
  )
  out_shape = [jax.ShapeDtypeStruct((num_splits, Hkv, B, R, D), jnp.float32),
               jax.ShapeDtypeStruct((num_splits, Hkv, B, R, 1), jnp.float32)]
  keys = max_pages * page_size  # a request's table, each row tile reading it
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      cost_estimate=cost(pairs=Hkv * B * R * keys, width=D,
                         bytes_accessed=nbytes(q_rows, *out_shape)
                         + B * tiles * max_pages * (nbytes(k_pages, v_pages) // P)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      name="moska_unique_attention",
  )(lengths, block_tables.reshape(-1), q_rows, *([k2] * pages_per_block),
    *([v2] * pages_per_block))
  return o, lse[..., 0]
