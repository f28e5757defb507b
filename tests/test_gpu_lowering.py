"""The Mosaic GPU kernels lower for CUDA on any machine: their Pallas -> Mosaic GPU lowering
(layout inference, the float8 -> float16 widening, barriers, TMA transforms) runs here, on CPU,
for the configs "auto" plans on Hopper; so does the Triton scorer's Pallas -> Triton step. What
a GPU adds (PTX compilation, numerics) is in the compiled tests, skipped off Hopper."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import targets
from pallas_kernels.gpu import mosaic_attention, tuning as gpu_tuning
from pallas_kernels.layout import AttentionDims


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def _lower(op, args, **kwargs):
  plan = pk.plan(op, *args, implementation="mosaic_gpu", target="h200", **kwargs)
  fn = jax.jit(lambda *a: getattr(pk, op)(*a, implementation="mosaic_gpu", config=plan.config,
                                          **kwargs))
  fn.trace(*args).lower(lowering_platforms=("cuda",))
  return plan


@pytest.mark.parametrize("B,D,dtype,kv_dtype,schedule,S", [
    (1, 128, "bfloat16", "bfloat16", (1, False, False), 4096),  # one consumer warpgroup
    (64, 128, "float16", "float16", (2, False, False), 4040),  # a ping-pong pair; S past tiles
    (3, 256, "bfloat16", "bfloat16", (1, False, False), 4096),
    (2, 64, "bfloat16", "bfloat16", (1, False, False), 4096),
    (64, 96, "bfloat16", "bfloat16", (2, False, False), 4096),  # 64-byte swizzled rows
    (1, 80, "float16", "float16", (1, False, False), 4096),  # 32-byte swizzled rows
    (1, 128, "bfloat16", "float8_e4m3fn", (2, True, False), 4008),  # two consumers' keys
    (64, 128, "bfloat16", "float8_e5m2", (2, False, False), 4096),
    (128, 80, "bfloat16", "float8_e5m2", (2, False, True), 4096),  # widened in HBM first (M=512)
    (128, 128, "bfloat16", "float8_e4m3fn", (2, False, False), 4096),  # read as float8 (M=512)
    (2, 256, "bfloat16", "float8_e4m3fn", (2, True, False), 4096),  # two e4m3 terms fit D=256
    (64, 256, "bfloat16", "float8_e4m3fn", (2, False, False), 4096),
    (128, 256, "bfloat16", "float8_e5m2", (2, False, True), 4096),  # three terms: widened
])
def test_shared_attention_lowers(B, D, dtype, kv_dtype, schedule, S):
  """schedule: (consumers, split_keys, widen_kv) of the default plan."""
  q, kv = _sds((B, 1, 32, D), dtype), _sds((S, 8, D), kv_dtype)
  scales = {}
  if kv_dtype != dtype:
    scales = dict(k_scale=jnp.full((8,), 0.01), v_scale=jnp.full((8,), 0.02))
  plan = _lower("shared_attention", (q, kv, kv), **scales)
  assert (plan.config.consumers, plan.config.split_keys, plan.config.widen_kv) == schedule


@pytest.mark.parametrize("B,kv_dtype", [(1, "float8_e4m3fn"), (64, "float8_e5m2")])
def test_float8_kv_scores_take_float8_query_terms(B, kv_dtype):
  """Float8 K/V read in the kernel: QK^T on float8 wgmma straight from the ring, the queries
  handed over as float8 terms of the K format (two e4m3, three e5m2)."""
  q, kv = _sds((B, 1, 32, 128), "bfloat16"), _sds((4096, 8, 128), kv_dtype)
  scales = dict(k_scale=jnp.full((8,), 0.01), v_scale=jnp.full((8,), 0.02))
  plan = pk.plan("shared_attention", q, kv, kv, implementation="mosaic_gpu", target="h200",
                 **scales)
  assert not plan.config.widen_kv
  text = jax.jit(lambda *a: pk.shared_attention(*a, implementation="mosaic_gpu",
                                                config=plan.config, **scales)).trace(
      q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  terms = mosaic_attention.Q_TERMS[jnp.dtype(kv_dtype)]
  assert re.search(rf"tensor<{terms}x8x\d+x128x{'f8E4M3FN' if terms == 2 else 'f8E5M2'}>", text)


def test_widened_float8_waits_for_the_queries_and_skips_an_empty_context():
  """widen_v (the plan at 1024 rows of e4m3) and widen_kv: the widening sits behind an
  optimization barrier with the call's queries, and with a traced kv_length inside a
  conditional on kv_length > 0 (an unread context costs no widening pass); the pass is
  `widen.widen`'s Pallas kernel."""
  q, kv, n = _sds((256, 1, 32, 128), "bfloat16"), _sds((4096, 8, 128), "float8_e4m3fn"), _sds(
      (), "int32")
  scales = dict(k_scale=jnp.full((8,), 0.01), v_scale=jnp.full((8,), 0.02))
  plan = pk.plan("shared_attention", q, kv, kv, implementation="mosaic_gpu", target="h200",
                 **scales)
  assert plan.config.widen_v and not plan.config.widen_kv
  for config in (plan.config, dataclasses.replace(plan.config, widen_kv=True, widen_v=False)):
    for traced in (False, True):
      fn = jax.jit(lambda q, k, v, n: pk.shared_attention(
          q, k, v, kv_length=n if traced else None, implementation="mosaic_gpu",
          config=config, **scales))
      text = fn.trace(q, kv, kv, n).lower(lowering_platforms=("cuda",)).as_text()
      assert "optimization_barrier" in text
      assert ("stablehlo.case" in text) == traced
      assert "widen_fp8" in text  # the Pallas pass, not XLA's convert


