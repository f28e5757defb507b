"""The default tilings, tested for invariants on every preset chip (not for exact values):
every plan is one its implementation accepts, and the grid fills the chip without a second wave
it does not need. The heuristics alone: measured tuning tables are tested in
test_tuning_table.py."""

import itertools
import math

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import checks, targets, tuning_table
from pallas_kernels.gpu import mosaic_attention, softmax
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.tpu import tuning as tpu_tuning

GPUS = sorted(targets.GPU_PRESETS)
TPUS = sorted(targets.TPU_PRESETS)
SHAPES = list(itertools.product((1, 7, 64, 512), (1, 4), (1, 4, 16), (64, 80, 128, 256),
                                (1000, 131072), (jnp.bfloat16, jnp.float32)))


@pytest.fixture(autouse=True)
def _heuristics_only():
  with tuning_table.ignored():
    yield


def _sds(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _fits(plan, D, dtype, tgt) -> bool:
  """The plan's computed shared-memory use fits the chip (GPU implementations)."""
  c = plan.config
  if plan.implementation == "mosaic_gpu":
    return mosaic_attention.smem_bytes_used(
        D, c.block_k, jnp.dtype(dtype).itemsize, num_stages=c.num_stages,
        consumers=getattr(c, "consumers", 2)) <= tgt.smem_per_block
  if plan.implementation == "triton" and hasattr(c, "block_m"):
    return gpu_tuning.triton_smem_bytes(c.block_m, c.block_k, D, jnp.dtype(dtype).itemsize,
                                        c.num_stages) <= tgt.smem_per_block
  return True


@pytest.mark.parametrize("name", GPUS + TPUS)
def test_shared_plans_are_valid_and_fill_the_chip(name):
  tgt = targets.target(name)
  for B, T, G, D, S, dtype in SHAPES:
    Hkv = 8
    q, k = _sds((B, T, G * Hkv, D), dtype), _sds((S, Hkv, D), dtype)
    plan = pk.plan("shared_attention", q, k, k, backend=tgt.platform, target=tgt)
    c = plan.config
    M = B * T * G
    assert _fits(plan, D, dtype, tgt)
    if plan.implementation == "mosaic_gpu":
      kv_bytes = 2 * S * Hkv * D * jnp.dtype(dtype).itemsize
      assert tgt.is_hopper and (M > 64 or kv_bytes >= gpu_tuning.MOSAIC_MIN_KV_BYTES)
      rows, block_k = c.rows_per_cta, c.block_k
    else:
      rows, block_k = c.block_m, c.block_k
    programs = Hkv * math.ceil(M / rows)
    tiles = math.ceil(S / block_k)
    total = programs * c.num_splits
    assert 1 <= c.num_splits <= tiles
    # One wave at most (unless the rows alone need more), and no idle core that one more split
    # of S could have used.
    assert total <= max(programs, tgt.num_cores)
    assert c.num_splits == tiles or total + programs > tgt.num_cores


@pytest.mark.parametrize("name", GPUS + TPUS)
@pytest.mark.parametrize("page_size", [8, 16, 64])
def test_unique_plans_are_valid_and_split_long_requests(name, page_size):
  tgt = targets.target(name)
  for B, T, G, D, S, dtype in SHAPES:
    Hkv = 8
    max_pages = -(-S // page_size)
    pool = _sds((4, page_size, Hkv, D), dtype)
    args = (_sds((B, T, G * Hkv, D), dtype), pool, pool, _sds((B, max_pages), jnp.int32),
            _sds((B,), jnp.int32))
    try:
      c = pk.plan("unique_attention", *args, backend=tgt.platform, target=tgt).config
    except ValueError as e:  # a program holds 16 rows and at least one page: may overflow
      smallest = gpu_tuning.triton_smem_bytes(16, max(16, page_size), D,
                                              jnp.dtype(dtype).itemsize, 1)
      assert "shared memory" in str(e) and smallest > gpu_tuning.SMEM_USE * tgt.smem_per_block, e
      continue
    keys = c.pages_per_block * page_size
    assert keys >= min(32, page_size) and keys <= max(128, page_size)
    blocks = -(-max_pages // c.pages_per_block)
    assert c.num_splits == 1 or blocks // c.num_splits >= 4  # a split keeps >= 4 blocks


@pytest.mark.parametrize("name", GPUS + TPUS)
@pytest.mark.parametrize("chunk_size", [64, 128, 384, 512, 2048])
def test_chunk_plans_are_valid(name, chunk_size):
  tgt = targets.target(name)
  for B, T, G, D, S, dtype in SHAPES:
    Hkv, N = 8, -(-S // chunk_size)
    K = max(1, N // 4)
    q, k = _sds((B, T, G * Hkv, D), dtype), _sds((S, Hkv, D), dtype)
    ids = _sds((B, Hkv, K), jnp.int32)
    try:
      plan = pk.plan("chunk_attention", q, k, k, ids, chunk_size=chunk_size, backend=tgt.platform,
                     target=tgt)
    except ValueError as e:  # TPU blocks are 128-key multiples: C=64 / 384-divisible only
      assert tgt.platform == "tpu" and chunk_size % 128, e
      continue
    assert _fits(plan, D, dtype, tgt)
    if plan.implementation == "mosaic_gpu":
      assert tgt.is_hopper and chunk_size >= 1024 and S % 128 == 0
    elif tgt.platform == "tpu":
      assert chunk_size % plan.config.block_k == 0


@pytest.mark.parametrize("name", TPUS)
def test_tpu_tilings_fit_vmem(name):
  """Default tilings and sweep candidates of shared and chunk attention fit the chip's VMEM
  budget (`tpu_tuning.fits`); a kernel asks for more than the default scoped VMEM only when it
  needs it, and for at most the chip's VMEM."""
  tgt = targets.target(name)
  # 8 heads x D=112 in float32 (one 896-column block): 512-key blocks do not fit v4's 16 MiB.
  for B, T, G, D, S, dtype in SHAPES + [(64, 1, 16, 112, 131072, jnp.float32)]:
    q, k = _sds((B, T, G * 8, D), dtype), _sds((S, 8, D), dtype)
    dims = checks.check_shared_kv_inputs(q, k, k, op="test")
    needs = [tpu_tuning.shared_vmem(dims, dtype, p.config)
             for p in pk.sweep("shared_attention", q, k, k, backend="tpu", target=tgt)]
    for C in (128, 512, 2048):
      ids = _sds((B, 8, max(1, S // C // 4)), jnp.int32)
      c = pk.plan("chunk_attention", q, k, k, ids, chunk_size=C, backend="tpu", target=tgt).config
      needs.append(tpu_tuning.chunk_vmem(dims, dtype, c))
    for need in needs:
      assert tpu_tuning.fits(need, tgt), (B, T, G, D, S, dtype, need)
      limit = tpu_tuning.vmem_limit(need, tgt)
      assert (limit is None) == (need <= tgt.scoped_vmem_bytes)
      assert limit is None or need < limit <= tgt.vmem_bytes


@pytest.mark.parametrize("name", TPUS)
def test_tpu_unique_row_tiles_shrink_to_fit_vmem(name):
  """The Mosaic TPU unique default halves its row tiles until they fit (`tpu_tuning.fits`), and
  so do its sweep candidates: a 2048-token prefill chunk of a Phi-2-like model (Hkv=32, G=1,
  D=80: all 32 heads in one block) was refused on v4 at 512 rows per tile."""
  tgt = targets.target(name)
  for Hkv, G, D, T, dtype in ((32, 1, 80, 2048, jnp.bfloat16), (32, 1, 80, 512, jnp.float32),
                              (8, 4, 128, 256, jnp.bfloat16), (8, 8, 64, 1, jnp.float32)):
    q = _sds((2, T, G * Hkv, D), dtype)
    pages = _sds((256, 16, Hkv, D), dtype)
    args = (q, pages, pages, _sds((2, 128), jnp.int32), _sds((2,), jnp.int32))
    dims, _ = checks.check_paged_inputs(*args, op="test")
    plans = pk.sweep("unique_attention", *args, backend="tpu", target=tgt)
    for p in plans:
      need = tpu_tuning.unique_vmem(dims, 16, dtype, p.config)
      assert tpu_tuning.fits(need, tgt), (name, Hkv, G, D, T, p.config, need)
    assert plans[0].config.block_m <= tpu_tuning.UNIQUE_MAX_ROWS


def test_current_target_off_platform_is_the_default_preset():
  if jax.default_backend() == "cpu":
    assert targets.current("gpu") == targets.target(targets.DEFAULT["gpu"])
    assert targets.current("tpu") == targets.target(targets.DEFAULT["tpu"])
  with pytest.raises(ValueError, match="target must be one of"):
    targets.target("h300")
  with pytest.raises(ValueError, match="platform must be 'gpu' or 'tpu'"):
    targets.current("cpu")


def test_triton_smem_model_covers_what_the_compiler_asked_for():
  # (block_m, block_k, D, itemsize, num_stages, bytes requested on an H200): tilings the previous
  # model under-counted, which then failed with RESOURCE_EXHAUSTED on the GPU.
  for bm, bk, D, itemsize, stages, requested in ((128, 64, 128, 4, 2, 262144),
                                                  (128, 64, 256, 2, 3, 262144),
                                                  (32, 128, 128, 4, 2, 262144),
                                                  (64, 32, 192, 4, 2, 262144),
                                                  (64, 32, 256, 4, 2, 262144)):
    assert gpu_tuning.triton_smem_bytes(bm, bk, D, itemsize, stages) >= requested


@pytest.mark.parametrize("name", GPUS)
def test_triton_tilings_keep_a_load_in_flight_where_one_fits(name):
  """Contiguous K/V tiles keep two pipeline stages when a smaller key tile (>= 32 keys) allows
  it; rows are never traded for stages. Paged unique attention may keep one stage
  (min_stages=1)."""
  tgt = targets.target(name)
  budget = gpu_tuning.SMEM_USE * tgt.smem_per_block
  fits = lambda m, k, D, itemsize, st: gpu_tuning.triton_smem_bytes(m, k, D, itemsize,
                                                                     st) <= budget
  for block_m, D, itemsize in itertools.product((16, 32, 64, 128), (64, 128, 256), (2, 4)):
    bm, bk, st = gpu_tuning._fit_triton(block_m, 128, 3, D, itemsize, tgt)  # noqa: SLF001
    assert fits(bm, bk, D, itemsize, st)
    # the first row count (halving) where anything fits, and stages as soon as 32+ keys allow
    first = next(m for m in (128, 64, 32, 16) if m <= block_m
                 and any(fits(m, k, D, itemsize, 1) for k in (16, 32, 64, 128)))
    assert bm == first, (block_m, D, itemsize, (bm, bk, st))
    two_fit = any(fits(bm, k, D, itemsize, 2) for k in (32, 64, 128))
    assert st >= 2 or not two_fit, (block_m, D, itemsize, (bm, bk, st))
  # float32, D=128, 16 rows: 64 keys x 3 stages rather than 128 keys x 1 (tiling_probes.md)
  if tgt.smem_per_block >= 224 * 1024:
    assert gpu_tuning._fit_triton(16, 128, 3, 128, 4, tgt) == (16, 64, 3)  # noqa: SLF001
  # rows and whole pages are kept for unique attention, one stage allowed
  if gpu_tuning.triton_smem_bytes(16, 128, 128, 4, 1) <= budget:
    assert gpu_tuning._fit_triton(16, 128, 2, 128, 4, tgt, min_block_m=16,  # noqa: SLF001
                                  min_block_k=128, min_stages=1)[:2] == (16, 128)


def test_triton_tiles_pad_the_head_dim_to_a_power_of_two():
  assert [softmax.padded(d) for d in (1, 16, 64, 80, 96, 128, 192, 256)] == [
      1, 16, 64, 128, 128, 128, 256, 256]
  # the model counts the padded tiles: D=80 costs what D=128 does
  assert gpu_tuning.triton_smem_bytes(16, 128, 80, 2, 3) == gpu_tuning.triton_smem_bytes(
      16, 128, 128, 2, 3)


@pytest.mark.parametrize("name", [n for n in GPUS if targets.target(n).is_hopper])
def test_mosaic_gpu_consumers_follow_m_and_every_candidate_fits(name):
  """One consumer warpgroup while M <= 64 (split-S), a ping-pong pair above; every Mosaic GPU
  candidate of the sweep, of every schedule, fits the chip's shared memory."""
  tgt = targets.target(name)
  for B, T, G, D, S, dtype in SHAPES:
    if dtype != jnp.bfloat16 or D % 64 or S % 128:  # what the kernel accepts
      continue
    q, k = _sds((B, T, G * 8, D), dtype), _sds((S, 8, D), dtype)
    plan = pk.plan("shared_attention", q, k, k, implementation="mosaic_gpu", target=tgt)
    assert plan.config.consumers == (1 if B * T * G <= 64 else 2)
    mosaic = [p for p in pk.sweep("shared_attention", q, k, k, backend="gpu", target=tgt)
              if p.implementation == "mosaic_gpu"]
    schedules = {(p.config.consumers, p.config.split_keys) for p in mosaic}
    assert schedules - {(3, True)} == {(1, False), (2, False), (2, True)}  # 3: where it fits
    assert all(_fits(p, D, dtype, tgt) for p in mosaic)


@pytest.mark.parametrize("name", [n for n in GPUS if targets.target(n).is_hopper])
def test_mosaic_gpu_scorer_plans_fit_and_fill_the_chip(name):
  """The Mosaic GPU scorer's default and every candidate: one consumer while M <= 64, tiles
  that divide the chunk, shared memory that fits, the CTAs filling the chip twice where the
  chunks allow."""
  from pallas_kernels.gpu import mosaic_scores
  tgt = targets.target(name)
  for B, G, W, S, C in itertools.product((1, 7, 64, 512), (1, 4, 16), (32, 64, 128),
                                         (4096, 1 << 20), (64, 96, 512)):
    dims = pk.layout.AttentionDims(B=B, T=1, Hq=8 * G, Hkv=8, D=W, S=S)
    base = gpu_tuning.mosaic_scores_config(dims, C, tgt)
    assert base.consumers == (1 if B * G <= 64 else 2)
    rows = 8 * math.ceil(B * G / (64 * base.consumers))
    if base.chunks_per_cta > 1:
      assert rows * math.ceil(math.ceil(S / C) / base.chunks_per_cta) >= 2 * tgt.num_cores
    for c in gpu_tuning.mosaic_scores_candidates(dims, C, tgt):
      assert C % c.block_k == 0 and c.block_k % 16 == 0
      assert gpu_tuning.mosaic_scores_unsupported(dims, C, c, tgt, False) is None, c
      assert mosaic_scores.smem_bytes_used(W, c.block_k, num_stages=c.num_stages,
                                           consumers=c.consumers,
                                           chunks_per_cta=c.chunks_per_cta) <= tgt.smem_per_block


@pytest.mark.parametrize("B,schedule", [(1, (2, True)), (13, (2, True)), (16, (2, True)),
                                        (17, (2, False)), (32, (2, False))])
def test_mosaic_gpu_float8_small_m_splits_the_keys(B, schedule):
  """Float8 K/V with M <= 64: two consumers on the same 64 rows take alternate key tiles (one
  consumer alone is limited by widening V); an even ring, splits filling the chip. More rows
  go to a ping-pong pair, which reads the keys once per 128 rows."""
  tgt = targets.target("h200")
  q, k = _sds((B, 1, 32, 128)), _sds((1 << 20, 8, 128), jnp.float8_e4m3fn)
  scales = dict(k_scale=_sds((8,), jnp.float32), v_scale=_sds((8,), jnp.float32))
  c = pk.plan("shared_attention", q, k, k, implementation="mosaic_gpu", target=tgt,
              **scales).config
  assert (c.consumers, c.split_keys) == schedule
  assert c.num_stages % 2 == 0 or not c.split_keys
  assert 8 * math.ceil(B * 4 / c.rows_per_cta) * c.num_splits <= tgt.num_cores


@pytest.mark.parametrize("kwargs,match", [
    (dict(consumers=1, split_keys=True, num_stages=2), "split_keys needs consumers 2 or 3"),
    (dict(consumers=3, split_keys=False, num_stages=3), "consumers=3 needs split_keys"),
    (dict(consumers=2, split_keys=True, num_stages=3), "a multiple of consumers=2, got 3"),
    (dict(consumers=3, split_keys=True, num_stages=4), "a multiple of consumers=3, got 4"),
    (dict(consumers=2, split_keys=1, num_stages=2), "split_keys must be True or False"),
])
def test_mosaic_gpu_split_keys_config_is_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pk.MosaicGpuSharedConfig(block_k=128, num_splits=4, **kwargs)


def test_mosaic_gpu_unique_config_has_one_consumer():
  """Consumers taking turns over paged keys are refused (see mosaic_attention)."""
  with pytest.raises(ValueError, match="consumers"):
    pk.MosaicGpuUniqueConfig(block_k=128, num_stages=2, consumers=2, split_keys=True)


@pytest.mark.parametrize("page_size", [8, 16, 64, 256])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_mosaic_gpu_unique_plans_fit_and_refuse_what_they_cannot_run(page_size, kv_dtype):
  """Mosaic GPU unique attention on Hopper: the default and every candidate fit shared memory
  and tile whole pages or one page's part; more than 64 rows per request, or pages of 24 keys,
  are refused with the reason."""
  tgt = targets.target("h200")
  B, Hkv, D, pages = 64, 8, 128, 4096 // page_size
  pool = _sds((B * pages, page_size, Hkv, D), kv_dtype)
  tables, lengths = _sds((B, pages), jnp.int32), _sds((B,), jnp.int32)
  scales = {}
  if kv_dtype != jnp.bfloat16:
    scales = dict(k_scale=_sds((Hkv,), jnp.float32), v_scale=_sds((Hkv,), jnp.float32))
  args = (_sds((B, 1, 4 * Hkv, D)), pool, pool, tables, lengths)
  plan = pk.plan("unique_attention", *args, implementation="mosaic_gpu", target=tgt, **scales)
  assert (plan.config.consumers, plan.config.split_keys) == (1, False)
  plans = [p for p in pk.sweep("unique_attention", *args, backend="gpu", target=tgt, **scales)
           if p.implementation == "mosaic_gpu"]
  assert plan in plans and len(plans) > 4
  for p in plans:
    c = p.config
    assert c.block_k % page_size == 0 or page_size % c.block_k == 0
    assert mosaic_attention.smem_bytes_used(
        D, c.block_k, 2, num_stages=c.num_stages, consumers=c.consumers,
        kv_dtype=kv_dtype) <= tgt.smem_per_block
  with pytest.raises(ValueError, match="T \\* G query rows to fit one 64-row tile"):
    pk.plan("unique_attention", _sds((B, 2, 40 * Hkv, D)), *args[1:],
            implementation="mosaic_gpu", target=tgt, **scales)
  bad_pool = _sds((B * pages, 24, Hkv, D), kv_dtype)
  with pytest.raises(ValueError, match="page_size a multiple of 8 that divides"):
    pk.plan("unique_attention", args[0], bad_pool, bad_pool, tables, lengths,
            implementation="mosaic_gpu", target=tgt, **scales)
