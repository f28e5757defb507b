"""MoE-style routing over the shared KV: chunk summaries, a top-k router, an exact-logit oracle.

The shared KV is cut into N = ceil(S / C) chunks ("experts"). Each chunk has a summary built once
with the shared store; a request's router score for a chunk estimates how much attention its
queries would give the chunk, and the top-k chunks per (request, kv head) are attended by
`pallas_kernels.chunk_attention`.

Summary kinds (`SUMMARIES`). A kind is a pair of functions: `summarize` turns a chunk's keys into
arrays with one row per chunk, and `score` turns the queries of a (request, kv head) -- its T rows
times G query heads -- into one score per chunk.
- "mean": the mean of the chunk's valid keys; the score is the chunk's mean logit SUMMED over the
  group's rows (q . mean(k) is linear in q, so this is one [B, Hkv, D] x [N, Hkv, D] product on
  the summed queries: chunks that matter to most rows win).
- "envelope" (Quest): the per-dimension max and min of the keys; the score is Quest's upper bound
  on the chunk's largest logit, sum_d max(q_d max_d, q_d min_d), summed over the rows likewise.
- "int4": every key kept as a 4-bit sketch, k ~ center + scale * code with the chunk's mean as
  center, one scale per key and codes in [-7, 7]; the score is the chunk's largest approximate
  logit, MAXED over the group's rows. This one finds needles: a chunk that holds a
  single key matching one head's query scores high even though its other keys (and the group's
  other heads) do not. The sketch is 4 bits per key dimension plus a scale per key (about 1/8
  of the bf16 K/V bytes, packed two codes a byte as `pallas_kernels.sketch` lays them out), and
  it is scored by the `pallas_kernels.chunk_scores` kernel: the sketches are read once for the
  whole batch's stacked queries and only one float per (query row, chunk) is written. Scoring
  still multiplies the queries with every key (half the FLOPs of dense attention), which is why
  `MoskaConfig.reroute_every` can keep a selection for several decode steps.
- The PCA kinds "int{bits}-pca{d}" (Loki-style low-rank keys): the same, but each key's residual
  is first projected on the top W = D / d principal directions of its kv head's residuals (one
  [W, D] projection per kv head, `ChunkSummaries.projection`, common to all chunks) and sketched
  there with 4-bit packed or 8-bit codes (8-bit: one scale per chunk, which the scorer applies
  once per chunk instead of once per key); the queries are projected likewise before scoring.
  W / D of the multiplies and (8-bit) none of the per-key work of unpacking and scaling. The
  retrieval model's keys keep their needles in half the directions (accuracy_pca_c64.md).
Single-vector summaries cannot find needles: on the trained retrieval model
(`experiments/accuracy.py`) mean and envelope routing at 75% sparsity are near random chunk
choice, while "int4" matches routing by the exact logits (`oracle_route`, the reference router).

Aggregating by the max over rows (and not the sum) is what lets one retrieval head pick its chunk
when the other head of its group attends diffusely. Zero query rows -- the padding of a
fixed-shape step -- take no part in any score (they add 0 to a sum and are masked out of a max).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moska_jax.config import DEFAULT_SUMMARY, SKETCHES, sketch_width
from pallas_kernels import checks

import pallas_kernels as pk
from pallas_kernels import grouping, sketch

_HI = jax.lax.Precision.HIGHEST
_SCORE_ELEMENTS = 1 << 24  # oracle logits held at once (64 MiB in f32), not B x Hq x S
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite: a request with no live row still ranks


class SummaryKind(NamedTuple):
  """summarize(k[N, C, Hkv, D] f32, valid[N, C]) -> (tuple of [N, ...] arrays, projection or
  None); score(q[B, T, Hkv, G, D] (its own dtype), arrays, projection, kernel) -> [B, Hkv, N]
  f32, where `kernel` holds the `backend=` / `interpret=` a kind's kernel runs with."""

  summarize: Callable[[jax.Array, jax.Array], tuple[tuple[jax.Array, ...], jax.Array | None]]
  score: Callable[[jax.Array, tuple[jax.Array, ...], jax.Array | None, dict], jax.Array]


def _mean(k: jax.Array, valid: jax.Array) -> jax.Array:
  w = valid[:, :, None, None]
  count = jnp.maximum(jnp.sum(valid, axis=1), 1)[:, None, None]
  return jnp.sum(jnp.where(w, k, 0.0), axis=1) / count


