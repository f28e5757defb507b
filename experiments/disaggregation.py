"""disaggregation: a decode layer with unique and shared KV on separate device groups, one program.

--shape heads (default Llama-3.1-8B: Hq=32, Hkv=8, D=128), T=1, one layer, B requests with U
unique tokens each (paged) and a dense shared store of S tokens sharded in whole chunks over n
shared devices (`moska_jax.sharding`). Two tables:

`disaggregation`, one row per (processes, layout, n_shared, B):
- layout "colocated": one device does both halves; "split": --disagg_unique_devices unique
  devices + n shared devices, the layer as ONE jitted program over their span
  (`sharding.disaggregated_attention_program`: q handed to the shared devices by one
  all-gather, unique and shared attention at once on their groups, one collective merge back).
- step_ms: that program. transfer_ms: the step's collectives alone (the q hand-off and the
  (o, lse) merge), the marginal time of one such exchange in a program that runs 17 in a row
  (`transfer_time`), so transfer_frac = transfer_ms / step_ms is what the exchange adds to the
  step (nothing overlaps it there); transfer_call_ms: a program of one exchange, which also pays
  its own launch. unique_ms / shared_ms: each half alone on its group (one process).
- x_colocated: the colocated step over this row's step at the same B (> 1: splitting pays).
- processes > 1: the same split over that many local processes of one `jax.distributed` job (one
  device each on GPUs, `moska_jax.sharding.launch`); unique_ms / shared_ms are not measured
  there (each is one group's program).

`disaggregation_scaling`, one row per (n, B), one process: the shared attention over n devices
(per-device `shared_attention` + the max-then-sum merge), scaling_eff = t(n_min) n_min / (t(n) n),
and its per-device roofline floor from the ceilings measured in the same run.

The pools and the store are GBs, far past L2: no input rotation is needed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from experiments import common, harness, timing
from moska_jax import sharding
from moska_jax.sharding import launch
from moska_jax.sharding.shared_step import (hand_off, merge_over_span, own_rows, span_context,
                                            span_map)
from pallas_kernels import (merge_attention_states, merge_partials, shared_attention,
                            unique_attention)

flags.DEFINE_integer("disagg_length", 1048576, "disaggregation: shared tokens S (one layer).",
                     lower_bound=1)
flags.DEFINE_list("disagg_batches", ["16", "64", "256"], "disaggregation: B values.")
flags.DEFINE_list("disagg_shared_counts", ["1", "2", "3", "4", "7"],
                  "disaggregation: shared-group sizes n (skipped when devices are missing).")
flags.DEFINE_integer("disagg_unique_devices", 1, "disaggregation: devices of the unique group.",
                     lower_bound=1)
flags.DEFINE_integer("disagg_unique_length", 16384, "disaggregation: unique tokens U per request.",
                     lower_bound=1)
flags.DEFINE_integer("disagg_page_size", 64, "disaggregation: unique-cache page size.",
                     lower_bound=1)
flags.DEFINE_integer("disagg_chunk", 2048,
                     "disaggregation: chunk size C (whole chunks per device).", lower_bound=1)
flags.DEFINE_list("disagg_processes", ["1"],
                  "disaggregation: process counts; p > 1 runs the split layout over p local "
                  "processes of one jax.distributed job (launched by this run).")
flags.DEFINE_integer("disagg_devices_per_process", 1,
                     "disaggregation: devices of each launched process (CPU: emulated).",
                     lower_bound=1)
common.ints("disagg_batches")
common.ints("disagg_shared_counts")
common.ints("disagg_processes")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, *args, warmup: int = 3, inner: int = 5, samples: int = 7) -> float:
  """Seconds per call of fn(*args): `timing.time_fn` in one process; over several processes
  the median of `samples` means of `inner` calls, counts fixed because every process must run
  the same programs as many times (time_fn adapts them to the time a call takes here)."""
  if jax.process_count() == 1:
    return timing.time_fn(fn, *args)
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    out = [fn(*args) for _ in range(inner)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


class Layer:
  """One layer on the span of `groups` for B requests, random values made on each device: the
  unique devices' page pools (U tokens per request) and the shared devices' store rows (whole
  chunks), as two memories of exactly their role's size (the shared kernels split a device's rows
  statically, so a block padded to the pool's size would leave part of their splits idle)."""

  def __init__(self, groups: sharding.DeviceGroups, B: int, dtype, key):
    S, U, C, page = (FLAGS.disagg_length, FLAGS.disagg_unique_length, FLAGS.disagg_chunk,
                     FLAGS.disagg_page_size)
    Hq, Hkv, D = common.shape().heads
    B_l = B // groups.span_roles(B).shards
    pages = -(-U // page)

    def memory(salt: int, rows: int):
      def block(i, device):
        return harness.normal(jax.random.fold_in(jax.random.fold_in(key, salt), i),
                              (rows, Hkv, D), dtype, SingleDeviceSharding(device))
      return sharding.span_blocks(groups, block, (rows, Hkv, D), dtype)

    pool_rows = (B_l * pages + 1) * page  # + the scratch page 0
    store_rows = sharding.shared_rows_per_device(groups, S, C)
    self.k_pages, self.v_pages = memory(0, pool_rows), memory(1, pool_rows)
    self.k, self.v = memory(2, store_rows), memory(3, store_rows)
    self.kv_length = sharding.place_replicated(groups, np.int32(S))
    tables = (1 + np.arange(B * pages, dtype=np.int32) % (B_l * pages)).reshape(B, pages)
    self.q, self.tables, self.lengths = sharding.place_requests(
        groups, (np.asarray(jax.random.normal(key, (B, 1, Hq, D)), dtype), tables,
                 np.full((B,), U, np.int32)), B)
    self.unique_bytes = 2 * B_l * U * Hkv * D * jnp.dtype(dtype).itemsize
    self.args = (self.q, self.k_pages, self.v_pages, self.tables, self.lengths, self.k, self.v,
                 self.kv_length)


def collectives_program(groups: sharding.DeviceGroups, B: int, rounds: int = 1):
  """The step's exchange without its kernels, `rounds` times in one program: q handed off,
  (o, lse) [B, 1, Hq, D] float32 merged over the span (what `disaggregated_attention_program`
  moves), each round's q the previous round's own rows so that the rounds run in order
  (unrolled: a device loop would add its own per-iteration cost)."""

  def body(q):
    ctx = span_context(groups, B)
    for _ in range(rounds):
      o = hand_off(ctx, q).astype(jnp.float32)
      o, lse = merge_over_span(o, o[..., 0])
      q = own_rows(ctx, o + lse[..., None]).astype(q.dtype)
    return q

  return jax.jit(span_map(body, groups, (P("span"),), P("span")))


def transfer_time(groups: sharding.DeviceGroups, B: int, q) -> tuple[float, float]:
  """(seconds of one exchange inside a program, seconds of a program of one exchange):
  `timing.round_time` of `collectives_program`. The first is what the exchange adds to a step,
  where it runs inside the step's program; the second also pays a program launch of its own
  (at small B the host's dispatch of a multi-device program, not the collectives, can set it)."""
  return timing.round_time(lambda n: collectives_program(groups, B, n), q, time=_time)


def shared_program(mesh):
  """Shared attention of replicated q over k, v sharded on the mesh's "kv" axis, merged."""
  def local(q, k, v):
    return merge_partials(*shared_attention(q, k, v, backend=FLAGS.backend), axis_name="kv")
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("kv"), P("kv")),
                               out_specs=(P(), P()), check_vma=False))


