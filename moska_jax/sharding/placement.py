"""Placement of data on the span of the device groups (`DeviceGroups.span_mesh`), and the bytes a
step moves between the groups, counted from the program's shapes.

A span array has one block per span device, all of one shape: its global shape is
[num_span_devices * rows, ...] split over "span" along its first axis (`P("span")`), or it is
replicated (`P()`). Each device's block holds what its role needs:

  array                      unique device (span index < u)          shared device of rank r
  requests [B, ...]          its request shard [B_l, ...]            shard 0 (a filler, unused)
  shared K/V [S, Hkv, D]     R zero rows: free for its page pool      store rows [r R, (r + 1) R)
  summaries [N, ...]         R / C zero rows (unused)                 its R / C chunks' summaries
  weights, scalars           replicated                               replicated

Placement works from host arrays (every process passes the same values under `jax.distributed`)
or from per-device blocks (`span_blocks`), and never moves data between devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moska_jax import routing
from moska_jax.sharding.groups import SPAN, DeviceGroups


def span_sharding(groups: DeviceGroups, axis: int | None = 0) -> NamedSharding:
  """The span sharding that splits `axis` over "span" (None: replicated on every span device)."""
  spec = PartitionSpec() if axis is None else PartitionSpec(*[None] * axis, SPAN)
  return NamedSharding(groups.span_mesh, spec)


def place_replicated(groups: DeviceGroups, tree: Any) -> Any:
  """Every leaf of `tree` (weights, scalars) replicated on every span device (host values under
  jax.distributed: each process puts them on its own devices)."""
  return jax.device_put(tree, span_sharding(groups, None))


def span_blocks(groups: DeviceGroups, block: Callable[[int, Any], Any], shape: tuple[int, ...],
                dtype) -> jax.Array:
  """A span array [num_span_devices * rows, ...] built from per-device blocks, with no copy
  between devices.

  Args:
    block: block(span_index, device) -> that device's [rows, ...] block, a host array or one
      already on `device` (it is called for this process's devices only).
    shape: the block shape [rows, ...].
    dtype: the blocks' dtype.
  """
  sharding = span_sharding(groups)
  devices = groups.span_devices
  arrays = []
  for device in sharding.addressable_devices:
    x = block(devices.index(device), device)
    if tuple(x.shape) != tuple(shape) or jnp.dtype(x.dtype) != jnp.dtype(dtype):
      raise ValueError(f"span_blocks: every block must be {tuple(shape)} {jnp.dtype(dtype)}, got "
                       f"{tuple(x.shape)} {jnp.dtype(x.dtype)}")
    arrays.append(jax.device_put(x, device))
  return jax.make_array_from_single_device_arrays((len(devices) * shape[0], *shape[1:]),
                                                  sharding, arrays, dtype=dtype)


def place_requests(groups: DeviceGroups, tree: Any, batch: int,
                   replicated: bool = False) -> Any:
  """Per-request arrays [B, ...] (B = batch; host arrays, the same in every process) as span
  arrays [num_span_devices * B_l, ...]: each unique device gets the requests of its shard
  (`DeviceGroups.span_roles(batch, replicated)`), each shared device a copy of shard 0 that it
  never uses."""
  roles = groups.span_roles(batch, replicated)
  rows = batch // roles.shards

  def place(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] != batch:
      raise ValueError(f"place_requests: every leaf must have the request axis B={batch} first, "
                       f"got shape {x.shape}")
    blocks = [x[s * rows:(s + 1) * rows] for s in roles.shard]
    return jax.device_put(np.concatenate(blocks), span_sharding(groups))

  return jax.tree.map(place, tree)


class PlacedSharedKV(NamedTuple):
  """One layer's shared store over the span.

  k, v: [num_span_devices * R, Hkv, D] span arrays: shared device r holds the padded store's rows
    [r R, (r + 1) R), whole chunks; a unique device holds R zero rows (the room of its page pool,
    `PlacedSharedKV.rows_per_device`). Rows past the store are zero and masked by kv_length.
  summaries: the given `routing.ChunkSummaries` with every per-chunk array as a span array
    [num_span * R / C, ...] likewise (zeros on unique devices), the rest replicated; None when
    none was given.
  kv_length: int32 scalar replicated over the span: the valid rows (default the store's S).
  chunk_size: C.
  """

  k: jax.Array
  v: jax.Array
  summaries: routing.ChunkSummaries | None
  kv_length: jax.Array
  chunk_size: int

  @property
  def rows_per_device(self) -> int:
    """R, the rows of each span device's block."""
    return self.k.shape[0] // self.k.sharding.mesh.size


def shared_rows_per_device(groups: DeviceGroups, rows: int, chunk_size: int,
                           multiple_of: int = 1) -> int:
  """The smallest R that holds `rows` store rows over the shared group in whole chunks, rounded
  up to a multiple of `multiple_of` (e.g. a page size, so R also holds whole pages)."""
  per_device = -(-rows // (groups.num_shared * chunk_size)) * chunk_size
  step = math.lcm(chunk_size, multiple_of)
  return -(-per_device // step) * step


def place_shared_kv(groups: DeviceGroups, k, v,
                    summaries: routing.ChunkSummaries | None = None, *, chunk_size: int,
                    kv_length: int | None = None, rows_per_device: int | None = None,
                    unique_blocks: tuple[Callable, Callable] | None = None) -> PlacedSharedKV:
  """Puts one layer's shared k, v[S, Hkv, D] (and per-chunk summaries) on the shared devices of
  the span, R rows per device (see `PlacedSharedKV`).

  Shared device r gets rows [r R, (r + 1) R) of the store padded with zero rows to num_shared * R,
  so chunk c lives on rank c // (R / C) and no chunk straddles two devices.

  Args:
    groups: the device groups.
    k, v: [S, Hkv, D] host or single-process arrays (multi-process: the same values in every
      process; each process places its own devices' rows).
    summaries: optional `routing.ChunkSummaries` of N = ceil(S / C) chunks: their per-chunk
      arrays are placed like the rows, the rest replicated.
    chunk_size: C.
    kv_length: the valid rows (default S); past them keys are masked.
    rows_per_device: R, a multiple of C with num_shared * R >= S (default the smallest,
      `shared_rows_per_device`); a larger R leaves the unique devices room for bigger page pools.
    unique_blocks: what the unique devices' blocks of k and v hold instead of zeros, as two
      functions (span_index, device) -> [R, Hkv, D] on that device (e.g. the page pools already
      there, which then stay in place).
  """
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"place_shared_kv: chunk_size must be a positive int, got {chunk_size!r}")
  if k.ndim != 3 or v.shape != k.shape:
    raise ValueError(f"place_shared_kv: k and v must both have shape [S, Hkv, D], got {k.shape} "
                     f"and {v.shape}")
  S = k.shape[0]
  n_chunks = -(-S // chunk_size)
  least = shared_rows_per_device(groups, S, chunk_size)
  R = least if rows_per_device is None else rows_per_device
  if isinstance(R, bool) or not isinstance(R, int) or R < least or R % chunk_size:
    raise ValueError(f"place_shared_kv: rows_per_device must be a multiple of chunk_size="
                     f"{chunk_size} and at least {least} (S={S} rows over {groups.num_shared} "
                     f"shared devices), got {rows_per_device!r}")
  kv_length = S if kv_length is None else int(kv_length)
  if not 0 <= kv_length <= S:
    raise ValueError(f"place_shared_kv: kv_length must be in [0, S={S}], got {kv_length}")
  roles = groups.span_roles(1)
  n_local = R // chunk_size

  def rows_of(x, per_device: int, unique_block: Callable | None = None):
    """The span array whose shared rank r holds x[r * per_device:(r + 1) * per_device], zero
    rows past x's end, and unique_block(i, device) (default zero rows) on unique devices."""
    x = np.asarray(x)

    def block(i, device):
      r = roles.shared_rank[i]
      if r < 0:  # made on the device: no host buffer of R rows
        return (unique_block(i, device) if unique_block is not None else
                jnp.zeros((per_device, *x.shape[1:]), x.dtype, device=device))
      part = x[r * per_device:(r + 1) * per_device]
      return np.concatenate([part, np.zeros((per_device - len(part), *x.shape[1:]), x.dtype)])

    return span_blocks(groups, block, (per_device, *x.shape[1:]), x.dtype)

  def per_chunk(x):
    if x.shape[0] != n_chunks:
      raise ValueError(f"place_shared_kv: every per-chunk summary array must have N={n_chunks} "
                       f"rows (ceil(S={S} / chunk_size={chunk_size})), got shape {x.shape}")
    return rows_of(x, n_local)

  if summaries is not None:
    if not isinstance(summaries, routing.ChunkSummaries):
      raise ValueError(f"place_shared_kv: summaries must be routing.ChunkSummaries or None, got "
                       f"{type(summaries).__name__}")
    summaries = summaries.map_parts(per_chunk, lambda x: place_replicated(groups, x))
  k_block, v_block = unique_blocks or (None, None)
  return PlacedSharedKV(rows_of(k, R, k_block), rows_of(v, R, v_block), summaries,
                        place_replicated(groups, np.int32(kv_length)), chunk_size)


# The q hand-off and the (o, lse) return gather every span device's block when what each device
# receives is at most this many bytes (decode steps): one collective round, whose latency on
# NVLink (2x H200, disaggregation.md) is what an exchange costs at those sizes. Above it
# (prefill parts, wide spans) the reductions' collective forms move fewer bytes than span - 1
# blocks.
GATHER_MAX_BYTES = 16 * 1024 * 1024


def exchanges_by_gather(span: int, block_bytes: int) -> bool:
  """Whether an exchange over `span` devices (`shared_step.hand_off`: block = one device's
  rows; `shared_step.merge_over_span`: block = one device's float32 (o, lse)) is one
  all_gather, else its reduction form (a psum; a pmax, then psums)."""
  return (span - 1) * block_bytes <= GATHER_MAX_BYTES


@dataclasses.dataclass(frozen=True)
class TransferStats:
  """Bytes that one step moves between the groups, counted from the program's shapes where they
  land (every receiving device counted).

  bytes_to_shared: what each shared device receives of the queries (and chunk ids): every
    other span device's rows when the hand-off is one all_gather (`exchanges_by_gather`), else
    the B rows of the all-reduce; and, once per step, of the last logits that every span device
    samples from (`of_logits`).
  bytes_to_unique: what each unique device receives of the (o, lse) return (float32, all B
    rows): every other span device's partial when the merge is one all_gather, else the merged
    (o, lse) of the all-reduce.
  Both are 0 when the groups are one device (`colocated`): nothing moves.
  """

  bytes_to_shared: int
  bytes_to_unique: int

  @property
  def total_bytes(self) -> int:
    return self.bytes_to_shared + self.bytes_to_unique

  @classmethod
  def of_step(cls, groups: DeviceGroups, q_shape: tuple[int, ...], q_dtype,
              chunk_ids_shape: tuple[int, ...] | None = None,
              replicated: bool = False) -> TransferStats:
    """The bytes of one disaggregated attention over queries q [B, T, Hq, D] (and handed-off
    chunk ids [B, Hkv, K], int32); replicated: every unique device runs every request
    (`DeviceGroups.span_roles`)."""
    if groups.colocated:
      return cls(0, 0)
    span = len(groups.span_devices)
    shards = groups.span_roles(q_shape[0], replicated).shards
    handed = [math.prod(q_shape) * jnp.dtype(q_dtype).itemsize]  # q, then chunk ids (int32)
    if chunk_ids_shape is not None:
      handed.append(math.prod(chunk_ids_shape) * 4)
    to_shared = sum(_received(span, b // shards, b) for b in handed)
    out = math.prod(q_shape) // q_shape[-1] * (q_shape[-1] + 1) * 4  # o and lse, float32
    return cls(groups.num_shared * to_shared, groups.num_unique * _received(span, out, out))

  @classmethod
  def of_logits(cls, groups: DeviceGroups, batch: int, vocab: int,
                replicated: bool = False) -> TransferStats:
    """The bytes of a step's last logits [B, vocab] float32, handed to every span device to
    sample from (`hand_off`): what each shared device receives (to_shared only)."""
    if groups.colocated:
      return cls(0, 0)
    shards = groups.span_roles(batch, replicated).shards
    full = batch * vocab * 4
    return cls(groups.num_shared * _received(len(groups.span_devices), full // shards, full), 0)


def _received(span: int, block: int, reduced: int) -> int:
  """Bytes one device receives from one exchange of `block` bytes per device: every other
  device's block by one all_gather (`exchanges_by_gather`), else the `reduced` all-reduce."""
  return (span - 1) * block if exchanges_by_gather(span, block) else reduced
