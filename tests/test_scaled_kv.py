"""Scaled float8 K/V (`pallas_kernels.quant`): every op's kernels vs float64 of the dequantized K/V.

Each kv head gets its own magnitude (so its own scale): a kernel applying one head's scale to
another shows. Keys a kernel must not read stay NaN in float8 too.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import grouping, quant, targets
from pallas_kernels.gpu import mosaic_attention, tuning as gpu_tuning, widen
from pallas_kernels.layout import AttentionDims
from tests import kernel_cases as kc
from tests.np_reference import (chunk_attention_f64, rel_err, shared_attention_f64,
                                unique_attention_f64)

FP8 = [pytest.param(jnp.float8_e4m3fn, id="e4m3"), pytest.param(jnp.float8_e5m2, id="e5m2")]
# Relative error of o / absolute of lse beyond the query dtype's (the kernels see exactly the
# dequantized values; only the folded scales round once more in the query dtype).
TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1.5e-2, 3e-2)}


def _fp8(x, dtype, head_gain):
  """x [..., Hkv, D] times a per-head gain, stored in `dtype` with per-head scales: (stored,
  k_scale, the dequantized float32 values). NaN (poison) stays NaN in the stored copy."""
  x = jnp.asarray(x, jnp.float32) * jnp.asarray(head_gain, jnp.float32)[:, None]
  nan = jnp.isnan(x)
  stored, scale = quant.quantize(jnp.where(nan, 0.0, x), dtype)
  stored = jnp.where(nan, jnp.nan, stored.astype(jnp.float32)).astype(dtype)
  return stored, scale, quant.dequantize(stored, scale)


def _check(o, lse, o_ref, lse_ref, q):
  o_tol, lse_tol = TOL[q.dtype.type]
  assert o.shape == q.shape and o.dtype == q.dtype
  assert np.all(np.isfinite(np.asarray(o, np.float32))), "unwritten or unmasked output (NaN)"
  assert rel_err(o, o_ref) < o_tol
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=lse_tol, atol=lse_tol)


def _shared(seed, dtype, fp8, G=4, Hkv=2, S=300, D=64):
  rng, q, k, v = kc.shared_inputs(seed, 3, 2, G, Hkv, D, S, jnp.float32)
  gains = 1.0 + 3.0 * np.arange(Hkv)
  k8, ks, kd = _fp8(k, fp8, gains)
  v8, vs, vd = _fp8(v, fp8, gains[::-1])
  return rng, q.astype(dtype), (k8, ks, kd), (v8, vs, vd)


# Query dtype x float8 format x implementation, pairwise: every implementation meets both query
# dtypes and both formats, and every (dtype, format) pair runs.
@pytest.mark.parametrize("implementation,interpret,dtype,fp8", kc.implementations_pairwise(
    "shared_attention", dtype={"bf16": jnp.bfloat16, "f32": jnp.float32},
    fp8={"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}))
def test_shared_attention(implementation, interpret, dtype, fp8):
  _, q, (k8, ks, kd), (v8, vs, vd) = _shared(0, dtype, fp8)
  kc.plan_or_skip("shared_attention", q, k8, v8, k_scale=ks, v_scale=vs,
                  implementation=implementation, interpret=interpret)
  n = 250  # keys past kv_length poisoned
  k8, v8 = (kc.poison_outside(x, np.arange(x.shape[0])[:, None] < n) for x in (k8, v8))
  o, lse = kc.run(pk.shared_attention, q, k8, v8, k_scale=ks, v_scale=vs, kv_length=jnp.int32(n),
                  implementation=implementation, interpret=interpret)
  _check(o, lse, *shared_attention_f64(q, kd, vd, n), q)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("implementation,interpret", kc.implementations("chunk_attention"))
def test_chunk_attention(implementation, interpret, dtype):
  C, K = 128, 2
  rng, q, (k8, ks, kd), (v8, vs, vd) = _shared(1, dtype, jnp.float8_e4m3fn, G=8, Hkv=2, S=600)
  N = -(-k8.shape[0] // C)
  ids = kc.random_ids(rng, q.shape[0], 2, N, K, pattern="shaped")
  keep = np.asarray(grouping.selected_chunks(ids, N)).any(0).T[np.arange(k8.shape[0]) // C]
  kc.plan_or_skip("chunk_attention", q, k8, v8, ids, chunk_size=C, k_scale=ks, v_scale=vs,
                  implementation=implementation, interpret=interpret)
  o, lse = kc.run(pk.chunk_attention, q, kc.poison_outside(k8, keep),
                  kc.poison_outside(v8, keep), ids, chunk_size=C, k_scale=ks, v_scale=vs,
                  implementation=implementation, interpret=interpret)
  _check(o, lse, *chunk_attention_f64(q, kd, vd, ids, C), q)


@pytest.mark.parametrize("implementation,interpret", kc.implementations("tile_chunk_attention"))
def test_tile_chunk_attention(implementation, interpret):
  C, K, R = 64, 2, 3
  # mosaic_gpu reads float8 rows of 128 bytes and whole 128-key tiles (two chunks of 64 each)
  shape = dict(S=512, D=128) if implementation == "mosaic_gpu" else {}
  rng, q, (k8, ks, kd), (v8, vs, vd) = _shared(2, jnp.bfloat16, jnp.float8_e4m3fn, G=1, **shape)
  N = -(-k8.shape[0] // C)
  tiles = grouping.tile_union(kc.random_ids(rng, q.shape[0], 2, N, K), N, R)
  o, lse = kc.run(pk.tile_chunk_attention, q, k8, v8, tiles, chunk_size=C, k_scale=ks,
                  v_scale=vs, implementation=implementation, interpret=interpret)
  per_request = np.repeat(np.asarray(tiles), q.shape[0] // tiles.shape[0], axis=0)
  _check(o, lse, *chunk_attention_f64(q, kd, vd, per_request, C), q)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("implementation,interpret", kc.implementations("unique_attention"))
def test_unique_attention(implementation, interpret, fp8):
  """The page pool's unowned slots stay NaN in float8 (8 for mosaic_gpu, which reads the tile
  holding a length whole): a read past a length shows."""
  q, k_pages, v_pages, tables, lengths = kc.paged_inputs(
      3, 2, 4, 2, 128 if implementation == "mosaic_gpu" else 64, 16, (0, 2, 16, 77), jnp.float32,
      poison="finite" if implementation == "mosaic_gpu" else True)
  gains = np.array([0.5, 4.0])
  k8, ks, kd = _fp8(k_pages, fp8, gains)
  v8, vs, vd = _fp8(v_pages, fp8, gains[::-1])
  q = q.astype(jnp.bfloat16)
  o, lse = kc.run(pk.unique_attention, q, k8, v8, tables, lengths, k_scale=ks, v_scale=vs,
                  implementation=implementation, interpret=interpret)
  o_ref, lse_ref = unique_attention_f64(q, kd, vd, tables, lengths)
  live = np.asarray(lengths) > 0  # an empty slot gives lse = -inf, checked apart
  _check(o[live], lse[live], o_ref[live], lse_ref[live], q[live])
  assert np.all(np.asarray(lse)[~live] == -np.inf) and np.all(np.asarray(o)[~live] == 0)


def test_quantize_round_trip_per_head():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((50, 3, 64)) * np.array([1e-3, 1.0, 1e3])[:, None])
  x = x.at[:, 2].set(0.0)  # an all-zero head: scale 1, stored zeros
  for dtype, rel in ((jnp.float8_e4m3fn, 2 ** -3), (jnp.float8_e5m2, 2 ** -2)):
    stored, scale = quant.quantize(x, dtype)
    assert stored.dtype == dtype and scale.shape == (3,) and scale.dtype == jnp.float32
    assert scale[2] == 1.0 and not np.any(np.asarray(stored[:, 2], np.float32))
    back = np.asarray(quant.dequantize(stored, scale), np.float64)
    for h in range(2):  # elementwise within the format's relative step (normal range)
      big = np.abs(np.asarray(x[:, h])) > 1e-2 * float(np.abs(x[:, h]).max())
      assert np.all(np.abs(back[:, h] - x[:, h])[big] <= rel * np.abs(np.asarray(x[:, h]))[big])
  with pytest.raises(ValueError, match="dtype must be one of"):
    quant.quantize(x, jnp.int8)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_split_rows_carries_bfloat16_precision(dtype):
  """The float8 terms the Mosaic GPU kernel multiplies K by: each row's terms sum (times its
  power-of-two inverse scale) to the row within bfloat16's rounding of its largest magnitude,
  for rows of any magnitude; one term alone is float8's coarse step; a NaN stays NaN."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 40, 128)) * np.logspace(-30, 30, 40)[None, :, None]
  x[1, 7, 5] = np.nan
  terms, inv = quant.split_rows(jnp.asarray(x, jnp.float32), dtype, mosaic_attention.Q_TERMS[
      jnp.dtype(dtype)])
  assert terms.dtype == dtype and inv.shape == x.shape[:-1] and inv.dtype == jnp.float32
  assert np.all(np.log2(np.asarray(inv)) == np.round(np.log2(np.asarray(inv))))
  sums = np.asarray(terms, np.float64).sum(0) * np.asarray(inv, np.float64)[..., None]
  assert np.isnan(sums[1, 7, 5])
  ok = ~np.isnan(x).any(-1)
  err = (np.abs(sums - x).max(-1) / np.abs(x).max(-1))[ok]
  one = (np.abs(np.asarray(terms[0], np.float64) * np.asarray(inv)[..., None] - x).max(-1)
         / np.abs(x).max(-1))[ok]
  assert err.max() < 2 ** -8 and one.max() > 2 ** -7


