"""Compiled GPU kernels vs float64 NumPy (skipped without a GPU; run on the GPU machine).

Covers what interpret mode cannot: the Triton lowering as compiled, and the Hopper-only Mosaic GPU
kernel (no interpret mode), including a key mask inside a tile and empty splits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import SharedAttentionBlocks, shared_attention
from pallas_kernels.backend import is_hopper
from tests.np_reference import random_normal, rel_err, shared_attention_f64

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

KERNELS = [
    SharedAttentionBlocks(block_m=16, block_k=128, num_splits=5, num_warps=4, num_stages=3),
    SharedAttentionBlocks(block_m=128, block_k=64, num_splits=1, num_warps=8, num_stages=3),
    pytest.param(SharedAttentionBlocks(block_m=128, block_k=128, num_splits=3, num_stages=2,
                                       kernel="mosaic"),
                 marks=pytest.mark.skipif(not is_hopper(), reason="needs Hopper")),
    pytest.param(SharedAttentionBlocks(block_m=128, block_k=64, num_splits=1, num_stages=4,
                                       kernel="mosaic"),
                 marks=pytest.mark.skipif(not is_hopper(), reason="needs Hopper")),
]


@pytest.mark.parametrize("blocks", KERNELS, ids=lambda b: f"{b.kernel}-{b.block_m}-{b.block_k}-"
                         f"{b.num_splits}")
@pytest.mark.parametrize("B,G,kv_length", [(64, 4, None), (33, 4, 4000), (40, 8, 130), (64, 4, 0)])
def test_compiled_kernel_matches_f64(blocks, B, G, kv_length):
  rng = np.random.default_rng(B + G)
  Hkv, D, S = 2, 128, 4096
  q = random_normal(rng, (B, 1, G * Hkv, D), jnp.bfloat16)
  k = random_normal(rng, (S, Hkv, D), jnp.bfloat16)
  v = random_normal(rng, (S, Hkv, D), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v, n: shared_attention(q, k, v, kv_length=n, backend="gpu",
                                                   blocks=blocks))
  o, lse = fn(q, k, v, jnp.int32(S if kv_length is None else kv_length))
  o_ref, lse_ref = shared_attention_f64(q, k, v, kv_length=kv_length)
  o32 = np.asarray(o, np.float32)
  if kv_length == 0:
    assert np.all(o32 == 0) and np.all(np.isneginf(np.asarray(lse)))
    return
  assert np.all(np.isfinite(o32))
  assert rel_err(o32, o_ref) < 1e-2
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=1e-2, atol=2e-2)


def test_f32_inputs_use_ieee_matmuls():
  rng = np.random.default_rng(0)
  q = random_normal(rng, (3, 2, 8, 64), jnp.float32)
  k = random_normal(rng, (1000, 2, 64), jnp.float32)
  o, lse = jax.jit(lambda q, k: shared_attention(q, k, k, backend="gpu"))(q, k)
  o_ref, lse_ref = shared_attention_f64(q, k, k)
  assert rel_err(o, o_ref) < 1e-5
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=1e-5, atol=1e-5)


MOSAIC_CHUNKS = pytest.mark.skipif(not is_hopper(), reason="needs Hopper")


@pytest.mark.parametrize("chunk_size,K,kv_length,kernel", [
    (128, 5, None, "triton"), (64, 3, 3000, "triton"), (512, 5, 4096, "triton"),
    pytest.param(128, 5, None, "mosaic", marks=MOSAIC_CHUNKS),
    pytest.param(512, 5, 3000, "mosaic", marks=MOSAIC_CHUNKS),
])
def test_compiled_chunk_attention_matches_f64(chunk_size, K, kv_length, kernel):
  from pallas_kernels import ChunkAttentionBlocks, chunk_attention

  blocks = (ChunkAttentionBlocks(128, 128, num_stages=3, kernel="mosaic") if kernel == "mosaic"
            else None)
  from tests.test_chunk_attention import chunk_attention_f64, random_ids

  rng = np.random.default_rng(chunk_size + K)
  B, G, Hkv, D, S = 24, 4, 2, 128, 4096
  q = random_normal(rng, (B, 1, G * Hkv, D), jnp.bfloat16)
  k = random_normal(rng, (S, Hkv, D), jnp.bfloat16)
  v = random_normal(rng, (S, Hkv, D), jnp.bfloat16)
  ids = random_ids(rng, B, Hkv, S // chunk_size, K, pattern="shaped")
  fn = jax.jit(lambda q, k, v, ids: chunk_attention(q, k, v, ids, chunk_size=chunk_size,
                                                    kv_length=kv_length, backend="gpu",
                                                    blocks=blocks))
  o, lse = fn(q, k, v, ids)
  o_ref, lse_ref = chunk_attention_f64(q, k, v, ids, chunk_size, kv_length)
  assert np.all(np.isfinite(np.asarray(o, np.float32)))
  assert rel_err(o, o_ref) < 1e-2
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=1e-2, atol=2e-2)
