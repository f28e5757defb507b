"""moska_jax.routing: chunk summaries and the top-k router vs NumPy; route -> chunk_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moska_jax import routing
from moska_jax.config import SUMMARY_KINDS
from pallas_kernels import chunk_attention, shared_attention
from tests.np_reference import random_normal, rel_err


def summaries_np(k, C, n, kind):
  """float64 summaries of the valid keys of each chunk (zeros if none), as the kind's arrays."""
  k = np.asarray(k, np.float64)
  S, Hkv, D = k.shape
  N = -(-S // C)
  kc = np.zeros((N, C, Hkv, D))
  kc.reshape(N * C, Hkv, D)[:S] = k
  valid = (np.arange(N * C) < n).reshape(N, C)
  mean = np.zeros((N, Hkv, D))
  hi, lo, scale = np.zeros((N, Hkv, D)), np.zeros((N, Hkv, D)), np.zeros((N, C, Hkv))
  codes = np.zeros((N, C, Hkv, D))
  for c in range(N):
    x = kc[c, valid[c]]
    if len(x):
      mean[c], hi[c], lo[c] = x.mean(0), x.max(0), x.min(0)
      r = x - mean[c]
      scale[c, valid[c]] = np.abs(r).max(-1) / 7
      s = scale[c, valid[c]][..., None]
      codes[c, valid[c]] = np.round(r / np.where(s > 0, s, 1.0))
  return dict(mean=(mean,), envelope=(hi, lo), int4=(mean, scale, codes, valid))[kind]


def unpack_np(packed):
  """int8 [..., D/2] (packed bytes) -> float64 codes [..., D]: low nibble = dim j, high nibble =
  dim j + D/2, two's complement (decoded here independently of pallas_kernels.sketch)."""
  b = np.asarray(packed).astype(np.int64)
  lo, hi = b & 15, b >> 4
  return np.concatenate([np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)],
                        -1).astype(np.float64)


def scores_np(q, arrays, kind, projection=None):
  """Router scores [B, Hkv, N]: mean/envelope summed over the G heads and T rows of a (request,
  kv head), the sketch kinds the largest sketched logit over its live (non-zero) rows and valid
  keys (a sketch of projected residuals maps back to D dimensions through the projection)."""
  q = np.asarray(q, np.float64)
  B, T, Hq, D = q.shape
  N, Hkv = arrays[0].shape[:2]
  qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
  if kind in routing.SKETCH_KINDS:
    center, scale, codes, valid = (np.asarray(x) for x in arrays)
    width = D if projection is None else projection.shape[1]  # the sketched dimensions
    codes = unpack_np(codes) if 2 * codes.shape[-1] == width else codes.astype(np.float64)
    if projection is not None:
      codes = np.einsum("nchw,hwd->nchd", codes, np.asarray(projection, np.float64))
    scale = scale[:, None] if scale.ndim == 2 else scale  # 8-bit: one per (chunk, kv head)
    keys = center[:, None] + scale[..., None] * codes  # [N, C, Hkv, D]
    logit = np.einsum("bthgd,nchd->bthgnc", qg, keys)
    logit = np.where(valid[None, None, None, None], logit, -np.inf)
    logit = np.where(np.any(qg != 0, -1)[..., None, None], logit, -np.inf)
    return logit.max(axis=(1, 3, 5))
  if kind == "envelope":  # Quest: sum_d max(q_d hi_d, q_d lo_d)
    per_row = np.maximum(np.einsum("bthgd,nhd->bthgnd", qg, arrays[0]),
                         np.einsum("bthgd,nhd->bthgnd", qg, arrays[1])).sum(-1)
  else:
    per_row = np.einsum("bthgd,nhd->bthgn", qg, arrays[0])
  return per_row.sum(axis=(1, 3))


