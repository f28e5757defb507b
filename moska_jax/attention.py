"""MoskaAttention: GQA projections with RoPE, and the attention paths that tie router + kernels.

The module owns the q/k/v/o projections; the attention itself is chosen by the caller (the
decoder's `attend` callback) among these functions:
- `causal_attention`: plain causal attention within a sequence (the reference decoder, training,
  and the inside of a prefill chunk).
- `shared_prefix_attention`: a chunk of shared tokens against the store built so far, merged with
  causal attention inside the chunk (the bounded-memory prefill of the shared store).
- the two halves of the decode / unique-prefill step of DESIGN.md: `unique_partial` appends the
  new K/V to each request's pages and runs `unique_attention`; `shared_partial` runs
  `shared_attention` (dense) or `route` + `chunk_attention` (sparse) over the shared store.
  `moska_jax.step` merges them per layer (`merge_attention_states`).
Only `pallas_kernels` entry points are called: no Pallas here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from moska_jax import routing
from moska_jax.config import ModelConfig, MoskaConfig
from pallas_kernels.reference import attend


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [D/2] of RoPE, with Llama-3.1 scaling when the config has it."""
  D = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  wavelen = 2 * jnp.pi / inv
  low_wavelen = sc.original_max_position / sc.low_freq_factor
  high_wavelen = sc.original_max_position / sc.high_freq_factor
  scaled = jnp.where(wavelen > low_wavelen, inv / sc.factor, inv)
  smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (
      sc.high_freq_factor - sc.low_freq_factor)
  mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(mid, (1 - smooth) * scaled / sc.factor + smooth * scaled, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x[B, T, H, D] (rotate-half convention) at integer positions[B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MoskaAttention(nnx.Module):
  """GQA attention projections (no bias) with RoPE; see the module docstring for the paths."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    E, D = cfg.hidden, cfg.head_dim
    dt = cfg.jnp_dtype
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
    self.q_proj = lin(E, cfg.num_heads * D)
    self.k_proj = lin(E, cfg.num_kv_heads * D)
    self.v_proj = lin(E, cfg.num_kv_heads * D)
    self.o_proj = lin(cfg.num_heads * D, E)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D

  def project(self, x: jax.Array, positions: jax.Array,
              inv_freq: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x[B, T, E] at positions[B, T] -> q[B, T, Hq, D], k, v[B, T, Hkv, D] (RoPE on q, k)."""
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

  def output(self, o: jax.Array) -> jax.Array:
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, -1))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal attention of q[B, T, Hq, D] over k, v[B, T, Hkv, D] of the same tokens -> (o, lse)."""
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  qg = q.reshape(B, T, Hkv, Hq // Hkv, D).astype(jnp.float32)
  s = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * D**-0.5
  mask = jnp.tril(jnp.ones((T, T), bool))
  o, lse = attend(s, mask, v, "bhgts,bshd->bhgtd")
  o = o.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
  return o.astype(q.dtype), lse.transpose(0, 3, 1, 2).reshape(B, T, Hq)


def shared_prefix_attention(q, k, v, store_k, store_v, start, backend: str) -> jax.Array:
  """A chunk of shared tokens at positions [start, start+T) of one sequence (B = 1).

  Its queries see the store's keys [0, start) (shared_attention with kv_length=start) and,
  causally, the chunk's own keys; the two partials merge exactly.
  """
  o_prev, lse_prev = pk.shared_attention(q, store_k, store_v, kv_length=start, backend=backend)
  o_own, lse_own = causal_attention(q, k, v)
  return pk.merge_attention_states(o_prev, lse_prev, o_own, lse_own)[0]


class SharedLayer(NamedTuple):
  """One layer of the shared store as the attention sees it.

  k, v: [S, Hkv, D] in the model dtype, or float8 (`pallas_kernels.quant.FP8_DTYPES`) with
    k_scale, v_scale: [Hkv] float32 dequantization scales (k = k_scale[h] * k_stored); None for
    unscaled K/V. The kernels read the float8 tiles and fold the scales into q and o.
  summaries: the routing summaries (built from the full-precision or dequantized keys).
  length: valid tokens (int32 scalar).
  """

  k: jax.Array
  v: jax.Array
  summaries: routing.ChunkSummaries
  length: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None


def with_room(tables: jax.Array, T: int, page_size: int) -> jax.Array:
  """tables [B, max_pages] with ceil(T / page_size) more entries on the scratch page 0, so that
  lengths + T (the unique attention's causal end for T fed rows) fits the table even when a
  request feeds fewer than T real tokens into its last pages: clamped to the table, that end
  would move the real rows' causal window back (they lost their newest keys). The padding
  tokens past a request's pages land on page 0 and reach no real row."""
  extra = -(-T // page_size)
  return jnp.pad(tables, ((0, 0), (0, extra)))


def unique_partial(q: jax.Array, k: jax.Array, v: jax.Array, pages: tuple[jax.Array, jax.Array],
                   tables: jax.Array, lengths: jax.Array, mcfg: MoskaConfig, *,
                   k_scale: jax.Array | None = None, v_scale: jax.Array | None = None
                   ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """The unique half of a MoSKA step for one layer.

  Appends the new k, v[B, T, Hkv, D] to each request's pages and attends q[B, T, Hq, D] to its
  unique KV (cached tokens and the new ones).

  Args:
    q, k, v: the step's T new tokens of every request.
    pages: this layer's (k_pages, v_pages) [P, page_size, Hkv, D], one pool for all requests.
    tables: [B, max_pages] each request's page ids.
    lengths: [B] tokens each request had cached before this step.
    mcfg: the kernel backend and interpret mode.
    k_scale, v_scale: [Hkv] float32 scales of float8 pools (the new K/V are written as
      k / k_scale, saturated; `pk.write_pages`), None for pools in the model dtype.

  Returns:
    ((o, lse), updated (k_pages, v_pages)).
  """
  T = q.shape[1]
  scales = dict(k_scale=k_scale, v_scale=v_scale)
  tables = with_room(tables, T, pages[0].shape[1])
  k_pages, v_pages = pk.write_pages(*pages, tables, lengths, k, v, **scales)
  o_u, lse_u = pk.unique_attention(q, k_pages, v_pages, tables, lengths + T, **scales,
                                   backend=mcfg.backend, interpret=mcfg.interpret)
  return (o_u, lse_u), (k_pages, v_pages)


def shared_partial(q: jax.Array, shared: SharedLayer, mcfg: MoskaConfig, *,
                   top_k: int | None = None,
                   chunk_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(o, lse) of q[B, T, Hq, D] over the shared KV: the whole store (dense) or routed chunks.

  Sparse: over `chunk_ids` [B, Hkv, K] when given, else over the top_k chunks `routing.route`
  picks (default top_k: `mcfg.chunks_kept` of the summaries' chunk slots; pass the store's real
  chunk count's K, as the engine does, when the store is padded past its last chunk), routed with
  the kernel settings of `mcfg` (int8 scorer, backend, interpret); then `routed_attention`.
  """
  if mcfg.mode == "dense":
    return pk.shared_attention(q, shared.k, shared.v, kv_length=shared.length,
                               k_scale=shared.k_scale, v_scale=shared.v_scale,
                               backend=mcfg.backend, interpret=mcfg.interpret)
  if chunk_ids is None:
    top_k = top_k or mcfg.chunks_kept(shared.summaries.num_chunks)
    chunk_ids = routing.route(q, shared.summaries, top_k, always_include=mcfg.always_include,
                              int8=mcfg.int8_scorer, backend=mcfg.backend,
                              interpret=mcfg.interpret)
  return routed_attention(q, shared, chunk_ids, mcfg)


def routed_attention(q: jax.Array, shared: SharedLayer, ids: jax.Array,
                     mcfg: MoskaConfig) -> tuple[jax.Array, jax.Array]:
  """(o, lse) of q[B, T, Hq, D] over the routed chunks ids[B, Hkv, K] of the shared KV: per
  (request, chunk) pair (`chunk_attention`), or per tile of alike requests over the union of
  their chunks when `mcfg.batch_aware` is set (`routing.batch_aware`, `tile_chunk_attention`)."""
  if mcfg.chunk_size != shared.summaries.chunk_size:
    raise ValueError(f"routed_attention: mcfg.chunk_size={mcfg.chunk_size} must match the "
                     f"summaries' chunk_size={shared.summaries.chunk_size} (the chunks routed)")
  kernel = dict(chunk_size=mcfg.chunk_size, kv_length=shared.length, k_scale=shared.k_scale,
                v_scale=shared.v_scale, backend=mcfg.backend, interpret=mcfg.interpret)
  if not mcfg.batch_aware:
    return pk.chunk_attention(q, shared.k, shared.v, ids, **kernel)
  B = q.shape[0]
  order, tiles = routing.batch_aware(ids, shared.summaries.num_chunks, mcfg.batch_aware,
                                     skip=len(mcfg.always_include))
  q_tiled = jnp.pad(q, ((0, order.shape[0] - B),) + ((0, 0),) * 3)[order]
  o, lse = pk.tile_chunk_attention(q_tiled, shared.k, shared.v, tiles, **kernel)
  back = jnp.argsort(order)[:B]  # where each request sits in the tile order
  return o[back], lse[back]
