"""A layer's disaggregated attention as one compiled program over the span of the device groups.

A jitted program runs on one set of devices, so the step runs on `DeviceGroups.span_mesh` (the
unique devices, then the shared ones) as a `shard_map` body, each device on its own blocks
(`moska_jax.sharding.placement`). The hand-off of the queries and the return of (o, lse) are
collectives inside the program:

    unique device (its request rows)              shared device r (its store rows)
    q [B_l]  --hand_off: all_gather over "span", the owners' rows kept-->  q [B] on every device
    unique partial over its pages                 shared partial over rows [r R, (r + 1) R):
      (shared devices: 0 keys)                      dense, or routed (each device scores its
                                                    chunks, scores all-gathered, one top-k)
                                                    (unique devices: 0 rows)
    merge_over_span: all_gather over "span" + local merge (or pmax, psum) -> (o, lse) [B] everywhere
    own_rows: each unique device keeps its requests' rows

Roles are data (lengths and masks from `DeviceGroups.span_roles`), not control flow: every device
runs the same kernels, the other role's over zero keys (the kernels' loops stop at the length).
A device-dependent `lax.cond` would make each GPU step wait on the host for its predicate, and a
collective inside one branch would never be met by the devices that took the other.

Only q (and chunk ids) go out and only (o, lse) come back, B*T*Hq*(D+1) numbers per layer and
span device (`merge_over_span`); the shared KV never moves. `TransferStats.of_step` counts them
from the shapes.

Here: the body-level parts (`SpanContext`, `hand_off`, `own_rows`, `shared_partial`,
`merge_over_span`), two programs built from them (`shared_attention_program`: the shared half;
`disaggregated_attention_program`: a decode layer's unique and shared halves merged) and
`shared_attention_step`, which places its inputs and runs the first.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from moska_jax import routing
from moska_jax.sharding.groups import SPAN, DeviceGroups
from moska_jax.sharding.placement import (TransferStats, exchanges_by_gather, place_replicated,
                                          place_requests, span_sharding)
from pallas_kernels import chunk_attention, merge_partials, shared_attention, unique_attention


def span_map(f, groups: DeviceGroups, in_specs, out_specs):
  """`shard_map` of f over the span mesh; replication checks off because the Pallas calls
  inside carry no varying-axes types on every supported version."""
  mesh: Mesh = groups.span_mesh
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map

  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


class SpanContext(NamedTuple):
  """Inside a span body: this device's role for a batch of `batch` requests (the traced entries
  of `DeviceGroups.span_roles` at this device's span position)."""

  batch: int
  rows: int  # B_l, the requests each unique device serves
  shard: jax.Array  # int32: the request shard it serves
  owner: jax.Array  # bool: it speaks for its shard in collectives
  unique: jax.Array  # bool: it serves requests
  shared_rank: jax.Array  # int32: its rank in the shared group, -1 on unique devices
  shared_positions: tuple[int, ...]  # the span positions of shared ranks 0, 1, ...
  owner_positions: tuple[int, ...]  # the span positions of the owners of shards 0, 1, ...


def span_context(groups: DeviceGroups, batch: int, replicated: bool = False) -> SpanContext:
  """This device's `SpanContext` (call inside a `span_map` body; `DeviceGroups.span_roles`)."""
  roles = groups.span_roles(batch, replicated)
  i = jax.lax.axis_index(SPAN)
  at = lambda values: jnp.asarray(np.asarray(values))[i]
  positions = tuple(sorted((r, p) for p, r in enumerate(roles.shared_rank) if r >= 0))
  owners = sorted((s, p) for p, (s, o) in enumerate(zip(roles.shard, roles.owner)) if o)
  return SpanContext(batch, batch // roles.shards, at(roles.shard), at(roles.owner),
                     at(roles.unique), at(roles.shared_rank), tuple(p for _, p in positions),
                     tuple(p for _, p in owners))


