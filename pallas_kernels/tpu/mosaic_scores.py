"""The chunk scorer on TPU (Mosaic): the GPU kernel's work under TPU tiling rules.

Grid (kv-head groups, M blocks, chunk blocks, key tiles of the block), the last axis sequential.
Sketches are viewed as [S, Hkv * W] (W = D/2 packed, D for 8-bit codes) so a block
(block_k, hb * W) is lane-dense; per-key scales arrive transposed, [Hkv, S], so a head's scales
are one lane-dense row of a (Hkv, block_k) block. Key tiles past kv_length are skipped and their
index map is clamped to the last valid tile (no copy). The running max of every (row, chunk) of
the block lives in VMEM scratch and is written once, after the block's last key tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import sketch
from pallas_kernels.numerics import matmul_precision
from pallas_kernels.tpu.tuning import cost, heads_per_block, nbytes


def _kernel(len_ref, *refs, chunk_size: int, block_k: int, chunks_per_block: int, hb: int,
            precision, packed: bool, per_key_scale: bool):
  if per_key_scale:
    *q_refs, codes_ref, scale_ref, out_ref, best_sc = refs
  else:
    (*q_refs, codes_ref, out_ref, best_sc), scale_ref = refs, None
  hg, nb, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  w = q_refs[0].shape[-1]
  length = len_ref[0]
  start = nb * chunks_per_block * chunk_size + t * block_k
  j = jax.lax.div(t, jnp.int32(chunk_size // block_k))  # the tile's chunk within the block

  @pl.when(t == 0)
  def _init():
    best_sc[...] = jnp.full(best_sc.shape, -jnp.inf, jnp.float32)

  @pl.when(start < length)
  def _tile():
    valid = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < length
    col = jax.lax.broadcasted_iota(jnp.int32, best_sc.shape[1:], 1)
    dims = (((1,), (1,)), ((), ()))
    acc = jnp.int32 if q_refs[0].dtype == jnp.int8 else jnp.float32  # int8 rows: the int MXU
    for jj in range(hb):  # static unroll over the kv heads of this block
      s = functools.reduce(jnp.add, [  # [block_m, block_k]
          jax.lax.dot_general(r[jj], c.astype(r.dtype), dims, precision=precision,
                              preferred_element_type=acc).astype(jnp.float32)
          for r, c in zip(q_refs, sketch.parts(codes_ref[:, jj * w:(jj + 1) * w], packed))])
      if scale_ref is not None:
        s = s * scale_ref[pl.ds(hg * hb + jj, 1), :]
      s = jnp.where(valid, s, -jnp.inf)
      best = best_sc[jj]
      best_sc[jj] = jnp.where(col == j, jnp.maximum(best, s.max(axis=1, keepdims=True)), best)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    out_ref[...] = best_sc[...]


def chunk_scores(q_parts: tuple[jax.Array, ...], codes: jax.Array, scale_t: jax.Array | None,
                 kv_length: jax.Array, *, chunk_size: int, block_m: int, block_k: int,
                 chunks_per_block: int, interpret=False) -> jax.Array:
  """Largest sketched logit of each folded query row in each chunk (the GPU kernel's contract).

  Args:
    q_parts: the folded query rows [Hkv, M, W] (M a multiple of block_m) as `sketch.split`
      makes them: two halves of D (W = D/2) for packed codes, all of D (W = D) for 8-bit ones.
    codes: [S, Hkv, W] int8 sketches; scale_t: [Hkv, S] per-key scales (transposed), or None:
      the raw code logits (per-chunk scales are applied by the caller).
    kv_length: int32 scalar.
    block_k: divides chunk_size, a multiple of 128; chunks_per_block: a multiple of 128 or all N.

  Returns:
    [Hkv, M, N'] float32, N' = N rounded up to chunks_per_block; -inf for chunks with no valid key.
  """
  Hkv, M, W = q_parts[0].shape
  S = codes.shape[0]
  hb = heads_per_block(Hkv, W)
  n_blocks = pl.cdiv(pl.cdiv(S, chunk_size), chunks_per_block)
  tiles = chunks_per_block * chunk_size // block_k
  codes2 = codes.reshape(S, Hkv * W)
  scales = () if scale_t is None else (scale_t,)

  def key_tile(hg, i, nb, t, len_ref):
    del i
    last = jnp.maximum(pl.cdiv(len_ref[0], block_k) - 1, 0)
    return jnp.minimum(nb * tiles + t, last), hg

  kernel = functools.partial(_kernel, chunk_size=chunk_size, block_k=block_k,
                             chunks_per_block=chunks_per_block, hb=hb, packed=len(q_parts) == 2,
                             per_key_scale=scale_t is not None,
                             precision=None if q_parts[0].dtype == jnp.int8 else
                             matmul_precision(q_parts[0].dtype))
  q_spec = pl.BlockSpec((hb, block_m, W), lambda hg, i, nb, t, n: (hg, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(Hkv // hb, M // block_m, n_blocks, tiles),
      in_specs=[
          *[q_spec] * len(q_parts),
          pl.BlockSpec((block_k, hb * W), key_tile),
          *[pl.BlockSpec((Hkv, block_k),
                         lambda hg, i, nb, t, n: (0, key_tile(hg, i, nb, t, n)[0]))] * len(scales),
      ],
      out_specs=pl.BlockSpec((hb, block_m, chunks_per_block),
                             lambda hg, i, nb, t, n: (hg, i, nb)),
      scratch_shapes=[pltpu.VMEM((hb, block_m, chunks_per_block), jnp.float32)],
  )
  out_shape = jax.ShapeDtypeStruct((Hkv, M, n_blocks * chunks_per_block), jnp.float32)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      cost_estimate=cost(pairs=Hkv * M * S, width=W, products=len(q_parts), softmax=False,
                         bytes_accessed=nbytes(*q_parts, out_shape)
                         + M // block_m * nbytes(codes, *scales)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="moska_chunk_scores",
  )(kv_length.reshape(1), *q_parts, codes2, *scales)
