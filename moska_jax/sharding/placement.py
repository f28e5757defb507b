"""Placement of data on the device groups, and the counted transfers between them.

Every transfer between the groups is an explicit `jax.device_put` to a target sharding, and the
bytes it lands are counted in `TransferStats`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moska_jax.sharding.groups import DeviceGroups


class PlacedSharedKV(NamedTuple):
  """One layer's shared store on the shared group.

  k, v: [S_pad, Hkv, D] split by rows (`ShardingRules.shared_rows`), S_pad = S rounded up to
  num_shared * chunk_size (zero rows appended; they are masked by kv_length). summaries: the given
  pytree with every per-chunk leaf [N_pad, ...] split likewise (zero rows appended), scalars
  replicated. kv_length: the valid rows, None when nothing was padded and none was given; pass
  it to `shared_attention_step`.
  """

  k: jax.Array
  v: jax.Array
  summaries: Any
  kv_length: int | jax.Array | None
  chunk_size: int


def _pad_rows(x, rows: int):
  pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def place_shared_kv(groups: DeviceGroups, k, v, summaries: Any = None, *, chunk_size: int,
                    kv_length: int | jax.Array | None = None) -> PlacedSharedKV:
  """Puts one layer's shared k, v[S, Hkv, D] (and per-chunk summaries) on the shared group.

  Each shared device gets S_pad / num_shared consecutive rows, a whole number of chunks, so chunk
  c lives on device c // (chunks per device) and no chunk straddles two devices. When S is not a
  multiple of num_shared * chunk_size, zero rows are appended and the returned kv_length
  (min(S, kv_length)) masks them: the result of `shared_attention_step` is unchanged.

  Args:
    groups: the device groups.
    k, v: [S, Hkv, D] NumPy or JAX arrays (multi-host: the same host array in every process).
    summaries: optional pytree whose array leaves of ndim >= 1 have N = ceil(S / chunk_size) rows
      (e.g. `routing.ChunkSummaries`); scalar leaves are replicated.
    chunk_size: C.
    kv_length: optional valid rows (int or int scalar array).
  """
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"place_shared_kv: chunk_size must be a positive int, got {chunk_size!r}")
  if k.ndim != 3 or v.shape != k.shape:
    raise ValueError(f"place_shared_kv: k and v must both have shape [S, Hkv, D], got {k.shape} "
                     f"and {v.shape}")
  S = k.shape[0]
  n_chunks = -(-S // chunk_size)
  per_device = -(-n_chunks // groups.num_shared)  # chunks per device
  n_pad = per_device * groups.num_shared
  s_pad = n_pad * chunk_size
  if s_pad != S:
    k, v = _pad_rows(k, s_pad), _pad_rows(v, s_pad)
    if kv_length is None or isinstance(kv_length, int):
      kv_length = S if kv_length is None else min(kv_length, S)
    else:
      kv_length = jnp.minimum(kv_length, S)
  rows = NamedSharding(groups.shared_mesh, groups.rules.shared_rows)
  replicated = NamedSharding(groups.shared_mesh, PartitionSpec())

  def place_summary(x):
    if np.ndim(x) == 0:
      return jax.device_put(x, replicated)
    if x.shape[0] != n_chunks:
      raise ValueError(f"place_shared_kv: every summary leaf must have N={n_chunks} rows "
                       f"(ceil(S={S} / chunk_size={chunk_size})), got shape {x.shape}")
    return jax.device_put(_pad_rows(x, n_pad), rows)

  summaries = None if summaries is None else jax.tree.map(place_summary, summaries)
  return PlacedSharedKV(jax.device_put(k, rows), jax.device_put(v, rows), summaries, kv_length,
                        chunk_size)


def place_unique(groups: DeviceGroups, tree: Any, *, batch_axis: int | None = None,
                 specs: Any = None) -> Any:
  """Puts a pytree (weights, unique caches, request state) on the unique group.

  Default: every leaf replicated over the unique mesh. batch_axis: split that axis of every leaf
  of higher rank by request (`ShardingRules.requests`; scalars stay replicated). specs: a pytree
  prefix of `PartitionSpec`s over ("batch", "model") for anything else (e.g. `rules.weights`,
  `rules.pages`, or tensor-parallel weights over "model"). batch_axis and specs are exclusive.
  """
  if batch_axis is not None and specs is not None:
    raise ValueError("place_unique: pass batch_axis or specs, not both")
  mesh = groups.unique_mesh
  if specs is not None:
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, PartitionSpec))
    return jax.device_put(tree, shardings)

  def place(x):
    if batch_axis is None or np.ndim(x) <= batch_axis:
      return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    return jax.device_put(x, NamedSharding(mesh, groups.rules.request_spec(batch_axis)))

  return jax.tree.map(place, tree)


@dataclasses.dataclass(frozen=True)
class TransferStats:
  """Bytes that one step moves between the groups, counted where they land (every replica).

  bytes_to_shared: q, chunk ids and kv_length arriving on the shared devices.
  bytes_to_unique: o and lse arriving on the unique devices.
  Arrays already on their target sharding (one device: `colocated`) move nothing and count 0.
  """

  bytes_to_shared: int
  bytes_to_unique: int

  @property
  def total_bytes(self) -> int:
    return self.bytes_to_shared + self.bytes_to_unique


def _landed_bytes(x, target: NamedSharding, colocated: bool) -> int:
  """Bytes `device_put(x, target)` writes on target's devices (0 if x is already there)."""
  if colocated:
    return 0
  sharding = getattr(x, "sharding", None)
  if (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and sharding is not None
      and sharding.is_equivalent_to(target, x.ndim)):
    return 0
  shard = target.shard_shape(np.shape(x))
  return math.prod(shard) * jnp.dtype(x.dtype).itemsize * len(target.device_set)


def _put(xs: Sequence[Any], target: NamedSharding, colocated: bool) -> tuple[list, int]:
  """Explicit transfer of arrays to one target sharding; returns (arrays, landed bytes)."""
  moved = sum(_landed_bytes(x, target, colocated) for x in xs)
  return [jax.device_put(x, target) for x in xs], moved


def send_to_shared(groups: DeviceGroups, *arrays) -> tuple[list[jax.Array], int]:
  """Moves q (and routing decisions, kv_length) to the shared group, replicated on every device."""
  return _put(arrays, NamedSharding(groups.shared_mesh, PartitionSpec()), groups.colocated)


def send_to_unique(groups: DeviceGroups, o: jax.Array, lse: jax.Array,
                   like: Any = None) -> tuple[jax.Array, jax.Array, int]:
  """Moves (o[B, T, Hq, D], lse[B, T, Hq]) back to the unique group.

  They take the sharding of `like` (the caller's q) when it is a NamedSharding of the unique mesh,
  else they are split by request (replicated when B does not split evenly).
  """
  mesh = groups.unique_mesh
  spec = getattr(getattr(like, "sharding", None), "spec", None)
  if spec is None or getattr(like.sharding, "mesh", None) != mesh:
    spec = groups.rules.requests if o.shape[0] % groups.request_shards == 0 else PartitionSpec()
  spec = tuple(spec) + (None,) * (o.ndim - len(tuple(spec)))
  (o,), n_o = _put([o], NamedSharding(mesh, PartitionSpec(*spec)), groups.colocated)
  (lse,), n_lse = _put([lse], NamedSharding(mesh, PartitionSpec(*spec[:lse.ndim])),
                       groups.colocated)
  return o, lse, n_o + n_lse
