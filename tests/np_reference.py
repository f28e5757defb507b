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


def unique_attention_f64(q, k_pages, v_pages, block_tables, lengths, sm_scale=None):
  """Per request: gather its pages, attend causally (query t at position length - T + t)."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  B, T, Hq, D = q.shape
  _, page_size, Hkv, _ = k_pages.shape
  G = Hq // Hkv
  o, lse = np.zeros((B, T, Hq, D)), np.zeros((B, T, Hq))
  for b, n in enumerate(np.asarray(lengths)):
    pages = np.asarray(block_tables)[b, :-(-n // page_size)]
    k = k_pages[pages].reshape(-1, Hkv, D)[:n]
    v = v_pages[pages].reshape(-1, Hkv, D)[:n]
    mask = np.arange(n)[None, :] <= (n - T + np.arange(T))[:, None]
    for h in range(Hq):
      o[b, :, h], lse[b, :, h] = attention_f64(q[b, :, h], k[:, h // G], v[:, h // G], mask,
                                               sm_scale)
  return o, lse


def chunk_attention_f64(q, k, v, chunk_ids, chunk_size, kv_length=None):
  """Float64 attention of each (request, kv head) over the keys of its gathered chunks."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  ids = np.asarray(chunk_ids)
  B, T, Hq, D = q.shape
  S, Hkv, _ = k.shape
  G = Hq // Hkv
  n = S if kv_length is None else int(kv_length)
  N = -(-S // chunk_size)
  o, lse = np.zeros((B, T, Hq, D)), np.zeros((B, T, Hq))
  for b in range(B):
    for h in range(Hkv):
      keys = [s for c in ids[b, h] if 0 <= c < N
              for s in range(c * chunk_size, min((c + 1) * chunk_size, n))]
      rows = q[b, :, h * G:(h + 1) * G].reshape(T * G, D)
      ob, lb = attention_f64(rows, k[keys, h], v[keys, h])
      o[b, :, h * G:(h + 1) * G] = ob.reshape(T, G, D)
      lse[b, :, h * G:(h + 1) * G] = lb.reshape(T, G)
  return o, lse
