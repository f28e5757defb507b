"""Grouped chunk attention on TPU (Mosaic): the GPU kernel's work list under TPU tiling rules.

Grid (Hkv, tiles, key blocks of the chunk), the last axis sequential. The work list arrives by
scalar prefetch (the chunk of every tile, the real tile count of every kv head, kv_length), and
the K/V index map (`kv_block`) turns (tile, key block) into a block of that tile's chunk, so only
selected chunks are DMA'd; key blocks past kv_length and every step of the padding tiles map to
the block already resident (no copy) and are skipped. The query rows were gathered into tile
order in XLA, since Mosaic DMAs whole blocks. K/V are viewed as [S, Hkv*D] with (block_k, hb*D)
blocks as in shared_attention; when hb > 1 (D < 128) the kernel picks its head's columns out of
the block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import quant
from pallas_kernels.numerics import matmul_precision
from pallas_kernels.tpu import softmax
from pallas_kernels.tpu.tuning import cost, heads_per_block, nbytes


def _kernel(len_ref, chunk_ref, ntiles_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc,
            acc_sc, *, scale: float, chunk_size: int, block_k: int, num_tiles: int, hb: int,
            precision):
  h, t, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d = q_ref.shape[-1]
  chunk = chunk_ref[h * num_tiles + t]
  start = chunk * chunk_size + kb * block_k
  end = jnp.minimum(chunk * chunk_size + chunk_size, len_ref[0])

  @pl.when(kb == 0)
  def _init():
    softmax.init(m_sc, l_sc, acc_sc)

  def tile(j: int):
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    q = q_ref[...]  # [block_m, D]
    k = quant.widen(k_ref[:, j * d:(j + 1) * d], q.dtype)  # [block_k, D]
    # Rows past kv_length (or past S in a partial edge block) may hold anything: zero V there.
    v = jnp.where(rows < end, quant.widen(v_ref[:, j * d:(j + 1) * d], q.dtype), 0)
    s = jnp.where(cols < end, softmax.scores(q, k, scale, precision), -jnp.inf)
    softmax.update(m_sc, l_sc, acc_sc, s, v, precision)

  real = (t < ntiles_ref[h]) & (chunk >= 0) & (start < end)
  # lax.rem / lax.div on grid indices (never negative), not % and //: floor division emits
  # lax.sign, whose Mosaic rule reads the chip generation (unknown when lowering off a TPU).
  for j in range(hb):  # static: the column block of this kv head inside the hb-head block
    pl.when(real & (jax.lax.rem(h, hb) == j))(functools.partial(tile, j))

  @pl.when(kb == pl.num_programs(2) - 1)
  def _finish():
    softmax.finish(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def kv_block(h, t, kb, kv_length, tile_chunk, num_tiles, *, num_tile_slots: int, chunk_size: int,
             block_k: int):
  """The K/V block (in units of block_k rows) that grid step (kv head h, tile t, key block kb)
  reads; also works on arrays of steps.

  The pipeline copies a block only when the index differs from the previous step's, so steps that
  compute nothing repeat an index: key blocks past kv_length map to the chunk's last valid block,
  and padding tiles (t >= num_tiles[h], which come last) map to the block of the last real tile's
  last step, so none of their steps copies anything. Consecutive tiles of one chunk share the
  block (no re-copy) only when the chunk is one key block (block_k = chunk_size); otherwise each
  tile streams the chunk from its first block again.

  Args:
    h, t, kb: grid indices (int32 scalars, or broadcastable int arrays).
    kv_length: int32 scalar, keys [0, kv_length) are valid.
    tile_chunk: [Hkv * num_tile_slots] chunk of each tile (flattened `ChunkGroups.tile_chunk`).
    num_tiles: [Hkv] real tiles per kv head.
  """
  last_real = jnp.maximum(num_tiles[h] - 1, 0)
  c = jnp.maximum(tile_chunk[h * num_tile_slots + jnp.minimum(t, last_real)], 0)
  n_valid = jnp.maximum(jnp.minimum(c * chunk_size + chunk_size, kv_length) - c * chunk_size, 0)
  last = jnp.maximum(pl.cdiv(n_valid, block_k) - 1, 0)
  kb = jnp.where(t < num_tiles[h], jnp.minimum(kb, last), last)
  return c * (chunk_size // block_k) + kb


def chunk_attention_tiles(q_tiles: jax.Array, k: jax.Array, v: jax.Array, kv_length: jax.Array,
                          tile_chunk: jax.Array, num_tiles: jax.Array, *, scale: float,
                          chunk_size: int, block_m: int, block_k: int, interpret=False,
                          vmem_limit_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Partial attention of each tile of stacked query rows over its chunk.

  Args:
    q_tiles: [Hkv, NT * block_m, D] query rows in tile order (`ChunkGroups.rows` gathered).
    k, v: [S, Hkv, D] shared keys / values.
    kv_length: int32 scalar, keys [0, kv_length) are valid (kv_length <= S).
    tile_chunk: [Hkv, NT] chunk of each tile, -1 for padding tiles.
    num_tiles: [Hkv] real tiles per kv head (they come first).
    block_k: divides chunk_size, a multiple of 128 (lane-dense score tile).
    vmem_limit_bytes: Mosaic's VMEM limit for the kernel (None: the default scoped VMEM).

  Returns:
    o[Hkv, NT * block_m, D] in q_tiles.dtype and lse[Hkv, NT * block_m] float32 per tile row;
    padding tiles give o = 0, lse = -inf.
  """
  Hkv, rows, D = q_tiles.shape
  S = k.shape[0]
  NT = tile_chunk.shape[1]
  hb = heads_per_block(Hkv, D)
  k2, v2 = k.reshape(S, Hkv * D), v.reshape(S, Hkv * D)

  def kv_map(h, t, kb, len_ref, chunk_ref, ntiles_ref):
    return kv_block(h, t, kb, len_ref[0], chunk_ref, ntiles_ref, num_tile_slots=NT,
                    chunk_size=chunk_size, block_k=block_k), jax.lax.div(h, hb)  # see _kernel

  row_map = lambda h, t, kb, *_: (h, t, 0)
  kernel = functools.partial(
      _kernel, scale=scale, chunk_size=chunk_size, block_k=block_k, num_tiles=NT, hb=hb,
      precision=matmul_precision(q_tiles.dtype))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(Hkv, NT, chunk_size // block_k),
      in_specs=[
          pl.BlockSpec((None, block_m, D), row_map),
          pl.BlockSpec((block_k, hb * D), kv_map),
          pl.BlockSpec((block_k, hb * D), kv_map),
      ],
      out_specs=[
          pl.BlockSpec((None, block_m, D), row_map),
          pl.BlockSpec((None, block_m, 1), row_map),
      ],
      scratch_shapes=softmax.scratch(rows=block_m, d=D),
  )
  out_shape = [jax.ShapeDtypeStruct((Hkv, rows, D), q_tiles.dtype),
               jax.ShapeDtypeStruct((Hkv, rows, 1), jnp.float32)]
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      cost_estimate=cost(pairs=Hkv * rows * chunk_size, width=D,  # each tile reads its chunk
                         bytes_accessed=nbytes(q_tiles, *out_shape)
                         + NT * chunk_size * (nbytes(k, v) // S)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      name="moska_chunk_attention",
  )(kv_length.reshape(1), tile_chunk.reshape(Hkv * NT), num_tiles, q_tiles, k2, v2)
  return o, lse[..., 0]
