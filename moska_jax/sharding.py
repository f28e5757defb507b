"""Disaggregated serving: unique KV and shared KV on separate device groups (MoSKA's third idea).

`make_device_groups` splits the devices (all hosts' devices under `jax.distributed`) into a unique
group, mesh axes ("batch", "model"), that holds the weights and the per-request caches, and a
shared group, mesh axis ("kv"), that holds the shared store sharded along S in whole chunks. One
device is the non-disaggregated case: both groups are that device and the code path is the same.

One shared step (`shared_attention_step`) for one layer:

    unique group                          shared group (shard_map over "kv")
    q [B,T,Hq,D], chunk ids  --device_put-->  replicated on every shared device
                                              device i: partial (o_i, lse_i) over ITS chunks
                                              lse = pmax + log psum, o = psum(w_i o_i) / psum(w_i)
    (o_s, lse_s)            <--device_put--   replicated result
    merge_attention_states(o_u, lse_u, o_s, lse_s)   (the caller, pallas_kernels)

Only q (and routing decisions) travel out and only (o, lse) travel back: B*T*Hq*(D+1) numbers per
layer, never the shared KV. Both transfers are explicit `jax.device_put`s to a target sharding and
counted in `TransferStats`.

Why the step is three programs, not one jit: a jitted computation runs on one device set; a
`device_put` to another device set inside `jit` raises "Received incompatible devices for jitted
computation". So with disjoint groups the cross-group step is orchestrated from Python (dispatch is
asynchronous, so the host does not wait between the pieces). With one device (`colocated`) the
step is traceable and may sit inside the caller's jit.

The engine on groups (`MoskaEngine(..., groups=groups)`, moska_jax.engine). It places the weights
and the page pools with `place_unique` (replicated; block tables, lengths and tokens over "batch"
when max_batch divides it), and every layer's shared K/V (plus the summaries when sparse) with
`place_shared_kv`, whole chunks per "kv" device. Per step it runs `Decoder.forward` eagerly on the
unique group with an `attend` that, per layer, dispatches three jitted programs: the unique part
`attention.unique_partial` (write_pages + unique_attention) on the unique group,
`shared_attention_step` (dense, or routed on the shared group with the engine's top_k and
always_include), and `merge_attention_states`; the model code is unchanged. Each step's
`TransferStats` add up in `engine.stats["bytes_to_shared"]` / `["bytes_to_unique"]`. A
single-device `DeviceGroups` takes the same path (0 bytes); `groups=None` keeps the engine's one
jitted step.

Multi-host: call `jax.distributed.initialize()` in every process first; `jax.devices()` then lists
every host's devices (ordered by process), `make_device_groups()` splits that global list, and every
process runs the same code (each passing the same host arrays to the placement helpers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

UNIQUE_AXES = ("batch", "model")
SHARED_AXIS = "kv"


@dataclasses.dataclass(frozen=True)
class DeviceGroups:
  """The unique and shared device groups and their meshes (build with `make_device_groups`).

  unique_devices / shared_devices: disjoint, non-empty; or both the same single device.
  unique_mesh: axes ("batch", "model") over unique_devices (requests over "batch").
  shared_mesh: axis ("kv",) over shared_devices (shared KV rows over "kv", whole chunks each).
  """

  unique_devices: tuple[Any, ...]
  shared_devices: tuple[Any, ...]
  unique_mesh: Mesh
  shared_mesh: Mesh

  def __post_init__(self):
    for name in ("unique_devices", "shared_devices"):
      devs = getattr(self, name)
      if not devs:
        raise ValueError(f"DeviceGroups: {name} is empty; each group needs at least one device")
      if len(set(devs)) != len(devs):
        raise ValueError(f"DeviceGroups: {name} lists a device twice: {list(devs)}")
    overlap = set(self.unique_devices) & set(self.shared_devices)
    if overlap and not self.colocated:
      raise ValueError("DeviceGroups: the unique and shared groups must be disjoint (or both be "
                       f"the same single device); both hold {sorted(overlap, key=str)}")
    if (self.unique_mesh.axis_names != UNIQUE_AXES
        or tuple(self.unique_mesh.devices.flat) != self.unique_devices):
      raise ValueError(f"DeviceGroups: unique_mesh must have axes {UNIQUE_AXES} over exactly "
                       f"unique_devices, got {self.unique_mesh}")
    if (self.shared_mesh.axis_names != (SHARED_AXIS,)
        or tuple(self.shared_mesh.devices.flat) != self.shared_devices):
      raise ValueError(f"DeviceGroups: shared_mesh must have the axis ({SHARED_AXIS!r},) over "
                       f"exactly shared_devices, got {self.shared_mesh}")

  @property
  def colocated(self) -> bool:
    """Both groups are one device: the non-disaggregated case (transfers are no-ops)."""
    return len(self.unique_devices) == 1 and self.unique_devices == self.shared_devices

  @property
  def num_shared(self) -> int:
    return len(self.shared_devices)


def make_device_groups(devices: Sequence[Any] | None = None, num_shared: int | None = None,
                       unique_mesh_shape: tuple[int, int] | None = None) -> DeviceGroups:
  """Splits `devices` into a unique group (the first ones) and a shared group (the last num_shared).

  Args:
    devices: default `jax.devices()` (every host's devices under `jax.distributed`).
    num_shared: devices of the shared group, 1 <= num_shared < len(devices); default half (rounded
      down). With a single device it must be 1 or None: both groups are that device.
    unique_mesh_shape: ("batch", "model") sizes of the unique mesh; default (unique devices, 1).

  Raises:
    ValueError: empty or repeated devices, a group left empty, or a mesh shape that does not
      match the unique group's size.
  """
  devices = tuple(jax.devices() if devices is None else devices)
  n = len(devices)
  if n == 0:
    raise ValueError("make_device_groups: no devices given")
  if len(set(devices)) != n:
    raise ValueError(f"make_device_groups: devices lists a device twice: {list(devices)}")
  if num_shared is not None and (isinstance(num_shared, bool) or not isinstance(num_shared, int)):
    raise ValueError(f"make_device_groups: num_shared must be an int, got {num_shared!r}")
  if n == 1:
    if num_shared not in (None, 1):
      raise ValueError(f"make_device_groups: with a single device num_shared must be 1 (both "
                       f"groups on that device), got {num_shared}")
    unique, shared = devices, devices
  else:
    num_shared = n // 2 if num_shared is None else num_shared
    if not 1 <= num_shared < n:
      raise ValueError(f"make_device_groups: num_shared must be in [1, {n - 1}] with {n} devices "
                       f"(both groups need a device), got {num_shared}")
    unique, shared = devices[:n - num_shared], devices[n - num_shared:]
  shape = (len(unique), 1) if unique_mesh_shape is None else tuple(unique_mesh_shape)
  if len(shape) != 2 or math.prod(shape) != len(unique) or min(shape) < 1:
    raise ValueError(f"make_device_groups: unique_mesh_shape {unique_mesh_shape} must be two "
                     f"positive sizes ('batch', 'model') whose product is the {len(unique)} "
                     "unique devices")
  return DeviceGroups(unique, shared, Mesh(np.asarray(unique, dtype=object).reshape(shape),
                                           UNIQUE_AXES),
                      Mesh(np.asarray(shared, dtype=object), (SHARED_AXIS,)))


# ----------------------------------------------------------------------------- placement


def shared_kv_sharding(groups: DeviceGroups) -> NamedSharding:
  """Rows (axis 0: S of k/v, N of summaries) split over "kv"; other axes whole."""
  return NamedSharding(groups.shared_mesh, P(SHARED_AXIS))


class PlacedSharedKV(NamedTuple):
  """One layer's shared store on the shared group.

  k, v: [S_pad, Hkv, D] sharded over "kv", S_pad = S rounded up to num_shared * chunk_size (zero
  rows appended; they are masked by kv_length). summaries: the given pytree with every per-chunk
  leaf [N_pad, ...] sharded likewise (zero rows appended), scalars replicated. kv_length: the valid
  rows, None when nothing was padded and none was given; pass it to `shared_attention_step`.
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
  rows = shared_kv_sharding(groups)
  replicated = NamedSharding(groups.shared_mesh, P())

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

  Default: every leaf replicated over the unique mesh (weights). batch_axis: shard that axis of
  every leaf of higher rank over "batch" (per-request arrays; scalars stay replicated). specs: a
  pytree prefix of `PartitionSpec`s over ("batch", "model") for anything else (e.g. tensor-parallel
  weights over "model"). batch_axis and specs are exclusive.
  """
  if batch_axis is not None and specs is not None:
    raise ValueError("place_unique: pass batch_axis or specs, not both")
  mesh = groups.unique_mesh
  if specs is not None:
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    return jax.device_put(tree, shardings)

  def place(x):
    if batch_axis is None or np.ndim(x) <= batch_axis:
      return jax.device_put(x, NamedSharding(mesh, P()))
    return jax.device_put(x, NamedSharding(mesh, P(*[None] * batch_axis, "batch")))

  return jax.tree.map(place, tree)


# ----------------------------------------------------------------------------- the shared step


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
  """Moves q (and routing decisions, kv_length) to the shared group, replicated over "kv"."""
  return _put(arrays, NamedSharding(groups.shared_mesh, P()), groups.colocated)


def send_to_unique(groups: DeviceGroups, o: jax.Array, lse: jax.Array,
                   like: Any = None) -> tuple[jax.Array, jax.Array, int]:
  """Moves (o[B, T, Hq, D], lse[B, T, Hq]) back to the unique group.

  They take the sharding of `like` (the caller's q) when it is a NamedSharding of the unique mesh,
  else requests over "batch" (replicated when B is not a multiple of the "batch" size).
  """
  mesh = groups.unique_mesh
  spec = getattr(getattr(like, "sharding", None), "spec", None)
  if spec is None or getattr(like.sharding, "mesh", None) != mesh:
    spec = P("batch") if o.shape[0] % mesh.shape["batch"] == 0 else P()
  spec = tuple(spec) + (None,) * (o.ndim - len(tuple(spec)))
  (o,), n_o = _put([o], NamedSharding(mesh, P(*spec)), groups.colocated)
  (lse,), n_lse = _put([lse], NamedSharding(mesh, P(*spec[:lse.ndim])), groups.colocated)
  return o, lse, n_o + n_lse


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
  """jax.shard_map (jax >= 0.10) or the experimental one; replication checks off because the
  Pallas calls inside carry no varying-axes types on every supported version."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map

  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@functools.lru_cache(maxsize=None)
def _shared_program(mesh: Mesh, mode: str, top_k: int | None, always_include: tuple[int, ...],
                    chunk_size: int | None, sm_scale: float | None, backend: str,
                    interpret: bool):
  """The jitted shared-group program for one configuration (mode: "dense" or "sparse")."""
  from pallas_kernels import chunk_attention, merge_partials, shared_attention

  def local(q, k, v, kv_length, chunk_ids=None):
    # k, v are this device's rows [i * S_local, (i + 1) * S_local) of the padded store.
    i = jax.lax.axis_index(SHARED_AXIS)
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
    return merge_partials(o, lse, axis_name=SHARED_AXIS)

  rows = P(SHARED_AXIS)

  def program(q, k, v, kv_length, chunk_ids=None, summaries=None):
    if mode == "dense":
      return _shard_map(local, mesh, (P(), rows, rows, P()), (P(), P()))(q, k, v, kv_length)
    if top_k is not None:  # route on the shared group: the summaries never leave it
      from moska_jax import routing

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
    raise ValueError(f"shared_attention_step: S={S} rows do not split evenly over "
                     f"{groups.num_shared} shared devices; place the store with place_shared_kv")
  sparse = chunk_ids is not None or top_k is not None
  if sparse:
    if chunk_ids is not None and top_k is not None:
      raise ValueError("shared_attention_step: pass chunk_ids or (summaries, top_k), not both")
    if top_k is not None and summaries is None:
      raise ValueError("shared_attention_step: top_k needs the shared store's summaries")
    s_local = S // groups.num_shared
    if not isinstance(chunk_size, int) or chunk_size < 1 or s_local % chunk_size:
      raise ValueError(f"shared_attention_step: sparse attention needs a chunk_size that divides "
                       f"the {s_local} rows of each shared device (whole chunks per device), "
                       f"got {chunk_size!r}")
  program = _shared_program(groups.shared_mesh, "sparse" if sparse else "dense", top_k,
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
