"""Pure-jnp reference implementations.

Every Pallas kernel is tested against these, and they are the portable `backend="xla"` path.
They accumulate in float32 (HIGHEST matmul precision, so GPUs do not drop to TF32) and return
(o in q.dtype, lse float32 natural log); a query row with no valid key gets o = 0, lse = -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.layout import check_kv_length, check_shared_kv_inputs, default_sm_scale
from pallas_kernels.merge import merge_attention_states  # noqa: F401  (part of the reference API)

_HI = jax.lax.Precision.HIGHEST


def attend(scores: jax.Array, mask: jax.Array | None, v: jax.Array,
           spec: str) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis of float32 `scores` (masked), then `einsum(spec, p, v)`.

  Returns (o float32, lse float32); fully masked rows give o = 0, lse = -inf.
  """
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  denom = jnp.sum(p, axis=-1)
  o = jnp.einsum(spec, p, v.astype(jnp.float32), precision=_HI)
  o = o / jnp.where(denom > 0, denom, 1.0)[..., None]
  lse = jnp.where(denom > 0, jnp.log(denom) + m[..., 0], -jnp.inf)
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
  kv_length = check_kv_length(kv_length, op="shared_attention_ref")
  B, T, Hq, Hkv, D, S = dims
  scale = default_sm_scale(sm_scale, D)
  qg = q.reshape(B, T, Hkv, dims.G, D).astype(jnp.float32)
  s = jnp.einsum("bthgd,shd->bthgs", qg, k.astype(jnp.float32), precision=_HI) * scale
  mask = None if kv_length is None else jnp.arange(S) < kv_length
  o, lse = attend(s, mask, v, "bthgs,shd->bthgd")
  return o.reshape(B, T, Hq, D).astype(q.dtype), lse.reshape(B, T, Hq)
