"""Disaggregated serving: unique KV and shared KV on separate device groups (MoSKA's third idea).

`make_device_groups` splits the devices (all hosts' devices under `jax.distributed`) into a unique
group, mesh axes ("batch", "model"), that holds the weights and the per-request caches, and a
shared group, mesh axis ("kv"), that holds the shared store split along S in whole chunks;
`ShardingRules` says which axis each role goes over. One device is the non-disaggregated case:
both groups are that device and the code path is the same.

- `groups`: `DeviceGroups`, `make_device_groups`, `ShardingRules`.
- `placement`: `place_shared_kv`, `place_unique`, and the counted transfers between the groups
  (`send_to_shared`, `send_to_unique`, `TransferStats`).
- `shared_step`: the shared half of a step for queries on the unique group
  (`shared_attention_step`; `shared_partial_attention` on inputs already on the shared group).
How the engine runs on groups: `moska_jax.engine`.

Multi-host: call `jax.distributed.initialize()` in every process first; `jax.devices()` then lists
every host's devices (ordered by process), `make_device_groups()` splits that global list, and every
process runs the same code (each passing the same host arrays to the placement helpers).
"""

from moska_jax.sharding.groups import DeviceGroups, ShardingRules, make_device_groups
from moska_jax.sharding.placement import (PlacedSharedKV, TransferStats, place_shared_kv,
                                          place_unique, send_to_shared, send_to_unique)
from moska_jax.sharding.shared_step import shared_attention_step, shared_partial_attention

__all__ = [
    "DeviceGroups",
    "PlacedSharedKV",
    "ShardingRules",
    "TransferStats",
    "make_device_groups",
    "place_shared_kv",
    "place_unique",
    "send_to_shared",
    "send_to_unique",
    "shared_attention_step",
    "shared_partial_attention",
]
