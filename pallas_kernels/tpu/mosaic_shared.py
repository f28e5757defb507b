"""Shared-KV attention on TPU (Mosaic): the GPU kernel's algorithm under TPU tiling rules.

Grid (splits, kv-head groups, M blocks, K tiles), the last axis sequential. K/V are viewed as
[S, Hkv*D] so a block (block_k, hb*D) is lane-dense (hb*D a multiple of 128, or the full width);
the hb kv heads of a block are unrolled in the kernel. kv_length arrives by scalar prefetch: tiles
past it are skipped, and their index map is clamped to the last valid tile so the pipeline issues
no copy for them. Online softmax state lives in VMEM scratch across the K tiles of a split.
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


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale: float,
            block_k: int, tiles_per_split: int, hb: int, precision):
  split, t = pl.program_id(0), pl.program_id(3)
  d = q_ref.shape[-1]
  kv_len = len_ref[0]
  start = (split * tiles_per_split + t) * block_k

  @pl.when(t == 0)
  def _init():
    softmax.init(m_sc, l_sc, acc_sc)

  @pl.when(start < kv_len)
  def _tile():
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    for j in range(hb):  # static unroll over the kv heads of this block
      q = q_ref[j]  # [block_m, D]
      k = quant.widen(k_ref[:, j * d:(j + 1) * d], q.dtype)  # [block_k, D]
      # Rows past kv_length (or past S in a partial edge block) may hold anything: zero V there.
      v = jnp.where(rows < kv_len, quant.widen(v_ref[:, j * d:(j + 1) * d], q.dtype), 0)
      s = jnp.where(cols < kv_len, softmax.scores(q, k, scale, precision), -jnp.inf)
      softmax.update(m_sc.at[j], l_sc.at[j], acc_sc.at[j], s, v, precision)

  @pl.when(t == tiles_per_split - 1)
  def _finish():
    softmax.finish(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def shared_attention_partials(q_rows: jax.Array, k: jax.Array, v: jax.Array,
                              kv_length: jax.Array, *, scale: float, block_m: int, block_k: int,
                              num_splits: int, interpret=False,
                              vmem_limit_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Partial attention of q_rows[Hkv, M, D] (M a multiple of block_m) over k, v[S, Hkv, D].

  Same contract as the GPU kernel: o[num_splits, Hkv, M, D], lse[num_splits, Hkv, M] float32.
  block_k must be a multiple of 128 (a lane-dense score tile) and block_m of 16.
  vmem_limit_bytes: Mosaic's VMEM limit for the kernel (None: the default scoped VMEM).
  """
  Hkv, M, D = q_rows.shape
  S = k.shape[0]
  hb = heads_per_block(Hkv, D)
  n_tiles = pl.cdiv(S, block_k)
  tiles_per_split = pl.cdiv(n_tiles, num_splits)
  k2, v2 = k.reshape(S, Hkv * D), v.reshape(S, Hkv * D)

  def kv_map(s, hg, i, t, len_ref):
    last = jnp.maximum(pl.cdiv(len_ref[0], block_k) - 1, 0)
    return jnp.minimum(s * tiles_per_split + t, last), hg

  kernel = functools.partial(
      _kernel, scale=scale, block_k=block_k, tiles_per_split=tiles_per_split, hb=hb,
      precision=matmul_precision(q_rows.dtype))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(num_splits, Hkv // hb, M // block_m, tiles_per_split),
      in_specs=[
          pl.BlockSpec((hb, block_m, D), lambda s, hg, i, t, n: (hg, i, 0)),
          pl.BlockSpec((block_k, hb * D), kv_map),
          pl.BlockSpec((block_k, hb * D), kv_map),
      ],
      out_specs=[
          pl.BlockSpec((None, hb, block_m, D), lambda s, hg, i, t, n: (s, hg, i, 0)),
          pl.BlockSpec((None, hb, block_m, 1), lambda s, hg, i, t, n: (s, hg, i, 0)),
      ],
      scratch_shapes=softmax.scratch(hb, rows=block_m, d=D),
  )
  out_shape = [jax.ShapeDtypeStruct((num_splits, Hkv, M, D), jnp.float32),
               jax.ShapeDtypeStruct((num_splits, Hkv, M, 1), jnp.float32)]
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      cost_estimate=cost(pairs=Hkv * M * S, width=D, bytes_accessed=nbytes(q_rows, *out_shape)
                         + M // block_m * nbytes(k, v)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      name="moska_shared_attention",
  )(kv_length.reshape(1), q_rows, k2, v2)
  return o, lse[..., 0]