@pytest.mark.parametrize("B,D,kv_dtype", [(256, 128, "float8_e4m3fn"), (64, 128, "float8_e5m2"),
                                           (2, 128, "float8_e4m3fn")])  # two splitting keys
def test_float8_keys_under_widened_values_lower(B, D, kv_dtype):
  """widen_v: only V widened before the kernel (in the pass, behind the barrier); K stays float8
  for QK^T on the FP8 tensor cores, PV reads the bf16 V tiles from the ring."""
  q, kv = _sds((B, 1, 32, D), "bfloat16"), _sds((4096, 8, D), kv_dtype)
  scales = dict(k_scale=jnp.full((8,), 0.01), v_scale=jnp.full((8,), 0.02))
  config = gpu_tuning.mosaic_shared(AttentionDims(B=B, T=1, Hq=32, Hkv=8, D=D, S=4096),
                                    jnp.bfloat16, targets.target("h200"), kv_dtype=kv_dtype,
                                    widen_v=True)
  assert config.widen_v and not config.widen_kv
  fn = jax.jit(lambda *a: pk.shared_attention(*a, implementation="mosaic_gpu", config=config,
                                              **scales))
  text = fn.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  terms = mosaic_attention.Q_TERMS[jnp.dtype(kv_dtype)]
  assert re.search(rf"tensor<{terms}x8x\d+x{D}x{'f8E4M3FN' if terms == 2 else 'f8E5M2'}>", text)
  assert "optimization_barrier" in text


@pytest.mark.parametrize("D,consumers,num_stages,kv_dtype", [
    (128, 2, 2, "bfloat16"), (64, 2, 4, "bfloat16"), (128, 3, 6, "float8_e4m3fn")])
def test_shared_attention_split_keys_lowers(D, consumers, num_stages, kv_dtype):
  """Consumers sharing 64 rows and taking turns over the key tiles."""
  q, kv = _sds((4, 1, 32, D), "bfloat16"), _sds((4096 + 64, 8, D), kv_dtype)
  scales = {}
  if kv_dtype != "bfloat16":
    scales = dict(k_scale=jnp.full((8,), 0.01), v_scale=jnp.full((8,), 0.02))
  config = pk.MosaicGpuSharedConfig(block_k=64, num_stages=num_stages, num_splits=3,
                                    consumers=consumers, split_keys=True)
  fn = jax.jit(lambda *a: pk.shared_attention(*a, implementation="mosaic_gpu", config=config,
                                              **scales))
  fn.trace(q, kv, kv).lower(lowering_platforms=("cuda",))


def test_chunk_attention_lowers():
  q, kv = _sds((64, 1, 32, 128), "bfloat16"), _sds((8192, 8, 128), "bfloat16")
  _lower("chunk_attention", (q, kv, kv, _sds((64, 8, 2), jnp.int32)), chunk_size=1024)


