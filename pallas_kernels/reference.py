"""Pure-jnp reference implementations.

Every Pallas kernel is tested against these, and they are the portable `backend="xla"` path.
They accumulate in float32 (HIGHEST matmul precision, so GPUs do not drop to TF32) and return
(o in q.dtype, lse float32 natural log); a query row with no valid key gets o = 0, lse = -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.checks import (check_chunk_ids, check_kv_length, check_paged_inputs,
                                   check_shared_kv_inputs)
from pallas_kernels import sketch
from pallas_kernels.grouping import selected_chunks
from pallas_kernels.numerics import default_sm_scale

_HI = jax.lax.Precision.HIGHEST


def attend(scores: jax.Array, mask: jax.Array | None, v: jax.Array,
           spec: str) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis of float32 `scores` (masked), then `einsum(spec, p, v)`.

  Masked keys are never read, as in the kernels: NaN or inf in their K (scores) or V rows reaches
  no output, while one in a key a row attends to makes that row's o and lse NaN.
  Returns (o float32, lse float32); fully masked rows give o = 0, lse = -inf.
  """
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  denom = jnp.sum(p, axis=-1)
  v = v.astype(jnp.float32)
  if mask is None:
    o = jnp.einsum(spec, p, v, precision=_HI)
  else:  # 0 * NaN would leak masked rows: zero them, then put back what attended rows read
    finite = jnp.isfinite(v)
    o = jnp.einsum(spec, p, jnp.where(finite, v, 0.0), precision=_HI)
    seen = jnp.broadcast_to(mask, scores.shape).astype(jnp.float32)
    o = jnp.where(jnp.einsum(spec, seen, (~finite).astype(jnp.float32)) > 0, jnp.nan, o)
  empty = denom == 0  # a NaN denominator (a NaN score) is not "no key": it reaches o and lse
  o = o / jnp.where(empty, 1.0, denom)[..., None]
  lse = jnp.where(empty, -jnp.inf, jnp.log(denom) + m[..., 0])
  return o, lse


def shared_attention_ref(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         sm_scale: float | None = None,
                         kv_length=None) -> tuple[jax.Array, jax.Array]:
  """Attention of every query row over one shared KV.

  Args:
    q: [B, T, Hq, D] queries; query head h reads kv head h // (Hq // Hkv).
    k, v: [S, Hkv, D] shared keys and values.
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar (may be traced): only keys [0, kv_length) are valid.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32 (natural log of sum_j exp(scale q.k_j)).
  """
  dims = check_shared_kv_inputs(q, k, v, op="shared_attention_ref")
  kv_length = check_kv_length(kv_length, dims.S, op="shared_attention_ref")
  B, T, Hq, Hkv, D, S = dims
  scale = default_sm_scale(sm_scale, D)
  qg = q.reshape(B, T, Hkv, dims.G, D).astype(jnp.float32)
  s = jnp.einsum("bthgd,shd->bthgs", qg, k.astype(jnp.float32), precision=_HI) * scale
  mask = None if kv_length is None else jnp.arange(S) < kv_length
  o, lse = attend(s, mask, v, "bthgs,shd->bthgd")
  return o.reshape(B, T, Hq, D).astype(q.dtype), lse.reshape(B, T, Hq)


