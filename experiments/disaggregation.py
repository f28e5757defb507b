"""disaggregation: one layer's decode attention with unique and shared KV on separate device groups.

--shape heads (default Llama-3.1-8B: Hq=32, Hkv=8, D=128), T=1, one layer: the shared store
(S tokens, dense) is sharded in whole chunks over n shared devices (`moska_jax.sharding`), each
request's unique KV (U tokens, paged) sits on the unique group. For each n in
--disagg_shared_counts and B in --disagg_batches the same process times the pieces of one step
separately: unique attention (`pallas_kernels.unique_attention` on the unique group), the
transfer of q to the shared group, the shared attention (shard_map over "kv": per-device
`shared_attention` + the max-then-sum collective merge), the transfer of (o, lse) back, and the
merge with the unique partial; then the whole step (`shared_attention_step` with the unique
attention in flight on the other group, so the two overlap). Shared-attention scaling is
t_shared(1) / t_shared(n) against the ideal n; the per-device roofline floor uses the ceilings
measured in the same run, and the transfers are set against a measured device-to-device copy.
The unique pool and the shared KV are GBs, far past L2: no input rotation is needed.
"""


from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from experiments import harness, shapes, timing
from moska_jax import sharding
from pallas_kernels import merge_attention_states, shared_attention, unique_attention

flags.DEFINE_integer("disagg_length", 1048576, "disaggregation: shared tokens S (one layer).")
flags.DEFINE_list("disagg_batches", ["64", "256"], "disaggregation: B values.")
flags.DEFINE_list("disagg_shared_counts", ["1", "2", "3"],
                  "disaggregation: shared-group sizes n (skipped when devices are missing).")
flags.DEFINE_integer("disagg_unique_devices", 1, "disaggregation: devices of the unique group.")
flags.DEFINE_integer("disagg_unique_length", 16384, "disaggregation: unique tokens U per request.")
flags.DEFINE_integer("disagg_page_size", 64, "disaggregation: unique-cache page size.")
flags.DEFINE_integer("disagg_chunk", 2048,
                     "disaggregation: chunk size C (whole chunks per device).")
flags.DEFINE_integer("disagg_copy_mb", 256,
                     "disaggregation: bytes of the device-to-device copy ceiling (MiB).")
FLAGS = flags.FLAGS