def _assert_top_k(ids, scores, valid_n, forced=()):
  """ids hold the top-k of `scores` among chunks < valid_n (forced first), -1 when too few."""
  B, Hkv, K = ids.shape
  for b in range(B):
    for h in range(Hkv):
      got = [int(c) for c in ids[b, h] if c >= 0]
      assert len(got) == len(set(got)) == min(K, valid_n)
      assert all(c < valid_n for c in got)
      s = scores[b, h, :valid_n].copy()
      want = [c for c in forced if c < valid_n]
      s[want] = -np.inf
      want += list(np.argsort(-s, kind="stable")[:min(K, valid_n) - len(want)])
      if set(got) != set(want):  # only a near-tie at the boundary may differ
        diff = set(got) ^ set(want)
        assert np.ptp(scores[b, h, list(diff)]) < 1e-4 * np.abs(scores[b, h]).max(), (got, want)


NP_KINDS = ["mean", "envelope", "int4"]  # summaries_np builds these
KINDS = NP_KINDS + ["int4-pca2", "int8-pca4"]


def reference_arrays(k, C, n, s: routing.ChunkSummaries):
  """The arrays to score against: summaries_np's, or for the PCA kinds (whose eigenvectors'
  signs are arbitrary) the router's own, which test_pca_sketches checks."""
  if s.kind in NP_KINDS:
    return summaries_np(k, C, n, s.kind)
  return tuple(np.asarray(x) for x in s.arrays)


@pytest.mark.parametrize("kind", NP_KINDS)
@pytest.mark.parametrize("kv_length", [None, 700, 129])
def test_chunk_summaries_match_numpy(kind, kv_length):
  rng = np.random.default_rng(1)
  k = random_normal(rng, (1000, 2, 32), jnp.float32)  # 8 chunks of 128, the last partial
  s = jax.jit(lambda k, n: routing.chunk_summaries(k, 128, n, summary=kind))(k, kv_length)
  n = 1000 if kv_length is None else kv_length
  assert s.kind == kind and s.chunk_size == 128 and int(s.num_valid_chunks) == -(-n // 128)
  assert s.num_chunks == 8
  want = summaries_np(k, 128, n, kind)
  assert len(s.arrays) == len(want)
  if kind == "int4":  # codes: rounding may differ from float64 only at a .5 tie
    center, scale, codes, valid = (np.asarray(x) for x in s.arrays)
    assert codes.dtype == np.int8 and codes.shape[-1] == 16 and valid.dtype == bool
    codes = unpack_np(codes)
    kc = np.zeros(codes.shape)
    kc.reshape(-1, *codes.shape[2:])[:1000] = k
    ratio = (kc - want[0][:, None]) / np.where(want[1] > 0, want[1], 1.0)[..., None]
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4  # f32 vs f64 may round apart
    assert np.all((codes == want[2]) | (tie & valid[..., None, None]))
    assert np.abs(codes).max() <= 7
    np.testing.assert_array_equal(codes[~valid], 0)
    np.testing.assert_array_equal(valid, want[3])
    # every valid key is within half a quantization step of its sketch
    err = np.abs(center[:, None] + scale[..., None] * codes - kc)
    assert np.all((err <= scale[..., None] / 2 + 1e-5)[valid])
    got, want = (center, scale), want[:2]
  else:
    got = s.arrays
  for x, y in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(x), y, atol=1e-5)


@pytest.mark.parametrize("kind,width,bits", [("int4-pca2", 16, 4), ("int4-pca4", 8, 4),
                                             ("int8-pca2", 16, 8), ("int8-pca4", 8, 8)])
