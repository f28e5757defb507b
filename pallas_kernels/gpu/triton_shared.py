"""Shared-KV attention on GPU (Pallas Triton lowering): one flash-attention GEMM per kv head.

Grid (Hkv, M blocks, S splits). A program holds a [block_m, D] tile of query rows (G heads x B*T
tokens of one kv head) and streams its split of the shared K/V in [block_k, D] tiles with an online
softmax, so every K/V tile is multiplied by block_m rows at once and the row blocks of one kv head
read the same tiles (L2 hits). Splitting S (flash-decoding) keeps every SM streaming when M is
small. Each program writes a normalized partial (o, lse) that `merge_partials` combines.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu import softmax
from pallas_kernels.numerics import LOG2E


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, block_k: int,
            split_len: int, precision, head_dim: int):
  start = pl.program_id(2) * split_len
  end = jnp.minimum(start + split_len, len_ref[0])
  o, lse_ref[...] = softmax.attend_range(softmax.load_rows(q_ref, head_dim), k_ref, v_ref, start,
                                         end, scale=scale, block_k=block_k, precision=precision,
                                         head_dim=head_dim)
  softmax.store_rows(o_ref, o, head_dim)


def shared_attention_partials(q_rows: jax.Array, k: jax.Array, v: jax.Array,
                              kv_length: jax.Array, *, scale: float, block_m: int, block_k: int,
                              num_splits: int, num_warps: int, num_stages: int,
                              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Partial attention of q_rows[Hkv, M, D] (M a multiple of block_m) over k, v[S, Hkv, D].

  Returns o[num_splits, Hkv, M, D] float32 (normalized per split) and lse[num_splits, Hkv, M]
  float32; a split with no valid key has o = 0, lse = -inf.
  """
  split_len = pl.cdiv(pl.cdiv(k.shape[0], num_splits), block_k) * block_k
  precision = softmax.dot_precision(q_rows.dtype, interpret)
  kernel = functools.partial(_kernel, scale=scale, block_k=block_k, split_len=split_len,
                             precision=precision, head_dim=q_rows.shape[-1])
  return _partials_call(kernel, [], q_rows, k, v, kv_length, block_m=block_m,
                        num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                        interpret=interpret, name="moska_shared_attention")


def _partials_call(kernel, tables: list, q_rows: jax.Array, k: jax.Array, v: jax.Array,
                   kv_length: jax.Array, *, block_m: int, num_splits: int, num_warps: int,
                   num_stages: int, interpret: bool, name: str) -> tuple[jax.Array, jax.Array]:
  """The pallas_call both kernels share: grid (Hkv, row blocks, splits), kernel(len, *tables,
  q, k, v, o, lse); `tables` are (array, BlockSpec) pairs read per (kv head, row block). Blocks
  span the padded head dim (`softmax.padded`)."""
  Hkv, M, D = q_rows.shape
  Dp = softmax.padded(D)
  kv_spec = pl.BlockSpec((k.shape[0], None, Dp), lambda h, i, j: (0, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(Hkv, M // block_m, num_splits),
      in_specs=[
          pl.BlockSpec((1,), lambda h, i, j: (0,)),
          *(spec for _, spec in tables),
          pl.BlockSpec((None, block_m, Dp), lambda h, i, j: (h, i, 0)),
          kv_spec,
          kv_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_m, Dp), lambda h, i, j: (j, h, i, 0)),
          pl.BlockSpec((None, None, block_m), lambda h, i, j: (j, h, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_splits, Hkv, M, D), jnp.float32),
          jax.ShapeDtypeStruct((num_splits, Hkv, M), jnp.float32),
      ],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=name,
  )(kv_length.reshape(1), *(x for x, _ in tables), q_rows, k, v)


def _list_kernel(len_ref, count_ref, ids_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                 scale: float, block_k: int, chunk_size: int, num_splits: int, precision,
                 head_dim: int):
  n, count = len_ref[0], count_ref[0]
  per_split = pl.cdiv(count, num_splits)
  first = pl.program_id(2) * per_split
  q = softmax.load_rows(q_ref, head_dim)

  def chunk(j, carry):
    start = ids_ref[j] * chunk_size
    return softmax.attend_keys(q, k_ref, v_ref, start, jnp.minimum(start + chunk_size, n), carry,
                               scale_log2=scale * LOG2E, block_k=block_k,
                               precision=precision, head_dim=head_dim)

  carry = jax.lax.fori_loop(first, jnp.minimum(first + per_split, count), chunk,
                            softmax.initial_state(*q.shape))
  o, lse_ref[...] = softmax.finish(*carry)
  softmax.store_rows(o_ref, o, head_dim)


def chunk_list_partials(q_rows: jax.Array, k: jax.Array, v: jax.Array, kv_length: jax.Array,
                        tile_ids: jax.Array, tile_counts: jax.Array, *, scale: float,
                        chunk_size: int, rows_per_tile: int, block_m: int, block_k: int,
                        num_splits: int, num_warps: int, num_stages: int,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Partial attention of each tile of rows over its own list of chunks (shared_attention over a
  chosen subset of S, accumulated online across the chunks: one partial per split).

  Args:
    q_rows: [Hkv, n_tiles * rows_per_tile, D] folded query rows, tile t owning rows
      [t * rows_per_tile, (t + 1) * rows_per_tile), rows_per_tile a multiple of block_m.
    k, v: [S, Hkv, D]; kv_length: int32 scalar.
    tile_ids: [Hkv, n_tiles, U] chunk ids of each (kv head, tile), the first tile_counts of them
      valid (U a power of two); tile_counts: [Hkv, n_tiles] int32.

  Returns:
    o[num_splits, Hkv, rows, D] float32 (normalized per split) and lse[num_splits, Hkv, rows];
    each split takes an equal share of its tile's list.
  """
  U = tile_ids.shape[-1]
  blocks_per_tile = rows_per_tile // block_m
  kernel = functools.partial(_list_kernel, scale=scale, block_k=block_k, chunk_size=chunk_size,
                             num_splits=num_splits, head_dim=q_rows.shape[-1],
                             precision=softmax.dot_precision(q_rows.dtype, interpret))
  tables = [(tile_counts, pl.BlockSpec((None, 1), lambda h, i, j: (h, i // blocks_per_tile))),
            (tile_ids, pl.BlockSpec((None, None, U), lambda h, i, j: (h, i // blocks_per_tile, 0)))]
  return _partials_call(kernel, tables, q_rows, k, v, kv_length, block_m=block_m,
                        num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                        interpret=interpret, name="moska_tile_chunk_attention")
