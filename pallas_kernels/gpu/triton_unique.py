"""Unique-KV (paged, ragged) decode attention on GPU (Triton): one program per (request, kv head,
row tile, split).

A program holds block_m (a power of two >= 16, for the tensor cores) of the T*G query rows of
one request and one kv head (the G query heads of the kv head x the T new tokens, padded to whole
tiles: one tile while T*G <= block_m, as in decode; several for a prefill chunk, each stopping at
the keys its own last query sees) and streams the request's pages in compute
blocks of `pages_per_block` pages with an online softmax. Page ids are read from the block table
inside the kernel and turned into row offsets of the pool viewed as [P * page_size, Hkv, D], so
one block is a single gather of block_k rows of D contiguous elements.

Each request's pages are cut into `num_splits` equal runs of whole blocks (flash decoding): the
runs follow each request's own length, so a short request costs its pages, not the padded
maximum, and the splits of one request are balanced. A program writes a normalized partial
(o, lse); `merge_partials` combines the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import layout
from pallas_kernels.gpu import softmax
from pallas_kernels.numerics import LOG2E


def _kernel(len_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, T: int,
            G: int, page_size: int, pages_per_block: int, num_splits: int, row_tiles: int,
            precision, head_dim: int):
  b, split = pl.program_id(0), pl.program_id(2)
  q = softmax.load_rows(q_ref, head_dim)  # [block_m, D_pad]
  R, d = q.shape
  row0 = jax.lax.rem(pl.program_id(1), row_tiles) * R
  row = row0 + jnp.arange(R)  # rows of the request
  block_k = pages_per_block * page_size
  length = len_ref[b]
  first, end, num_pages = layout.tile_split_range(length, split, row0, R, T=T, G=G,
                                                  page_size=page_size,
                                                  pages_per_block=pages_per_block,
                                                  num_splits=num_splits)
  last = jnp.maximum(end, first)  # an empty split, or tile, runs no block
  # Row r is query t = r // G at position length - T + t; padded rows (t >= T) see every key.
  row_hi = jnp.minimum(length - T + row // G, length - 1)
  scale_log2 = scale * LOG2E
  key = jnp.arange(block_k)
  lanes = jnp.arange(d)[None, :]  # the padded head dim
  real_lanes = softmax.lanes(head_dim, d)  # None: no padding lane

  def page_ids(i):
    """The page id of every key of block i (repeated reads of one entry hit L1); 0 past the end."""
    page = jax.lax.div(i * block_k + key, page_size)  # >= 0: truncation, no floor fix-ups
    return pltriton.load(tables_ref.at[page], mask=page < num_pages, other=0)

  def body(i, carry):
    *state, ids = carry
    pos = i * block_k + key  # positions of the block's keys in the request
    valid = (pos < length)[:, None]
    valid = valid if real_lanes is None else valid & real_lanes
    # Index both axes with arrays (a gather of [block_k, D]): interpret mode cannot mix an array
    # index with a slice. K and V are issued together so both are in flight at once.
    rows = (ids * page_size + jax.lax.rem(pos, page_size))[:, None]
    k = softmax.widen(pltriton.load(k_ref.at[rows, lanes], mask=valid, other=0.0), q.dtype)
    v = softmax.widen(pltriton.load(v_ref.at[rows, lanes], mask=valid, other=0.0), q.dtype)
    # Next block's page ids now, so its K/V addresses never wait on a table read (manual
    # prefetch: the block table is an indirection Triton's pipeliner may not look through).
    ids_next = page_ids(i + 1)
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision)
    s = jnp.where(pos[None, :] <= row_hi[:, None], s, -jnp.inf)
    # A causal mask may leave a row without a key in this block (and so far).
    p, (acc, m, l) = softmax.step(state, s, scale_log2=scale_log2, rows_may_be_empty=True)
    acc = acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                        precision=precision)
    return acc, m, l, ids_next

  acc, m, l, _ = jax.lax.fori_loop(first, last, body,
                                   (*softmax.initial_state(R, d), page_ids(first)))
  o, lse = softmax.finish(acc, m, l)
  real = row < T * G  # padded rows are never read: skip their stores
  pltriton.store(o_ref, o, mask=real[:, None] if real_lanes is None else
                 real[:, None] & real_lanes)
  pltriton.store(lse_ref, lse, mask=real)


def unique_attention_partials(q_rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, lengths: jax.Array, *, T: int, G: int,
                              scale: float, pages_per_block: int, num_splits: int, block_m: int,
                              num_warps: int, num_stages: int, interpret: bool = False
                              ) -> tuple[jax.Array, jax.Array]:
  """Partial attention of q_rows[Hkv, B, R, D] over each request's pages.

  Row r of request b is query token r // G of that request (G = Hq / Hkv); R >= T*G is a multiple
  of block_m, a power of two >= 16 (rows past T*G are padding); a program holds block_m rows.
  k_pages, v_pages: [P, page_size, Hkv, D] with page_size * pages_per_block a power of two >= 16;
  block_tables [B, max_pages] int32; lengths [B] int32.

  Returns o[num_splits, Hkv, B, R, D] float32 (normalized per split) and lse[num_splits, Hkv, B, R]
  float32; only rows < T*G are written. A split with no valid key for a row has o = 0,
  lse = -inf there.
  """
  Hkv, B, R, D = q_rows.shape
  P, page_size = k_pages.shape[:2]
  tiles, rem = divmod(R, block_m)
  assert not rem, f"q_rows' {R} rows are not whole tiles of block_m={block_m}"
  kernel = functools.partial(
      _kernel, scale=scale, T=T, G=G, page_size=page_size, pages_per_block=pages_per_block,
      num_splits=num_splits, row_tiles=tiles, head_dim=D,
      precision=softmax.dot_precision(q_rows.dtype, interpret))
  # [P * page_size, Hkv, D] is a free view; a block squeezes one kv head (rows strided by Hkv*D).
  Dp = softmax.padded(D)
  # Grid axis 1 walks (kv head, row tile) pairs: Triton grids have three axes.
  kv_spec = pl.BlockSpec((P * page_size, None, Dp), lambda b, hr, s: (0, hr // tiles, 0))
  max_pages = block_tables.shape[1]
  return pl.pallas_call(
      kernel,
      grid=(B, Hkv * tiles, num_splits),
      in_specs=[
          pl.BlockSpec((B,), lambda b, hr, s: (0,)),
          pl.BlockSpec((None, max_pages), lambda b, hr, s: (b, 0)),
          pl.BlockSpec((None, None, block_m, Dp), lambda b, hr, s: (hr // tiles, b, hr % tiles, 0)),
          kv_spec,
          kv_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_m, Dp),
                       lambda b, hr, s: (s, hr // tiles, b, hr % tiles, 0)),
          pl.BlockSpec((None, None, None, block_m),
                       lambda b, hr, s: (s, hr // tiles, b, hr % tiles)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_splits, Hkv, B, R, D), jnp.float32),
          jax.ShapeDtypeStruct((num_splits, Hkv, B, R), jnp.float32),
      ],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moska_unique_attention",
  )(lengths, block_tables, q_rows, k_pages.reshape(P * page_size, *k_pages.shape[2:]),
    v_pages.reshape(P * page_size, *v_pages.shape[2:]))
