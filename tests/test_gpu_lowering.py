"""The Mosaic GPU kernels lower for CUDA on any machine: their Pallas -> Mosaic GPU lowering
(layout inference, the float8 -> float16 widening, barriers, TMA transforms) runs here, on CPU,
for the configs "auto" plans on Hopper. What a GPU adds (PTX compilation, numerics) is in the
compiled tests, skipped off Hopper."""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def _lower(op, args, **kwargs):
  plan = pk.plan(op, *args, implementation="mosaic_gpu", target="h200", **kwargs)
  fn = jax.jit(lambda *a: getattr(pk, op)(*a, implementation="mosaic_gpu", config=plan.config,
                                          **kwargs))
  fn.trace(*args).lower(lowering_platforms=("cuda",))
  return plan


@pytest.mark.parametrize("B,D,dtype,kv_dtype", [
    (1, 128, "bfloat16", "bfloat16"),  # one consumer warpgroup
    (64, 128, "float16", "float16"),  # a ping-pong pair
    (3, 256, "bfloat16", "bfloat16"),
    (2, 64, "bfloat16", "bfloat16"),
    (1, 128, "bfloat16", "float8_e4m3fn"),  # float8 K/V widened per consumer
    (64, 128, "bfloat16", "float8_e5m2"),
])
def test_shared_attention_lowers(B, D, dtype, kv_dtype):
  q, kv = _sds((B, 1, 32, D), dtype), _sds((4096, 8, D), kv_dtype)
  scales = {}
  if kv_dtype != dtype:
    scales = dict(k_scale=jnp.full((8,), 0.01), v_scale=jnp.full((8,), 0.02))
  plan = _lower("shared_attention", (q, kv, kv), **scales)
  assert plan.config.consumers == (1 if B * 4 <= 64 else 2)


def test_chunk_attention_lowers():
  q, kv = _sds((64, 1, 32, 128), "bfloat16"), _sds((8192, 8, 128), "bfloat16")
  _lower("chunk_attention", (q, kv, kv, _sds((64, 8, 2), jnp.int32)), chunk_size=1024)
