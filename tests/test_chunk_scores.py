"""chunk_scores (the router's scorer), every implementation vs a float64 NumPy reference, and its
top-k against NumPy's top-k of the same scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import chunk_scores, sketch
from pallas_kernels.chunk_scores import quantize_rows
from tests import kernel_cases as kc

OP = "chunk_scores"


def scores_f64(q, codes, scale, C, kv_length=None):
  """max over the valid keys of each chunk of scale * (q . code), float64; packed codes unpacked
  by hand (low nibble = dim j, high nibble = dim j + D/2, two's complement), 8-bit codes as is;
  per-chunk scales [N, Hkv] given to each of the chunk's keys."""
  q, scale = np.asarray(q, np.float64), np.asarray(scale, np.float64)
  if scale.shape[0] != codes.shape[0]:
    scale = np.repeat(scale, C, axis=0)[:codes.shape[0]]
  b = np.asarray(codes).astype(np.int64)
  lo, hi = b & 15, b >> 4
  code = b if b.shape[-1] == q.shape[-1] else np.concatenate(
      [np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)], -1)
  B, T, Hq, D = q.shape
  S, Hkv, _ = code.shape
  G, n, N = Hq // Hkv, S if kv_length is None else kv_length, -(-S // C)
  out = np.full((B, T, Hq, N), -np.inf)
  for h in range(Hq):
    logit = q[:, :, h] @ (code[:, h // G] * scale[:, h // G, None]).T  # [B, T, S]
    for c in range(N):
      keys = slice(c * C, min((c + 1) * C, n))
      if keys.stop > keys.start:
        out[:, :, h, c] = logit[..., keys].max(-1)
  return out


def _inputs(seed, B, T, G, Hkv, D, S, dtype, bits=4, chunk_scale=0):
  """Random queries, scales and codes: packed 4-bit ([S, Hkv, D/2]) or 8-bit ([S, Hkv, D]);
  scales per key [S, Hkv], or per chunk [N, Hkv] with chunk_scale = C."""
  rng = np.random.default_rng(seed)
  q = kc.random_normal(rng, (B, T, G * Hkv, D), dtype)
  if bits == 4:
    codes = sketch.pack(jnp.asarray(rng.integers(-7, 8, (S, Hkv, D))))
  else:
    codes = jnp.asarray(rng.integers(-127, 128, (S, Hkv, D)), jnp.int8)
  rows = -(-S // chunk_scale) if chunk_scale else S
  scale = jnp.asarray(rng.uniform(0.05, 1.0, (rows, Hkv)), jnp.float32)
  if chunk_scale:
    scale = scale.at[0].set(0.0)  # a chunk whose keys all sketch to 0 scores 0, not NaN
  return q, codes, scale


# (B, T, G, Hkv, D, S, C, kv_length, dtype, bits, scales): partial last chunks, kv_length inside
# a chunk, GQA 1/4/8, chunk sizes the TPU kernel takes (multiples of 128) and ones it refuses,
# packed 4-bit and 8-bit codes (the widths of PCA sketches: 32, 64), scales per key or per chunk
# (the 8-bit sketches' layout).
CASES = [
    (3, 1, 4, 2, 64, 1000, 128, None, jnp.float32, 4, "key"),
    (3, 1, 2, 2, 80, 640, 128, 600, jnp.bfloat16, 4, "key"),  # head dim 80: 40-byte rows, padded
    (2, 2, 8, 1, 128, 1280, 256, 1100, jnp.float32, 4, "key"),
    (5, 1, 1, 2, 64, 777, 64, 700, jnp.bfloat16, 4, "chunk"),
    (17, 1, 4, 1, 128, 2048, 512, 2000, jnp.bfloat16, 4, "key"),
    (3, 1, 4, 2, 64, 1000, 128, 900, jnp.float32, 8, "chunk"),
    (9, 1, 8, 2, 32, 1300, 256, None, jnp.bfloat16, 8, "chunk"),
    (2, 3, 1, 1, 64, 700, 64, 650, jnp.bfloat16, 8, "key"),
    (4, 1, 4, 2, 80, 1111, 128, 1111, jnp.bfloat16, 8, "chunk"),  # 80-wide 8-bit rows, padded
    (2, 1, 4, 2, 64, 100, 128, 90, jnp.float32, 4, "key"),  # fewer keys than one chunk / tile
]


def _case_id(c):
  return "B{}T{}G{}H{}D{}S{}C{}n{}{}-{}bit-per-{}".format(*c[:8], jnp.dtype(c[8]).name, *c[9:])


@pytest.mark.parametrize("implementation,interpret", kc.implementations(OP))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_f64(implementation, interpret, case):
  *shape, C, kv_length, dtype, bits, scales = case
  q, codes, scale = _inputs(CASES.index(case), *shape, dtype, bits,
                            chunk_scale=C if scales == "chunk" else 0)
  n = None if kv_length is None else jnp.int32(kv_length)
  kc.plan_or_skip(OP, q, codes, scale, chunk_size=C, kv_length=n, implementation=implementation,
                  interpret=interpret)
  out = kc.run(chunk_scores, q, codes, scale, chunk_size=C, kv_length=n,
               implementation=implementation, interpret=interpret)
  ref = scores_f64(q, codes, scale, C, kv_length)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  finite = np.isfinite(ref)
  assert np.array_equal(np.isfinite(np.asarray(out)), finite), "a chunk's validity differs"
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16 queries: bf16 products
  np.testing.assert_allclose(np.asarray(out)[finite], ref[finite], rtol=tol, atol=tol * 10)
  # The router's choice: top-k of the scores maxed over a request's rows equals NumPy's, except
  # where two chunks' scores are within the tolerance (ties).
  K = min(3, ref.shape[-1] - 1)  # (one chunk: nothing to rank)
  got = np.asarray(jax.lax.top_k(jnp.max(out, axis=(1, 2)), K)[1])
  best = ref.max(axis=(1, 2))
  for b in range(best.shape[0] if K else 0):
    order = np.argsort(-best[b])
    clear = best[b, order[K - 1]] - best[b, order[K]] > 4 * tol * max(1, abs(best[b, order[K]]))
    if clear:
      assert set(got[b]) == set(order[:K]), (b, got[b], order[:K])


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.skipif(
    not kc.ON_GPU, reason="needs a GPU"))])