def hand_off(ctx: SpanContext, x: jax.Array) -> jax.Array:
  """x[B_l, ...] of each unique device's requests -> x[B, ...] on every span device.

  At decode sizes (`placement.exchanges_by_gather`): one all_gather over "span" of every
  device's x, of which each device keeps the shard owners' blocks, one collective round (a psum
  is a reduce-scatter and an all-gather). Larger x (prefill lanes, wide spans): a psum of the
  [B] rows where only each shard's owner writes its rows (the others add exact zeros, so the
  values arrive unchanged), which moves fewer bytes than span - 1 blocks.
  """
  if exchanges_by_gather(jax.lax.axis_size(SPAN), x.size * x.dtype.itemsize):
    every = jax.lax.all_gather(x, SPAN)  # [span, B_l, ...]
    return every[np.asarray(ctx.owner_positions)].reshape(ctx.batch, *x.shape[1:])
  rows = jnp.where(ctx.owner, x, jnp.zeros((), x.dtype))
  full = jnp.zeros((ctx.batch, *x.shape[1:]), x.dtype)
  full = jax.lax.dynamic_update_slice_in_dim(full, rows, ctx.shard * ctx.rows, axis=0)
  return jax.lax.psum(full, SPAN)


def own_rows(ctx: SpanContext, x: jax.Array) -> jax.Array:
  """x[B, ...] -> this device's request rows [B_l, ...]."""
  return jax.lax.dynamic_slice_in_dim(x, ctx.shard * ctx.rows, ctx.rows, axis=0)