@pytest.mark.parametrize("T,G,page_size,kv_dtype", [
    (1, 4, 16, "bfloat16"),  # four pages per 64-key tile
    (4, 8, 128, "bfloat16"),  # one tile = part of a page; causal over the 4 newest tokens
    (1, 8, 64, "float8_e4m3fn"),  # float8 pages widened
])
def test_unique_attention_lowers(T, G, page_size, kv_dtype):
  B, Hkv, D, pages = 3, 2, 128, 5
  q = _sds((B, T, G * Hkv, D), "bfloat16")
  pool = _sds((B * pages + 1, page_size, Hkv, D), kv_dtype)
  args = (q, pool, pool, _sds((B, pages), jnp.int32), _sds((B,), jnp.int32))
  scales = {}
  if kv_dtype != "bfloat16":
    scales = dict(k_scale=jnp.full((Hkv,), 0.01), v_scale=jnp.full((Hkv,), 0.02))
  plan = _lower("unique_attention", args, **scales)
  assert (plan.config.consumers, plan.config.split_keys) == (1, False)


@pytest.mark.parametrize("codes_width,int8,scale_rows", [
    (64, False, 1 << 14), (128, True, 1 << 14), (64, True, 1 << 14), (128, False, 32),
    (128, True, 32)])
def test_chunk_scores_triton_lowers(codes_width, int8, scale_rows):
  """The Triton scorer lowers for CUDA (its Pallas -> Triton IR step runs here) with packed
  4-bit codes (D/2) and 8-bit codes (D), bf16 or int8 query rows, per-key or per-chunk scales."""
  q = _sds((8, 1, 32, 128), "bfloat16")
  codes, scale = _sds((1 << 14, 8, codes_width), jnp.int8), _sds((scale_rows, 8), jnp.float32)
  fn = jax.jit(lambda *a: pk.chunk_scores(*a, chunk_size=512, int8=int8,
                                          implementation="triton"))
  fn.trace(q, codes, scale).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("B,W,S,C,consumers", [
    (8, 64, 1 << 14, 512, 1), (128, 64, 1 << 14, 64, 2), (3, 32, 4000, 128, 1),
    (40, 96, 1000, 48, 2)])
def test_chunk_scores_mosaic_gpu_lowers(B, W, S, C, consumers):
  """The Mosaic GPU scorer (int8 rows over 8-bit codes with per-chunk scales) lowers for CUDA:
  int8 wgmma over 32 / 64 / 128-byte swizzled code rows, one or two consumers, chunks of one
  tile or several. "auto" plans it on Hopper only for codes past Triton's 32-bit offsets."""
  q, codes = _sds((B, 1, 32, W), "bfloat16"), _sds((S, 8, W), jnp.int8)
  scale = _sds((-(-S // C), 8), jnp.float32)
  plan = _lower("chunk_scores", (q, codes, scale), chunk_size=C, int8=True)
  assert plan.config.consumers == consumers
  auto = lambda codes, scale: pk.plan("chunk_scores", q, codes, scale, chunk_size=C, int8=True,
                                      target="h200", backend="gpu").implementation
  assert auto(codes, scale) == "triton"
  S_big = ((1 << 31) // (8 * W) // 64 + 1) * 64  # past 2^31 one-byte elements
  big = _sds((S_big, 8, W), jnp.int8), _sds((-(-S_big // C), 8), jnp.float32)
  assert auto(*big) == "mosaic_gpu"
  with pytest.raises(ValueError, match="int8 query rows"):
    pk.plan("chunk_scores", q, codes, scale, chunk_size=C, implementation="mosaic_gpu",
            target="h200")
  with pytest.raises(ValueError, match="one scale per chunk"):  # per-key scales
    pk.plan("chunk_scores", q, codes, _sds((S, 8), jnp.float32), chunk_size=C, int8=True,
            implementation="mosaic_gpu", target="h200")


def test_unrolled_layers_share_one_kernel():
  """Calls with equal plans and shapes (a model's unrolled layers) lower to one kernel that each
  call site calls: Mosaic GPU compiled a kernel per call site (compile_dedup.md). A call with
  another shape gets its own."""
  q, kv = _sds((8, 1, 32, 128), "bfloat16"), _sds((4096, 8, 128), "bfloat16")
  config = pk.plan("shared_attention", q, kv, kv, implementation="mosaic_gpu",
                   target="h200").config
  attend = lambda q, k, v: pk.shared_attention(q, k, v, implementation="mosaic_gpu",
                                               config=config)[0]

  def layers(q, k, v):
    for _ in range(3):
      q = attend(q, k, v)
    return q, attend(q, k[:2048], v[:2048])

  text = jax.jit(layers).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  kernels = re.findall(r"stablehlo\.custom_call @(\w+)", text)
  assert len(kernels) == 2 and len(set(kernels)) == 1, kernels
