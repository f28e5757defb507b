"""Disaggregated serving: unique KV and shared KV on separate device groups (MoSKA's third idea).

`make_device_groups` splits the devices (every process's devices under `jax.distributed`) into a
unique group, mesh axes ("batch", "model"), that serves the requests (weights, page pools), and a
shared group, mesh axis ("kv"), that holds the shared store split along S in whole chunks;
`ShardingRules` says how requests and store rows are split. A step runs on both groups as ONE
compiled program over their span (`DeviceGroups.span_mesh`): the queries go to the shared group
and (o, lse) come back by collectives inside it, never through the host. One device is the
non-disaggregated case: both groups are that device.

- `groups`: `DeviceGroups`, `make_device_groups`, `ShardingRules`, `SpanRoles`.
- `placement`: span arrays (`place_shared_kv`, `shared_rows_per_device`, `place_requests`,
  `place_replicated`, `span_blocks`) and the bytes a step moves (`TransferStats`).
- `shared_step`: the span program's parts and programs (`shared_attention_step`,
  `shared_attention_program`, `disaggregated_attention_program`).
- `launch`: N local processes of one `jax.distributed` job (tests, experiments).
How the engine runs on groups: `moska_jax.engine`.

Multi-process: start every process with `launch` (or your cluster's launcher) and call
`launch.initialize()` (or `jax.distributed.initialize()`) first; `jax.devices()` then lists every
process's devices in process order, `make_device_groups()` splits that global list, and every
process runs the same code on the same host values.
"""

from moska_jax.sharding.groups import DeviceGroups, ShardingRules, SpanRoles, make_device_groups
from moska_jax.sharding.placement import (PlacedSharedKV, TransferStats, place_replicated,
                                          place_requests, place_shared_kv,
                                          shared_rows_per_device, span_blocks, span_sharding)
from moska_jax.sharding.shared_step import (SharedConfig, disaggregated_attention_program,
                                            shared_attention_program, shared_attention_step)

__all__ = [
    "DeviceGroups",
    "PlacedSharedKV",
    "SharedConfig",
    "ShardingRules",
    "SpanRoles",
    "TransferStats",
    "disaggregated_attention_program",
    "make_device_groups",
    "place_replicated",
    "place_requests",
    "place_shared_kv",
    "shared_attention_program",
    "shared_attention_step",
    "shared_rows_per_device",
    "span_blocks",
    "span_sharding",
]