def merge_over_span(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One partial per span device -> their exact merge on every device.

  At decode sizes (`placement.exchanges_by_gather`): one all_gather of the partials packed as
  [..., D + 1] float32 (o, then lse), then the local stacked merge, a single collective round;
  there each round costs its latency, not its bytes, and the collective form of `merge_partials`
  (a pmax, then psums of counts, weights and outputs) takes several dependent rounds (on 2x H200
  the exchange fell from 0.27 to 0.16 ms at B=64: disaggregation.md). Larger partials take the
  collective form, which moves fewer bytes than span - 1 partials.
  """
  span = jax.lax.axis_size(SPAN)
  if not exchanges_by_gather(span, o.size // o.shape[-1] * (o.shape[-1] + 1) * 4):
    return merge_partials(o, lse, axis_name=SPAN)
  packed = jnp.concatenate([o.astype(jnp.float32), lse.astype(jnp.float32)[..., None]], axis=-1)
  every = jax.lax.all_gather(packed, SPAN)  # [span, ..., D + 1]
  out, out_lse = merge_partials(every[..., :-1], every[..., -1], axis=0)
  return out.astype(o.dtype), out_lse


def route_on_span(ctx: SpanContext, q: jax.Array, summaries: routing.ChunkSummaries, top_k: int,
                  always_include: Sequence[int] = (), *, kernel: dict) -> jax.Array:
  """`routing.route` over the summaries sharded on the shared devices, in a span body.

  Each device scores its own chunks; the scores [B, Hkv, N_local] are gathered over "span" and
  every device takes the same global top-k (the shared ranks' chunks in order; unique devices'
  blocks are dropped). q: [B, T, Hq, D] on every device; kernel: how a kind's scoring kernel runs
  (int8, backend, interpret). Returns global chunk ids [B, Hkv, K].
  """
  arrays = summaries.arrays
  n_local, Hkv = arrays[0].shape[:2]
  B, T, Hq, D = q.shape
  if Hq % Hkv:
    raise ValueError(f"route_on_span: Hq={Hq} must be a multiple of the summaries' Hkv={Hkv}")
  grouped = q.reshape(B, T, Hkv, Hq // Hkv, D)
  scores = routing.SUMMARIES[summaries.kind].score(  # [B, Hkv, N_local]
      grouped, arrays, summaries.projection, kernel)
  ranks = np.asarray(ctx.shared_positions)
  gathered = jax.lax.all_gather(scores, SPAN)[ranks]  # [n, B, Hkv, N_local]
  scores = gathered.transpose(1, 2, 0, 3).reshape(B, Hkv, len(ranks) * n_local)
  forced = tuple(int(c) for c in always_include)
  # routing's own selection (forced chunks first, -1 past the valid ones), on the global scores.
  return routing._select(scores, top_k, forced, summaries.num_valid_chunks)  # noqa: SLF001


class SharedConfig(NamedTuple):
  """The static arguments of the shared half (hashable: programs are cached on it).

  mode: "dense", "sparse" (chunk ids handed off with q) or "routed" (summaries + top_k, routed on
  the shared devices). chunk_size divides every device's rows (sparse, routed). int8_scorer:
  `MoskaConfig.int8_scorer` for an "int4" router.
  """

  mode: str = "dense"
  top_k: int | None = None
  always_include: tuple[int, ...] = ()
  chunk_size: int | None = None
  sm_scale: float | None = None
  backend: str = "auto"
  interpret: bool = False
  int8_scorer: bool = False


def shared_partial(ctx: SpanContext, q: jax.Array, k: jax.Array, v: jax.Array,
                   kv_length: jax.Array, cfg: SharedConfig, *, chunk_ids: jax.Array | None = None,
                   summaries: Any = None) -> tuple[jax.Array, jax.Array]:
  """This device's partial (o, lse) of q[B, T, Hq, D] over its store rows k, v[R, Hkv, D] (rows
  [r R, (r + 1) R) of the store on shared rank r; none on unique devices), in a span body.

  kv_length: the store's valid rows. chunk_ids: [B, Hkv, K] global ids ("sparse"); summaries:
  this device's block of the `ChunkSummaries` ("routed").
  """
  r, R = ctx.shared_rank, k.shape[0]
  n = jnp.where(r >= 0, jnp.clip(kv_length - r * R, 0, R), 0)
  kernel = dict(sm_scale=cfg.sm_scale, kv_length=n, backend=cfg.backend,
                interpret=cfg.interpret)
  if cfg.mode == "dense":
    return shared_attention(q, k, v, **kernel)
  if cfg.mode == "routed":
    chunk_ids = route_on_span(ctx, q, summaries, cfg.top_k, cfg.always_include,
                              kernel=dict(int8=cfg.int8_scorer, backend=cfg.backend,
                                          interpret=cfg.interpret))
  # Global chunk c lives on rank c // per_device; other ranks' ids (and -1 padding) become -1,
  # which chunk_attention skips.
  per_device = R // cfg.chunk_size
  ids = chunk_ids - r * per_device
  ids = jnp.where((chunk_ids >= 0) & (r >= 0) & (ids >= 0) & (ids < per_device), ids, -1)
  return chunk_attention(q, k, v, ids, chunk_size=cfg.chunk_size, **kernel)


def merge_with_unique(ctx: SpanContext, unique: tuple[jax.Array, jax.Array],
                      shared: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The attention over unique + shared KV on every span device: the owners' unique partials
  (o_u [B_l, ...], lse_u) and every device's shared partial (o_s [B, ...], lse_s) merged over the
  span in one collective. Returns (o [B, ...] float32, lse [B, ...])."""
  (o_u, lse_u), (o_s, lse_s) = unique, shared
  at = ctx.shard * ctx.rows
  o_full = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(o_s.shape, jnp.float32),
                                               o_u.astype(jnp.float32), at, axis=0)
  lse_u = jnp.where(ctx.owner, lse_u.astype(jnp.float32), -jnp.inf)
  lse_full = jax.lax.dynamic_update_slice_in_dim(jnp.full(lse_s.shape, -jnp.inf), lse_u, at,
                                                 axis=0)
  o, lse = merge_partials(jnp.stack([o_full, o_s.astype(jnp.float32)]),
                          jnp.stack([lse_full, lse_s]), axis=0)
  return merge_over_span(o, lse)


def _check_store(groups: DeviceGroups, name: str, x: jax.Array, cfg: SharedConfig) -> None:
  span = len(groups.span_devices)
  if (not isinstance(x, jax.Array) or x.ndim != 3 or x.shape[0] % span
      or not x.sharding.is_equivalent_to(span_sharding(groups), 3)):
    raise ValueError(f"{name} must be a span array [{span} * R, Hkv, D] split over 'span' "
                     f"(place the store with place_shared_kv), got shape {x.shape}")
  R = x.shape[0] // span
  if cfg.mode != "dense" and (not isinstance(cfg.chunk_size, int) or cfg.chunk_size < 1
                              or R % cfg.chunk_size):
    raise ValueError(f"sparse attention needs a chunk_size that divides the {R} rows of each "
                     f"device (whole chunks per device), got {cfg.chunk_size!r}")


def summary_specs(summaries: routing.ChunkSummaries) -> routing.ChunkSummaries:
  """The span specs of placed summaries: per-chunk arrays split over "span", the rest
  replicated (`PlacedSharedKV.summaries`)."""
  return summaries.map_parts(lambda x: P(SPAN), lambda x: P())


