"""Float64 NumPy attention: the ground truth every test compares against."""

from __future__ import annotations

import numpy as np


def attention_f64(q, k, v, mask=None, sm_scale=None):
  """One query matrix against one key set, in float64.

  Args:
    q: [R, D] query rows; k, v: [N, D]; mask: optional bool [R, N] (True = attend).
  Returns:
    o [R, D], lse [R]; rows with no valid key give o = 0, lse = -inf.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  s = scale * q @ k.T
  if mask is not None:
    s = np.where(mask, s, -np.inf)
  m = s.max(axis=-1, keepdims=True) if s.shape[-1] else np.full((s.shape[0], 1), -np.inf)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(s - m)
  denom = p.sum(axis=-1)
  o = (p @ v) / np.where(denom > 0, denom, 1.0)[:, None]
  with np.errstate(divide="ignore"):
    lse = np.where(denom > 0, np.log(denom) + m[:, 0], -np.inf)
  return o, lse


def shared_attention_f64(q, k, v, kv_length=None, sm_scale=None):
  """q[B, T, Hq, D] vs shared k, v[S, Hkv, D]; returns o[B, T, Hq, D], lse[B, T, Hq] in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, Hq, D = q.shape
  S, Hkv, _ = k.shape
  G = Hq // Hkv
  n = S if kv_length is None else int(kv_length)
  o = np.zeros((B, T, Hq, D))
  lse = np.zeros((B, T, Hq))
  for h in range(Hq):
    rows = q[:, :, h].reshape(B * T, D)
    oh, lh = attention_f64(rows, k[:n, h // G], v[:n, h // G], sm_scale=sm_scale)
    o[:, :, h] = oh.reshape(B, T, D)
    lse[:, :, h] = lh.reshape(B, T)
  return o, lse


def rel_err(x, ref):
  """||x - ref|| / ||ref|| in float64 (max-abs error if ref is all zeros)."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  denom = np.linalg.norm(ref)
  diff = np.linalg.norm(x - ref)
  return diff / denom if denom > 0 else diff


def random_normal(rng, shape, dtype):
  """Fresh standard-normal data (never zeros) cast to `dtype` via jax.numpy."""
  import jax.numpy as jnp

  return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
