"""shared_attention, every implementation (interpreted Pallas kernels, XLA, compiled GPU kernels
where a GPU is present) vs float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import layout, shared_attention
from pallas_kernels.gpu import triton_shared as gpu_kernel
from pallas_kernels.tpu import mosaic_shared as tpu_kernel
from tests import kernel_cases as kc
from tests.np_reference import rel_err, shared_attention_f64

OP = "shared_attention"

# (B, T, G, Hkv, D, S, kv_length, dtype): every B/T/GQA/D/S value appears at least once; S and
# kv_length are multiples of no block.
CASES = [
    (1, 1, 1, 2, 64, 1000, None, jnp.float32),
    (3, 1, 4, 2, 128, 1000, 700, jnp.float32),
    (17, 1, 8, 1, 64, 4097, None, jnp.bfloat16),
    (3, 5, 4, 1, 64, 1000, 37, jnp.float32),  # kv_length inside the first block
    (1, 5, 8, 1, 128, 4097, 4000, jnp.bfloat16),
    (17, 5, 1, 2, 64, 1000, 999, jnp.bfloat16),
    (5, 2, 2, 2, 80, 1000, 901, jnp.bfloat16),  # head dim 80: Triton tiles padded to 128 lanes
]
# Compiled-only (GPU): sizes the Hopper kernel takes (D a multiple of 16), row tiles that cut a
# request, a key mask inside a tile, empty splits, head dims that are not multiples of 64
# (Hopper: 32-byte swizzles for 48 / 80, 64-byte for 96 / 160; Triton: padded lanes), with one
# consumer warpgroup (M <= 64) and a ping-pong pair (D=80, M=160), and S past the last whole
# tile (a multiple of 8: the Hopper kernel's last tile reads past S, where TMA fills zeros).
LARGE = [(64, 1, 4, 2, 128, 4096, None, jnp.bfloat16), (33, 1, 4, 2, 128, 4096, 4000, jnp.bfloat16),
         (40, 1, 8, 2, 128, 4096, 130, jnp.bfloat16), (64, 1, 4, 2, 128, 4096, 0, jnp.bfloat16),
         (3, 2, 4, 2, 64, 1000, None, jnp.float32), (40, 1, 4, 2, 96, 4096, 4000, jnp.bfloat16),
         (3, 1, 8, 2, 80, 4096, None, jnp.bfloat16), (64, 1, 2, 2, 48, 4096, 4001, jnp.bfloat16),
         (2, 1, 4, 2, 160, 4096, None, jnp.bfloat16), (20, 1, 8, 2, 80, 4096, 4001, jnp.bfloat16),
         (3, 1, 4, 2, 128, 4040, None, jnp.bfloat16), (64, 2, 4, 2, 128, 1000, 999, jnp.float16)]


def _case_id(c):
  return "B{}T{}G{}H{}D{}S{}n{}{}".format(*c[:7], jnp.dtype(c[7]).name)


def _run_and_check(seed, case, implementation, interpret, config=None):
  *shape, kv_length, dtype = case
  _, q, k, v = kc.shared_inputs(seed, *shape, dtype)
  n = None if kv_length is None else jnp.int32(kv_length)
  kc.plan_or_skip(OP, q, k, v, kv_length=n, implementation=implementation, interpret=interpret,
                  config=config)
  o, lse = kc.run(shared_attention, q, k, v, kv_length=n, implementation=implementation,
                  interpret=interpret, config=config)
  if kv_length == 0:
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    return
  kc.check(o, lse, *shared_attention_f64(q, k, v, kv_length=kv_length), q, dtype)


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_f64(implementation, interpret, case):
  _run_and_check(CASES.index(case), case, implementation, interpret)  # seeded by position


@pytest.mark.parametrize("implementation", [
    pytest.param("triton", marks=pytest.mark.skipif(not kc.ON_GPU, reason="needs a GPU")),
    pytest.param("mosaic_gpu", marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper"))])
@pytest.mark.parametrize("case", LARGE, ids=_case_id)
def test_compiled_gpu_matches_f64(implementation, case):
  """The kernels as compiled on the GPU (what interpret mode cannot check), f32 in IEEE
  precision (not TF32)."""
  _run_and_check(100 + LARGE.index(case), case, implementation, False)


CONFIGS = [
    ("triton", True, pk.TritonSharedConfig(block_m=16, block_k=64, num_splits=3)),
    ("triton", True, pk.TritonSharedConfig(block_m=32, block_k=128, num_splits=1)),
    ("mosaic_tpu", True, pk.MosaicTpuSharedConfig(block_m=16, block_k=128, num_splits=3)),
    ("mosaic_tpu", True, pk.MosaicTpuSharedConfig(block_m=32, block_k=256, num_splits=1)),
    pytest.param("triton", False, pk.TritonSharedConfig(block_m=128, block_k=64, num_splits=1,
                                                        num_warps=8, num_stages=3),
                 marks=pytest.mark.skipif(not kc.ON_GPU, reason="needs a GPU")),
    pytest.param("mosaic_gpu", False, pk.MosaicGpuSharedConfig(block_k=64, num_splits=3,
                                                               num_stages=4),
                 marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper")),
    pytest.param("mosaic_gpu", False, pk.MosaicGpuSharedConfig(block_k=128, num_splits=3,
                                                               num_stages=3, consumers=1),
                 marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper")),
    # consumers taking turns over the key tiles: a consumer with no tile, a masked tile of each
    *(pytest.param("mosaic_gpu", False, pk.MosaicGpuSharedConfig(
        block_k=bk, num_splits=splits, num_stages=stages, consumers=2, split_keys=True),
        marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper"))
      for bk, splits, stages in ((64, 3, 2), (128, 1, 2))),
    pytest.param("mosaic_gpu", False, pk.MosaicGpuSharedConfig(
        block_k=64, num_splits=2, num_stages=3, consumers=3, split_keys=True),
        marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper")),
]


@pytest.mark.parametrize("implementation,interpret,config", CONFIGS)
def test_explicit_configs_and_traced_kv_length(implementation, interpret, config):
  """Explicit tilings (splits that end past S, one split) under one jit with a traced
  kv_length: whole, cut inside a block, and empty."""
  dtype = kc.float_dtype(implementation)
  _, q, k, v = kc.shared_inputs(5, 3, 1, 4, 2, 64 if dtype == jnp.float32 else 128, 1024, dtype)
  fn = jax.jit(lambda q, k, v, n: shared_attention(q, k, v, kv_length=n, config=config,
                                                   implementation=implementation,
                                                   interpret=interpret))
  for n in (1024, 130, 0):
    o, lse = fn(q, k, v, jnp.int32(n))
    if n == 0:
      assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    else:
      kc.check(o, lse, *shared_attention_f64(q, k, v, kv_length=n), q, dtype)


@pytest.mark.parametrize("implementation", ["triton", "mosaic_tpu"])
def test_partials_are_fully_written(implementation):
  """Every split writes every row: finite o, and lse finite or -inf (an empty split), never NaN."""
  _, q, k, v = kc.shared_inputs(9, 2, 1, 4, 2, 64, 700, jnp.float32)
  q_rows = jnp.pad(layout.fold_queries(q, 2), ((0, 0), (0, 8), (0, 0)))  # M = 8 -> block_m 16
  n = jnp.int32(300)  # splits past 300 keys are empty
  if implementation == "triton":
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


def test_backend_alias_and_auto():
  """`backend=` names a family; "auto" on a CPU is the reference, and with interpret=True the
  GPU family in interpret mode (Triton semantics)."""
  _, q, k, v = kc.shared_inputs(1, 2, 1, 4, 2, 64, 300, jnp.float32)
  ref = shared_attention_f64(q, k, v)
  for kw in (dict(backend="xla"), dict(backend="auto"), dict(backend="gpu", interpret=True),
             dict(backend="tpu", interpret=True), dict(interpret=True)):
    kc.check(*shared_attention(q, k, v, **kw), *ref, q, jnp.float32)
  if not kc.ON_GPU:
    assert pk.plan(OP, q, k, k).implementation == "xla"
    assert pk.plan(OP, q, k, k, interpret=True).implementation == "triton"
  assert pk.plan(OP, q, k, k, backend="tpu", interpret=True).implementation == "mosaic_tpu"
  assert pk.plans_used()[OP] == pk.plan(OP, q, k, k, interpret=True)  # the last call's plan


def test_plan_targets_and_refusals():
  """Plans for named chips; Mosaic GPU chosen on Hopper only, for large M or a long K/V stream
  (one consumer warpgroup at small M), refused where it cannot run; the config must be the
  implementation's own."""
  q = jax.ShapeDtypeStruct((512, 1, 32, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((131072, 8, 128), jnp.bfloat16)
  big = pk.plan(OP, q, k, k, backend="gpu", target="h200")
  assert big.implementation == "mosaic_gpu" and big.config.consumers == 2
  assert pk.plan(OP, q, k, k, backend="gpu", target="a100").implementation == "triton"
  small = jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.bfloat16)
  long_kv = pk.plan(OP, small, k, k, backend="gpu", target="h100")
  assert long_kv.implementation == "mosaic_gpu" and long_kv.config.consumers == 1
  short = jax.ShapeDtypeStruct((8192, 8, 128), jnp.bfloat16)  # 32 MiB of K/V: launch-bound
  assert pk.plan(OP, small, short, short, backend="gpu", target="h100").implementation == "triton"
  for B, D, implementation in ((64, 80, "mosaic_gpu"), (2, 80, "triton"), (2, 96, "mosaic_gpu")):
    q_d, k_d = q.update(shape=(B, 1, 16, D)), k.update(shape=(131072, 4, D))  # > 128 MiB of K/V
    assert pk.plan(OP, q_d, k_d, k_d, backend="gpu", target="h200").implementation == (
        implementation), (B, D)
  given = pk.TritonSharedConfig(block_m=16, block_k=64)  # a config names its implementation
  assert pk.plan(OP, small, k, k, backend="gpu", target="h100", config=given) == pk.Plan(
      OP, "triton", given)
  with pytest.raises(ValueError, match="config must be one of.*on GPU, got MosaicTpuSharedConfig"):
    pk.plan(OP, small, k, k, backend="gpu", target="h100",
            config=pk.MosaicTpuSharedConfig(block_m=16, block_k=128))
  with pytest.raises(ValueError, match="mosaic_gpu.*cannot run.*bfloat16 or float16"):
    pk.plan(OP, q.update(dtype=jnp.float32), k.update(dtype=jnp.float32),
            k.update(dtype=jnp.float32), implementation="mosaic_gpu", target="h100")
  with pytest.raises(ValueError, match="needs a Hopper GPU"):
    pk.plan(OP, q, k, k, implementation="mosaic_gpu", target="a100")
  with pytest.raises(ValueError, match="has no interpret mode"):
    pk.plan(OP, q, k, k, implementation="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="at most 32 K/V ring slots, got config.num_stages=40"):
    pk.plan(OP, q.update(shape=(1, 1, 32, 16)), k.update(shape=(65536, 8, 16)),
            k.update(shape=(65536, 8, 16)), implementation="mosaic_gpu", target="h200",
            config=pk.MosaicGpuSharedConfig(block_k=64, num_stages=40, consumers=1))
  with pytest.raises(ValueError, match="shared memory per block"):
    pk.plan(OP, q, k, k, implementation="mosaic_gpu", target="h100",
            config=pk.MosaicGpuSharedConfig(block_k=128, num_stages=4))
  with pytest.raises(ValueError, match="config for implementation 'triton' must be "
                     "TritonSharedConfig, got MosaicTpuSharedConfig"):
    pk.plan(OP, q, k, k, implementation="triton",
            config=pk.MosaicTpuSharedConfig(block_m=16, block_k=128))
  with pytest.raises(ValueError, match="target TPU v5e is a TPU, but the implementation runs on"):
    pk.plan(OP, q, k, k, implementation="triton", target="v5e")
  # A traced kv_length's stand-in plans as the traced value would (no value to check).
  n = jax.ShapeDtypeStruct((), jnp.int32)
  assert pk.plan(OP, q, k, k, kv_length=n, backend="gpu", target="h200") == big
  assert pk.sweep(OP, small, k, k, kv_length=n, backend="gpu", target="h100")
  with pytest.raises(ValueError, match="kv_length must be an integer scalar, got shape"):
    pk.plan(OP, q, k, k, kv_length=n.update(shape=(2,)), backend="gpu", target="h200")


def test_validation_errors():
  _, q, k, v = kc.shared_inputs(2, 1, 1, 4, 2, 64, 100, jnp.float32)
  with pytest.raises(ValueError, match="backend must be one of"):
    shared_attention(q, k, v, backend="cuda")
  with pytest.raises(ValueError, match="implementation must be 'auto' or one of"):
    shared_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="give implementation= or its alias backend=, not both"):
    shared_attention(q, k, v, implementation="triton", backend="gpu")
  with pytest.raises(ValueError, match="the 'xla' implementation has none"):
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
  with pytest.raises(ValueError, match="kv_length must be an integer scalar"):
    shared_attention(q, k, v, kv_length=jnp.ones(2, jnp.int32))


@pytest.mark.parametrize("make,match", [
    (lambda: pk.TritonSharedConfig(block_m=24, block_k=64), "block_m must be a power of two >= 16"),
    (lambda: pk.TritonSharedConfig(block_m=16, block_k=64, num_splits=0),
     "num_splits must be a positive int"),
    (lambda: pk.TritonSharedConfig(block_m=16, block_k=64, num_warps=32), "at most 16"),
    (lambda: pk.MosaicTpuSharedConfig(block_m=16, block_k=64), "block_k must be a multiple of 128"),
    (lambda: pk.MosaicTpuSharedConfig(block_m=8, block_k=128), "block_m must be a multiple of 16"),
    (lambda: pk.MosaicGpuSharedConfig(block_k=96), "block_k must be a multiple of 64"),
    (lambda: pk.MosaicGpuSharedConfig(num_stages=1), "num_stages must be an int >= 2"),
])
def test_configs_validate_themselves(make, match):
  with pytest.raises(ValueError, match=match):
    make()
