"""The shared half of a MoSKA step across the device groups: attention over the shared store,
split over the shared group's devices, for queries that live on the unique group.

    unique group                          shared group (shard_map over "kv")
    q [B,T,Hq,D], chunk ids  --device_put-->  replicated on every shared device
                                              device i: partial (o_i, lse_i) over ITS chunks
                                              merge_partials over "kv" (pmax, then psum)
    (o_s, lse_s)            <--device_put--   replicated result

Only q (and routing decisions) travel out and only (o, lse) travel back: B*T*Hq*(D+1) numbers per
layer, never the shared KV. The caller merges (o_s, lse_s) with its unique half.

Why this is several programs, not one jit: a jitted computation runs on one device set; a
`device_put` to another device set inside `jit` raises "Received incompatible devices for jitted
computation". So with disjoint groups the step is orchestrated from Python (dispatch is
asynchronous, so the host does not wait between the pieces). With one device (`colocated`) the
step is traceable and may sit inside the caller's jit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from moska_jax import routing
from moska_jax.sharding.groups import DeviceGroups
from moska_jax.sharding.placement import TransferStats, send_to_shared, send_to_unique
from pallas_kernels import chunk_attention, merge_partials, shared_attention


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
  """jax.shard_map (jax >= 0.10) or the experimental one; replication checks off because the
  Pallas calls inside carry no varying-axes types on every supported version."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map

  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@functools.lru_cache(maxsize=None)
def _shared_program(mesh: Mesh, rows: P, mode: str, top_k: int | None,
                    always_include: tuple[int, ...], chunk_size: int | None,
                    sm_scale: float | None, backend: str, interpret: bool):
  """The jitted shared-group program for one configuration (mode: "dense" or "sparse"); rows:
  the spec of the shared K/V rows, over one mesh axis."""
  (axis,) = rows

  def local(q, k, v, kv_length, chunk_ids=None):
    # k, v are this device's rows [i * S_local, (i + 1) * S_local) of the padded store.
    i = jax.lax.axis_index(axis)
    s_local = k.shape[0]
    n = jnp.clip(kv_length - i * s_local, 0, s_local)
    if mode == "dense":
      o, lse = shared_attention(q, k, v, sm_scale=sm_scale, kv_length=n, backend=backend,
                                interpret=interpret)
    else:
      # Global chunk id c lives here as c - i * per_device; ids of other devices (and -1
      # padding) become -1, which chunk_attention ignores.
      per_device = s_local // chunk_size
      ids = chunk_ids - i * per_device
      ids = jnp.where((chunk_ids >= 0) & (ids >= 0) & (ids < per_device), ids, -1)
      o, lse = chunk_attention(q, k, v, ids, chunk_size=chunk_size, sm_scale=sm_scale,
                               kv_length=n, backend=backend, interpret=interpret)
    return merge_partials(o, lse, axis_name=axis)

  def program(q, k, v, kv_length, chunk_ids=None, summaries=None):
    if mode == "dense":
      return _shard_map(local, mesh, (P(), rows, rows, P()), (P(), P()))(q, k, v, kv_length)
    if top_k is not None:  # route on the shared group: the summaries never leave it
      chunk_ids = routing.route(q, summaries, top_k, always_include=always_include)
    return _shard_map(local, mesh, (P(), rows, rows, P(), P()), (P(), P()))(
        q, k, v, kv_length, chunk_ids)

  return jax.jit(program)


