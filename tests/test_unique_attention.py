"""unique_attention kernels (GPU Triton + TPU Mosaic, interpret mode) and the XLA path vs float64.

The page pool is poisoned: every slot no request owns (spare pages, the tail of each request's last
page) holds NaN, and block-table entries past each request's pages are junk ids (negative or past
the pool). A kernel that reads past a length, or a page it does not own, without masking shows
NaN; interpret mode also fills unwritten outputs with NaN.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import merge_attention_states, shared_attention, unique_attention, write_pages
from pallas_kernels import layout
from pallas_kernels.gpu import triton_unique as gpu_kernel
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.tpu import tuning as tpu_tuning
from pallas_kernels.reference import unique_attention_ref
from pallas_kernels.tpu import mosaic_unique as tpu_kernel
from tests import kernel_cases as kc
from tests.np_reference import attention_f64, random_normal, rel_err, unique_attention_f64

OP = "unique_attention"

# (T, G, Hkv, D, page_size, lengths, dtype). Lengths cover an empty slot (0), 1 token, exactly one
# page, many pages and partial last pages; T = 4 rows attend causally inside the new tokens.
CASES = [
    (1, 1, 2, 64, 16, (0, 1, 16, 77, 130), jnp.float32),
    (4, 4, 2, 128, 16, (0, 4, 16, 61), jnp.bfloat16),
    (1, 8, 1, 64, 16, (1, 200, 33), jnp.bfloat16),
    (4, 1, 1, 128, 32, (0, 32, 100), jnp.float32),
    (1, 4, 2, 128, 16, (16, 257, 1), jnp.float32),
    (4, 8, 2, 64, 16, (5, 48, 0), jnp.float32),
    (2, 2, 2, 96, 16, (3, 70, 18), jnp.bfloat16),  # head dim 96: padded Triton tiles
]


def _check(o, lse, inputs, dtype):
  kc.check(o, lse, *unique_attention_f64(*inputs), inputs[0], dtype)


def _case_id(c):
  return "T{}G{}H{}D{}ps{}n{}{}".format(*c[:5], "-".join(map(str, c[5])), jnp.dtype(c[6]).name)


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_f64(implementation, interpret, case):
  *shape, dtype = case
  inputs = kc.paged_inputs(CASES.index(case), *shape, dtype,
                           poison="finite" if implementation == "mosaic_gpu" else True)
  kc.plan_or_skip(OP, *inputs, implementation=implementation, interpret=interpret)
  o, lse = kc.run(unique_attention, *inputs, implementation=implementation, interpret=interpret)
  _check(o, lse, inputs, dtype)


@pytest.mark.parametrize("implementation,interpret,config", [
    ("triton", True, pk.TritonUniqueConfig(pages_per_block=1, num_splits=3)),
    ("triton", True, pk.TritonUniqueConfig(pages_per_block=4, num_splits=1)),
    ("mosaic_tpu", True, pk.MosaicTpuUniqueConfig(pages_per_block=1, num_splits=3)),
    ("mosaic_tpu", True, pk.MosaicTpuUniqueConfig(pages_per_block=4, num_splits=2)),
    pytest.param("triton", False, pk.TritonUniqueConfig(pages_per_block=1, num_splits=7,
                                                        num_stages=3),
                 marks=pytest.mark.skipif(not kc.ON_GPU, reason="needs a GPU")),
])
def test_explicit_configs_and_traced_lengths(implementation, interpret, config):
  """Explicit tilings (more splits than a request has blocks, one split) under jit; the same
  compiled call serves new lengths."""
  q, k, v, tables, _ = kc.paged_inputs(5, 4, 4, 2, 64, 16, (90, 30, 7), jnp.float32, poison=False)
  fn = jax.jit(lambda q, k, v, t, n: unique_attention(
      q, k, v, t, n, implementation=implementation, interpret=interpret, config=config))
  for lengths in ((90, 30, 7), (17, 0, 16)):  # within the pages each request owns
    n = jnp.asarray(lengths, jnp.int32)
    o, lse = fn(q, k, v, tables, n)
    _check(o, lse, (q, k, v, tables, n), jnp.float32)


# Every pair of (kernel, dtype, tiling case), not the full product (TPU interpret mode is slow).
_ROW_TILES = kc.pairwise({"implementation": ["triton", "mosaic_tpu"],
                          "dtype": [jnp.float32, jnp.bfloat16],
                          "case": [(9, 4, 1), (5, 8, 2), (16, 1, 3), (40, 1, 2)]})


@pytest.mark.parametrize("implementation,dtype,T,G,num_splits", [
    pytest.param(r["implementation"], r["dtype"], *r["case"],
                 id=f"{r['implementation']}-{jnp.dtype(r['dtype']).name}-{r['case']}")
    for r in _ROW_TILES])
def test_row_tiles(implementation, T, G, num_splits, dtype):
  """A prefill chunk's T*G rows cut into programs of block_m=16 rows (36 rows: three tiles, the
  last mostly padding; 40 over 2 splits; 16: one tile), causal inside the new tokens, on the
  poisoned pool; a request of exactly T tokens has early tiles that stop short of its last
  16-key blocks (T=40: the first tile reads 1 of 3)."""
  lengths = (T, 70, 3 * T + 5, 40)
  inputs = kc.paged_inputs(60 + T, T, G, 2, 64, 16, lengths, dtype)
  config = (pk.TritonUniqueConfig if implementation == "triton" else pk.MosaicTpuUniqueConfig)(
      pages_per_block=1, num_splits=num_splits, block_m=16)
  o, lse = kc.run(unique_attention, *inputs, implementation=implementation, interpret=True,
                  config=config)
  _check(o, lse, inputs, dtype)


@pytest.mark.parametrize("name", ["h100", "h200", "a100"])
@pytest.mark.parametrize("T,D,dtype", [(256, 128, jnp.bfloat16), (512, 256, jnp.bfloat16),
                                       (128, 128, jnp.float32)])
def test_prefill_chunks_plan_row_tiles_that_fit(name, T, D, dtype):
  """A prefill chunk of T tokens with Llama-3.1-8B's G=4 (T*G rows: more than one program holds
  in shared memory at D=128 from T=256 on) plans row tiles whose tiling fits the chip."""
  Hkv, page_size, max_pages = 8, 16, 256
  pool = jax.ShapeDtypeStruct((64, page_size, Hkv, D), dtype)
  plan = pk.plan(OP, jax.ShapeDtypeStruct((2, T, 4 * Hkv, D), dtype), pool, pool,
                 jax.ShapeDtypeStruct((2, max_pages), jnp.int32),
                 jax.ShapeDtypeStruct((2,), jnp.int32), implementation="triton",
                 target=name)
  c, tgt = plan.config, pk.targets.target(name)
  assert c.block_m < T * 4
  assert gpu_tuning.triton_smem_bytes(c.block_m, c.pages_per_block * page_size, D,
                                      jnp.dtype(dtype).itemsize, c.num_stages) <= tgt.smem_per_block


@pytest.mark.parametrize("name,T", [("v4", 2048), ("v5e", 8192)])
def test_tpu_prefill_chunks_plan_row_tiles_within_vmem(name, T):
  """The Mosaic TPU kernel's default row tiles keep a long prefill chunk (T*G rows of Llama-3.1-8B
  heads, far past VMEM in one block) within the chip's VMEM; a config whose tile cannot fit is
  refused when planned, naming its rows, not left to the compiler."""
  pool = jax.ShapeDtypeStruct((64, 16, 8, 128), jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((1, T, 32, 128), jnp.bfloat16), pool, pool,
          jax.ShapeDtypeStruct((1, 600), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
  plan = pk.plan(OP, *args, implementation="mosaic_tpu", target=name)
  dims = layout.AttentionDims(1, T, 32, 8, 128, 600 * 16)
  tgt = pk.targets.target(name)
  assert plan.config.block_m < 4 * T
  assert tpu_tuning.unique_vmem(dims, 16, jnp.bfloat16, plan.config) <= tgt.scoped_vmem_bytes
  whole = pk.MosaicTpuUniqueConfig(pages_per_block=8, block_m=4 * T)
  with pytest.raises(ValueError, match=f"VMEM for row tiles of {4 * T} query rows"):
    pk.plan(OP, *args, implementation="mosaic_tpu", config=whole, target=name)


@pytest.mark.parametrize("implementation", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("T", [1, 4])
def test_default_tiling_splits_on_poisoned_pool(implementation, T):
  """The default tiling at lengths long enough that it splits each request's pages (CASES are
  too short to split), on the poisoned pool: splits that cut a request unevenly, splits with no
  block, and their merge."""
  # GPU: ragged requests (4 splits). TPU splits only while one program would leave a megacore's
  # second core idle: one request whose kv heads fit one block (Hkv * D = 128), 2 splits.
  lengths = (2000, 37, 0, 1000) if implementation == "triton" else (1500,)
  inputs = kc.paged_inputs(40 + T, T, 4, 2, 64, 16, lengths, jnp.float32)
  plan = pk.plan(OP, *inputs, implementation=implementation, interpret=True, target=(
      "h100" if implementation == "triton" else "v5p"))
  assert plan.config.num_splits > 1
  o, lse = kc.run(unique_attention, *inputs, implementation=implementation, interpret=True)
  _check(o, lse, inputs, jnp.float32)


@pytest.mark.parametrize("implementation", [
    pytest.param("triton", marks=pytest.mark.skipif(not kc.ON_GPU, reason="needs a GPU")),
    pytest.param("mosaic_gpu", marks=pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper"))])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("T", [1, 4, 80])
def test_compiled_gpu_llama_heads(implementation, page_size, T):
  """The default tiling as compiled, Llama-3.1-8B heads, ragged lengths (pages of 16 and 64:
  several per Mosaic GPU tile; of 256: a tile is part of a page); T=80, a prefill chunk: 320
  rows in three Triton row tiles."""
  lengths = (0, 1, page_size, 3000, 4096, 777, 2 * page_size + 5, 4000)
  inputs = kc.paged_inputs(page_size + T, T, 4, 8, 128, page_size, lengths, jnp.bfloat16,
                           poison="finite" if implementation == "mosaic_gpu" else True)
  if implementation == "mosaic_gpu":  # T*G <= 64 only; Triton must plan every case
    kc.plan_or_skip(OP, *inputs, implementation=implementation, interpret=False)
  o, lse = kc.run(unique_attention, *inputs, implementation=implementation, interpret=False)
  _check(o, lse, inputs, jnp.bfloat16)


@pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper")
@pytest.mark.parametrize("config", [
    pk.MosaicGpuUniqueConfig(block_k=64, num_stages=2, num_splits=5),
    pk.MosaicGpuUniqueConfig(block_k=128, num_stages=3, num_splits=2)])
def test_compiled_mosaic_gpu_configs(config):
  """Explicit Mosaic GPU tilings: more splits than a request has tiles, a tile of 8 pages,
  T = 4 causal rows, a request of one token."""
  inputs = kc.paged_inputs(77, 4, 8, 2, 128, 16, (0, 1, 300, 64, 1000), jnp.bfloat16,
                           poison="finite")
  o, lse = kc.run(unique_attention, *inputs, implementation="mosaic_gpu", interpret=False,
                  config=config)
  _check(o, lse, inputs, jnp.bfloat16)


@pytest.mark.parametrize("implementation", ["triton", "mosaic_tpu"])
def test_partials_written_and_empty_splits(implementation):
  """Every split writes every query row (no NaN); a split with no valid key gives o = 0,
  lse = -inf."""
  q, k, v, tables, lengths = kc.paged_inputs(9, 1, 4, 2, 64, 16, (0, 20, 300), jnp.float32)
  T, G, Hkv, D = 1, 4, 2, 64
  q_rows = layout.fold_queries(q, Hkv).reshape(Hkv, 3, T * G, D)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, 16 - T * G), (0, 0)))
  common = dict(T=T, G=G, scale=D**-0.5, pages_per_block=1, num_splits=4)
  if implementation == "triton":
    o, lse = gpu_kernel.unique_attention_partials(q_rows, k, v, tables, lengths, block_m=16,
                                                  num_warps=4, num_stages=2, interpret=True,
                                                  **common)
  else:
    from jax.experimental.pallas import tpu as pltpu
    o, lse = tpu_kernel.unique_attention_partials(q_rows, k, v, tables, lengths, block_m=16,
                                                  interpret=pltpu.InterpretParams(), **common)
  assert o.shape == (4, Hkv, 3, 16, D) and lse.shape == (4, Hkv, 3, 16)
  o, lse = np.asarray(o)[..., :T * G, :], np.asarray(lse)[..., :T * G]  # padded rows: unused
  assert np.all(np.isfinite(o)) and not np.any(np.isnan(lse))
  # Request 0 is empty; request 1 has 2 one-page blocks (splits 2, 3 empty); request 2 fills all.
  assert np.all(np.isneginf(lse[:, :, 0])) and np.all(o[:, :, 0] == 0)
  assert np.all(np.isfinite(lse[:2, :, 1])) and np.all(np.isneginf(lse[2:, :, 1]))
  assert np.all(o[2:, :, 1] == 0)
  assert np.all(np.isfinite(lse[:, :, 2]))


@pytest.mark.parametrize("implementation", ["triton", "mosaic_tpu"])
def test_shared_plus_unique_equals_dense(implementation):
  """merge(shared_attention over [shared], unique_attention over [unique]) equals one attention
  over [shared + unique] (causal within unique) to f32 precision."""
  T, G, Hkv, D, S, lengths = 4, 4, 2, 64, 300, (4, 37, 80)
  q, k_pages, v_pages, tables, n = kc.paged_inputs(13, T, G, Hkv, D, 16, lengths, jnp.float32)
  rng = np.random.default_rng(14)
  k_s = random_normal(rng, (S, Hkv, D), jnp.float32)
  v_s = random_normal(rng, (S, Hkv, D), jnp.float32)

  @jax.jit
  def moska(q, k_s, v_s, k_pages, v_pages, tables, n):
    o_s, lse_s = shared_attention(q, k_s, v_s, implementation=implementation, interpret=True)
    o_u, lse_u = unique_attention(q, k_pages, v_pages, tables, n, implementation=implementation,
                                  interpret=True)
    return merge_attention_states(o_s, lse_s, o_u, lse_u)

  o, lse = moska(q, k_s, v_s, k_pages, v_pages, tables, n)
  B, Hq = len(lengths), G * Hkv
  kp, vp, qf = (np.asarray(x, np.float64) for x in (k_pages, v_pages, q))
  o_ref, lse_ref = np.zeros((B, T, Hq, D)), np.zeros((B, T, Hq))
  for b, u in enumerate(lengths):
    pages = np.asarray(tables)[b, :math.ceil(u / 16)]
    k = np.concatenate([np.asarray(k_s, np.float64), kp[pages].reshape(-1, Hkv, D)[:u]])
    v = np.concatenate([np.asarray(v_s, np.float64), vp[pages].reshape(-1, Hkv, D)[:u]])
    mask = np.arange(S + u)[None, :] <= S + u - T + np.arange(T)[:, None]
    for h in range(Hq):
      o_ref[b, :, h], lse_ref[b, :, h] = attention_f64(qf[b, :, h], k[:, h // G], v[:, h // G],
                                                       mask)
  assert rel_err(o, o_ref) < 1e-5
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=1e-5, atol=1e-5)


def test_write_pages_round_trip():
  """New tokens land at their positions (nothing else changes, overflow is dropped), under jit
  with the pools donated, and attention over the written pages is right."""
  T, Hkv, D, ps = 3, 2, 64, 16
  before = (0, 5, 16, 31, 62)  # the last request overflows its 4-page table by one token
  q, k_pages, v_pages, tables, _ = kc.paged_inputs(21, T, 4, Hkv, D, ps, (3, 8, 19, 34, 64),
                                                 jnp.float32, poison=False)
  tables = tables[:, :4]  # capacity 64 tokens; every write below lands in an owned page
  rng = np.random.default_rng(22)
  k_new = random_normal(rng, (5, T, Hkv, D), jnp.float32)
  v_new = random_normal(rng, (5, T, Hkv, D), jnp.float32)
  # Expected pools: copies, not np.asarray, which on CPU is a view of the device buffer, and a
  # buffer with a live external view is not donated (jax silently copies instead).
  k_exp, v_exp = np.array(k_pages), np.array(v_pages)
  ptrs = k_pages.unsafe_buffer_pointer(), v_pages.unsafe_buffer_pointer()
  donated = k_pages, v_pages
  write = jax.jit(write_pages, donate_argnums=(0, 1))
  k_pages, v_pages = write(k_pages, v_pages, tables, jnp.asarray(before, jnp.int32), k_new, v_new)
  # In place: the donated pools were consumed and the results live in their buffers. jax honors
  # donation on CPU as on GPU / TPU (checked on CPU, jax 0.10), so this is asserted on every
  # backend: a lost donation leaves the inputs alive and the step copies both pools.
  assert all(x.is_deleted() for x in donated), "donated page pools were not consumed"
  assert (k_pages.unsafe_buffer_pointer(), v_pages.unsafe_buffer_pointer()) == ptrs
  for b, n in enumerate(before):
    for t in range(T):
      pos = n + t
      if pos < 4 * ps:
        page = int(tables[b, pos // ps])
        k_exp[page, pos % ps] = k_new[b, t]
        v_exp[page, pos % ps] = v_new[b, t]
  np.testing.assert_array_equal(np.asarray(k_pages), k_exp)
  np.testing.assert_array_equal(np.asarray(v_pages), v_exp)
  lengths = jnp.asarray([n + T for n in before[:4]] + [64], jnp.int32)
  o, lse = kc.run(unique_attention, q, k_pages, v_pages, tables, lengths,
                  implementation="triton", interpret=True)
  _check(o, lse, (q, k_pages, v_pages, tables, lengths), jnp.float32)


def test_traced_lengths_past_the_table_are_clamped_alike():
  """A traced length past max_pages * page_size is clamped to it by every implementation (the
  XLA path once let T > 1 queries see past the table's last position)."""
  q, k, v, tables, _ = kc.paged_inputs(6, 4, 2, 2, 64, 8, (24, 5), jnp.float32, poison=False)
  tables = tables[:, :3]  # capacity 24
  run = lambda impl, i, n: jax.jit(lambda n: unique_attention(
      q, k, v, tables, n, implementation=impl, interpret=i))(n)
  want = run("xla", False, jnp.asarray([24, 5], jnp.int32))
  for impl, interpret in (("xla", False), ("triton", True), ("mosaic_tpu", True)):
    got = run(impl, interpret, jnp.asarray([27, 5], jnp.int32))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5, err_msg=impl)