@pytest.mark.parametrize("implementation", ["xla", "triton", "mosaic_gpu", "mosaic_tpu"])
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_matrix_unit_path(implementation, interpret, bits):
  """int8 query rows score within the quantization error of the float reference, and every
  implementation agrees with the int8 reference (integer dots are exact). 8-bit codes with
  per-chunk scales (their layout): integer maxima, and kv_length inside a key tile."""
  if implementation == "mosaic_gpu":
    if interpret or bits == 4 or not kc.ON_HOPPER:
      pytest.skip("Mosaic GPU: compiled, on Hopper, 8-bit codes only")
  elif implementation != "triton" and not interpret:
    pytest.skip("compiled here: the GPU kernels only")
  q, codes, scale = _inputs(7, 4, 1, 4, 2, 128, 1024, jnp.bfloat16, bits,
                            chunk_scale=128 if bits == 8 else 0)
  n = jnp.int32(1000)
  run = lambda impl, i: kc.run(chunk_scores, q, codes, scale, chunk_size=128, int8=True,
                               kv_length=n, implementation=impl, interpret=i)
  out = np.asarray(run(implementation, interpret and implementation != "xla"))
  ref = scores_f64(q, codes, scale, 128, 1000)
  assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
  # The rows as quantized (each within half a step of q, steps of max |q| / 127; a tie at half a
  # step may round either way), scored in float64: the kernels must score exactly those rows.
  codes_q, step = (np.asarray(x, np.float64) for x in quantize_rows(q))
  rows = codes_q * step[..., None]
  q64 = np.asarray(q, np.float64)
  assert np.all(np.abs(rows - q64) <= 0.5001 * step[..., None]) and np.abs(codes_q).max() == 127
  np.testing.assert_allclose(step, np.abs(q64).max(-1) / 127, rtol=1e-6)
  int8_ref = scores_f64(rows, codes, scale, 128, 1000)
  assert np.abs(out - int8_ref).max() <= 1e-4 * np.abs(ref).max()
  assert np.abs(out - ref).max() > 1e-3 * np.abs(ref).max()  # the rows really were rounded


# (B, T, G, Hkv, W, S, C, kv_length): one consumer (M <= 64) and two, rows past a 64-row tile,
# sketch widths on 32 / 64 / 128-byte swizzles, chunks of one tile, of several and of a
# multiple of 16 only, kv_length inside a tile, at a chunk's end, before whole runs, and 0.
MOSAIC_CASES = [
    (3, 1, 4, 2, 64, 4096, 512, 3001),
    (33, 1, 4, 2, 64, 8192, 64, 8192),
    (5, 2, 8, 1, 32, 2048, 128, 1500),
    (9, 1, 16, 2, 96, 1000, 48, 999),
    (2, 1, 1, 4, 128, 4096, 256, 512),
    (70, 1, 2, 1, 64, 6000, 64, 0),
]


@pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper (Mosaic GPU has no interpret mode)")
@pytest.mark.parametrize("case", MOSAIC_CASES, ids=lambda c: "B{}T{}G{}H{}W{}S{}C{}n{}".format(*c))
def test_mosaic_gpu_scores_equal_the_int8_reference(case):
  """The Mosaic GPU scorer against the int8 rows scored in float64 (integer dots: exact up to
  the float32 scaling), every chunk past kv_length -inf."""
  *shape, S, C, n = case
  q, codes, scale = _inputs(sum(case), *shape, S, jnp.bfloat16, 8, chunk_scale=C)
  out = np.asarray(chunk_scores(q, codes, scale, chunk_size=C, kv_length=jnp.int32(n),
                                int8=True, implementation="mosaic_gpu"))
  codes_q, step = (np.asarray(x, np.float64) for x in quantize_rows(q))
  ref = scores_f64(codes_q * step[..., None], codes, scale, C, n)
  assert np.array_equal(np.isfinite(out), np.isfinite(ref)), "a chunk's validity differs"
  np.testing.assert_allclose(out[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5,
                             atol=1e-5 * np.abs(ref[np.isfinite(ref)]).max(initial=1))


@pytest.mark.skipif(not kc.ON_HOPPER, reason="needs Hopper (Mosaic GPU has no interpret mode)")
def test_codes_past_triton_offsets_run_on_mosaic_gpu():
  """Codes of more than 2^31 one-byte elements (S = 5M keys of 8 x 64, 2.5 GiB), which Triton
  cannot address: "auto" plans the Mosaic GPU scorer, whose scores equal the XLA path's (the
  int8 rows' integer dots; the XLA path is checked against float64 in
  test_int8_matrix_unit_path)."""
  S, C, n = 5 << 20, 512, (5 << 20) - 1000
  key = jax.random.PRNGKey(3)
  codes = jax.random.randint(key, (S, 8, 64), -127, 128, jnp.int32).astype(jnp.int8)
  scale = jax.random.uniform(key, (S // C, 8), jnp.float32, 0.1, 1.0)
  q = jax.random.normal(jax.random.fold_in(key, 1), (2, 1, 32, 64), jnp.bfloat16)
  call = lambda impl: np.asarray(chunk_scores(q, codes, scale, chunk_size=C,
                                              kv_length=jnp.int32(n), int8=True,
                                              implementation=impl))
  assert pk.plan(OP, q, codes, scale, chunk_size=C, int8=True).implementation == "mosaic_gpu"
  out, ref = call("auto"), call("xla")
  finite = np.isfinite(ref)
  assert np.array_equal(np.isfinite(out), finite) and finite[..., (n - 1) // C].all()
  np.testing.assert_allclose(out[finite], ref[finite], rtol=1e-5,
                             atol=1e-5 * np.abs(ref[finite]).max())


def test_empty_and_validation():
  q, codes, scale = _inputs(8, 2, 1, 4, 2, 64, 300, jnp.float32)
  out = kc.run(chunk_scores, q, codes, scale, chunk_size=128, kv_length=jnp.int32(0),
               implementation="triton", interpret=True)
  assert np.all(np.isneginf(np.asarray(out)))
  with pytest.raises(ValueError, match=r"codes must be an int8 array of shape \[S, Hkv, D/2=32\] "
                                       r"\(packed 4-bit\) or \[S, Hkv, D=64\] \(8-bit\)"):
    chunk_scores(q, codes.astype(jnp.uint8), scale, chunk_size=128)
  with pytest.raises(ValueError, match=r"codes must be an int8 array"):
    chunk_scores(q, codes[..., :16], scale, chunk_size=128)
  with pytest.raises(ValueError, match=r"int8 must be True or False, got 'yes'"):
    chunk_scores(q, codes, scale, chunk_size=128, int8="yes")
  with pytest.raises(ValueError, match=r"per-chunk scales must be >= 0 .* got a minimum of -1.0"):
    chunk_scores(q, codes, -jnp.ones((3, 2), jnp.float32), chunk_size=128)
  with pytest.raises(ValueError, match=r"scale must be a float array of shape \[S=300, Hkv=2\] "
                                       r"\(per key\) or \[N=3, Hkv=2\] \(per chunk\)"):
    chunk_scores(q, codes, scale[:10], chunk_size=128)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    chunk_scores(q, codes, scale, chunk_size=0)
  with pytest.raises(ValueError, match="chunk_size must be a multiple of config.block_k"):
    pk.plan(OP, q, codes, scale, chunk_size=100, implementation="mosaic_tpu")


@pytest.mark.parametrize("bits", [4, 8])
def test_fewer_keys_than_a_key_tile(bits):
  """S = 12 keys, below the Triton scorer's smallest key tile (16): padded, masked, exact."""
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
  raw = jnp.asarray(rng.integers(-7, 8, (12, 2, 16)), jnp.int8)
  codes = sketch.pack(raw) if bits == 4 else raw
  scale = jnp.asarray(rng.uniform(0.5, 2, (12, 2) if bits == 4 else (3, 2)), jnp.float32)
  want = chunk_scores(q, codes, scale, chunk_size=4, kv_length=10, implementation="xla")
  got = chunk_scores(q, codes, scale, chunk_size=4, kv_length=10, implementation="triton",
                     interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_pack_unpack_round_trip():
  codes = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (5, 3, 16)))
  lo, hi = sketch.unpack(sketch.pack(codes))
  np.testing.assert_array_equal(np.concatenate([lo, hi], -1), codes)
  with pytest.raises(ValueError, match="must be even"):
    sketch.pack(codes[..., :15])