def device_copy_bytes_per_s(src, dst, nbytes: int) -> float:
  """Bandwidth of one jax.device_put from device src to device dst (the transfers' ceiling)."""
  x = harness.normal(jax.random.key(1), (nbytes // 2,), jnp.bfloat16, SingleDeviceSharding(src))
  t = timing.time_fn(lambda x: jax.device_put(x, SingleDeviceSharding(dst)), x)
  return x.nbytes / t


def check(bench: harness.Bench, groups: sharding.DeviceGroups, dtype) -> None:
  """The sharded step vs one-device shared_attention on a small ragged problem."""
  C = 128
  S = 2 * groups.num_shared * C + 37
  valid = S - 50

  def sharded(q, k, v):
    store = sharding.place_shared_kv(groups, k, v, chunk_size=C, kv_length=valid)
    return sharding.shared_attention_step(groups, q, store.k, store.v,
                                          kv_length=store.kv_length, backend=FLAGS.backend)

  bench.check(f"sharded step (n={groups.num_shared}) vs one-device attention", sharded,
              lambda q, k, v: shared_attention(q, k, v, kv_length=valid, backend="xla"),
              harness.qkv(jax.random.key(FLAGS.seed + 1), 5, S, bench.shape, dtype))


class UniqueSide:
  """B requests' paged unique caches (U tokens each) and queries on the unique group."""

  def __init__(self, groups: sharding.DeviceGroups, B: int, shape: shapes.Shape, dtype, key):
    U, page = FLAGS.disagg_unique_length, FLAGS.disagg_page_size
    Hq, Hkv, D = shape.heads
    pages = -(-U // page)
    rep = NamedSharding(groups.unique_mesh, P())
    kq, kk, kv = jax.random.split(key, 3)
    self.k_pages = harness.normal(kk, (B * pages, page, Hkv, D), dtype, rep)
    self.v_pages = harness.normal(kv, (B * pages, page, Hkv, D), dtype, rep)
    self.q = sharding.place_unique(groups, harness.normal(kq, (B, 1, Hq, D), dtype, rep),
                                   batch_axis=0)
    self.tables, self.lengths = sharding.place_unique(
        groups, (np.arange(B * pages, dtype=np.int32).reshape(B, pages),
                 np.full((B,), U, np.int32)), batch_axis=0)
    self.fn = jax.jit(lambda q, kp, vp, t, n: unique_attention(q, kp, vp, t, n,
                                                               backend=FLAGS.backend))
    self.bytes = 2 * B * U * Hkv * D * jnp.dtype(dtype).itemsize

  def __call__(self, q=None):
    return self.fn(self.q if q is None else q, self.k_pages, self.v_pages, self.tables,
                   self.lengths)


def measure(bench: harness.Bench, groups: sharding.DeviceGroups, store: sharding.PlacedSharedKV,
            B: int, dtype, key) -> dict:
  """Times the pieces of one step and the whole step for one (n, B): the row of the table."""
  backend, S, n = FLAGS.backend, FLAGS.disagg_length, groups.num_shared
  Hq, Hkv, D = bench.shape.heads
  uniq = UniqueSide(groups, B, bench.shape, dtype, key)
  q = uniq.q
  merge = jax.jit(merge_attention_states)

  def to_shared(q):
    return sharding.send_to_shared(groups, q, np.int32(S))[0]  # S: the valid rows of the store

  def shared(q_s, n_s):
    return sharding.shared_partial_attention(groups, q_s, store.k, store.v, n_s, backend=backend)

  def to_unique(o, lse):
    return sharding.send_to_unique(groups, o, lse, like=q)[:2]

  def step(q):
    o_u, lse_u = uniq(q)  # dispatched first: runs on the unique group while the shared step does
    o_s, lse_s, _ = sharding.shared_attention_step(groups, q, store.k, store.v,
                                                   kv_length=store.kv_length, backend=backend)
    return merge(o_u, lse_u, o_s, lse_s)

  o_u, lse_u = uniq()
  q_s, n_s = to_shared(q)
  o_s, lse_s = shared(q_s, n_s)
  o_b, lse_b = to_unique(o_s, lse_s)
  _, _, stats = sharding.shared_attention_step(groups, q, store.k, store.v,
                                               kv_length=store.kv_length, backend=backend)
  t = dict(unique=timing.time_fn(uniq), to_shared=timing.time_fn(to_shared, q),
           shared=timing.time_fn(shared, q_s, n_s),
           to_unique=timing.time_fn(to_unique, o_s, lse_s),
           merge=timing.time_fn(merge, o_u, lse_u, o_b, lse_b), step=timing.time_fn(step, q))
  itemsize = jnp.dtype(dtype).itemsize
  shared_floor = bench.ceilings.floor_s(4.0 * B * Hq * S * D / n, 2.0 * S * Hkv * D * itemsize / n)
  transfer = t["to_shared"] + t["to_unique"]
  return dict(n_shared=n, B=B, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
              transfer_frac=transfer / t["step"], tokens_per_s=B / t["step"],
              shared_x_floor=t["shared"] / shared_floor,
              unique_TBps=uniq.bytes / t["unique"] / 1e12,
              bytes_to_shared=stats.bytes_to_shared, bytes_to_unique=stats.bytes_to_unique)


def main() -> None:
  bench = harness.Bench()
  dtype = jnp.dtype(FLAGS.dtype)
  S, C = FLAGS.disagg_length, FLAGS.disagg_chunk
  Hq, Hkv, D = bench.shape.heads
  u = FLAGS.disagg_unique_devices
  devices = jax.devices()
  wanted = list(map(int, FLAGS.disagg_shared_counts))
  if len(devices) == 1:  # no second device: the colocated (non-disaggregated) case, n = 1
    logging.warning("one device: both groups on it (colocated), shared-group size 1 only")
    counts, missing = [1], [n for n in wanted if n != 1]
  else:
    counts = [n for n in wanted if u + n <= len(devices)]
    missing = [n for n in wanted if u + n > len(devices)]
  if missing:
    logging.warning("only %d devices: skipping shared-group sizes %s (unique group: %d)",
                    len(devices), missing, u)
  if not counts:
    raise SystemExit(f"disaggregation: needs at least {u + 1} devices, found {len(devices)}")

  def groups_for(n: int) -> sharding.DeviceGroups:
    return sharding.make_device_groups(devices[:u + n], num_shared=n)

  copy_bw = (device_copy_bytes_per_s(devices[0], devices[u], FLAGS.disagg_copy_mb << 20)
             if len(devices) > u else float("nan"))
  logging.info("device-to-device copy: %.1f GB/s", copy_bw / 1e9)
  bench.env["ceilings"] += f"; device-to-device device_put {copy_bw / 1e9:.1f} GB/s"
  bench.env["shapes"] = (f"S={S}, C={C}, Hq={Hq}, Hkv={Hkv}, D={D}, T=1, "
                         f"U={FLAGS.disagg_unique_length} per request (page "
                         f"{FLAGS.disagg_page_size}), {FLAGS.dtype}, unique group {u} device(s), "
                         "one layer")
  if missing:
    bench.env["missing"] = f"shared-group sizes {missing} (only {len(devices)} devices)"
  check(bench, groups_for(max(counts)), dtype)
  key, kk, kv = jax.random.split(jax.random.key(FLAGS.seed), 3)
  # One copy of the layer's shared K/V on the unique group's first device; each n re-places it.
  home = SingleDeviceSharding(devices[0])
  k, v = harness.normal(kk, (S, Hkv, D), dtype, home), harness.normal(kv, (S, Hkv, D), dtype, home)
  table = bench.table("disaggregation",
                      "disaggregation: unique and shared KV on separate device groups",
                      keys=("n_shared", "B"))
  for n in counts:
    groups = groups_for(n)
    store = sharding.place_shared_kv(groups, k, v, chunk_size=C)
    for B in map(int, FLAGS.disagg_batches):
      key, sub = jax.random.split(key)
      table.add(**measure(bench, groups, store, B, dtype, sub))
    del store
  base = {r["B"]: r["shared_ms"] for r in table.rows if r["n_shared"] == counts[0]}
  for r in table.rows:  # scaling relative to the smallest shared group measured (normally n = 1)
    r["shared_speedup"] = base[r["B"]] / r["shared_ms"]
    r["scaling_eff"] = r["shared_speedup"] * counts[0] / r["n_shared"]
  notes = ("Times per layer-step; `step` runs unique attention and the shared step concurrently "
           "on their groups, then the merge, so it is less than the sum of the pieces. "
           "transfer_frac = (to_shared + to_unique) / step. shared_x_floor: the shared attention "
           "over the per-device roofline floor max(bytes / read BW, FLOPs / matmul rate) with "
           "S/n rows per device. scaling_eff = t_shared(n_min) * n_min / (t_shared(n) * n). "
           "bytes_*: `TransferStats` (bytes landing on the target devices, every replica "
           "counted); 0 when both groups share one device (colocated): nothing moves and the "
           "transfer columns are dispatch overhead.")
  table.write(notes=notes, plot=_plot)


def _plot(plt, rows: list[dict]):
  """Shared-attention speedup vs n (with ideal), and the step's time split per (n, B)."""
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  ns = sorted({r["n_shared"] for r in rows})
  for B in sorted({r["B"] for r in rows}):
    rs = sorted((r for r in rows if r["B"] == B), key=lambda r: r["n_shared"])
    ax1.plot([r["n_shared"] for r in rs], [r["shared_speedup"] for r in rs], "o-", label=f"B={B}")
  ax1.plot(ns, [n / ns[0] for n in ns], "k--", lw=0.8, label="ideal")
  ax1.set(xlabel="shared devices n", ylabel="shared attention speedup", xticks=ns)
  ax1.legend(fontsize=7)
  parts = ("unique", "to_shared", "shared", "to_unique", "merge")
  labels = [f"n={r['n_shared']}\nB={r['B']}" for r in rows]
  bottom = np.zeros(len(rows))
  for part in parts:
    vals = np.array([r[f"{part}_ms"] for r in rows])
    ax2.bar(labels, vals, bottom=bottom, label=part)
    bottom += vals
  ax2.plot(labels, [r["step_ms"] for r in rows], "k_", ms=18, label="step (overlapped)")
  ax2.set(ylabel="ms per layer-step")
  ax2.tick_params(axis="x", labelsize=7)
  ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return fig
