"""shared_attention kernels (GPU Triton + TPU Mosaic, interpret mode) vs float64 NumPy.

Both interpret modes fill kernel outputs and out-of-bounds reads with NaN, so an element a kernel
forgets to write, or a padded key it forgets to mask, shows up as NaN in these checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import SharedAttentionBlocks, shared_attention
from pallas_kernels import layout
from pallas_kernels.gpu import shared_attention as gpu_kernel
from pallas_kernels.tpu import shared_attention as tpu_kernel
from tests.np_reference import random_normal, rel_err, shared_attention_f64

TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-2, 2e-2)}  # (rel err of o, abs err of lse)

# (B, T, G, Hkv, D, S, kv_length, dtype): every B/T/GQA/D/S value of the issue appears at least
# once.
CASES = [
    (1, 1, 1, 2, 64, 1000, None, jnp.float32),
    (3, 1, 4, 2, 128, 1000, 700, jnp.float32),
    (17, 1, 8, 1, 64, 4097, None, jnp.bfloat16),
    (3, 5, 4, 1, 64, 1000, 37, jnp.float32),  # kv_length inside the first block
    (1, 5, 8, 1, 128, 4097, 4000, jnp.bfloat16),
    (17, 5, 1, 2, 64, 1000, 999, jnp.bfloat16),
]


def _inputs(seed, B, T, G, Hkv, D, S, dtype):
  rng = np.random.default_rng(seed)
  q = random_normal(rng, (B, T, G * Hkv, D), dtype)
  k = random_normal(rng, (S, Hkv, D), dtype)
  v = random_normal(rng, (S, Hkv, D), dtype)
  return q, k, v


def _check(o, lse, q, k, v, kv_length, dtype):
  o_ref, lse_ref = shared_attention_f64(q, k, v, kv_length=kv_length)
  assert o.shape == q.shape and o.dtype == q.dtype
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o, np.float32))), "unwritten or unmasked output (NaN)"
  o_tol, lse_tol = TOL[dtype]
  assert rel_err(o, o_ref) < o_tol
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=lse_tol, atol=lse_tol)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}G{}H{}D{}S{}n{}{}".format(
    *c[:7], jnp.dtype(c[7]).name))
def test_kernel_matches_f64(backend, case):
  *shape, kv_length, dtype = case
  q, k, v = _inputs(CASES.index(case), *shape, dtype)  # hash(case) would vary per process
  o, lse = shared_attention(q, k, v, kv_length=kv_length, backend=backend, interpret=True)
  _check(o, lse, q, k, v, kv_length, dtype)


@pytest.mark.parametrize("backend,blocks", [
    ("gpu", SharedAttentionBlocks(block_m=16, block_k=64, num_splits=3)),
    ("gpu", SharedAttentionBlocks(block_m=32, block_k=128, num_splits=1)),
    ("tpu", SharedAttentionBlocks(block_m=16, block_k=128, num_splits=3)),
    ("tpu", SharedAttentionBlocks(block_m=32, block_k=256, num_splits=1)),
])
def test_block_overrides_and_traced_kv_length(backend, blocks):
  """Explicit tilings (splits that end past S, one split) under jit with a traced kv_length."""
  q, k, v = _inputs(5, 3, 1, 4, 2, 64, 1000, jnp.float32)
  fn = jax.jit(lambda q, k, v, n: shared_attention(q, k, v, kv_length=n, backend=backend,
                                                   interpret=True, blocks=blocks))
  for n in (1000, 130, 0):
    o, lse = fn(q, k, v, jnp.int32(n))
    if n == 0:
      assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    else:
      _check(o, lse, q, k, v, n, jnp.float32)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_partials_are_fully_written(backend):
  """Every split writes every row: finite o, and lse finite or -inf (an empty split), never NaN."""
  q, k, v = _inputs(9, 2, 1, 4, 2, 64, 700, jnp.float32)
  q_rows = jnp.pad(layout.fold_queries(q, 2), ((0, 0), (0, 8), (0, 0)))  # M = 8 -> block_m 16
  n = jnp.int32(300)  # splits past 300 keys are empty
  if backend == "gpu":
    o, lse = gpu_kernel.shared_attention_partials(
        q_rows, k, v, n, scale=0.125, block_m=16, block_k=64, num_splits=4, num_warps=4,
        num_stages=2, interpret=True)
  else:
    from jax.experimental.pallas import tpu as pltpu
    o, lse = tpu_kernel.shared_attention_partials(
        q_rows, k, v, n, scale=0.125, block_m=16, block_k=128, num_splits=4,
        interpret=pltpu.InterpretParams())
  o, lse = np.asarray(o), np.asarray(lse)
  assert o.shape[:3] == lse.shape == (4, 2, 16)
  assert np.all(np.isfinite(o)) and not np.any(np.isnan(lse))
  assert np.all(np.isfinite(lse[0])) and np.all(np.isneginf(lse[-1]))
  assert np.all(o[-1] == 0)


def test_xla_backend_and_auto_on_cpu():
  q, k, v = _inputs(1, 2, 1, 4, 2, 64, 300, jnp.float32)
  for backend in ("xla", "auto"):
    o, lse = shared_attention(q, k, v, backend=backend)
    _check(o, lse, q, k, v, None, jnp.float32)


def test_validation_errors():
  q, k, v = _inputs(2, 1, 1, 4, 2, 64, 100, jnp.float32)
  with pytest.raises(ValueError, match="backend must be one of"):
    shared_attention(q, k, v, backend="cuda")
  with pytest.raises(ValueError, match="interpret=True needs a Pallas backend"):
    shared_attention(q, k, v, backend="xla", interpret=True)
  with pytest.raises(ValueError, match=r"v must have the shape of k"):
    shared_attention(q, k, v[:10])
  with pytest.raises(ValueError, match="k and v must share a dtype"):
    shared_attention(q, k, v.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="q and k, v must share a dtype, got q bfloat16 and k, v "
                     "float32"):
    shared_attention(q.astype(jnp.bfloat16), k, v, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
    shared_attention(q.astype(jnp.int32), k, v)
  with pytest.raises(ValueError, match="power of two >= 16"):
    shared_attention(q, k, v, backend="gpu", interpret=True,
                     blocks=SharedAttentionBlocks(block_m=24, block_k=64, num_splits=1))
  with pytest.raises(ValueError, match="multiple of 16"):
    shared_attention(q, k, v, backend="tpu", interpret=True,
                     blocks=SharedAttentionBlocks(block_m=16, block_k=64, num_splits=1))


def test_heuristic_splits_small_m_and_tiles_large_m():
  small = layout.AttentionDims(B=1, T=1, Hq=32, Hkv=8, D=128, S=131072)
  large = layout.AttentionDims(B=512, T=1, Hq=32, Hkv=8, D=128, S=131072)
  from pallas_kernels.shared_attention import choose_blocks
  b_small, b_large = choose_blocks(small, "gpu"), choose_blocks(large, "gpu")
  assert b_small.block_m == 16 and b_small.num_splits >= 16  # stream S over the whole chip
  assert b_large.block_m == 128 and b_large.num_splits <= 4  # M already fills the chip
