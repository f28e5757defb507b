"""The online softmax every GPU kernel runs (Triton and Mosaic GPU), in base 2.

The state of a block of query rows is (acc [rows, D], m [rows], l [rows]) in float32: the
running unnormalized output, the running max of the scaled scores (base-2 units) and the running
sum of exp2(score - m). `step` folds one tile of raw scores into it; the caller then adds
p @ V to acc (on the tensor cores, so the order of the two matmuls stays the kernel's choice).
`attend_range` is the whole loop for the Triton kernels that stream one contiguous key range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import quant
from pallas_kernels.numerics import LN2, LOG2E, matmul_precision


def widen(x: jax.Array, dtype) -> jax.Array:
  """`quant.widen` for Triton: e5m2 goes to bfloat16 through float16 (which holds each of its
  values), since Triton's direct conversion maps e5m2's inf and NaN codes to finite numbers
  (65536 to 114688 on an H200)."""
  if x.dtype == jnp.float8_e5m2 and jnp.dtype(dtype) == jnp.bfloat16:
    return x.astype(jnp.float16).astype(dtype)
  return quant.widen(x, dtype)


def dot_precision(dtype, interpret: bool):
  """Matmul precision of the Triton kernels: float32 inputs run as 3xTF32 on the tensor cores
  (about float32 accuracy, where IEEE float32 would leave the tensor cores idle); interpret mode
  runs on a CPU, whose dots take IEEE float32 (`numerics.matmul_precision`)."""
  if jnp.dtype(dtype) == jnp.float32 and not interpret:
    return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return matmul_precision(dtype)


def padded(d: int) -> int:
  """The head dim of a Triton tile: Triton's arrays have power-of-two sizes, so a head dim of
  80, 96 or 192 is read as the next power of two with the lanes past it masked (the BlockSpecs
  take the padded size; the arrays keep theirs)."""
  return 1 << max(d - 1, 0).bit_length()


def lanes(d: int, d_pad: int):
  """The [1, d_pad] mask of a tile's real lanes, or None when no lane is padding."""
  return None if d == d_pad else (jnp.arange(d_pad) < d)[None, :]


def load_rows(ref, head_dim: int):
  """A [rows, d_pad] tile of a ref whose block is padded past head_dim: padding lanes read 0."""
  mask = lanes(head_dim, ref.shape[-1])
  return ref[...] if mask is None else pltriton.load(ref, mask=mask, other=0)


def store_rows(ref, x: jax.Array, head_dim: int) -> None:
  """Writes x[rows, d_pad] into a ref whose block is padded past head_dim (real lanes only)."""
  mask = lanes(head_dim, ref.shape[-1])
  if mask is None:
    ref[...] = x
  else:
    pltriton.store(ref, x, mask=jnp.broadcast_to(mask, x.shape))


def initial_state(rows: int, d: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The empty state: acc = 0, m = -inf, l = 0."""
  return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def step(carry, s: jax.Array, *, scale_log2: float, rows_may_be_empty: bool = False):
  """Folds raw scores s[rows, keys] (masked entries -inf) into the state.

  Returns p = exp2(s * scale_log2 - m_new) (the caller adds p @ V to acc) and the state rescaled
  to the new max. `rows_may_be_empty`: a row may have no valid key yet (a causal mask), so its
  max stays -inf and must not produce inf - inf; without it every tile holds a valid key for
  every row (a key-range mask), and the guard is skipped.
  """
  acc, m, l = carry
  m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
  m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if rows_may_be_empty else m_new
  alpha = jnp.exp2(m - m_ref)
  p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_ref, s.shape, [0]))
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
  return p, (acc, m_new, l * alpha + p.sum(axis=1))


def finish(acc: jax.Array, m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normalizes the state into (o, natural-log lse); l = 0 (no key) gives o = 0, lse = -inf, a
  NaN l (a NaN score) o and lse NaN."""
  empty = l == 0  # not `l <= 0`: a NaN sum read as "no key" would vanish from the merge
  safe_l = jnp.where(empty, 1.0, l)
  o = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
  return o, jnp.where(empty, -jnp.inf, (m + jnp.log2(safe_l)) * LN2)


def attend_keys(q: jax.Array, k_ref, v_ref, start, end, carry, *, scale_log2: float,
                block_k: int, precision, head_dim: int):
  """Folds keys [start, end) of the [S, D_pad] refs k_ref / v_ref into the state of
  q[block_m, D_pad] (Triton): block_k-row tiles with masked loads (rows past `end` and lanes past
  head_dim read as zero; rows past `end` score -inf)."""
  lane = lanes(head_dim, q.shape[-1])

  def body(i, carry):
    s0 = start + i * block_k
    valid = s0 + jnp.arange(block_k) < end
    mask = valid[:, None] if lane is None else valid[:, None] & lane
    k = widen(pltriton.load(k_ref.at[pl.ds(s0, block_k), :], mask=mask, other=0.0),
              q.dtype)
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision)
    p, (acc, m, l) = step(carry, jnp.where(valid[None, :], s, -jnp.inf), scale_log2=scale_log2)
    v = widen(pltriton.load(v_ref.at[pl.ds(s0, block_k), :], mask=mask, other=0.0),
              q.dtype)
    acc = acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                        precision=precision)
    return acc, m, l

  return lax.fori_loop(0, pl.cdiv(jnp.maximum(end - start, 0), block_k), body, carry)


def attend_range(q: jax.Array, k_ref, v_ref, start, end, *, scale: float, block_k: int,
                 precision, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """Attention of q[block_m, D] over rows [start, end) of the [S, D] refs k_ref / v_ref (Triton).

  Returns o [block_m, D] float32 normalized, and lse [block_m] float32 natural log; an empty
  range gives o = 0, lse = -inf.
  """
  carry = attend_keys(q, k_ref, v_ref, start, end, initial_state(*q.shape),
                      scale_log2=scale * LOG2E, block_k=block_k, precision=precision,
                      head_dim=head_dim)
  return finish(*carry)
