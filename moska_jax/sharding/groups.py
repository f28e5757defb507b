"""Device groups of disaggregated serving, and the rules that map each role of the layout to the
mesh axes it is split over."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

BATCH, MODEL, KV = "batch", "model", "kv"
UNIQUE_AXES = (BATCH, MODEL)
SHARED_AXES = (KV,)


def _axis_names(spec: PartitionSpec) -> set[str]:
  names = set()
  for entry in spec:
    names.update((entry,) if isinstance(entry, str) else entry or ())
  return names


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Where each role of the disaggregated layout lives, as a PartitionSpec over its group's mesh.

  The one place that maps data to mesh axes (MaxText's logical axis rules, for MoSKA's roles).
  On the unique mesh, axes ("batch", "model"):
    requests: per-request arrays along their request axis (tokens, positions, block tables,
      lengths, q, o, lse); `request_spec` shifts it to another axis.
    weights: every weight leaf (replicated; per-leaf tensor-parallel specs go through
      `place_unique(specs=...)`).
    pages: the unique page pools [P, page_size, Hkv, D].
  On the shared mesh, axis ("kv",):
    shared_rows: the shared K/V [S, Hkv, D] and per-chunk summaries [N, ...] along their rows,
      whole chunks per device; the shared step merges its per-device partials over this axis.
  """

  requests: PartitionSpec = PartitionSpec(BATCH)
  weights: PartitionSpec = PartitionSpec()
  pages: PartitionSpec = PartitionSpec()
  shared_rows: PartitionSpec = PartitionSpec(KV)

  def __post_init__(self):
    for name, axes in (("requests", UNIQUE_AXES), ("weights", UNIQUE_AXES),
                       ("pages", UNIQUE_AXES), ("shared_rows", SHARED_AXES)):
      spec = getattr(self, name)
      if not isinstance(spec, PartitionSpec) or not _axis_names(spec) <= set(axes):
        raise ValueError(f"ShardingRules.{name} must be a PartitionSpec over the axes {axes}, "
                         f"got {spec!r}")
    if len(self.requests) != 1:
      raise ValueError(f"ShardingRules.requests must split one axis (the request axis), got "
                       f"{self.requests!r}")
    if tuple(self.shared_rows) != SHARED_AXES:
      raise ValueError(f"ShardingRules.shared_rows must be PartitionSpec({KV!r}) (rows over the "
                       f"shared mesh), got {self.shared_rows!r}")

  @property
  def kv_axis(self) -> str:
    """The shared mesh axis the shared K/V rows are split over."""
    return self.shared_rows[0]

  def request_spec(self, axis: int = 0) -> PartitionSpec:
    """The spec of an array whose `axis` indexes requests."""
    return PartitionSpec(*[None] * axis, *self.requests)


@dataclasses.dataclass(frozen=True)
class DeviceGroups:
  """The unique and shared device groups and their meshes (build with `make_device_groups`).

  unique_devices / shared_devices: disjoint, non-empty; or both the same single device.
  unique_mesh: axes ("batch", "model") over unique_devices (weights, unique caches, requests).
  shared_mesh: axis ("kv",) over shared_devices (the shared store, whole chunks per device).
  rules: what goes over which axis (`ShardingRules`).
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
  def num_shared(self) -> int:
    return len(self.shared_devices)

  @property
  def request_shards(self) -> int:
    """Parts the requests are split into on the unique mesh (`rules.requests`)."""
    return math.prod(self.unique_mesh.shape[a] for a in _axis_names(self.rules.requests))


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