def _envelope(k: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  w = valid[:, :, None, None]
  nonempty = jnp.any(valid, axis=1)[:, None, None]
  hi = jnp.where(nonempty, jnp.max(jnp.where(w, k, -jnp.inf), axis=1), 0.0)
  lo = jnp.where(nonempty, jnp.min(jnp.where(w, k, jnp.inf), axis=1), 0.0)
  return hi, lo


def _summed(q: jax.Array) -> jax.Array:
  # [B, Hkv, D]: linear scores sum over the rows exactly
  return jnp.sum(q.astype(jnp.float32), axis=(1, 3))


def _score_mean(q, arrays, projection, kernel):
  del projection, kernel  # linear kinds score in XLA
  return jnp.einsum("bhd,nhd->bhn", _summed(q), arrays[0], precision=_HI)


def _score_envelope(q, arrays, projection, kernel):
  del projection, kernel
  hi, lo = arrays  # each row's bound is linear in (max(q, 0), min(q, 0)): sum those
  return (jnp.einsum("bhd,nhd->bhn", _summed(jnp.maximum(q, 0)), hi, precision=_HI)
          + jnp.einsum("bhd,nhd->bhn", _summed(jnp.minimum(q, 0)), lo, precision=_HI))


def _sketch(r: jax.Array, bits: int = 4) -> tuple[jax.Array, jax.Array]:
  """r[N, C, Hkv, W] -> (scales, codes), r ~ scale * code: 4-bit codes packed [N, C, Hkv, W/2]
  with a scale per key [N, C, Hkv]; 8-bit codes [N, C, Hkv, W] with one scale per chunk and kv
  head [N, Hkv] (127 levels are enough to share it, and the scorer then skips a per-key
  multiply: `pallas_kernels.chunk_scores`)."""
  levels = sketch.LEVELS if bits == 4 else sketch.LEVELS_8BIT
  scale = jnp.max(jnp.abs(r), axis=-1 if bits == 4 else (1, 3)) / levels
  per_key = scale if bits == 4 else scale[:, None]
  codes = jnp.clip(jnp.round(r / jnp.where(per_key > 0, per_key, 1.0)[..., None]), -levels,
                   levels)
  return scale, sketch.pack(codes) if bits == 4 else codes.astype(jnp.int8)


def _residuals(k: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each chunk's mean (its center) and its keys minus it (0 for invalid keys)."""
  center = _mean(k, valid)
  return center, jnp.where(valid[:, :, None, None], k - center[:, None], 0.0)


def _int4(k: jax.Array, valid: jax.Array):
  center, r = _residuals(k, valid)
  scale, codes = _sketch(r)  # one scale per key
  return (center, scale, codes, valid), None


def _pca_sketch(kind: str):
  """The "int4" sketch with the kind's code bits of each key's residual projected on the top
  W principal directions of its kv head's residuals (`config.sketch_width`): W / D of the
  scorer's multiplies, exact for the part of the residual in those directions."""
  bits = SKETCHES[kind][0]

  def summarize(k: jax.Array, valid: jax.Array):
    center, r = _residuals(k, valid)
    width = sketch_width(kind, k.shape[-1])
    cov = jnp.einsum("nchd,nche->hde", r, r, precision=_HI)  # [Hkv, D, D]
    _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues
    projection = jnp.swapaxes(vecs[..., ::-1][..., :width], 1, 2)  # [Hkv, W, D]
    scale, codes = _sketch(jnp.einsum("nchd,hwd->nchw", r, projection, precision=_HI), bits)
    return (center, scale, codes, valid), projection

  return summarize


def _chunk_max(q: jax.Array, per_key: tuple[jax.Array, ...], valid: jax.Array,
               logits: Callable[..., jax.Array]) -> jax.Array:
  """[B, T, Hkv, G, N]: each query row's largest logit over each chunk's valid keys.

  q[B, T, Hkv, G, D] f32; per_key: arrays [N, C, ...] handed to `logits(rows[Hkv, R, D],
  *blocks) -> [Hkv, R, n, C]` a block of n chunks at a time, so that never more than
  _SCORE_ELEMENTS logits (not B x Hq x S) are held at once.
  """
  B, T, Hkv, G, D = q.shape
  N, C = valid.shape
  rows = q.transpose(2, 0, 1, 3, 4).reshape(Hkv, B * T * G, D)
  step = max(1, min(N, _SCORE_ELEMENTS // (Hkv * B * T * G * C)))

  def block(args):  # n chunks -> [Hkv, rows, n]
    *arrays, va = args
    return jnp.max(jnp.where(va[None, None], logits(rows, *arrays), _MASKED), axis=-1)

  pad = -N % step
  blocks = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, step, *x.shape[1:])
                 for x in (*per_key, valid))
  best = jax.lax.map(block, blocks)  # [N / step, Hkv, rows, step]
  return best.transpose(1, 2, 0, 3).reshape(Hkv, B, T, G, -1)[..., :N].transpose(1, 2, 0, 3, 4)


def _max_over_live_rows(q: jax.Array, logit: jax.Array) -> jax.Array:
  """logit[B, T, Hkv, G, N] -> [B, Hkv, N], maxed over the rows that are not all zero (padding)."""
  live = jnp.any(q != 0, axis=-1)[..., None]
  return jnp.max(jnp.where(live, logit, _MASKED), axis=(1, 3))


def _score_sketch(q, arrays, projection, kernel):
  # logit(q, key c of chunk n) ~ q . center_n + scale_nc * (q' . code_nc), q' = q projected on
  # the sketch's directions (q itself without a projection): the kernel takes the largest
  # sketched term of each (row, chunk) over the valid keys (a prefix of the store), the center
  # term is added per chunk.
  center, scale, codes, valid = arrays
  B, T, Hkv, G, D = q.shape
  N, C = valid.shape
  qs = q if projection is None else jnp.einsum(
      "bthgd,hwd->bthgw", q.astype(jnp.float32), projection, precision=_HI).astype(q.dtype)
  W = qs.shape[-1]
  scale = scale if scale.ndim == 2 else scale.reshape(N * C, Hkv)  # per chunk, or per key
  best = pk.chunk_scores(qs.reshape(B, T, Hkv * G, W), codes.reshape(N * C, Hkv, -1),
                         scale, chunk_size=C,
                         kv_length=jnp.sum(valid, dtype=jnp.int32), **kernel)
  logit = best.reshape(B, T, Hkv, G, N) + jnp.einsum(
      "bthgd,nhd->bthgn", q.astype(jnp.float32), center, precision=_HI)
  return _max_over_live_rows(q, logit)


def _exact_logits(rows, k):
  return jnp.einsum("hrd,nchd->hrnc", rows, k, precision=_HI)


# The kinds scored by the `pallas_kernels.chunk_scores` kernel (`MoskaConfig.int8_scorer` applies).
SKETCH_KINDS = tuple(SKETCHES)
SUMMARIES: dict[str, SummaryKind] = {
    "mean": SummaryKind(lambda k, valid: ((_mean(k, valid),), None), _score_mean),
    "envelope": SummaryKind(lambda k, valid: (_envelope(k, valid), None), _score_envelope),
    "int4": SummaryKind(_int4, _score_sketch),
    **{kind: SummaryKind(_pca_sketch(kind), _score_sketch) for kind in SKETCHES if kind != "int4"},
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkSummaries:
  """Summaries of the N chunks of one shared k[S, Hkv, D].

  arrays: the kind's arrays, each with N rows: "mean" (mean [N, Hkv, D] f32,), "envelope" (max,
    min [N, Hkv, D] f32), "int4" (center [N, Hkv, D] f32, scale [N, C, Hkv] f32, codes
    [N, C, Hkv, D/2] int8 (`pallas_kernels.sketch` packing), valid [N, C] bool), the PCA kinds
    "int{4,8}-pca{2,4}" (the same with codes of the W projected dimensions: [N, C, Hkv, W/2]
    packed 4-bit; [N, C, Hkv, W] 8-bit, whose scale is one per chunk and kv head, [N, Hkv]).
  num_valid_chunks: int32 scalar, chunks [0, num_valid_chunks) hold a key before kv_length.
  kind: key of `SUMMARIES` (static).
  chunk_size: C (static).
  projection: [Hkv, W, D] f32, the principal directions the PCA kinds sketch along (one set per
    kv head, common to all chunks); None for the other kinds.
  """

  arrays: tuple[jax.Array, ...]
  num_valid_chunks: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True))
  chunk_size: int = dataclasses.field(metadata=dict(static=True))
  projection: jax.Array | None = None

  @property
  def num_chunks(self) -> int:
    """N, the chunk slots (valid or not)."""
    return self.arrays[0].shape[0]

  def map_parts(self, per_chunk: Callable, common: Callable) -> ChunkSummaries:
    """per_chunk(x) for each array of N rows, common(x) for num_valid_chunks and the projection:
    how a sharded store splits the first over its devices and replicates the rest."""
    return dataclasses.replace(
        self, arrays=tuple(per_chunk(x) for x in self.arrays),
        num_valid_chunks=common(self.num_valid_chunks),
        projection=None if self.projection is None else common(self.projection))


def _check_kind(summary: str) -> SummaryKind:
  if summary not in SUMMARIES:
    raise ValueError(f"summary must be one of {sorted(SUMMARIES)}, got {summary!r}")
  return SUMMARIES[summary]


def _chunked(k: jax.Array, chunk_size: int, kv_length, op: str):
  """k[S, Hkv, D] -> (keys [N, C, Hkv, D] f32 zero-padded, valid [N, C], valid chunks), N =
  ceil(S / C): keys [0, kv_length) are valid."""
  checks.check_array("k", k, op)
  if k.ndim != 3 or 0 in k.shape or not jnp.issubdtype(k.dtype, jnp.floating):
    raise ValueError(f"{op}: k must have shape [S, Hkv, D] with no empty axis and a float "
                     f"dtype, got {k.shape} {k.dtype}")
  checks.positive_int(chunk_size, name="chunk_size", where=op)
  if kv_length is not None and jnp.ndim(kv_length) != 0:
    raise ValueError(f"{op}: kv_length must be a scalar, got shape {jnp.shape(kv_length)}")
  kv_length = checks.check_kv_length(kv_length, k.shape[0], op=op)
  S, Hkv, D = k.shape
  N = -(-S // chunk_size)
  n = jnp.int32(S) if kv_length is None else jnp.clip(kv_length, 0, S)
  kc = jnp.pad(k, ((0, N * chunk_size - S), (0, 0), (0, 0))).reshape(N, chunk_size, Hkv, D)
  valid = jnp.arange(N * chunk_size).reshape(N, chunk_size) < n
  return kc.astype(jnp.float32), valid, (n + chunk_size - 1) // chunk_size


def chunk_summaries(k: jax.Array, chunk_size: int, kv_length=None,
                    summary: str = DEFAULT_SUMMARY) -> ChunkSummaries:
  """Summarizes each chunk of the shared keys (once, when the shared store is built).

  Args:
    k: [S, Hkv, D] shared keys; chunk c is rows [c*C, (c+1)*C), the last one may be partial.
    chunk_size: C.
    kv_length: optional int scalar: only keys [0, kv_length) are summarized; chunks with no
      valid key get zero summaries and are never routed to. A concrete value must lie in
      [0, S]; a traced one is clamped to it.
    summary: a key of `SUMMARIES` ("mean", "envelope", "int4" or a PCA kind, "int4-pca2",
      "int4-pca4", "int8-pca2", "int8-pca4"); default `config.DEFAULT_SUMMARY`. "int4" packs
      two 4-bit codes a byte, so it needs an even D; the PCA kinds need D >= 2.

  Returns:
    `ChunkSummaries` of N = ceil(S / C) chunks.
  """
  kind = _check_kind(summary)
  kc, valid, num_valid = _chunked(k, chunk_size, kv_length, "chunk_summaries")
  if summary == "int4" and k.shape[-1] % 2:
    raise ValueError(f"chunk_summaries: summary 'int4' packs two 4-bit codes a byte and needs an "
                     f"even head dim, got D={k.shape[-1]} (the PCA kinds take any D >= 2)")
  if summary not in ("mean", "envelope") and k.shape[-1] < 2:
    raise ValueError(f"chunk_summaries: summary {summary!r} codes keys in pairs of dimensions "
                     f"and needs a head dim D >= 2, got D={k.shape[-1]}")
  arrays, projection = kind.summarize(kc, valid)
  return ChunkSummaries(tuple(arrays), num_valid, summary, chunk_size, projection)


def _check_route(q: jax.Array, N: int, Hkv: int, D: int, top_k: int,
                 always_include: Sequence[int], op: str) -> tuple[int, ...]:
  """Validates a router's arguments; returns the forced chunk ids."""
  checks.check_array("q", q, op)
  if (q.ndim != 4 or q.shape[3] != D or q.shape[2] % Hkv or 0 in q.shape
      or not jnp.issubdtype(q.dtype, jnp.floating)):
    raise ValueError(f"{op}: q must have shape [B, T, Hq, D={D}] with Hq a multiple of "
                     f"Hkv={Hkv}, no empty axis and a float dtype, got {q.shape} {q.dtype}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= N:
    raise ValueError(f"{op}: top_k must be an int in [1, N={N}], got {top_k!r}")
  if (not isinstance(always_include, Sequence) or isinstance(always_include, (str, bytes))
      or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                 for c in always_include)):
    raise ValueError(f"{op}: always_include must be a sequence of int chunk ids, got "
                     f"{always_include!r}")
  forced = tuple(int(c) for c in always_include)
  if len(set(forced)) != len(forced) or len(forced) > top_k or any(not 0 <= c < N for c in forced):
    raise ValueError(f"{op}: always_include must hold at most top_k={top_k} distinct chunk ids "
                     f"in [0, N={N}), got {always_include!r}")
  return forced


def _select(scores: jax.Array, top_k: int, forced: tuple[int, ...], n_valid) -> jax.Array:
  """scores[B, Hkv, N] -> the top_k chunk ids, forced ones first, -1 past the valid chunks.

  A NaN score (a non-finite query) ranks lowest among the valid chunks: top_k would rank it above
  even the forced chunks' inf, and the -1 of no valid key would then take the request's every
  slot, forced chunks included."""
  c = jnp.arange(scores.shape[-1])
  scores = jnp.where(jnp.isnan(scores), _MASKED, scores)
  if forced:
    scores = jnp.where(jnp.isin(c, jnp.asarray(forced)), jnp.inf, scores)
  if n_valid is not None:
    scores = jnp.where(c < n_valid, scores, -jnp.inf)
  best, ids = jax.lax.top_k(scores, top_k)
  return jnp.where(best > -jnp.inf, ids, -1).astype(jnp.int32)


def _grouped(q: jax.Array, Hkv: int) -> jax.Array:
  B, T, Hq, D = q.shape
  return q.reshape(B, T, Hkv, Hq // Hkv, D)


def route(q: jax.Array, summaries: ChunkSummaries | jax.Array, top_k: int, *,
          always_include: Sequence[int] = (), num_valid_chunks=None, int8: bool = False,
          backend: str = "auto", interpret: bool = False) -> jax.Array:
  """Top-k chunks per (request, kv head).

  Args:
    q: [B, T, Hq, D] queries (query head h belongs to kv head h // G).
    summaries: `ChunkSummaries`, or a plain [N, Hkv, D] array of mean keys.
    top_k: K, chunks per (request, kv head), 1 <= K <= N.
    always_include: chunk ids forced into every set (e.g. 0, an attention sink), at most K,
      unless they are past the valid chunks.
    num_valid_chunks: optional int scalar: only chunks [0, num_valid_chunks) may be chosen;
      default from `summaries` (all N for a plain array). A concrete value must lie in [0, N];
      a traced one is not checked.
    int8, backend, interpret: how a kind that scores with a kernel runs it ("int4":
      `pallas_kernels.chunk_scores`, int8 query rows on the int8 matrix units or not).

  A zero query row takes no part in a request's score (see the module docstring): zero the
  padding rows of a fixed-shape step so they cannot steer the real tokens' choice.

  Returns:
    chunk_ids [B, Hkv, K] int32, duplicate-free, ordered by decreasing score (forced chunks
    first); when fewer than K chunks are valid the tail is -1 (which chunk_attention ignores).
  """
  projection = None
  if isinstance(summaries, ChunkSummaries):
    arrays, kind = summaries.arrays, _check_kind(summaries.kind)
    n_valid, projection = summaries.num_valid_chunks, summaries.projection
  else:
    if (not hasattr(summaries, "ndim") or summaries.ndim != 3
        or not jnp.issubdtype(summaries.dtype, jnp.floating)):
      raise ValueError(f"route: summaries must be ChunkSummaries or a float array of shape "
                       f"[N, Hkv, D], got {getattr(summaries, 'shape', type(summaries).__name__)}")
    arrays, kind, n_valid = (summaries,), SUMMARIES["mean"], None
  N, Hkv, D = arrays[0].shape
  forced = _check_route(q, N, Hkv, D, top_k, always_include, "route")
  if num_valid_chunks is not None:
    n_valid = checks.check_kv_length(num_valid_chunks, N, op="route", name="num_valid_chunks",
                                     bound="N")
  scores = kind.score(_grouped(q, Hkv), arrays, projection,
                      dict(int8=int8, backend=backend, interpret=interpret))
  return _select(scores, top_k, forced, n_valid)


def oracle_route(q: jax.Array, k: jax.Array, top_k: int, *, chunk_size: int, kv_length=None,
                 always_include: Sequence[int] = ()) -> jax.Array:
  """Top-k chunks per (request, kv head) by the EXACT largest logit: the reference router.

  A chunk's score is its largest q . k over its valid keys and the (request, kv head)'s live
  query rows (T rows times G heads; all-zero rows are padding and take no part), what the "int4"
  summaries estimate from 4-bit sketches. It reads every key at full precision, so it costs more
  than dense attention: a ceiling to measure routers against, not one to serve.

  Args:
    q: [B, T, Hq, D] queries.
    k: [S, Hkv, D] shared keys; chunk c is rows [c*C, (c+1)*C).
    top_k: K, 1 <= K <= N = ceil(S / C).
    chunk_size: C.
    kv_length: optional int scalar: only keys [0, kv_length) count, and chunks past them are
      never chosen. A concrete value must lie in [0, S]; a traced one is clamped to it.
    always_include: chunk ids forced into every set, as for `route`.

  Returns:
    chunk_ids [B, Hkv, K] int32 as `route` returns them.
  """
  keys, valid, num_valid = _chunked(k, chunk_size, kv_length, "oracle_route")
  N, _, Hkv, D = keys.shape
  forced = _check_route(q, N, Hkv, D, top_k, always_include, "oracle_route")
  qg = _grouped(q, Hkv).astype(jnp.float32)
  scores = _max_over_live_rows(qg, _chunk_max(qg, (keys,), valid, _exact_logits))
  return _select(scores, top_k, forced, num_valid)


def batch_aware(chunk_ids: jax.Array, num_chunks: int, requests_per_tile: int, *,
                skip: int = 0) -> tuple[jax.Array, jax.Array]:
  """Batch-aware routing: requests that chose alike share a tile, and a tile the union of its
  requests' chunks (`pallas_kernels.tile_chunk_attention` then streams each tile's chunks once,
  with one online softmax, instead of a partial state per (request, chunk)).

  Requests are ordered by their best routed chunk (that of the first kv head, after the `skip`
  forced ones), so that requests routed alike land in one tile; every request still attends to
  at least its own chunks, and the union's extra chunks only add exact attention.

  Args:
    chunk_ids: [B, Hkv, K] routed ids (`route`), best first after the forced ones.
    num_chunks: N.
    requests_per_tile: R, requests per tile; B is padded to a multiple of R with requests that
      choose nothing.
    skip: leading ids of every row that are forced (always_include), not routed.

  Returns:
    order [B'] int32, B' = B rounded up to R: tile t holds requests order[t*R:(t+1)*R] (ids >= B
    are padding); and tile_ids [B' / R, Hkv, min(N, R*K)] (`grouping.tile_union`).

  Raises:
    ValueError: chunk_ids not an integer [B, Hkv, K] array, R or N not a positive int, skip not
      an int >= 0.
  """
  where = "batch_aware"
  checks.positive_int(num_chunks, name="num_chunks", where=where)
  checks.positive_int(requests_per_tile, name="requests_per_tile", where=where)
  checks.at_least(skip, 0, name="skip", where=where)
  checks.check_array("chunk_ids", chunk_ids, where)
  if chunk_ids.ndim != 3 or not jnp.issubdtype(chunk_ids.dtype, jnp.integer):
    raise ValueError(f"{where}: chunk_ids must be an integer array [B, Hkv, K], got "
                     f"{chunk_ids.dtype} {chunk_ids.shape}")
  B, _, K = chunk_ids.shape
  padded = -(-B // requests_per_tile) * requests_per_tile
  ids = jnp.pad(chunk_ids, ((0, padded - B), (0, 0), (0, 0)), constant_values=-1)
  first = ids[:, 0, min(skip, K - 1)]
  order = jnp.argsort(jnp.where(first >= 0, first, num_chunks), stable=True).astype(jnp.int32)
  return order, grouping.tile_union(ids[order], num_chunks, requests_per_tile)