def shared_partial_attention(groups: DeviceGroups, q: jax.Array, shared_k: jax.Array,
                             shared_v: jax.Array, kv_length: jax.Array, *,
                             chunk_ids: jax.Array | None = None, summaries: Any = None,
                             top_k: int | None = None, always_include: Sequence[int] = (),
                             chunk_size: int | None = None, sm_scale: float | None = None,
                             backend: str = "auto",
                             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The shared-group part of the step, on inputs already on the shared group (see
  `shared_attention_step` for the arguments); returns (o, lse) replicated over "kv"."""
  S = shared_k.shape[0]
  if S % groups.num_shared:
    raise ValueError(f"shared_partial_attention: S={S} rows do not split evenly over "
                     f"{groups.num_shared} shared devices; place the store with place_shared_kv")
  sparse = chunk_ids is not None or top_k is not None
  if sparse:
    if chunk_ids is not None and top_k is not None:
      raise ValueError("shared_partial_attention: pass chunk_ids or (summaries, top_k), not both")
    if top_k is not None and summaries is None:
      raise ValueError("shared_partial_attention: top_k needs the shared store's summaries")
    s_local = S // groups.num_shared
    if not isinstance(chunk_size, int) or chunk_size < 1 or s_local % chunk_size:
      raise ValueError(f"shared_partial_attention: sparse attention needs a chunk_size that "
                       f"divides the {s_local} rows of each shared device (whole chunks per "
                       f"device), got {chunk_size!r}")
  program = _shared_program(groups.shared_mesh, groups.rules.shared_rows,
                            "sparse" if sparse else "dense", top_k,
                            tuple(int(c) for c in always_include) if top_k is not None else (),
                            chunk_size if sparse else None, sm_scale, backend, interpret)
  if not sparse:
    return program(q, shared_k, shared_v, kv_length)
  return program(q, shared_k, shared_v, kv_length, chunk_ids, summaries)


def shared_attention_step(groups: DeviceGroups, q: jax.Array, shared_k: jax.Array,
                          shared_v: jax.Array, *, kv_length: int | jax.Array | None = None,
                          chunk_ids: jax.Array | None = None, summaries: Any = None,
                          top_k: int | None = None, always_include: Sequence[int] = (),
                          chunk_size: int | None = None, sm_scale: float | None = None,
                          backend: str = "auto", interpret: bool = False
                          ) -> tuple[jax.Array, jax.Array, TransferStats]:
  """Attention of q over the shared store on the shared group; (o, lse) return to the unique group.

  Dense by default (`pallas_kernels.shared_attention` on each device's rows); sparse with
  `chunk_ids` (global ids, as from `routing.route`) or with `summaries` + `top_k` (routed on the
  shared group, next to the sharded summaries), run by `pallas_kernels.chunk_attention` on each
  device's own chunks. Per-device partials merge by a max-then-sum collective over "kv".

  Args:
    groups: the device groups.
    q: [B, T, Hq, D] queries, usually on the unique group.
    shared_k, shared_v: [S, Hkv, D] sharded over "kv" (`place_shared_kv`).
    kv_length: valid rows (int or int scalar array; `PlacedSharedKV.kv_length`); default S.
    chunk_ids: [B, Hkv, K] global chunk ids; ids outside [0, N) select nothing.
    summaries, top_k, always_include: route here instead (`routing.route(q, summaries, top_k,
      always_include=always_include)`).
    chunk_size: C (sparse only); it must divide each device's rows.
    sm_scale, backend, interpret: as for the kernels.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32 on the unique group (sharded like q when
    q is on the unique mesh), and the step's `TransferStats`.
  """
  if kv_length is None:
    kv_length = shared_k.shape[0]
  if not isinstance(kv_length, jax.Array):
    kv_length = np.int32(kv_length)
  out = [q, kv_length] + ([] if chunk_ids is None else [chunk_ids])
  moved, to_shared = send_to_shared(groups, *out)
  q_s, n_s = moved[:2]
  ids_s = moved[2] if chunk_ids is not None else None
  o, lse = shared_partial_attention(groups, q_s, shared_k, shared_v, n_s, chunk_ids=ids_s,
                                    summaries=summaries, top_k=top_k,
                                    always_include=always_include, chunk_size=chunk_size,
                                    sm_scale=sm_scale, backend=backend, interpret=interpret)
  o, lse, to_unique = send_to_unique(groups, o, lse, like=q)
  return o, lse, TransferStats(to_shared, to_unique)
