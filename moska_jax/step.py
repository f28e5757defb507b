"""One MoSKA step of the decoder over a batch of requests, as a pure function of its state.

A step feeds tokens to one or more `Part`s; a part is B_p requests feeding T_p tokens each. The
engine's steps have a decode part (every slot, T = 1) and, while prompts are being read, a
prefill part (a chunk of T = prefill_chunk prompt tokens for each of a few prefilling requests),
so a long prompt is read beside the decoding requests instead of stopping them. With several
parts the tokens are packed into one sequence [1, sum_p B_p T_p]: the weights are read once per
step, and per layer the shared half runs once over the rows of every part (the shared KV is read
once per step) while the unique half runs per part (its requests' paged attention).

In every layer `moska_attend` zeroes the padding query rows, runs the shared half (dense or
routed attention over each request's shared context) and the unique half (the new K/V appended
to the request's pages, then paged attention), and merges the two partials exactly. The page
pools, and the reused chunk selections when `MoskaConfig.reroute_every` > 1, are the decoder's
per-layer state: they go in and come out as values (`Decoder.forward`).

Several shared contexts (`SharedContext`, one per resident store) can serve one step: each
request names one in its part's `context`. Per layer each context's attention runs over the
step's rows that read it (a `lax.cond` skips a context no live row reads; on a GPU the dense
step gives it no valid key instead, as the disaggregated step does: `cond_waits_for_device`),
as chunk routing groups queries by chunk one level down: sparse, a context's chunk work list
holds only its own rows' (query, chunk) pairs; dense, its GEMM runs over the step's rows and
keeps its own, so each context in use costs one pass of the batch over its K/V (which is read
once; float8 K/V (or V only) under many rows are first widened once per layer, behind a
`lax.cond` on a valid key: `gpu.tuning.mosaic_shared`).

`moska_step` is the step on one device: pure and jittable (the engine jits it; experiments
call it directly). The disaggregated engine runs the same parts (`zero_padding`, the kernels) in
one program over both device groups, one part at a time, and merges the halves across them
(`moska_jax.engine.GroupsExecutor`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from moska_jax import routing
from moska_jax.attention import SharedLayer, shared_partial, with_room
from moska_jax.config import ModelConfig, MoskaConfig
from moska_jax.kv_cache import SharedKVStore
from moska_jax.model import Attend, Decoder

Pages = tuple[jax.Array, jax.Array]  # one layer's (k_pages, v_pages) [P, page_size, Hkv, D]
# one layer's (k_scale, v_scale) [Hkv] float32 of float8 page pools
Scales = tuple[jax.Array, jax.Array]
# shared(layer, qs, ids) -> ([(o, lse)] per part, new ids of part 0 or None); qs: each part's
# q[B_p, T_p, Hq, D]; ids: the layer's reused chunk selections of part 0 (or None)
SharedPart = Callable[[int, list, jax.Array | None], tuple[list, jax.Array | None]]
# unique(layer, qs, ks, vs, pages) -> ([(o, lse)] per part, pages): every part's new K/V appended
# to its requests' pages, then each part's paged attention
UniquePart = Callable[[int, list, list, list, Pages], tuple[list, Pages]]

# zero_padding and merge_halves are jitted so that an eager caller runs each as one program;
# inside a jitted step they are inlined.


@jax.jit
def zero_padding(q: jax.Array, fed: jax.Array) -> jax.Array:
  """Zeroes the query rows past fed[b] (padding of a fixed-shape step): their outputs are never
  read, and a zero row takes no part in the router's score (`routing.route`), so padding cannot
  steer routing."""
  return jnp.where(_live(fed, q.shape[1])[:, :, None, None], q, jnp.zeros((), q.dtype))


@jax.jit
def merge_halves(o_u: jax.Array, lse_u: jax.Array, o_s: jax.Array, lse_s: jax.Array) -> jax.Array:
  """The attention output over unique + shared KV from the two partials."""
  return pk.merge_attention_states(o_u, lse_u, o_s, lse_s)[0]


def _live(fed: jax.Array, T: int) -> jax.Array:
  """[B, T] bool: the rows of a part that carry real tokens."""
  return jnp.arange(T)[None, :] < fed[:, None]


class Part(NamedTuple):
  """B_p requests feeding T_p tokens each.

  tokens: [B_p, T_p] int32; the first fed[b] of row b are real, the rest padding.
  tables: [B_p, max_pages] int32 page ids of each request (rows of the scratch page 0 for rows
    that are all padding: their writes land there).
  lengths: [B_p] int32 tokens each request has cached before this step.
  fed: [B_p] int32.
  context: [B_p] int32, the index of the shared context each request reads.
  """

  tokens: jax.Array
  tables: jax.Array
  lengths: jax.Array
  fed: jax.Array
  context: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedContext:
  """A resident shared store as a step reads it.

  layers: per layer the store's `SharedLayer`.
  top_k: K, the chunks kept per (request, kv head) when sparse, from the chunks that hold the
    store's tokens (`MoskaConfig.chunks_kept`); None when dense. Static under jit.
  model_config: the config of the model that built the store (`moska_step` refuses another
    model's); None when unknown. Static under jit.
  """

  layers: tuple[SharedLayer, ...]
  top_k: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  model_config: ModelConfig | None = dataclasses.field(default=None, metadata=dict(static=True))

  @classmethod
  def of(cls, store: SharedKVStore, mcfg: MoskaConfig) -> SharedContext:
    """The context of `store` under `mcfg` (reads the store's token count to the host).

    Raises:
      ValueError: sparse mcfg whose chunk_size is not the store's (the router's chunk ids
        would name other keys).
    """
    if mcfg.mode == "sparse" and mcfg.chunk_size != store.chunk_size:
      raise ValueError(f"SharedContext.of: mcfg.chunk_size={mcfg.chunk_size} must match the "
                       f"store's chunk_size={store.chunk_size}")
    return cls(store.layers, store_top_k(store, mcfg), store.model_config)


def store_top_k(store: SharedKVStore, mcfg: MoskaConfig) -> int | None:
  """K for `store` under `mcfg`: a fraction of its ceil(S / C) chunks that hold tokens (None
  when dense)."""
  if mcfg.mode == "dense":
    return None
  return mcfg.chunks_kept(-(-int(store.length) // store.chunk_size))


class Routes(NamedTuple):
  """Chunk selections reused across decode steps (sparse, `MoskaConfig.reroute_every` > 1) by
  the requests of the step's first part.

  ids: per layer [B_0, Hkv, K] int32, K the largest top_k of the contexts (-1 padded).
  reroute: [B_0] bool, the rows that route in this step; the others keep their ids.
  due: a Python bool, whether any row of `reroute` is set, decided by the caller (the engine's
    plan knows it): False skips the router, True routes every context (each row keeps its own
    ids unless it re-routes). A branch decided on the device (lax.cond) would make a GPU host
    wait for the device in every layer.
  """

  ids: tuple[jax.Array, ...]
  reroute: jax.Array
  due: bool


def _split(x: jax.Array, shapes: Sequence[tuple[int, int]]) -> list[jax.Array]:
  """A step array [1, N, ...] of packed parts (or [B, T, ...] of one part) -> per part."""
  if len(shapes) == 1:
    return [x]
  out, start = [], 0
  for B, T in shapes:
    out.append(x[0, start:start + B * T].reshape(B, T, *x.shape[2:]))
    start += B * T
  return out


def _join(xs: Sequence[jax.Array]) -> jax.Array:
  """Inverse of `_split`."""
  if len(xs) == 1:
    return xs[0]
  return jnp.concatenate([x.reshape(1, -1, *x.shape[2:]) for x in xs], axis=1)


def moska_attend(shared: SharedPart, unique: UniquePart, shapes: Sequence[tuple[int, int]],
                 fed: Sequence[jax.Array | None]) -> Attend:
  """The decoder's `attend` for a MoSKA step; its layer state is (pages, reused ids or None).

  Args:
    shared: the shared half over every part (`local_shared`).
    unique: the unique half of every part (`local_unique`).
    shapes: each part's (B_p, T_p); q, k, v come packed when there are several parts.
    fed: per part [B_p] real tokens per request (the rest of the T_p rows is padding), or None
      (all real).
  """
  def attend(i, q, k, v, state):
    pages, ids = state
    qs = [qp if f is None else zero_padding(qp, f) for qp, f in zip(_split(q, shapes), fed)]
    shared_out, ids = shared(i, qs, ids)  # issued first: on groups it runs beside the unique half
    unique_out, pages = unique(i, qs, _split(k, shapes), _split(v, shapes), pages)
    out = [merge_halves(*u, *s) for u, s in zip(unique_out, shared_out)]
    return _join(out), (pages, ids)

  return attend


def step_positions(shared_lengths, lengths, T: int):
  """Positions [B, T] of a part's tokens: after each request's shared context (shared_lengths:
  a scalar or [B]) and its cached tokens."""
  start = jnp.reshape(shared_lengths, (-1, 1)) + lengths[:, None]
  return start + jnp.arange(T, dtype=jnp.int32)[None]


def _pad_ids(ids: jax.Array, K: int) -> jax.Array:
  return jnp.pad(ids, ((0, 0), (0, 0), (0, K - ids.shape[2])), constant_values=-1)


def local_unique(parts: Sequence[Part], mcfg: MoskaConfig,
                 scales: Sequence[Scales] | None = None) -> UniquePart:
  """The unique half of a one-device step: every part's K/V written first, then each part's
  paged attention, so the pools see no reader between the writes (updated in place, never
  copied). scales: per layer the float8 pools' (k_scale, v_scale), or None."""
  def unique(i, qs, ks, vs, pages):
    kv_scales = {} if scales is None else dict(zip(("k_scale", "v_scale"), scales[i]))
    tables = [with_room(p.tables, q.shape[1], pages[0].shape[1]) for p, q in zip(parts, qs)]
    for p, t, k, v in zip(parts, tables, ks, vs):
      pages = pk.write_pages(*pages, t, p.lengths, k, v, **kv_scales)
    return [pk.unique_attention(q, *pages, t, p.lengths + q.shape[1], **kv_scales,
                                backend=mcfg.backend, interpret=mcfg.interpret)
            for p, t, q in zip(parts, tables, qs)], pages

  return unique


def cond_waits_for_device(mcfg: MoskaConfig) -> bool:
  """Whether a `lax.cond` in the step would make the host wait for the device: on a GPU, XLA
  runs a conditional by copying its predicate to the host and blocking until the stream is done
  (its command buffers aside), so the step's dispatch would return only once the layers up to
  the last branch had run and the GPU would idle while the host launches what follows each one.
  There the dense step runs a context no row reads with no valid key instead (its Pallas kernels
  skip keys past kv_length; the XLA reference would compute them and mask, so it keeps the
  branch)."""
  return jax.default_backend() in ("gpu", "cuda", "rocm") and mcfg.backend != "xla"


def local_shared(contexts: Sequence[SharedContext], parts: Sequence[Part], mcfg: MoskaConfig,
                 routes: Routes | None) -> SharedPart:
  """The shared half of a one-device step (traceable): the rows of every part in one call per
  context in use (a branch per context; on a GPU, dense, every context, those no row reads with
  no valid key: `cond_waits_for_device`), each row keeping its own context's (o, lse).

  Sparse: each part routes per request over its T_p rows (a prefill chunk chooses together);
  with `routes`, the rows of part 0 that do not re-route keep the ids they are given (the
  router runs only when `routes.due`).
  """
  many = len(contexts) > 1
  sparse = mcfg.mode == "sparse"
  scorer = dict(int8=mcfg.int8_scorer, backend=mcfg.backend, interpret=mcfg.interpret)
  K = max(c.top_k for c in contexts) if sparse else None
  shapes = [p.tokens.shape for p in parts]
  if len(parts) == 1:  # one part keeps its [B, T] shape (one pair per request and chunk)
    (B, T), = shapes
    rows_ctx = jnp.broadcast_to(parts[0].context[:, None], (B, T))
    rows_live = _live(parts[0].fed, T)
  else:  # parts packed into rows [N, 1]
    rows_ctx = jnp.concatenate([jnp.repeat(p.context, T) for p, (_, T) in zip(parts, shapes)])
    rows_live = jnp.concatenate([_live(p.fed, T).reshape(-1) for p, (_, T) in zip(parts, shapes)])
    rows_ctx, rows_live = rows_ctx[:, None], rows_live[:, None]

  def pack(xs):  # per part [B_p, T_p, ...] -> the call's rows
    if len(xs) == 1:
      return xs[0]
    return jnp.concatenate([x.reshape(-1, 1, *x.shape[2:]) for x in xs])

  def unpack(x):  # inverse of pack
    if len(shapes) == 1:
      return [x]
    offsets = np.cumsum([0] + [B * T for B, T in shapes])
    return [x[a:b].reshape(B, T, *x.shape[2:]) for a, b, (B, T) in
            zip(offsets[:-1], offsets[1:], shapes)]

  def shared(i, qs, ids):
    q_rows = pack(qs)

    def context(c, length=None):  # (o, lse, part 0's ids) of the rows that read context c
      layer = contexts[c].layers[i]
      if not sparse:
        if length is not None:
          layer = layer._replace(length=length)
        return (*shared_partial(q_rows, layer, mcfg), ids)
      per_part = []
      for j, q in enumerate(qs):
        fresh = lambda q=q: _pad_ids(routing.route(q, layer.summaries, contexts[c].top_k,
                                                   always_include=mcfg.always_include,
                                                   **scorer), K)
        if j == 0 and ids is not None:  # the router runs only when some row re-routes
          pid = jnp.where(routes.reroute[:, None, None], fresh(), ids) if routes.due else ids
        else:
          pid = fresh()
        if many:  # other contexts' rows select nothing here
          pid = jnp.where((parts[j].context == c)[:, None, None], pid, -1)
        per_part.append(pid)
      row_ids = per_part[0] if len(parts) == 1 else jnp.concatenate(
          [jnp.repeat(p, T, axis=0) for p, (_, T) in zip(per_part, shapes)])
      o, lse = shared_partial(q_rows, layer, mcfg, chunk_ids=row_ids)
      return o, lse, per_part[0] if ids is not None else None

    if not many:
      o, lse, ids = context(0)
    else:
      idle = lambda: (jnp.zeros_like(q_rows), jnp.full(q_rows.shape[:3], -jnp.inf, jnp.float32),
                      ids)
      o, lse, new_ids = idle()
      for c in range(len(contexts)):
        in_c = rows_ctx == c
        read = jnp.any(in_c & rows_live)
        if sparse or not cond_waits_for_device(mcfg):
          o_c, lse_c, ids_c = jax.lax.cond(read, functools.partial(context, c), idle)
        else:  # no branch: a context no row reads has no valid key, which the kernels skip
          o_c, lse_c, ids_c = context(c, jnp.where(read, contexts[c].layers[i].length, 0))
        o = jnp.where(in_c[..., None, None], o_c, o)
        lse = jnp.where(in_c[..., None], lse_c, lse)
        if ids is not None:
          new_ids = jnp.where((parts[0].context == c)[:, None, None], ids_c, new_ids)
      ids = new_ids
    return list(zip(unpack(o), unpack(lse))), ids

  return shared


def moska_step(model: Decoder, contexts: Sequence[SharedContext], pools: Sequence[Pages],
               parts: Sequence[Part], mcfg: MoskaConfig, *, routes: Routes | None = None,
               unique_scales: Sequence[Scales] | None = None
               ) -> tuple[list[jax.Array], tuple[Pages, ...], tuple[jax.Array, ...] | None]:
  """Feeds every part's tokens; pure, so it can be jitted (donate `pools` and `routes.ids`).

  Args:
    model: the decoder (inside jit: `nnx.merge(graphdef, state)`).
    contexts: the resident shared contexts (`SharedContext.of(store, mcfg)`); parts name them by
      index. A context's layers may hold float8 K/V with their scales (`SharedLayer`).
    pools: per layer the unique cache's `Pages`, in the model dtype or float8.
    parts: the requests fed in this step (see `Part`); their requests' pages are disjoint.
    mcfg: dense or sparse shared attention, kernel backend.
    routes: sparse only, the chunk selections part 0 reuses (see `Routes`); None routes every
      row.
    unique_scales: float8 pools only (then required): per layer (k_scale, v_scale) [Hkv] float32,
      the fixed dequantization scales of the pages (new K/V are written as k / k_scale,
      saturated; `UniqueKVCache.scales`).

  Returns:
    per part logits [B_p, T_p, vocab] float32, the updated pools (each part's T_p tokens
    written at its requests' lengths onward) and, with `routes`, part 0's chunk ids per layer.
  """
  if routes is not None and mcfg.mode != "sparse":
    raise ValueError("moska_step: routes are chunk selections; they need mcfg.mode='sparse'")
  for i, c in enumerate(contexts):
    if c.model_config is not None and c.model_config != model.cfg:
      raise ValueError(f"moska_step: contexts[{i}] holds a store built by another model "
                       f"({c.model_config}); this model is {model.cfg}")
  for p in parts:
    ids = pk.checks.host_values(p.context)
    if ids is not None and ids.size and not 0 <= ids.min() <= ids.max() < len(contexts):
      raise ValueError(f"moska_step: Part.context must index the {len(contexts)} contexts "
                       f"([0, {len(contexts)})), got {ids.tolist()}")
  fp8_pools = pk.quant.is_fp8(pools[0][0].dtype)
  if fp8_pools != (unique_scales is not None) or (fp8_pools and len(unique_scales) != len(pools)):
    raise ValueError(f"moska_step: unique_scales must be given, one (k_scale, v_scale) per layer "
                     f"({len(pools)}), exactly when the pools are float8; pools "
                     f"{pools[0][0].dtype}, unique_scales "
                     f"{None if unique_scales is None else len(unique_scales)}")
  shapes = [p.tokens.shape for p in parts]
  shared_lengths = jnp.stack([c.layers[0].length for c in contexts])
  positions = [step_positions(shared_lengths[p.context], p.lengths, p.tokens.shape[1])
               for p in parts]
  attend = moska_attend(local_shared(contexts, parts, mcfg, routes),
                        local_unique(parts, mcfg, unique_scales), shapes,
                        [p.fed for p in parts])
  ids = (None,) * len(pools) if routes is None else routes.ids
  logits, state = model.forward(_join([p.tokens for p in parts]), _join(positions), attend,
                                list(zip(pools, ids)))
  new_ids = None if routes is None else tuple(s[1] for s in state)
  return _split(logits, shapes), tuple(s[0] for s in state), new_ids


def last_logits(logits: jax.Array, fed: jax.Array) -> jax.Array:
  """logits[B, T, V] of a part -> [B, V] at each request's last real token (row 0 when none)."""
  at = jnp.maximum(fed - 1, 0)[:, None, None]
  return jnp.take_along_axis(logits, at, axis=1)[:, 0]