def test_scale_validation():
  _, q, (k8, ks, _), (v8, vs, _) = _shared(5, jnp.bfloat16, jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="give k_scale and v_scale together"):
    pk.shared_attention(q, k8, v8, k_scale=ks)
  with pytest.raises(ValueError, match=r"k_scale must be a float array of shape \[Hkv=2\]"):
    pk.shared_attention(q, k8, v8, k_scale=ks[:1], v_scale=vs)
  with pytest.raises(ValueError, match="v_scale must be a float array"):
    pk.shared_attention(q, k8, v8, k_scale=ks, v_scale=jnp.ones(2, jnp.int32))
  for bad in (0.0, -1.0, float("nan"), float("inf")):  # a concrete scale must dequantize
    with pytest.raises(ValueError, match=r"k_scale must be finite and > 0 .*got \[1.0, "):
      pk.shared_attention(q, k8, v8, k_scale=jnp.asarray([1.0, bad]), v_scale=vs)
  jax.jit(lambda ks: pk.shared_attention(q, k8, v8, k_scale=ks, v_scale=vs))(ks)  # traced
  with pytest.raises(ValueError, match="q must be"):
    pk.shared_attention(q.astype(jnp.float8_e4m3fn), k8, v8, k_scale=ks, v_scale=vs)
  with pytest.raises(ValueError, match="must share a dtype"):
    pk.shared_attention(q, k8, v8.astype(jnp.float8_e5m2), k_scale=ks, v_scale=vs)


