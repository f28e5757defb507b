"""The online softmax every Mosaic TPU kernel runs, its state in VMEM scratch across key blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu


def init(m_ref, l_ref, acc_ref) -> None:
  """Empty state: m = -inf, l = 0, acc = 0."""
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update(m_ref, l_ref, acc_ref, s: jax.Array, v: jax.Array, precision) -> None:
  """Folds one block of masked scores s[rows, keys] (natural scale) and its V into the state.

  Rows with no valid key so far (m = -inf, e.g. under a causal mask) stay empty without NaN.
  """
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v,
                                                preferred_element_type=jnp.float32,
                                                precision=precision)
  m_ref[...] = m_new


def finish(m_ref, l_ref, acc_ref, o_ref, lse_ref) -> None:
  """Writes the normalized o and the natural-log lse; an empty row gives o = 0, lse = -inf, a
  NaN sum (a NaN score) o and lse NaN."""
  l = l_ref[...]
  empty = l == 0  # not `l <= 0`: a NaN sum read as "no key" would vanish from the merge
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc_ref[...] / safe_l).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(safe_l))


def scores(q: jax.Array, k: jax.Array, scale: float, precision) -> jax.Array:
  """scale * q @ k^T in float32 (q[rows, D], k[keys, D])."""
  return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=precision) * scale


def scratch(*lead: int, rows: int, d: int) -> list:
  """VMEM scratch for the state (m, l, acc) of `lead` row blocks of `rows` rows each."""
  return [pltpu.VMEM((*lead, rows, 1), jnp.float32), pltpu.VMEM((*lead, rows, 1), jnp.float32),
          pltpu.VMEM((*lead, rows, d), jnp.float32)]