@pytest.mark.parametrize("kv_length", [None, 700])
def test_pca_sketches(kind, width, bits, kv_length):
  """The PCA kinds: W orthonormal directions per kv head spanning the top-W principal subspace
  of the valid residuals (float64 eigh; keys with a clear gap after W), the codes (4-bit packed
  or 8-bit) within half a step of the residuals projected on them (a scale per key for 4-bit
  codes, per chunk and kv head for 8-bit ones: the largest projected residual over 127), the
  centers the chunk means."""
  rng = np.random.default_rng(11)
  S, Hkv, D, C = 1000, 2, 32, 128
  basis = np.linalg.qr(rng.standard_normal((Hkv, D, D)))[0]  # [Hkv, D, D] orthonormal columns
  weights = np.where(np.arange(D) < width, 3.0, 0.3)  # a gap after the W-th direction
  k = np.einsum("shd,hed->she", rng.standard_normal((S, Hkv, D)) * weights, basis)
  s = jax.jit(lambda k, n: routing.chunk_summaries(k, C, n, summary=kind))(
      jnp.asarray(k, jnp.float32), kv_length)
  n = S if kv_length is None else kv_length
  center, scale, codes, valid = (np.asarray(x) for x in s.arrays)
  P = np.asarray(s.projection, np.float64)
  assert P.shape == (Hkv, width, D) and codes.dtype == np.int8
  assert codes.shape == (8, C, Hkv, width // 2 if bits == 4 else width)
  np.testing.assert_allclose(np.einsum("hwd,hvd->hwv", P, P), np.broadcast_to(np.eye(width),
                             (Hkv, width, width)), atol=1e-5)
  mean = summaries_np(k, C, n, "mean")[0]
  np.testing.assert_allclose(center, mean, atol=1e-5)
  kc = np.zeros((8 * C, Hkv, D))
  kc[:S] = k
  r = np.where(valid[..., None, None], kc.reshape(8, C, Hkv, D) - mean[:, None], 0.0)
  cov = np.einsum("nchd,nche->hde", r, r)
  top = np.linalg.eigh(cov)[1][..., ::-1][..., :width]  # [Hkv, D, W]
  np.testing.assert_allclose(np.einsum("hwd,hwe->hde", P, P),
                             np.einsum("hdw,hew->hde", top, top), atol=1e-4)
  y = np.einsum("nchd,hwd->nchw", r, P)
  codes = unpack_np(codes) if bits == 4 else codes.astype(np.float64)
  assert np.abs(codes).max() == (7 if bits == 4 else 127)
  np.testing.assert_array_equal(codes[~valid], 0)
  if bits == 8:
    assert scale.shape == (8, Hkv)
    np.testing.assert_allclose(scale, np.abs(y).max(axis=(1, 3)) / 127, rtol=1e-5, atol=1e-7)
    scale = np.broadcast_to(scale[:, None], (8, C, Hkv))
  else:
    np.testing.assert_array_equal(scale[~valid], 0)
  assert np.all((np.abs(scale[..., None] * codes - y) <= scale[..., None] / 2 + 1e-4)[valid])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_route_is_top_k_of_aggregated_scores(kind, top_k):
  rng = np.random.default_rng(top_k)
  B, T, Hq, Hkv, D, C = 5, 2, 8, 2, 32, 64
  k = random_normal(rng, (500, Hkv, D), jnp.float32)  # 8 chunks
  q = random_normal(rng, (B, T, Hq, D), jnp.float32)
  s = routing.chunk_summaries(k, C, summary=kind)
  ids = np.asarray(jax.jit(lambda q, s: routing.route(q, s, top_k))(q, s))
  assert ids.shape == (B, Hkv, top_k) and ids.dtype == np.int32
  _assert_top_k(ids, scores_np(q, reference_arrays(k, C, 500, s), kind, s.projection), 8)


@pytest.mark.parametrize("kind", KINDS)
def test_route_always_include_and_kv_length(kind):
  rng = np.random.default_rng(2)
  B, Hq, Hkv, D, C, n = 4, 4, 1, 16, 32, 200  # 10 chunks, 7 hold keys before 200
  k = random_normal(rng, (320, Hkv, D), jnp.float32)
  q = random_normal(rng, (B, 1, Hq, D), jnp.float32)
  s = routing.chunk_summaries(k, C, n, summary=kind)
  scores = scores_np(q, reference_arrays(k, C, n, s), kind, s.projection)
  for top_k, forced in ((3, (0,)), (4, (0, 9, 5)), (9, (0,))):
    ids = np.asarray(routing.route(q, s, top_k, always_include=forced))
    for c in forced:  # forced chunks are in every set unless past kv_length (chunk 9 is)
      assert np.all((ids == c).any(-1)) == (c < 7)
    assert np.all(ids[..., :1] == 0)  # forced chunks come first
    _assert_top_k(ids, scores, 7, forced)
  assert np.all(np.asarray(routing.route(q, s, 9))[..., 7:] == -1)  # only 7 valid chunks


@pytest.mark.parametrize("kind", ["mean", "int4", "int8-pca2"])
def test_a_nan_query_keeps_its_forced_and_valid_chunks(kind):
  """A NaN in one request's query makes its scores NaN: it still gets its forced chunk first and
  top_k distinct valid chunks (top_k ranks NaN above the forced chunks' inf, and every slot was
  -1: the request read no shared KV, silently); the other requests route as before."""
  rng = np.random.default_rng(5)
  k = random_normal(rng, (256, 1, 16), jnp.float32)  # 8 chunks, 6 with keys before 190
  q = np.array(random_normal(rng, (2, 1, 4, 16), jnp.float32))
  s = routing.chunk_summaries(k, 32, 190, summary=kind)
  clean = np.asarray(routing.route(jnp.asarray(q), s, 3, always_include=(4,)))
  q[0, 0, 1, 3] = np.nan
  ids = np.asarray(routing.route(jnp.asarray(q), s, 3, always_include=(4,)))
  assert np.all(ids[0, :, 0] == 4) and np.all((0 <= ids[0]) & (ids[0] < 6))
  assert len(set(ids[0, 0].tolist())) == 3
  np.testing.assert_array_equal(ids[1], clean[1])


def test_route_plain_array_and_traced_num_valid():
  rng = np.random.default_rng(3)
  vec = random_normal(rng, (6, 2, 16), jnp.float32)
  q = random_normal(rng, (3, 1, 4, 16), jnp.float32)
  fn = jax.jit(lambda q, n: routing.route(q, vec, 2, num_valid_chunks=n))
  ids = np.asarray(fn(q, jnp.int32(4)))
  _assert_top_k(ids, scores_np(q, (np.asarray(vec),), "mean"), 4)


def test_route_validation_errors():
  k = jnp.ones((256, 2, 16))
  q = jnp.ones((2, 1, 4, 16))
  s = routing.chunk_summaries(k, 64)
  with pytest.raises(ValueError, match="summary must be one of"):
    routing.chunk_summaries(k, 64, summary="median")
  with pytest.raises(ValueError, match="summary 'int4' packs two 4-bit codes a byte and needs an "
                                       "even head dim, got D=15"):
    routing.chunk_summaries(jnp.ones((64, 1, 15)), 16, summary="int4")
  for kind in ("int4-pca2", "int8-pca4"):
    with pytest.raises(ValueError, match=f"summary '{kind}' codes keys in pairs of dimensions "
                       "and needs a head dim D >= 2, got D=1"):
      routing.chunk_summaries(jnp.ones((64, 1, 1)), 16, summary=kind)
  assert routing.chunk_summaries(jnp.ones((64, 1, 1)), 16, summary="mean").num_valid_chunks == 4
  with pytest.raises(ValueError, match=r"top_k must be an int in \[1, N=4\]"):
    routing.route(q, s, 5)
  with pytest.raises(ValueError, match="always_include must hold"):
    routing.route(q, s, 2, always_include=(0, 1, 2))
  with pytest.raises(ValueError, match="always_include must hold"):
    routing.route(q, s, 2, always_include=(4,))
  with pytest.raises(ValueError, match=r"q must have shape \[B, T, Hq, D=16\]"):
    routing.route(q[..., :8], s, 2)


@pytest.mark.parametrize("backend", ["gpu", "xla"])
def test_route_then_chunk_attention(backend):
  """The router's ids (with -1 padding past kv_length) feed chunk_attention; top_k = N is dense."""
  rng = np.random.default_rng(4)
  B, Hq, Hkv, D, C, n = 3, 8, 2, 32, 64, 250  # 5 chunks, 4 valid: the 5th id is -1
  k = random_normal(rng, (320, Hkv, D), jnp.float32)
  v = random_normal(rng, (320, Hkv, D), jnp.float32)
  q = random_normal(rng, (B, 1, Hq, D), jnp.float32)

  @jax.jit
  def step(q, k, v):
    ids = routing.route(q, routing.chunk_summaries(k, C, n), 5, always_include=(0,))
    return chunk_attention(q, k, v, ids, chunk_size=C, kv_length=n, backend=backend,
                           interpret=backend != "xla")

  o, lse = step(q, k, v)
  o_s, lse_s = shared_attention(q, k, v, kv_length=n, backend="xla")
  assert rel_err(o, o_s) < 1e-5
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_s), rtol=1e-5, atol=1e-5)