def test_mosaic_gpu_takes_float8_kv_with_128_byte_rows():
  """Mosaic GPU copies float8 tiles as stored and widens them per consumer: head dims that fill
  128-byte rows (128, 256); other K/V dtypes than the query's or float8 are refused."""
  dims = AttentionDims(B=64, T=1, Hq=32, Hkv=8, D=128, S=4096)
  h100 = targets.target("h100")
  for fp8 in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    assert gpu_tuning.mosaic_unsupported(dims, jnp.bfloat16, 128, 4, h100, False, kv_dtype=fp8,
                                         consumers=1) is None
    assert gpu_tuning.mosaic_unsupported(dims, jnp.bfloat16, 64, 4, h100, False, kv_dtype=fp8,
                                         consumers=2) is None
  why = gpu_tuning.mosaic_unsupported(dims._replace(D=64), jnp.bfloat16, 128, 2, h100, False,
                                      kv_dtype=jnp.float8_e4m3fn, consumers=1)
  assert "multiple of 128" in why
  why = gpu_tuning.mosaic_unsupported(dims, jnp.bfloat16, 128, 2, h100, False,
                                      kv_dtype=jnp.float16, consumers=1)
  assert "query dtype or float8" in why
  assert gpu_tuning.shared_implementation(dims, jnp.bfloat16, h100, False,
                                          kv_dtype=jnp.float8_e4m3fn) == "mosaic_gpu"