def check(bench: harness.Bench, groups: sharding.DeviceGroups, dtype) -> None:
  """The split layer program vs one-device unique + shared attention merged, on a small ragged
  problem (every process compares)."""
  Hq, Hkv, D = bench.shape.heads
  B, page, C = 3, 16, 128
  S = 2 * groups.num_shared * C + 37
  rng = np.random.default_rng(FLAGS.seed)
  q = rng.standard_normal((B, 1, Hq, D)).astype(dtype)
  k, v = (rng.standard_normal((S, Hkv, D)).astype(dtype) for _ in range(2))
  pool_k, pool_v = (rng.standard_normal((4 * B + 1, page, Hkv, D)).astype(dtype)
                    for _ in range(2))
  tables = (1 + np.arange(4 * B, dtype=np.int32)).reshape(B, 4)
  lengths = np.array([64, 5, 33], np.int32)
  R = max(sharding.shared_rows_per_device(groups, S, C), -(-(4 * B + 1) * page // C) * C)

  def split(q, k, v, pool_k, pool_v, tables, lengths):
    def pool(x):
      flat = np.asarray(x).reshape(-1, Hkv, D)
      return lambda i, device: np.concatenate([flat, np.zeros((R - len(flat), Hkv, D), dtype)])
    store = sharding.place_shared_kv(groups, k, v, chunk_size=C, kv_length=S - 50,
                                     rows_per_device=R, unique_blocks=(pool(pool_k), pool(pool_v)))
    program = sharding.disaggregated_attention_program(
        groups, B, page, sharding.SharedConfig(backend=FLAGS.backend))
    q_s, t_s, n_s = sharding.place_requests(groups, (q, tables, lengths), B)
    return program(q_s, store.k, store.v, t_s, n_s, store.k, store.v, store.kv_length)

  def reference(q, k, v, pool_k, pool_v, tables, lengths):
    return merge_attention_states(
        *unique_attention(q, pool_k, pool_v, tables, lengths, backend="xla"),
        *shared_attention(q, k, v, kv_length=S - 50, backend="xla"))

  bench.check(f"split layer program ({groups.num_unique}+{groups.num_shared}, "
              f"{jax.process_count()} process(es)) vs one-device attention", split, reference,
              (q, k, v, pool_k, pool_v, tables, lengths))


def measure_step(groups: sharding.DeviceGroups, B: int, dtype, key, layout: str) -> dict:
  """One row of `disaggregation`: the layer program, its collectives alone and (one process)
  each half alone."""
  Hq, Hkv, D = common.shape().heads
  layer = Layer(groups, B, dtype, key)
  program = sharding.disaggregated_attention_program(
      groups, B, FLAGS.disagg_page_size, sharding.SharedConfig(backend=FLAGS.backend))
  t = dict(step=_time(program, *layer.args))
  t["transfer"], t["transfer_call"] = transfer_time(groups, B, layer.q)
  t["unique"] = t["shared"] = math.nan
  if jax.process_count() == 1:
    first = groups.unique_devices[0]
    B_l = B // groups.span_roles(B).shards
    q = jax.device_put(np.asarray(jax.random.normal(key, (B_l, 1, Hq, D)), dtype), first)
    block = lambda x: next(s.data for s in x.addressable_shards if s.device == first)
    as_pages = lambda x: x.reshape(-1, FLAGS.disagg_page_size, Hkv, D)  # free inside the jit
    unique = jax.jit(lambda q, k, v, tables, lengths: unique_attention(
        q, as_pages(k), as_pages(v), tables, lengths, backend=FLAGS.backend))
    t["unique"] = _time(unique, q, *(block(x) for x in (layer.k_pages, layer.v_pages,
                                                        layer.tables, layer.lengths)))
    t["shared"] = shared_time(groups.shared_mesh, B, dtype, key)
  moved = sharding.TransferStats.of_step(groups, (B, 1, Hq, D), dtype)
  return dict(processes=jax.process_count(), layout=layout, n_shared=groups.num_shared, B=B,
              **{f"{k}_ms": v * 1e3 for k, v in t.items()},
              transfer_frac=t["transfer"] / t["step"] if not groups.colocated else math.nan,
              tokens_per_s=B / t["step"], unique_TBps=layer.unique_bytes / t["unique"] / 1e12,
              bytes_to_shared=moved.bytes_to_shared, bytes_to_unique=moved.bytes_to_unique)


def shared_time(mesh, B: int, dtype, key) -> float:
  """Seconds of the shared attention of B queries over S rows sharded on `mesh` ("kv")."""
  Hq, Hkv, D = common.shape().heads
  n = mesh.size
  S = -(-FLAGS.disagg_length // (n * FLAGS.disagg_chunk)) * n * FLAGS.disagg_chunk
  rows = NamedSharding(mesh, P("kv"))
  kq, kk, kv = jax.random.split(key, 3)
  q = harness.normal(kq, (B, 1, Hq, D), dtype, NamedSharding(mesh, P()))
  k, v = harness.normal(kk, (S, Hkv, D), dtype, rows), harness.normal(kv, (S, Hkv, D), dtype, rows)
  return _time(shared_program(mesh), q, k, v)


def run_processes(counts: list[int]) -> list[dict]:
  """Launches this run over p processes for each p > 1 in counts; returns their rows."""
  rows = []
  for p in counts:
    platform = "gpu" if jax.default_backend() == "gpu" else "cpu"
    results = launch.launch([sys.executable, "-m", "experiments.run", *sys.argv[1:]], p,
                            devices_per_process=FLAGS.disagg_devices_per_process,
                            platform=platform, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    for r in results:
      if r.returncode != 0:
        raise RuntimeError(f"disaggregation over {p} processes: process {r.process_id} exited "
                           f"{r.returncode}:\n{r.output[-4000:]}")
    with open(_rows_path(p)) as f:
      rows += json.load(f)
    os.remove(_rows_path(p))
  return rows


def _rows_path(p: int) -> str:
  return os.path.join(FLAGS.out_dir, f"disaggregation.processes{p}.json")


def launched() -> None:
  """One process of a launched run: the split layout over every process's devices."""
  launch.initialize()
  bench = harness.Bench(ceilings=False)
  dtype = jnp.dtype(FLAGS.dtype)
  u = FLAGS.disagg_unique_devices
  groups = sharding.make_device_groups(num_shared=jax.device_count() - u)
  check(bench, groups, dtype)
  key = jax.random.key(FLAGS.seed)
  rows = [dict(measure_step(groups, B, dtype, jax.random.fold_in(key, B), "split"),
               correctness=bench.env["correctness"]) for B in map(int, FLAGS.disagg_batches)]
  if jax.process_index() == 0:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(_rows_path(jax.process_count()), "w") as f:
      json.dump(rows, f)


def main() -> None:
  if launch.ENV_COORDINATOR in os.environ:
    return launched()
  counts = sorted(set(map(int, FLAGS.disagg_processes)))
  if any(p > 1 for p in counts):
    # This process opens the devices before the launched ones run on them: it must not take
    # their memory up front (jax preallocates most of a GPU's by default); they inherit it.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  mp_rows = run_processes([p for p in counts if p > 1])
  bench = harness.Bench()
  dtype = jnp.dtype(FLAGS.dtype)
  S, C = FLAGS.disagg_length, FLAGS.disagg_chunk
  Hq, Hkv, D = bench.shape.heads
  u = FLAGS.disagg_unique_devices
  devices = jax.devices()
  wanted = sorted(map(int, FLAGS.disagg_shared_counts))
  bench.env["shapes"] = (f"S={S}, C={C}, Hq={Hq}, Hkv={Hkv}, D={D}, T=1, "
                         f"U={FLAGS.disagg_unique_length} per request (page "
                         f"{FLAGS.disagg_page_size}), {FLAGS.dtype}, unique group {u} device(s), "
                         "one layer")
  missing = [n for n in wanted if n > len(devices)]
  if missing:
    bench.env["missing"] = f"shared-group sizes {missing} (only {len(devices)} devices)"
    logging.warning("only %d devices: skipping shared-group sizes %s", len(devices), missing)
  splits = [n for n in wanted if u + n <= len(devices)]
  unsplit = [n for n in wanted if n not in splits]
  if 1 in counts and unsplit:  # the split layout needs u unique + n shared devices
    skipped = f"shared-group sizes {unsplit}" if splits else "every shared-group size"
    bench.env["no split layout"] = f"{skipped} ({u} + n devices needed, {len(devices)} here)"
    logging.warning("only %d devices: no split layout (%d unique + n shared devices) for %s",
                    len(devices), u, skipped)
  for r in mp_rows:
    bench.env[f"correctness ({r['processes']} processes)"] = r.pop("correctness")
  key = jax.random.key(FLAGS.seed)
  batches = list(map(int, FLAGS.disagg_batches))
  table = bench.table("disaggregation",
                      "disaggregation: a decode layer on separate device groups, one program",
                      keys=("processes", "layout", "n_shared", "B"))
  scaling = bench.table("disaggregation_scaling",
                        "disaggregation: shared attention over n shared devices",
                        keys=("n_shared", "B"))
  if 1 in counts:
    if splits:
      check(bench, sharding.make_device_groups(devices[:u + max(splits)], num_shared=max(splits)),
            dtype)
    for B in batches:
      table.add(**measure_step(sharding.make_device_groups(devices[:1]), B, dtype,
                               jax.random.fold_in(key, B), "colocated"))
    for n in splits:
      groups = sharding.make_device_groups(devices[:u + n], num_shared=n)
      for B in batches:
        table.add(**measure_step(groups, B, dtype, jax.random.fold_in(key, B), "split"))
    for n in [n for n in wanted if n <= len(devices)]:
      mesh = Mesh(np.asarray(devices[:n]), ("kv",))  # any n devices: no unique group needed
      for B in batches:
        t = shared_time(mesh, B, dtype, jax.random.fold_in(key, B))
        floor = bench.ceilings.floor_s(4.0 * B * Hq * S * D / n,
                                       2.0 * S * Hkv * D * dtype.itemsize / n)
        scaling.add(n_shared=n, B=B, shared_ms=t * 1e3, shared_x_floor=t / floor)
  table.rows += mp_rows
  colocated = {r["B"]: r["step_ms"] for r in table.rows if r["layout"] == "colocated"}
  for r in table.rows:
    r["x_colocated"] = colocated.get(r["B"], math.nan) / r["step_ms"]
  base = {r["B"]: (r["n_shared"], r["shared_ms"]) for r in reversed(scaling.rows)}
  for r in scaling.rows:  # relative to the smallest n measured (normally 1)
    n0, t0 = base[r["B"]]
    r["speedup"] = t0 / r["shared_ms"]
    r["scaling_eff"] = r["speedup"] * n0 / r["n_shared"]
  table.write(notes=(
      "Times per layer-step. step: the whole layer as one program over the span (q hand-off, "
      "unique and shared attention at once on their groups, one collective merge). transfer: "
      "those collectives alone on the same shapes, the marginal time of one exchange in a "
      f"program of {1 + timing.ROUNDS} in a row (inside the step they overlap nothing but "
      "cost their latency); transfer_call: a program of one exchange, its launch included. "
      "transfer_frac = transfer_ms / step_ms (split only). unique / shared: each half alone on "
      "its group (one process; not measured over several processes). x_colocated: the "
      "colocated step at the same B over this row's step. bytes_*: `TransferStats` (every other "
      "span device's block of q gathered by every shared device; every other span device's "
      "partial (o, lse), float32, gathered by every unique device)."),
      plot=_plot)
  if scaling.rows:
    scaling.write(notes=(
        "shared attention over n devices: per-device `shared_attention` over S/n rows + the "
        "max-then-sum merge over \"kv\" (one program). speedup and scaling_eff = t(n_min) n_min / "
        "(t(n) n) relative to the smallest n measured. shared_x_floor: over the per-device "
        "roofline floor max(bytes / read BW, FLOPs / matmul rate)."), plot=_plot_scaling)


def _plot(plt, rows: list[dict]):
  """Step time per B for each (processes, layout, n), and the transfer share of the split steps."""
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  series = sorted({(r["processes"], r["layout"], r["n_shared"]) for r in rows})
  batches = sorted({r["B"] for r in rows})
  for color, (p, layout, n) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, series):
    rs = sorted((r for r in rows if (r["processes"], r["layout"], r["n_shared"]) == (p, layout, n)),
                key=lambda r: r["B"])
    label = f"{layout} n={n}" + (f" ({p} processes)" if p > 1 else "")
    ax1.plot([r["B"] for r in rs], [r["step_ms"] for r in rs], "o-", color=color, label=label)
    if layout == "split":
      ax2.plot([r["B"] for r in rs], [100 * r["transfer_frac"] for r in rs], "o-", color=color,
               label=label)
  for ax in (ax1, ax2):
    ax.set_xscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.legend(fontsize=7)
  ax1.set(xlabel="B", ylabel="ms per layer-step", yscale="log")
  ax2.set(xlabel="B", ylabel="transfers, % of the step")
  return fig


def _plot_scaling(plt, rows: list[dict]):
  fig, ax = plt.subplots(figsize=(5, 3.8))
  ns = sorted({r["n_shared"] for r in rows})
  for B in sorted({r["B"] for r in rows}):
    rs = sorted((r for r in rows if r["B"] == B), key=lambda r: r["n_shared"])
    ax.plot([r["n_shared"] for r in rs], [r["speedup"] for r in rs], "o-", label=f"B={B}")
  ax.plot(ns, [n / ns[0] for n in ns], "k--", lw=0.8, label="ideal")
  ax.set(xlabel="shared devices n", ylabel="shared attention speedup", xticks=ns)
  ax.legend(fontsize=7)
  return fig