def test_chunk_summaries_rejects_a_non_scalar_kv_length():
  with pytest.raises(ValueError, match="kv_length must be a scalar"):
    routing.chunk_summaries(jnp.ones((64, 1, 8)), 16, kv_length=jnp.array([10, 20]))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_padding_rows_do_not_steer_routing(kind):
  """The engine zeroes the padding rows of a fixed-shape step: the real rows alone decide."""
  rng = np.random.default_rng(5)
  B, T, Hq, Hkv, D, C = 3, 4, 4, 2, 16, 32
  k = random_normal(rng, (320, Hkv, D), jnp.float32)
  q = random_normal(rng, (B, T, Hq, D), jnp.float32)
  s = routing.chunk_summaries(k, C, summary=kind)
  real = np.array([4, 1, 2])  # tokens per request; the rest of its T rows are padding
  valid = np.arange(T)[None] < real[:, None]
  got = np.asarray(routing.route(jnp.where(valid[:, :, None, None], q, 0.0), s, 3))
  for b in range(B):
    want = np.asarray(routing.route(q[b:b + 1, :real[b]], s, 3))
    np.testing.assert_array_equal(got[b], want[0])


def test_int4_routes_to_the_chunk_holding_one_matching_key():
  """A needle: one key in one chunk matches one query head; the group's other head and every
  other key are random. int4 picks that chunk for every request; the mean, which dilutes the
  key 1/C among its chunk's keys, does not."""
  rng = np.random.default_rng(6)
  B, Hq, Hkv, D, C, N = 6, 4, 2, 32, 64, 16
  k = rng.standard_normal((N * C, Hkv, D))
  q = rng.standard_normal((B, 1, Hq, D))
  needle = rng.integers(0, N, (B, Hkv))
  for b in range(B):
    for h in range(Hkv):
      # a key aligned with the group's first query head of request b, hidden among C keys
      u = q[b, 0, h * 2] / np.linalg.norm(q[b, 0, h * 2])
      k[needle[b, h] * C + rng.integers(C), h] = 2.5 * np.sqrt(D) * u
  k, q = jnp.asarray(k, jnp.float32), jnp.asarray(q, jnp.float32)
  found = {kind: np.stack([np.asarray(routing.route(q[b:b + 1], routing.chunk_summaries(
      k, C, summary=kind), 1))[0, :, 0] for b in range(B)]) for kind in ("int4", "mean")}
  np.testing.assert_array_equal(found["int4"], needle)
  assert np.mean(found["mean"] == needle) < 0.75, found["mean"]