@functools.lru_cache(maxsize=None)
def shared_attention_program(groups: DeviceGroups, batch: int, cfg: SharedConfig):
  """The jitted shared half for `batch` requests:
  fn(q, k, v, kv_length[, chunk_ids | summaries]) -> (o, lse) replicated over the span.

  q: [num_span * B_l, T, Hq, D] (`place_requests`); k, v, kv_length (, summaries): a
  `PlacedSharedKV`; chunk_ids: [num_span * B_l, Hkv, K] global ids (`place_requests`).
  o [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32: the shared attention of every request.
  """

  def body(q, k, v, kv_length, extra=None):
    ctx = span_context(groups, batch)
    q = hand_off(ctx, q)
    ids = hand_off(ctx, extra) if cfg.mode == "sparse" else None
    o, lse = shared_partial(ctx, q, k, v, kv_length, cfg, chunk_ids=ids,
                            summaries=extra if cfg.mode == "routed" else None)
    o, lse = merge_over_span(o, lse)
    return o.astype(q.dtype), lse

  def program(q, k, v, kv_length, extra=None):
    specs = [P(SPAN), P(SPAN), P(SPAN), P()]
    args = [q, k, v, kv_length]
    if cfg.mode != "dense":
      specs.append(P(SPAN) if cfg.mode == "sparse" else summary_specs(extra))
      args.append(extra)
    return span_map(body, groups, tuple(specs), (P(), P()))(*args)

  return jax.jit(program)


@functools.lru_cache(maxsize=None)
def disaggregated_attention_program(groups: DeviceGroups, batch: int, page_size: int,
                                    cfg: SharedConfig):
  """The jitted attention of one decode layer over unique and shared KV, both halves in one
  program: fn(q, k_pages, v_pages, tables, lengths, k, v, kv_length[, summaries]) -> (o, lse)
  replicated over the span.

  q [num_span * B_l, T, Hq, D], tables [num_span * B_l, max_pages], lengths [num_span * B_l]
  (`place_requests`; lengths count the tokens in each request's pages, the T new ones included);
  k_pages, v_pages: span arrays [num_span * R_p, Hkv, D] whose unique blocks are page pools of
  R_p / page_size pages; k, v, kv_length (, summaries): a `PlacedSharedKV`. The pools and the store
  may be the same arrays (the unique devices' free rows of `place_shared_kv` hold the pages).
  Returns o [B, T, Hq, D] in q's dtype and lse [B, T, Hq] float32.
  """
  if cfg.mode == "sparse":
    raise ValueError("disaggregated_attention_program: chunk ids are routed on the shared "
                     "devices here; use mode 'dense' or 'routed'")

  def body(q, k_pages, v_pages, tables, lengths, k, v, kv_length, summaries=None):
    ctx = span_context(groups, batch)
    q_all = hand_off(ctx, q)
    pools = [x.reshape(-1, page_size, *x.shape[1:]) for x in (k_pages, v_pages)]
    # q from the hand-off: the unique half waits for it, so q leaves before the unique kernel.
    unique = unique_attention(own_rows(ctx, q_all), *pools, tables,
                              jnp.where(ctx.unique, lengths, 0), sm_scale=cfg.sm_scale,
                              backend=cfg.backend, interpret=cfg.interpret)
    shared = shared_partial(ctx, q_all, k, v, kv_length, cfg, summaries=summaries)
    o, lse = merge_with_unique(ctx, unique, shared)
    return o.astype(q.dtype), lse

  def program(q, k_pages, v_pages, tables, lengths, k, v, kv_length, summaries=None):
    specs = (P(SPAN),) * 7 + (P(),)
    args = (q, k_pages, v_pages, tables, lengths, k, v, kv_length)
    if cfg.mode == "routed":
      specs, args = specs + (summary_specs(summaries),), args + (summaries,)
    return span_map(body, groups, specs, (P(), P()))(*args)

  return jax.jit(program)


