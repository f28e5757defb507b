"""Grouped chunk attention on GPU (Pallas Triton lowering): one tile per (chunk, stacked rows).

Grid (tiles, Hkv), tiles fastest so the tiles of one chunk run back to back (a chunk that spans
several tiles is re-read from L2, not HBM). A program reads its chunk id (index operand) and the
block_m pair rows of its tile, gathers those query rows straight from the folded q_rows (a
masked pointer gather: no gathered copy of q in HBM), streams the chunk's K/V in block_k tiles
with an online softmax, and scatters its normalized partial (o, lse) to the rows of its
(request, chunk) pairs in the pair-major output that `merge_partials` reduces over K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu import softmax


def _kernel(len_ref, chunk_ref, rows_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float,
            chunk_size: int, block_k: int, rows_per_pair: int, pairs_per_request: int,
            precision, head_dim: int):
  rows = rows_ref[...]  # [block_m] pair rows (b*K + k)*R + r, -1 = padding slot
  live = rows >= 0
  rows = jnp.where(live, rows, 0)
  R = rows_per_pair
  q_idx = (rows // (pairs_per_request * R)) * R + rows % R  # request b's row r in q_rows
  # Both axes as index arrays: a gather in interpret mode, row*D + col pointers on GPU.
  cols = jnp.arange(q_ref.shape[-1])[None, :]  # the padded head dim, lanes >= head_dim masked
  real = live[:, None] & (cols < head_dim)
  q = pltriton.load(q_ref.at[q_idx[:, None], cols], mask=real, other=0.0)
  chunk = chunk_ref[0]
  start = chunk * chunk_size
  # Padding tiles (chunk -1) get an empty key range.
  end = jnp.where(chunk >= 0, jnp.minimum(start + chunk_size, len_ref[0]), start)
  o, lse = softmax.attend_range(q, k_ref, v_ref, start, end, scale=scale, block_k=block_k,
                              precision=precision, head_dim=head_dim)
  # Masked slots point one past the end: interpret mode drops out-of-bounds scatter updates
  # (an in-bounds dummy row could clobber a live row); the GPU never dereferences them.
  out = jnp.where(live, rows, o_ref.shape[0])
  pltriton.store(o_ref.at[out[:, None], cols], o.astype(o_ref.dtype),
                 mask=jnp.broadcast_to(real, o.shape))
  pltriton.store(lse_ref.at[out], lse, mask=live)


def chunk_attention_partials(q_rows: jax.Array, k: jax.Array, v: jax.Array,
                             kv_length: jax.Array, tile_chunk: jax.Array, rows: jax.Array, *,
                             rows_per_pair: int, pairs_per_request: int, scale: float,
                             chunk_size: int, block_m: int, block_k: int, num_warps: int,
                             num_stages: int,
                             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Partial attention of every (request, chunk) pair, one tile of stacked rows per program.

  Args:
    q_rows: [Hkv, B*R, D] folded queries (R = T*G rows per request).
    k, v: [S, Hkv, D] shared keys / values.
    kv_length: int32 scalar, keys [0, kv_length) are valid (kv_length <= S).
    tile_chunk: [Hkv, NT] chunk of each tile, -1 for padding tiles (`ChunkGroups.tile_chunk`).
    rows: [Hkv, NT * block_m] pair row of each tile slot, -1 for padding (`ChunkGroups.rows`).
    rows_per_pair: R.
    pairs_per_request: K.

  Returns:
    o[Hkv, B*K*R, D] in q_rows.dtype and lse[Hkv, B*K*R] float32, normalized per pair; rows of
    pairs that appear in no tile are left unwritten.
  """
  Hkv, BR, D = q_rows.shape
  S = k.shape[0]
  NT = tile_chunk.shape[1]
  P = BR * pairs_per_request
  precision = softmax.dot_precision(q_rows.dtype, interpret)
  kernel = functools.partial(_kernel, scale=scale, chunk_size=chunk_size, block_k=block_k,
                             rows_per_pair=rows_per_pair,
                             pairs_per_request=pairs_per_request, precision=precision,
                             head_dim=D)
  Dp = softmax.padded(D)
  kv_spec = pl.BlockSpec((S, None, Dp), lambda t, h: (0, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(NT, Hkv),
      in_specs=[
          pl.BlockSpec((1,), lambda t, h: (0,)),
          pl.BlockSpec((None, 1), lambda t, h: (h, t)),
          pl.BlockSpec((None, block_m), lambda t, h: (h, t)),
          pl.BlockSpec((None, BR, Dp), lambda t, h: (h, 0, 0)),
          kv_spec,
          kv_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, P, Dp), lambda t, h: (h, 0, 0)),
          pl.BlockSpec((None, P), lambda t, h: (h, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((Hkv, P, D), q_rows.dtype),
          jax.ShapeDtypeStruct((Hkv, P), jnp.float32),
      ],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moska_chunk_attention",
  )(kv_length.reshape(1), tile_chunk, rows, q_rows, k, v)