def test_float8_kv_widened_in_hbm_from_many_rows():
  """From FP8_WIDEN_MIN_ROWS_MOSAIC rows the Mosaic GPU plan widens float8 V (e4m3 keys: two
  query terms) or K/V (e5m2) before the kernel where its pair reads them as float8 in 128-key
  tiles; from FP8_WIDEN_MIN_ROWS rows K/V where it cannot (D=80's rows are not 128 bytes;
  D=256's three e5m2 query terms do not fit beside its ring, two e4m3 ones do in 64-key tiles),
  tiled as K/V in the query dtype (head dims of 16-byte multiples then run too); below, the
  kernel reads them as float8; widen_kv / widen_v on K/V that are not float8, both at once, or a
  V tile that does not fit are refused; a sweep has every widening."""
  h100 = targets.target("h100")
  e4m3, e5m2 = jnp.float8_e4m3fn, jnp.float8_e5m2
  assert gpu_tuning.FP8_WIDEN_MIN_ROWS < gpu_tuning.FP8_WIDEN_MIN_ROWS_MOSAIC
  in_kernel, widened_first = gpu_tuning.FP8_WIDEN_MIN_ROWS_MOSAIC, gpu_tuning.FP8_WIDEN_MIN_ROWS
  for D, fp8, rows, what in ((128, e4m3, in_kernel, "v"), (128, e5m2, in_kernel, "kv"),
                             (256, e4m3, widened_first, "kv"), (256, e5m2, widened_first, "kv"),
                             (80, e4m3, widened_first, "kv")):
    for B, widened in ((rows // 4 - 1, False), (rows // 4, True)):  # G = 4: M = 4 B
      dims = AttentionDims(B=B, T=1, Hq=32, Hkv=8, D=D, S=1 << 20)
      c = gpu_tuning.mosaic_shared(dims, jnp.bfloat16, h100, kv_dtype=fp8)
      assert (c.widen_kv, c.widen_v) == (widened and what == "kv", widened and what == "v")
      if c.widen_kv:
        assert c == dataclasses.replace(
            gpu_tuning.mosaic_shared(dims, jnp.bfloat16, h100, kv_dtype=jnp.bfloat16),
            widen_kv=True)
      runs = gpu_tuning.mosaic_shared_unsupported(dims, jnp.bfloat16, c, h100, False,
                                                  kv_dtype=fp8) is None
      assert runs == (D == 128 or (D, fp8) == (256, e4m3) or widened)
      assert (gpu_tuning.shared_implementation(dims, jnp.bfloat16, h100, False, kv_dtype=fp8)
              == ("mosaic_gpu" if runs else "triton"))
      swept = gpu_tuning.mosaic_shared_candidates(dims, jnp.bfloat16, h100, kv_dtype=fp8)
      assert {(x.widen_kv, x.widen_v) for x in swept} == {(False, False), (True, False),
                                                           (False, True)}
  for knob_name in ("widen_kv", "widen_v"):
    c = dataclasses.replace(c, widen_kv=knob_name == "widen_kv", widen_v=knob_name == "widen_v")
    why = gpu_tuning.mosaic_shared_unsupported(dims, jnp.bfloat16, c, h100, False,
                                               kv_dtype=jnp.bfloat16)
    assert f"{knob_name} needs float8 K/V, got bfloat16" in why
    with pytest.raises(ValueError, match=f"{knob_name} needs float8 K/V, got bfloat16"):
      gpu_tuning.mosaic_shared(dims, jnp.bfloat16, h100, kv_dtype=jnp.bfloat16,
                               **{knob_name: True})
  with pytest.raises(ValueError, match="set at most one of widen_kv and widen_v"):
    pk.MosaicGpuSharedConfig(widen_kv=True, widen_v=True)
  # A ring that fits float8 slots but not bf16 ones: the refusal says the K/V were widened.
  c = pk.MosaicGpuSharedConfig(block_k=128, num_stages=4, consumers=1)
  assert gpu_tuning.mosaic_shared_unsupported(dims._replace(D=128), jnp.bfloat16, c, h100, False,
                                              kv_dtype=fp8) is None
  why = gpu_tuning.mosaic_shared_unsupported(dims._replace(D=128), jnp.bfloat16,
                                             dataclasses.replace(c, widen_kv=True), h100, False,
                                             kv_dtype=fp8)
  assert "shared memory" in why and "(config.widen_kv: K/V widened to bfloat16)" in why
  # D=256: the pair's two query terms, two o tiles and two slots of float8 K + float16 V do not
  # fit (228 KiB); only V widened is refused, saying so.
  c = gpu_tuning.mosaic_shared(dims._replace(D=256), jnp.bfloat16, h100, kv_dtype=e4m3,
                               widen_v=True)
  why = gpu_tuning.mosaic_shared_unsupported(dims._replace(D=256), jnp.bfloat16, c, h100, False,
                                             kv_dtype=e4m3)
  assert "shared memory" in why and "(config.widen_v: V widened to float16)" in why


def test_triton_float8_kv_widened_from_many_rows():
  """The Triton plan (other GPUs) widens float8 K/V in one pass from FP8_WIDEN_MIN_ROWS rows of
  16-bit queries, as the Mosaic GPU one does, with the tiling of K/V in the query dtype (float32
  queries would take a copy of four times the float8 bytes: not unless asked); its sweep has
  both settings; widen_kv on K/V that are not float8 is refused, and by tile_chunk_attention,
  whose kernel widens in registers only."""
  a100, fp8 = targets.target("a100"), jnp.float8_e4m3fn
  rows = gpu_tuning.FP8_WIDEN_MIN_ROWS
  for B, widened in ((rows // 4 - 1, False), (rows // 4, True)):  # G = 4: M = 4 B
    dims = AttentionDims(B=B, T=1, Hq=32, Hkv=8, D=128, S=1 << 20)
    c = gpu_tuning.triton_shared(dims, jnp.bfloat16, a100, kv_dtype=fp8)
    assert c == dataclasses.replace(gpu_tuning.triton_shared(dims, jnp.bfloat16, a100),
                                    widen_kv=widened)
    assert gpu_tuning.triton_shared_unsupported(dims, jnp.bfloat16, c, a100,
                                                kv_dtype=fp8) is None
    swept = gpu_tuning.triton_shared_candidates(dims, jnp.bfloat16, a100, kv_dtype=fp8)
    assert {x.widen_kv for x in swept} == {False, True}
  assert not any(x.widen_kv for x in gpu_tuning.triton_shared_candidates(dims, jnp.bfloat16, a100))
  assert not gpu_tuning.triton_shared(dims, jnp.float32, a100, kv_dtype=fp8).widen_kv
  assert gpu_tuning.triton_shared(dims, jnp.float32, a100, kv_dtype=fp8, widen_kv=True).widen_kv
  _, q, k, v = kc.shared_inputs(1, 4, 1, 4, 2, 64, 256, jnp.bfloat16)
  k8, ks, _ = _fp8(k, fp8, np.ones(2))
  v8, vs, _ = _fp8(v, fp8, np.ones(2))
  tiles = jnp.zeros((2, 2, 1), jnp.int32)
  tile_config = pk.TritonSharedConfig(block_m=16, block_k=64, widen_kv=True)
  with pytest.raises(ValueError, match="tile_chunk_attention widens float8 K/V only in its kernel"):
    pk.tile_chunk_attention(q, k8, v8, tiles, chunk_size=128, k_scale=ks, v_scale=vs,
                            implementation="triton", config=tile_config, interpret=True)
  why = gpu_tuning.triton_shared_unsupported(dims, jnp.bfloat16, c, a100, kv_dtype=jnp.bfloat16)
  assert "widen_kv needs float8 K/V, got bfloat16" in why
  with pytest.raises(ValueError, match="widen_kv needs float8 K/V, got bfloat16"):
    gpu_tuning.triton_shared(dims, jnp.bfloat16, a100, kv_dtype=jnp.bfloat16, widen_kv=True)


def _outside_kernels(jaxpr) -> set[str]:
  """Primitive names of a jaxpr and of the jitted calls in it (an op runs in one), not of the
  kernels' bodies."""
  names = set()
  for e in jaxpr.eqns:
    names.add(e.primitive.name)
    if e.primitive.name in ("jit", "pjit"):
      names |= _outside_kernels(e.params["jaxpr"].jaxpr)
  return names


@pytest.mark.parametrize("n", [None, 250, 0], ids=["static", "traced", "traced-empty"])
def test_triton_widened_float8_kv_interpreted(n):
  """The widened path (one pass, then the kernel on K/V in the query dtype) on the Triton kernel
  in interpret mode: a static kv_length, a traced one (the pass inside a cond on kv_length > 0)
  and a traced 0 (the cond's empty branch: o = 0, lse = -inf)."""
  _, q, (k8, ks, kd), (v8, vs, vd) = _shared(5, jnp.bfloat16, jnp.float8_e5m2)
  dims = AttentionDims(B=q.shape[0], T=q.shape[1], Hq=q.shape[2], Hkv=k8.shape[1], D=q.shape[3],
                       S=k8.shape[0])
  config = gpu_tuning.triton_shared(dims, q.dtype, targets.target("h100"), kv_dtype=k8.dtype,
                                    widen_kv=True)
  if n:  # keys past kv_length poisoned
    k8, v8 = (kc.poison_outside(x, np.arange(x.shape[0])[:, None] < n) for x in (k8, v8))
  o, lse = kc.run(pk.shared_attention, q, k8, v8, k_scale=ks, v_scale=vs,
                  kv_length=None if n is None else jnp.int32(n), implementation="triton",
                  config=config, interpret=True)
  if n == 0:
    assert np.all(np.asarray(o, np.float32) == 0) and np.all(np.isneginf(np.asarray(lse)))
  else:
    _check(o, lse, *shared_attention_f64(q, kd, vd, n), q)
  # The pass ran: its barrier (and, with a traced kv_length, its cond) are in the program; the
  # kernel alone holds neither.
  top = lambda c: _outside_kernels(jax.make_jaxpr(
      lambda k, v: pk.shared_attention(q, k, v, k_scale=ks, v_scale=vs, implementation="triton",
                                       kv_length=None if n is None else jnp.int32(n), config=c,
                                       interpret=True))(k8, v8).jaxpr)
  widened = "optimization_barrier" if n is None else "cond"
  assert widened in top(config)
  assert widened not in top(dataclasses.replace(config, widen_kv=False))


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.skipif(
    not kc.ON_GPU, reason="needs a GPU"))], ids=["interpret", "compiled"])
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("wide", [jnp.float16, jnp.bfloat16, jnp.float32],
                         ids=["f16", "bf16", "f32"])
def test_widen_pass_is_exact_on_every_code(fp8, wide, interpret):
  """`widen.widen` (the pass before a widened kernel): every float8 code, in shapes whose size is
  not a multiple of its block (a masked last block) and smaller than one, gives the value NumPy
  gives (NaN where NaN: the interpreter may drop a NaN's sign; compiled, e5m2's inf and NaN
  codes are where Triton's direct conversion to bfloat16 went wrong). Codes of zero are left
  out, so an element the pass did not write (zero or NaN in interpret mode) shows."""
  codes = np.arange(256, dtype=np.uint8)
  codes = codes[(codes & 0x7F) != 0]
  rng = np.random.default_rng(7)
  for shape in [(3, 5, 7), (widen.BLOCK * 2 + 37, 3), codes.shape]:
    x = jnp.asarray(rng.choice(codes, size=shape) if shape != codes.shape else codes).view(fp8)
    got = jax.jit(lambda x: widen.widen(x, wide, interpret=interpret))(x)
    assert got.shape == x.shape and got.dtype == wide
    # NumPy's float8 -> float32 (ml_dtypes) is exact: the reference never runs on the device
    out, ref = np.asarray(got.astype(jnp.float32)).ravel(), np.asarray(x).astype(np.float32).ravel()
    wrong = (out != ref) & ~(np.isnan(out) & np.isnan(ref))
    raw = np.asarray(x.view(jnp.uint8)).ravel()
    assert not wrong.any(), sorted({(hex(c), o, r) for c, o, r in zip(
        raw[wrong], out[wrong], ref[wrong])})[:8]
  with pytest.raises(ValueError, match="x.dtype must be one of"):
    widen.widen(jnp.ones((4,), jnp.bfloat16), wide)
  with pytest.raises(ValueError, match="dtype must be one of"):
    widen.widen(jnp.ones((4,), fp8), jnp.int8)


# e5m2's +inf and a NaN code, e4m3's NaN code: (format, code byte, what the output must be)
SPECIAL_CODES = [pytest.param(jnp.float8_e5m2, 0x7C, np.inf, id="e5m2-inf"),
                 pytest.param(jnp.float8_e5m2, 0x7E, np.nan, id="e5m2-nan"),
                 pytest.param(jnp.float8_e4m3fn, 0x7F, np.nan, id="e4m3-nan")]


@pytest.mark.parametrize("fp8,code,expect", SPECIAL_CODES)
@pytest.mark.parametrize("implementation,interpret", kc.implementations("shared_attention"))
def test_special_float8_codes_reach_the_output(implementation, interpret, fp8, code, expect):
  """An inf or NaN stored in one valid V element reaches exactly its output column of its kv
  head's query heads, as the dequantized reference says (P > 0 for every key); a NaN key makes
  its kv head's outputs NaN. A widening that maps such codes to numbers (Triton's e5m2 ->
  bfloat16 did) leaves them finite. D=128: the float8 rows Mosaic GPU reads."""
  rng, q, k, v = kc.shared_inputs(11, 2, 1, 4, 2, 128, 200, jnp.float32)
  k8, ks = quant.quantize(k, fp8)
  v8, vs = quant.quantize(v, fp8)
  special = jnp.asarray(np.uint8(code)).view(fp8)
  run = lambda k8, v8: np.asarray(kc.run(
      pk.shared_attention, q.astype(jnp.bfloat16), k8, v8, k_scale=ks, v_scale=vs,
      implementation=implementation, interpret=interpret)[0], np.float32)
  o = run(k8, v8.at[37, 1, 5].set(special))  # [B, T, Hq, D]; kv head 1 = query heads 4..7
  hit = np.zeros(o.shape, bool)
  hit[:, :, 4:, 5] = True
  assert np.all(np.isfinite(o[~hit]))
  assert np.all(np.isnan(o[hit])) if np.isnan(expect) else np.all(np.isposinf(o[hit]))
  o = run(k8.at[100, 0, 9].set(jnp.asarray(np.uint8(0x7F)).view(fp8)), v8)  # a NaN key
  assert np.all(np.isnan(o[:, :, :4])) and np.all(np.isfinite(o[:, :, 4:]))


def test_float8_pages_run_on_mosaic_gpu_on_hopper():
  """"auto" runs float8 pages on Mosaic GPU on Hopper (QK^T on the FP8 tensor cores,
  fp8_unique.md) in long tables (from 16K keys with pages of 64, 64K with smaller pages:
  unique_crossover.md) where a request's rows fit its 64-row tile; Triton elsewhere (short
  tables, other GPUs, prefill chunks), with three stages for float8; pages in the query dtype
  stay on Triton."""
  sds = jax.ShapeDtypeStruct
  B, Hkv, D = 8, 8, 128
  scales = dict(k_scale=sds((Hkv,), jnp.float32), v_scale=sds((Hkv,), jnp.float32))

  def plan(T, kv_dtype, target, keys=65536, page_size=16):
    pages = keys // page_size
    pool = sds((B * pages + 1, page_size, Hkv, D), kv_dtype)
    return pk.plan("unique_attention", sds((B, T, 4 * Hkv, D), jnp.bfloat16), pool, pool,
                   sds((B, pages), jnp.int32), sds((B,), jnp.int32), backend="gpu",
                   target=target, **(scales if quant.is_fp8(kv_dtype) else {}))

  for fp8 in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    assert plan(1, fp8, "h200").implementation == "mosaic_gpu"
    assert plan(1, fp8, "h200", keys=16384, page_size=64).implementation == "mosaic_gpu"
    for keys, page_size in ((65536 - 16, 16), (16384, 32), (16384 - 64, 64)):  # short tables
      assert plan(1, fp8, "h200", keys, page_size).implementation == "triton"
    p = plan(1, fp8, "a100")
    assert (p.implementation, p.config.num_stages) == ("triton", 3)
    assert plan(32, fp8, "h200").implementation == "triton"  # a prefill chunk's 128 rows
  p = plan(1, jnp.bfloat16, "a100")
  assert (p.implementation, p.config.num_stages) == ("triton", 2)
  assert plan(1, jnp.bfloat16, "h200").implementation == "triton"


@pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper")
# (D, widen, fp8): float8 rows of 80 bytes have no in-kernel (float8) tiling on Mosaic GPU,
# only the widened one; at D=256 only e4m3's two query terms fit beside the ring
@pytest.mark.parametrize("D,widen,fp8", [
    pytest.param(D, widen, fp8.values[0], id=f"{D}-{widen or 'none'}-{fp8.id}")
    for D, widen in ((128, ""), (128, "kv"), (128, "v"), (80, "kv"), (256, "")) for fp8 in FP8
    if (D, fp8.id) != (256, "e5m2")])
@pytest.mark.parametrize("B", [3, 40])  # M=24: split_keys (one consumer widened); 320: a pair
def test_mosaic_gpu_float8_kv_compiled(B, fp8, D, widen):
  """Float8 K/V on Mosaic GPU, in the kernel (QK^T on the FP8 tensor cores with the queries as
  float8 terms: the first term alone would miss the tolerance by 4-5x), widened first, or with
  only V widened first (widen "v")."""
  rng, q, k, v = kc.shared_inputs(7, B, 2, 4, 2, D, 1024, jnp.float32)
  gains = 1.0 + 3.0 * np.arange(2)
  k8, ks, kd = _fp8(k, fp8, gains)
  v8, vs, vd = _fp8(v, fp8, gains[::-1])
  n = 700  # a cut inside a key tile; keys past it large (finite: mosaic_gpu reads the tile)
  far = (np.arange(k8.shape[0]) >= n)[:, None, None]
  k8, v8 = (jnp.where(far, jnp.asarray(240.0, x.dtype), x) for x in (k8, v8))
  q = q.astype(jnp.bfloat16)
  config = gpu_tuning.mosaic_shared(AttentionDims(B=B, T=2, Hq=8, Hkv=2, D=D, S=1024),
                                    jnp.bfloat16, targets.current("gpu"), kv_dtype=fp8,
                                    widen_kv=widen == "kv", widen_v=widen == "v")
  o, lse = kc.run(pk.shared_attention, q, k8, v8, k_scale=ks, v_scale=vs, kv_length=jnp.int32(n),
                  implementation="mosaic_gpu", config=config, interpret=False)
  _check(o, lse, *shared_attention_f64(q, kd, vd, kv_length=n), q)
