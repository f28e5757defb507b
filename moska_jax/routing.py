"""MoE-style routing over the shared KV: chunk summaries, a top-k router, grouping by chunk.

The shared KV is cut into N = ceil(S / C) chunks ("experts"). Each chunk has a summary built once
with the shared store; a request's router score for a chunk estimates how much attention its
queries would give the chunk, and the top-k chunks per (request, kv head) are attended by
`pallas_kernels.chunk_attention`.

Summary representation. A summary kind (`SUMMARIES`) is a pair of functions: `summarize` turns a
chunk's keys into P vectors per kv head, and `features` turns a query vector into P vectors, so
that score(q, chunk) = sum_p features(q)_p . summary_p. Both kinds are linear in their query
features, which makes the aggregation over a request's query rows exact and cheap:
- "mean": P = 1, the mean of the chunk's valid keys, features(q) = q; q . mean(k) is the mean
  logit of the chunk.
- "envelope" (Quest): P = 2, the per-dimension max and min of the keys, features(q) =
  (max(q, 0), min(q, 0)); the score is Quest's upper bound on the chunk's largest logit,
  sum_d max(q_d max_d, q_d min_d).

Aggregation (a choice; the paper does not say): the score of a (request, kv head) is the SUM of
the scores of its G query heads and T tokens. Since both kinds are linear in the features, this is
one [B, Hkv, P*D] x [N, Hkv, P*D] product on the summed features. For "mean" it is the chunk's
mean logit summed over the group's query rows (the group shares one chunk set, so chunks that
matter to most of its rows win); for "envelope" it is the sum of the rows' upper bounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_attention import ChunkGroups, group_by_chunk  # noqa: F401  (re-export)

_HI = jax.lax.Precision.HIGHEST


class SummaryKind(NamedTuple):
  """summarize(k[N, C, Hkv, D] f32, valid[N, C]) -> [N, Hkv, P, D]; features(q[..., D]) -> [..., P, D]."""

  summarize: Callable[[jax.Array, jax.Array], jax.Array]
  features: Callable[[jax.Array], jax.Array]


def _mean(k: jax.Array, valid: jax.Array) -> jax.Array:
  w = valid[:, :, None, None]
  count = jnp.maximum(jnp.sum(valid, axis=1), 1)[:, None, None]
  return (jnp.sum(jnp.where(w, k, 0.0), axis=1) / count)[:, :, None, :]


def _envelope(k: jax.Array, valid: jax.Array) -> jax.Array:
  w = valid[:, :, None, None]
  nonempty = jnp.any(valid, axis=1)[:, None, None]
  hi = jnp.where(nonempty, jnp.max(jnp.where(w, k, -jnp.inf), axis=1), 0.0)
  lo = jnp.where(nonempty, jnp.min(jnp.where(w, k, jnp.inf), axis=1), 0.0)
  return jnp.stack([hi, lo], axis=2)


SUMMARIES: dict[str, SummaryKind] = {
    "mean": SummaryKind(_mean, lambda q: q[..., None, :]),
    "envelope": SummaryKind(_envelope,
                            lambda q: jnp.stack([jnp.maximum(q, 0), jnp.minimum(q, 0)], axis=-2)),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkSummaries:
  """Summaries of the N chunks of one shared k[S, Hkv, D].

  vectors: [N, Hkv, P, D] float32 (P = 1 for "mean", 2 for "envelope").
  num_valid_chunks: int32 scalar, chunks [0, num_valid_chunks) hold a key before kv_length.
  kind: key of `SUMMARIES` (static).
  chunk_size: C (static).
  """

  vectors: jax.Array
  num_valid_chunks: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True))
  chunk_size: int = dataclasses.field(metadata=dict(static=True))


def _check_kind(summary: str) -> SummaryKind:
  if summary not in SUMMARIES:
    raise ValueError(f"summary must be one of {sorted(SUMMARIES)}, got {summary!r}")
  return SUMMARIES[summary]


def chunk_summaries(k: jax.Array, chunk_size: int, kv_length=None,
                    summary: str = "mean") -> ChunkSummaries:
  """Summarizes each chunk of the shared keys (once, when the shared store is built).

  Args:
    k: [S, Hkv, D] shared keys; chunk c is rows [c*C, (c+1)*C), the last one may be partial.
    chunk_size: C.
    kv_length: optional int scalar (may be traced): only keys [0, kv_length) are summarized;
      chunks with no valid key get zero vectors and are never routed to.
    summary: a key of `SUMMARIES` ("mean" or "envelope").

  Returns:
    `ChunkSummaries` with vectors [N, Hkv, P, D] float32, N = ceil(S / C).
  """
  kind = _check_kind(summary)
  if k.ndim != 3:
    raise ValueError(f"chunk_summaries: k must have shape [S, Hkv, D], got {k.shape}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_summaries: chunk_size must be a positive int, got {chunk_size!r}")
  S, Hkv, D = k.shape
  N = -(-S // chunk_size)
  if kv_length is not None and jnp.ndim(kv_length) != 0:
    raise ValueError(f"chunk_summaries: kv_length must be a scalar, got shape "
                     f"{jnp.shape(kv_length)}")
  n = jnp.int32(S) if kv_length is None else jnp.clip(jnp.asarray(kv_length, jnp.int32), 0, S)
  kc = jnp.pad(k, ((0, N * chunk_size - S), (0, 0), (0, 0))).reshape(N, chunk_size, Hkv, D)
  valid = jnp.arange(N * chunk_size).reshape(N, chunk_size) < n
  vectors = kind.summarize(kc.astype(jnp.float32), valid)
  return ChunkSummaries(vectors, (n + chunk_size - 1) // chunk_size, summary, chunk_size)


def route(q: jax.Array, summaries: ChunkSummaries | jax.Array, top_k: int, *,
          always_include: Sequence[int] = (), num_valid_chunks=None) -> jax.Array:
  """Top-k chunks per (request, kv head).

  Args:
    q: [B, T, Hq, D] queries (query head h belongs to kv head h // G).
    summaries: `ChunkSummaries`, or a plain [N, Hkv, D] array of mean keys.
    top_k: K, chunks per (request, kv head), 1 <= K <= N.
    always_include: chunk ids forced into every set (e.g. 0, an attention sink), at most K,
      unless they are past the valid chunks.
    num_valid_chunks: optional int scalar (may be traced): only chunks [0, num_valid_chunks) may be
      chosen; default from `summaries` (all N for a plain array).

  A zero query row adds nothing to a request's score (both feature kinds map 0 to 0): zero the
  padding rows of a fixed-shape step so they cannot steer the real tokens' choice.

  Returns:
    chunk_ids [B, Hkv, K] int32, duplicate-free, ordered by decreasing score (forced chunks
    first); when fewer than K chunks are valid the tail is -1 (which chunk_attention ignores).
  """
  if isinstance(summaries, ChunkSummaries):
    vectors, kind = summaries.vectors, _check_kind(summaries.kind)
    n_valid = summaries.num_valid_chunks
  else:
    if summaries.ndim != 3:
      raise ValueError(f"route: summaries must be ChunkSummaries or an array of shape "
                       f"[N, Hkv, D], got {summaries.shape}")
    vectors, kind, n_valid = summaries[:, :, None, :], SUMMARIES["mean"], None
  N, Hkv, P, D = vectors.shape
  if q.ndim != 4 or q.shape[3] != D or q.shape[2] % Hkv:
    raise ValueError(f"route: q must have shape [B, T, Hq, D={D}] with Hq a multiple of "
                     f"Hkv={Hkv}, got {q.shape}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= N:
    raise ValueError(f"route: top_k must be an int in [1, N={N}], got {top_k!r}")
  forced = tuple(int(c) for c in always_include)
  if len(set(forced)) != len(forced) or len(forced) > top_k or any(not 0 <= c < N for c in forced):
    raise ValueError(f"route: always_include must hold at most top_k={top_k} distinct chunk ids "
                     f"in [0, N={N}), got {always_include!r}")
  if num_valid_chunks is not None:
    n_valid = jnp.asarray(num_valid_chunks, jnp.int32)
  B, T, Hq, _ = q.shape
  feats = kind.features(q.reshape(B, T, Hkv, Hq // Hkv, D).astype(jnp.float32))
  feats = jnp.sum(feats, axis=(1, 3))  # [B, Hkv, P, D]: linear scores sum over rows exactly
  scores = jnp.einsum("bhpd,nhpd->bhn", feats, vectors, precision=_HI)
  c = jnp.arange(N)
  if forced:
    scores = jnp.where(jnp.isin(c, jnp.asarray(forced)), jnp.inf, scores)
  if n_valid is not None:
    scores = jnp.where(c < n_valid, scores, -jnp.inf)
  best, ids = jax.lax.top_k(scores, top_k)
  return jnp.where(best > -jnp.inf, ids, -1).astype(jnp.int32)
