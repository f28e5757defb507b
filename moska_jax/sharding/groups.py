"""Device groups of disaggregated serving, the rules that split requests and the shared store
over them, and the span mesh on which both groups run as one program."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

BATCH, MODEL, KV = "batch", "model", "kv"
SPAN = "span"
UNIQUE_AXES = (BATCH, MODEL)
SHARED_AXES = (KV,)


def _axis_names(spec: PartitionSpec) -> set[str]:
  names = set()
  for entry in spec:
    names.update((entry,) if isinstance(entry, str) else entry or ())
  return names


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How requests and the shared store are split over the groups (MaxText's logical axis rules,
  for MoSKA's two roles).

  requests: the unique mesh axes ("batch", "model") the request axis is split over; each unique
    device serves the requests of its coordinates along them, and devices that differ only along
    the other axes hold replicas (the same requests, computed again).
  shared_rows: the shared K/V [S, Hkv, D] and the per-chunk summaries [N, ...] along their rows
    over the shared mesh axis "kv", whole chunks per device.
  Every unique device holds the full weights and its own page pool (the span program,
  `moska_jax.sharding.shared_step`).
  """

  requests: PartitionSpec = PartitionSpec(BATCH)
  shared_rows: PartitionSpec = PartitionSpec(KV)

  def __post_init__(self):
    if (not isinstance(self.requests, PartitionSpec) or len(self.requests) != 1
        or not _axis_names(self.requests) <= set(UNIQUE_AXES)):
      raise ValueError(f"ShardingRules.requests must be a PartitionSpec that splits one axis (the "
                       f"request axis) over the axes {UNIQUE_AXES}, got {self.requests!r}")
    if not isinstance(self.shared_rows, PartitionSpec) or tuple(self.shared_rows) != SHARED_AXES:
      raise ValueError(f"ShardingRules.shared_rows must be PartitionSpec({KV!r}) (rows over the "
                       f"shared mesh), got {self.shared_rows!r}")

  @property
  def kv_axis(self) -> str:
    """The shared mesh axis the shared K/V rows are split over."""
    return self.shared_rows[0]

  @property
  def request_axes(self) -> tuple[str, ...]:
    """The unique mesh axes the requests are split over, in order (the first varies slowest)."""
    (entry,) = tuple(self.requests)
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


class SpanRoles(NamedTuple):
  """What each device of the span does for a batch of B requests (index = span position).

  shards: request shards (`DeviceGroups.request_shards` when it divides B, else 1: replicated).
  shard: the shard of requests a device serves (shared devices: 0, a filler they never use).
  owner: the one device that speaks for its shard in collectives (a unique device; replicas and
    shared devices contribute nothing).
  unique: whether the device is in the unique group (it serves requests).
  shared_rank: the device's rank in the shared group (its store rows), -1 on unique devices.
  One device (`colocated`) is both: unique, owner of shard 0 and shared rank 0.
  """

  shards: int
  shard: tuple[int, ...]
  owner: tuple[bool, ...]
  unique: tuple[bool, ...]
  shared_rank: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DeviceGroups:
  """The unique and shared device groups and their meshes (build with `make_device_groups`).

  unique_devices / shared_devices: disjoint, non-empty; or both the same single device.
  unique_mesh: axes ("batch", "model") over unique_devices (how the requests are split).
  shared_mesh: axis ("kv",) over shared_devices (the shared store, whole chunks per device).
  rules: what goes over which axis (`ShardingRules`).
  The span (`span_mesh`, axis "span") lists the unique devices, then the shared ones: the one
  mesh the disaggregated step runs on as a single program.
  """

  unique_devices: tuple[Any, ...]
  shared_devices: tuple[Any, ...]
  unique_mesh: Mesh
  shared_mesh: Mesh
  rules: ShardingRules = ShardingRules()

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
    if (self.shared_mesh.axis_names != SHARED_AXES
        or tuple(self.shared_mesh.devices.flat) != self.shared_devices):
      raise ValueError(f"DeviceGroups: shared_mesh must have the axis {SHARED_AXES} over "
                       f"exactly shared_devices, got {self.shared_mesh}")

  @property
  def colocated(self) -> bool:
    """Both groups are one device: the non-disaggregated case (transfers are no-ops)."""
    return len(self.unique_devices) == 1 and self.unique_devices == self.shared_devices

  @property
  def num_unique(self) -> int:
    return len(self.unique_devices)

  @property
  def num_shared(self) -> int:
    return len(self.shared_devices)

  @property
  def request_shards(self) -> int:
    """Parts the requests are split into on the unique mesh (`rules.requests`)."""
    return math.prod(self.unique_mesh.shape[a] for a in self.rules.request_axes)

  @property
  def span_devices(self) -> tuple[Any, ...]:
    """The unique devices, then the shared ones (one device when colocated)."""
    return self.unique_devices if self.colocated else self.unique_devices + self.shared_devices

  @functools.cached_property
  def span_mesh(self) -> Mesh:
    """The 1-D mesh (axis "span") over `span_devices` that the disaggregated step runs on."""
    return Mesh(np.asarray(self.span_devices, dtype=object), (SPAN,))

  def span_roles(self, batch: int, replicated: bool = False) -> SpanRoles:
    """Each span device's role for a batch of `batch` requests (see `SpanRoles`): split over
    the request shards where they divide it, else (or when `replicated`) every unique device
    runs every request and the first one speaks for them."""
    shards = self.request_shards if batch % self.request_shards == 0 and not replicated else 1
    shape = self.unique_mesh.shape
    shard, owner = [], []
    for coords in np.ndindex(*(shape[a] for a in UNIQUE_AXES)):  # row-major = unique order
      at = dict(zip(UNIQUE_AXES, coords))
      s = 0
      for a in self.rules.request_axes:
        s = s * shape[a] + at[a]
      replica = any(at[a] for a in UNIQUE_AXES if a not in self.rules.request_axes)
      shard.append(s if shards > 1 else 0)
      owner.append(not replica and (shards > 1 or s == 0))
    if self.colocated:
      return SpanRoles(shards, tuple(shard), tuple(owner), (True,), (0,))
    u, n = self.num_unique, self.num_shared
    return SpanRoles(shards, tuple(shard) + (0,) * n, tuple(owner) + (False,) * n,
                     (True,) * u + (False,) * n, (-1,) * u + tuple(range(n)))


def make_device_groups(devices: Sequence[Any] | None = None, num_shared: int | None = None,
                       unique_mesh_shape: tuple[int, int] | None = None,
                       rules: ShardingRules = ShardingRules()) -> DeviceGroups:
  """Splits `devices` into a unique group (the first ones) and a shared group (the last num_shared).

  Args:
    devices: default `jax.devices()` (every host's devices under `jax.distributed`).
    num_shared: devices of the shared group, 1 <= num_shared < len(devices); default half (rounded
      down). With a single device it must be 1 or None: both groups are that device.
    unique_mesh_shape: ("batch", "model") sizes of the unique mesh; default (unique devices, 1).
    rules: what goes over which mesh axis.

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
  return DeviceGroups(unique, shared,
                      Mesh(np.asarray(unique, dtype=object).reshape(shape), UNIQUE_AXES),
                      Mesh(np.asarray(shared, dtype=object), SHARED_AXES), rules)