def oracle_scores_np(q, k, C, n):
  """float64 [B, Hkv, N]: each chunk's largest exact logit over its keys before n and over the
  live (non-zero) rows and heads of a (request, kv head)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  B, T, Hq, D = q.shape
  S, Hkv, _ = k.shape
  N = -(-S // C)
  logit = np.einsum("bthgd,shd->bthgs", q.reshape(B, T, Hkv, Hq // Hkv, D), k)
  logit = np.where(np.arange(S) < n, logit, -np.inf)
  logit = np.where(np.any(q.reshape(B, T, Hkv, Hq // Hkv, D) != 0, -1)[..., None], logit, -np.inf)
  logit = np.pad(logit, [(0, 0)] * 4 + [(0, N * C - S)], constant_values=-np.inf)
  return logit.reshape(B, T, Hkv, Hq // Hkv, N, C).max(axis=(1, 3, 5))


@pytest.mark.parametrize("kv_length", [None, 200])
def test_oracle_route_is_top_k_of_exact_logits(kv_length):
  rng = np.random.default_rng(7)
  B, T, Hq, Hkv, D, C = 4, 3, 8, 2, 16, 32
  k = random_normal(rng, (300, Hkv, D), jnp.float32)  # 10 chunks, the last partial
  q = np.array(random_normal(rng, (B, T, Hq, D), jnp.float32))
  q[1, 1:] = 0.0  # padding rows of request 1 take no part
  n = 300 if kv_length is None else kv_length
  valid_n = -(-n // C)
  scores = oracle_scores_np(q, k, C, n)
  fn = jax.jit(lambda q, k, n: routing.oracle_route(q, k, 4, chunk_size=C, kv_length=n,
                                                    always_include=(9,)))
  ids = np.asarray(fn(jnp.asarray(q), k, n))
  assert ids.shape == (B, Hkv, 4) and ids.dtype == np.int32
  _assert_top_k(ids, scores, valid_n, (9,))
  assert np.all((ids == 9).any(-1)) == (9 < valid_n)  # a forced chunk past kv_length is dropped
  every = np.asarray(routing.oracle_route(jnp.asarray(q), k, 10, chunk_size=C, kv_length=n))
  assert np.all(np.sort(every, -1)[..., 10 - valid_n:] == np.arange(valid_n))
  assert np.all(every[..., valid_n:] == -1)  # only valid chunks, then -1


def test_oracle_route_validation_errors():
  k = jnp.ones((256, 2, 16))
  q = jnp.ones((2, 1, 4, 16))
  with pytest.raises(ValueError, match=r"oracle_route: top_k must be an int in \[1, N=4\]"):
    routing.oracle_route(q, k, 5, chunk_size=64)
  with pytest.raises(ValueError, match=r"oracle_route: q must have shape \[B, T, Hq, D=16\]"):
    routing.oracle_route(q[..., :8], k, 2, chunk_size=64)
  with pytest.raises(ValueError, match="oracle_route: chunk_size must be a positive int"):
    routing.oracle_route(q, k, 2, chunk_size=0)
  with pytest.raises(ValueError, match=r"oracle_route: k must have shape \[S, Hkv, D\]"):
    routing.oracle_route(q, k[0], 2, chunk_size=64)


def test_config_names_the_summary_kinds_of_the_router():
  assert SUMMARY_KINDS == tuple(routing.SUMMARIES)


@pytest.mark.parametrize("kwargs,message", [
    (dict(requests_per_tile=0), "requests_per_tile must be a positive int"),
    (dict(requests_per_tile=True), "requests_per_tile must be a positive int"),
    (dict(requests_per_tile=2, skip=-1), "skip must be an int >= 0"),
    (dict(requests_per_tile=2, num_chunks=0), "num_chunks must be a positive int"),
    (dict(requests_per_tile=2, chunk_ids=np.zeros((2, 3), np.int32)), r"\[B, Hkv, K\]"),
    (dict(requests_per_tile=2, chunk_ids=np.zeros((2, 1, 3), np.float32)), r"\[B, Hkv, K\]"),
])
def test_batch_aware_validation(kwargs, message):
  args = dict(chunk_ids=np.zeros((2, 1, 3), np.int32), num_chunks=4) | kwargs
  with pytest.raises(ValueError, match=f"batch_aware: .*{message}"):
    routing.batch_aware(**args)


def test_batch_aware_tiles_cover_each_request():
  """Every request's routed chunks are in its tile's list, the list is exactly the union of its
  requests' chunks, the order is a permutation (padding requests last) and requests with the same
  best chunk sit next to each other."""
  rng = np.random.default_rng(5)
  B, Hkv, N, K, R = 10, 2, 9, 3, 4
  ids = np.stack([[rng.permutation(N)[:K] for _ in range(Hkv)] for _ in range(B)])
  ids[:5, 0, 0] = 4  # five requests share their best chunk
  order, tiles = jax.jit(lambda i: routing.batch_aware(i, N, R))(jnp.asarray(ids, jnp.int32))
  order, tiles = np.asarray(order), np.asarray(tiles)
  assert sorted(order) == list(range(12)) and tiles.shape == (3, Hkv, N)
  assert set(order[-2:]) == {10, 11}  # padding requests choose nothing: they sort last
  pos = {int(b): i for i, b in enumerate(order)}
  assert max(pos[b] for b in range(5)) - min(pos[b] for b in range(5)) == 4
  for t in range(3):
    members = [b for b in order[t * R:(t + 1) * R] if b < B]
    for h in range(Hkv):
      got = tiles[t, h][tiles[t, h] >= 0]
      assert set(got) == {c for b in members for c in ids[b, h]}
      assert list(got) == sorted(got)