def shared_attention_step(groups: DeviceGroups, q, shared_k: jax.Array, shared_v: jax.Array, *,
                          kv_length: int | jax.Array | None = None, chunk_ids=None,
                          summaries: Any = None, top_k: int | None = None,
                          always_include: Sequence[int] = (), chunk_size: int | None = None,
                          sm_scale: float | None = None, backend: str = "auto",
                          interpret: bool = False
                          ) -> tuple[jax.Array, jax.Array, TransferStats]:
  """Attention of q over the shared store on the shared devices, with the hand-off of q and the
  return of (o, lse) inside one compiled program (`shared_attention_program`).

  Dense by default (`pallas_kernels.shared_attention` on each device's rows); sparse with
  `chunk_ids` (global ids, as from `routing.route`, handed off with q) or with `summaries` +
  `top_k` (routed on the shared devices, next to their summaries), run by
  `pallas_kernels.chunk_attention` on each device's own chunks.

  Args:
    groups: the device groups.
    q: [B, T, Hq, D] queries, host values (placed on the unique devices by request,
      `place_requests`; the same values in every process under jax.distributed).
    shared_k, shared_v: span arrays from `place_shared_kv`.
    kv_length: the store's valid rows S (an int, or the `PlacedSharedKV.kv_length` array);
      required: the placed store's rows past S are zero padding, which must not be attended.
    chunk_ids: [B, Hkv, K] global chunk ids (host values); ids outside [0, N) select nothing.
    summaries, top_k, always_include: route on the shared devices instead
      (`PlacedSharedKV.summaries`).
    chunk_size: C (sparse only); it must divide each device's rows (and, routed, be the
      summaries' chunk size).
    sm_scale, backend, interpret: as for the kernels.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32, replicated on every span device (so
    every process can read them), and the step's `TransferStats`.
  """
  sparse = chunk_ids is not None
  if sparse and top_k is not None:
    raise ValueError("shared_attention_step: pass chunk_ids or (summaries, top_k), not both")
  if top_k is not None and summaries is None:
    raise ValueError("shared_attention_step: top_k needs the shared store's summaries")
  mode = "sparse" if sparse else "routed" if top_k is not None else "dense"
  cfg = SharedConfig(mode, top_k, tuple(int(c) for c in always_include) if top_k else (),
                     chunk_size if mode != "dense" else None, sm_scale, backend, interpret)
  for name, x in (("shared_k", shared_k), ("shared_v", shared_v)):
    _check_store(groups, f"shared_attention_step: {name}", x, cfg)
  if kv_length is None:
    raise ValueError("shared_attention_step: kv_length is required (the store's S rows: "
                     "PlacedSharedKV.kv_length); rows past it are zero padding")
  if mode == "routed":
    if summaries.chunk_size != chunk_size:
      raise ValueError(f"shared_attention_step: chunk_size={chunk_size} must be the summaries' "
                       f"chunk size, {summaries.chunk_size}")
    n = groups.num_shared * summaries.arrays[0].shape[0] // len(groups.span_devices)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
      raise ValueError(f"shared_attention_step: top_k must be an int in [1, N={n}], got "
                       f"{top_k!r}")
    if any(not 0 <= c < n for c in cfg.always_include) or len(cfg.always_include) > top_k:
      raise ValueError(f"shared_attention_step: always_include must hold at most top_k={top_k} "
                       f"chunk ids in [0, N={n}), got {always_include!r}")
  if not isinstance(kv_length, jax.Array):  # a traced or placed length is the caller's
    rows = groups.num_shared * shared_k.shape[0] // len(groups.span_devices)
    if (isinstance(kv_length, (bool, np.bool_)) or not isinstance(kv_length, (int, np.integer))
        or not 0 <= kv_length <= rows):
      raise ValueError(f"shared_attention_step: kv_length must be an int in [0, {rows}] (the "
                       f"store's S rows, PlacedSharedKV.kv_length), got {kv_length!r}")
    kv_length = place_replicated(groups, np.int32(kv_length))
  q = np.asarray(q)
  B = q.shape[0]
  q_span = place_requests(groups, q, B)
  program = shared_attention_program(groups, B, cfg)
  if mode == "dense":
    o, lse = program(q_span, shared_k, shared_v, kv_length)
  else:
    extra = place_requests(groups, np.asarray(chunk_ids, np.int32), B) if sparse else summaries
    o, lse = program(q_span, shared_k, shared_v, kv_length, extra)
  return o, lse, TransferStats.of_step(groups, q.shape, q.dtype,
                                       np.shape(chunk_ids) if sparse else None)