def test_unscaled_float8_pools_saturate():
  """float8_e4m3fn has no inf: a token past its range is written as +-448, never NaN."""
  pools = jnp.zeros((4, 8, 1, 16), jnp.float8_e4m3fn)
  x = jnp.full((1, 2, 1, 16), 1000.0).at[:, 1].set(-2.0)
  k, v = write_pages(pools, pools, jnp.asarray([[1, 2]], jnp.int32), jnp.asarray([0]), x, x)
  np.testing.assert_array_equal(np.asarray(k[1, :2, 0, 0], np.float32), [448.0, -2.0])
  assert not np.any(np.isnan(np.asarray(v, np.float32)))


def test_reference_is_jittable_and_matches():
  inputs = kc.paged_inputs(3, 4, 4, 2, 64, 16, (0, 9, 40), jnp.float32)
  o, lse = jax.jit(unique_attention_ref)(*inputs)
  _check(o, lse, inputs, jnp.float32)


def test_validation_errors():
  q, k, v, tables, lengths = kc.paged_inputs(2, 1, 4, 2, 64, 16, (5, 20), jnp.float32)
  ua = unique_attention
  with pytest.raises(ValueError, match="backend must be one of"):
    ua(q, k, v, tables, lengths, backend="cuda")
  with pytest.raises(ValueError, match="the 'xla' implementation has none"):
    ua(q, k, v, tables, lengths, backend="xla", interpret=True)
  with pytest.raises(ValueError, match=r"q must have shape \[B, T, Hq, D\]"):
    ua(q[0], k, v, tables, lengths)
  with pytest.raises(ValueError, match=r"k_pages must have shape \[P, page_size, Hkv, D=64\]"):
    ua(q, k[..., :32], v[..., :32], tables, lengths)
  with pytest.raises(ValueError, match="v_pages must have the shape of k_pages"):
    ua(q, k, v[:1], tables, lengths)
  with pytest.raises(ValueError, match="Hq=8 of q must be a multiple of Hkv=3"):
    ua(q, jnp.ones((4, 16, 3, 64)), jnp.ones((4, 16, 3, 64)), tables, lengths)
  with pytest.raises(ValueError, match="k_pages and v_pages must share a dtype"):
    ua(q, k, v.astype(jnp.bfloat16), tables, lengths)
  with pytest.raises(ValueError, match="q and k_pages, v_pages must share a dtype, got q "
                     "bfloat16 and k_pages, v_pages float32"):
    ua(q.astype(jnp.bfloat16), k, v, tables, lengths, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match="q must be float32, bfloat16 or float16"):
    ua(q.astype(jnp.int32), k, v, tables, lengths)
  with pytest.raises(ValueError, match=r"block_tables must be an integer array of shape \[B=2"):
    ua(q, k, v, tables[:1], lengths)
  with pytest.raises(ValueError, match=r"block_tables must be an integer array"):
    ua(q, k, v, tables.astype(jnp.float32), lengths)
  with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \[B=2\]"):
    ua(q, k, v, tables, lengths[:1])
  with pytest.raises(ValueError, match="page_size \\* config.pages_per_block must be a power of "
                     "two >= 16, got 16 \\* 3"):
    ua(q, k, v, tables, lengths, implementation="triton", interpret=True,
       config=pk.TritonUniqueConfig(pages_per_block=3))
  with pytest.raises(ValueError, match="num_splits must be a positive int"):
    pk.TritonUniqueConfig(pages_per_block=1, num_splits=0)
  with pytest.raises(ValueError, match="page_size must be a multiple of 8"):
    ua(q, k[:, :12], v[:, :12], tables, lengths, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match=r"write_pages: k_new must have shape \[B=2, T, Hkv=2"):
    write_pages(k, v, tables, lengths, jnp.ones((2, 1, 3, 64)), jnp.ones((2, 1, 3, 64)))
