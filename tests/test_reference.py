"""The jnp references against float64 NumPy, and the merge identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import merge_attention_states, merge_partials
from pallas_kernels.reference import shared_attention_ref
from tests.np_reference import attention_f64, random_normal, rel_err, shared_attention_f64


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("kv_length", [None, 1, 377])
def test_shared_attention_ref_matches_f64(G, kv_length):
  rng = np.random.default_rng(G * 1000 + (kv_length or 0))
  B, T, Hkv, D, S = 3, 2, 2, 32, 611  # S is prime: a multiple of nothing
  q = random_normal(rng, (B, T, Hkv * G, D), jnp.float32)
  k = random_normal(rng, (S, Hkv, D), jnp.float32)
  v = random_normal(rng, (S, Hkv, D), jnp.float32)
  o, lse = jax.jit(shared_attention_ref)(q, k, v, kv_length=kv_length)
  o_ref, lse_ref = shared_attention_f64(q, k, v, kv_length=kv_length)
  assert o.dtype == jnp.float32 and lse.dtype == jnp.float32
  assert o.shape == (B, T, Hkv * G, D) and lse.shape == (B, T, Hkv * G)
  assert rel_err(o, o_ref) < 1e-5
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_shared_attention_ref_bf16_and_scale():
  rng = np.random.default_rng(7)
  q = random_normal(rng, (2, 1, 8, 64), jnp.bfloat16)
  k = random_normal(rng, (300, 2, 64), jnp.bfloat16)
  v = random_normal(rng, (300, 2, 64), jnp.bfloat16)
  o, lse = shared_attention_ref(q, k, v, sm_scale=0.3)
  o_ref, lse_ref = shared_attention_f64(q, k, v, sm_scale=0.3)
  assert o.dtype == jnp.bfloat16
  assert rel_err(o, o_ref) < 1e-2
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-3, atol=1e-3)


def test_shared_attention_ref_traced_kv_length_zero():
  rng = np.random.default_rng(3)
  q = random_normal(rng, (1, 1, 4, 16), jnp.float32)
  k = random_normal(rng, (50, 1, 16), jnp.float32)
  o, lse = jax.jit(lambda n: shared_attention_ref(q, k, k, kv_length=n))(jnp.int32(0))
  assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_shared_attention_ref_rejects_bad_shapes():
  q = jnp.ones((1, 1, 6, 16))
  with pytest.raises(ValueError, match="Hq=6 of q must be a multiple of Hkv=4"):
    shared_attention_ref(q, jnp.ones((8, 4, 16)), jnp.ones((8, 4, 16)))
  with pytest.raises(ValueError, match=r"k must have shape \[S, Hkv, D=16\]"):
    shared_attention_ref(q, jnp.ones((8, 2, 32)), jnp.ones((8, 2, 32)))
  with pytest.raises(ValueError, match="q must have shape"):
    shared_attention_ref(q[0], jnp.ones((8, 2, 16)), jnp.ones((8, 2, 16)))
  with pytest.raises(ValueError, match="kv_length must be an integer scalar"):
    shared_attention_ref(q, jnp.ones((8, 2, 16)), jnp.ones((8, 2, 16)), kv_length=jnp.ones(2))


@pytest.mark.parametrize("split", [0, 1, 250, 611])  # 0 / 611: one side empty
def test_merge_identity(split):
  """Attention over A ∪ B == merge(attention over A, attention over B)."""
  rng = np.random.default_rng(split)
  B, T, Hq, Hkv, D, S = 2, 3, 8, 2, 32, 611
  q = random_normal(rng, (B, T, Hq, D), jnp.float32)
  k = random_normal(rng, (S, Hkv, D), jnp.float32)
  v = random_normal(rng, (S, Hkv, D), jnp.float32)
  o_a, lse_a = shared_attention_ref(q, k[:split], v[:split]) if split else _empty(q)
  o_b, lse_b = shared_attention_ref(q, k[split:], v[split:]) if split < S else _empty(q)
  o, lse = jax.jit(merge_attention_states)(o_a, lse_a, o_b, lse_b)
  o_ref, lse_ref = shared_attention_f64(q, k, v)
  assert np.all(np.isfinite(np.asarray(o)))
  assert rel_err(o, o_ref) < 1e-5
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def _empty(q):
  # An empty side: lse = -inf; poison o to show it is ignored.
  return jnp.full(q.shape, jnp.nan, q.dtype), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)


def test_merge_both_empty_is_zero_not_nan():
  q = jnp.ones((2, 1, 4, 8))
  o, lse = merge_attention_states(*_empty(q), *_empty(q))
  assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_merge_partials_many_ways_f64():
  """An n-way merge of partials over a random partition equals the whole attention."""
  rng = np.random.default_rng(11)
  R, D, N = 5, 16, 97
  q, k, v = (rng.standard_normal(s) for s in ((R, D), (N, D), (N, D)))
  cuts = [0, 10, 10, 40, 97]  # includes an empty part
  parts = [attention_f64(q, k[a:b], v[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
  o_p = jnp.asarray(np.stack([p[0] for p in parts]), jnp.float32)
  lse_p = jnp.asarray(np.stack([p[1] for p in parts]), jnp.float32)
  o, lse = merge_partials(o_p, lse_p, axis=0)
  o_ref, lse_ref = attention_f64(q, k, v)
  assert rel_err(o, o_ref) < 1e-6
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-6)
