"""The online-softmax loop the Triton kernels share (softmax in base 2: exp2 is the fast op)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def attend_range(q: jax.Array, k_ref, v_ref, start, end, *, scale: float, block_k: int,
                 precision) -> tuple[jax.Array, jax.Array]:
  """Attention of q[block_m, D] over rows [start, end) of the [S, D] refs k_ref / v_ref.

  Streams block_k-row tiles with masked loads (rows past `end` read as zero and score -inf).
  Returns o [block_m, D] float32 normalized, and lse [block_m] float32 natural log; an empty
  range gives o = 0, lse = -inf.
  """
  block_m, d = q.shape
  qk_scale = scale * LOG2E

  def body(i, carry):
    acc, m, l = carry
    s0 = start + i * block_k
    valid = s0 + jnp.arange(block_k) < end
    k = pltriton.load(k_ref.at[pl.ds(s0, block_k), :], mask=valid[:, None], other=0.0)
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * qk_scale
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: every tile holds a valid key
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = pltriton.load(v_ref.at[pl.ds(s0, block_k), :], mask=valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                                         precision=precision)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  num_tiles = pl.cdiv(jnp.maximum(end - start, 0), block_k)
  init = (jnp.zeros((block_m, d), jnp.float32), jnp.full((block_m,), -jnp.inf, jnp.float32),
          jnp.zeros((block_m,), jnp.float32))
  return finish(*jax.lax.fori_loop(0, num_tiles, body, init))


def finish(acc: jax.Array, m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normalizes a base-2 online-softmax state into (o, natural-log lse); l = 0 means empty."""
  nonempty = l > 0
  safe_l = jnp.where(nonempty, l, 1.0)
  return acc / safe_l[:, None], jnp.where(nonempty, (m + jnp.log2(safe_l)) * LN2, -jnp.inf)


def matmul_precision(dtype):
  """IEEE float32 matmuls for float32 inputs (Triton would use TF32); default otherwise."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