def unique_attention_ref(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                         block_tables: jax.Array, lengths: jax.Array, *,
                         sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each request's T newest queries over its own paged KV (gather, then attend).

  Args:
    q: [B, T, Hq, D]; query t of request b sits at position lengths[b] - T + t.
    k_pages, v_pages: [P, page_size, Hkv, D] one pool of pages shared by all requests.
    block_tables: [B, max_pages] int page ids of each request, in order.
    lengths: [B] int tokens in each request's cache (the T new ones included).
    sm_scale: score scale, default 1/sqrt(D).

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32; query t attends to positions
    <= lengths[b] - T + t; a request with length 0 gives o = 0, lse = -inf.
  """
  dims, page_size = check_paged_inputs(q, k_pages, v_pages, block_tables, lengths,
                                       op="unique_attention_ref")
  B, T, Hq, Hkv, D, S = dims
  scale = default_sm_scale(sm_scale, D)
  tables = jnp.clip(block_tables, 0, k_pages.shape[0] - 1)  # entries past a length may be junk
  k = k_pages[tables].reshape(B, S, Hkv, D).astype(jnp.float32)
  v = v_pages[tables].reshape(B, S, Hkv, D)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, S)  # as the kernels clamp traced lengths
  pos = jnp.arange(S)
  qg = q.reshape(B, T, Hkv, dims.G, D).astype(jnp.float32)
  s = jnp.einsum("bthgd,bshd->bthgs", qg, k, precision=_HI) * scale
  last = lengths[:, None] - T + jnp.arange(T)[None, :]  # [B, T] position of each query
  mask = pos[None, None, :] <= jnp.minimum(last, lengths[:, None] - 1)[..., None]
  o, lse = attend(s, mask[:, :, None, None, :], v, "bthgs,bshd->bthgd")
  return o.reshape(B, T, Hq, D).astype(q.dtype), lse.reshape(B, T, Hq)


def chunk_attention_ref(q: jax.Array, k: jax.Array, v: jax.Array, chunk_ids: jax.Array, *,
                        chunk_size: int, sm_scale: float | None = None,
                        kv_length=None) -> tuple[jax.Array, jax.Array]:
  """Attention of each request over the union of its selected chunks of one shared KV.

  Args:
    q: [B, T, Hq, D] queries; query head h reads kv head h // (Hq // Hkv).
    k, v: [S, Hkv, D] shared keys and values; chunk c is rows [c*C, (c+1)*C).
    chunk_ids: [B, Hkv, K] chunk ids per (request, kv head); ids outside [0, N) select nothing.
    chunk_size: C.
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar (may be traced): only keys [0, kv_length) are valid.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32. A dense masked attention (O(B*S)):
    the ground truth and the portable fallback, not a fast path.
  """
  dims = check_shared_kv_inputs(q, k, v, op="chunk_attention_ref")
  n_chunks = check_chunk_ids(chunk_ids, dims, chunk_size, op="chunk_attention_ref")
  kv_length = check_kv_length(kv_length, dims.S, op="chunk_attention_ref")
  B, T, Hq, Hkv, D, S = dims
  scale = default_sm_scale(sm_scale, D)
  mask = selected_chunks(chunk_ids, n_chunks)[:, :, jnp.arange(S) // chunk_size]  # [B, Hkv, S]
  if kv_length is not None:
    mask = mask & (jnp.arange(S) < kv_length)
  qg = q.reshape(B, T, Hkv, dims.G, D).astype(jnp.float32)
  s = jnp.einsum("bthgd,shd->bthgs", qg, k.astype(jnp.float32), precision=_HI) * scale
  o, lse = attend(s, mask[:, None, :, None, :], v, "bthgs,shd->bthgd")
  return o.reshape(B, T, Hq, D).astype(q.dtype), lse.reshape(B, T, Hq)


def chunk_scores_ref(q: jax.Array, codes: jax.Array, scale: jax.Array, *, chunk_size: int,
                     kv_length=None) -> jax.Array:
  """The largest sketched logit of every query row in every chunk.

  Args:
    q: [B, T, Hq, D] queries; query head h reads kv head h // G.
    codes: [S, Hkv, D/2] int8 packed 4-bit or [S, Hkv, D] 8-bit key sketches
      (`pallas_kernels.sketch`).
    scale: [S, Hkv] float per-key scales: key s is approximated (up to its chunk's center,
      which the caller adds) by scale[s] * code[s]; or [N, Hkv] non-negative per-chunk scales,
      shared by the chunk's keys.
    chunk_size: C; chunk n is keys [n*C, (n+1)*C).
    kv_length: optional int scalar (may be traced): only keys [0, kv_length) count.

  Returns:
    [B, T, Hq, N] float32: max over the valid keys s of chunk n of scale[s] * (q . code[s]);
    -inf for a chunk with no valid key.
  """
  B, T, Hq, D = q.shape
  S, Hkv, _ = codes.shape
  N = -(-S // chunk_size)
  k = jnp.concatenate(sketch.parts(codes, sketch.is_packed(codes.shape[-1], D)), axis=-1)
  if scale.shape[0] != S:  # per chunk: each key takes its chunk's
    scale = jnp.repeat(scale, chunk_size, axis=0)[:S]
  k = k.astype(jnp.float32) * scale[..., None]
  qg = q.reshape(B, T, Hkv, Hq // Hkv, D).astype(jnp.float32)
  s = jnp.einsum("bthgd,shd->bthgs", qg, k, precision=_HI)
  n = S if kv_length is None else kv_length
  s = jnp.where(jnp.arange(S) < n, s, -jnp.inf)
  s = jnp.pad(s, [(0, 0)] * 4 + [(0, N * chunk_size - S)], constant_values=-jnp.inf)
  return jnp.max(s.reshape(B, T, Hkv, Hq // Hkv, N, chunk_size), axis=-1).reshape(B, T, Hq, N)
