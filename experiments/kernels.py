"""kernels: each op's default plan over shapes and B, timed against its roofline floor.

One process times `shared_attention` (S shared keys), `unique_attention` (each request U unique
tokens in pages) and `chunk_attention` (S shared keys, chunks of C, each request keeping a random
(1 - sparsity) share per kv head) for every shape (heads, T, dtype) and B, with whatever
`implementation="auto"` picks. A case that fails to compile or run is a row with its error. The
ops are called with `backend=` only, so the same command times any checkout of `pallas_kernels`
(run it from a folder holding that checkout's `pallas_kernels` and this `experiments`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import flags

from experiments import harness, shapes

flags.DEFINE_list("kernels_ops", ["shared_attention", "unique_attention", "chunk_attention"],
                  "kernels: ops to time.")
flags.DEFINE_list("kernels_shapes", [],
                  "kernels: HEADS/T/dtype of each shape, HEADS a --shape value (a name or "
                  "Hq/Hkv/D), T query tokens per request (default: --shape at T=1 in --dtype).")
flags.DEFINE_list("kernels_batches", ["1", "32", "128", "512"], "kernels: B values.")
flags.DEFINE_integer("kernels_shared", 131072, "kernels: shared keys S.")
flags.DEFINE_integer("kernels_unique", 4096, "kernels: unique tokens U per request.")
flags.DEFINE_integer("kernels_page", 16, "kernels: page size of the unique cache.")
flags.DEFINE_integer("kernels_chunk", 512, "kernels: chunk size C of chunk_attention.")
flags.DEFINE_float("kernels_sparsity", 0.75, "kernels: share of chunks each request skips.")
flags.DEFINE_string("kernels_name", "kernels", "kernels: base name of the files written.")
FLAGS = flags.FLAGS


def _case(pk, op: str, key, B: int, shape: shapes.Shape, T: int, dtype):
  """(jitted fn, args, FLOPs, bytes) of one op at one shape."""
  S, U, ps, C = (FLAGS.kernels_shared, FLAGS.kernels_unique, FLAGS.kernels_page,
                 FLAGS.kernels_chunk)
  Hq, Hkv, D = shape.heads
  kq, kk, ki = jax.random.split(key, 3)
  itemsize = jnp.dtype(dtype).itemsize
  if op == "unique_attention":
    q = harness.normal(kq, (B, T, Hq, D), dtype)
    pages = -(-U // ps)
    pool = harness.normal(kk, (2, B * pages + 1, ps, Hkv, D), dtype)
    tables = 1 + jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
    fn = jax.jit(lambda q, kp, vp, t, n: pk.unique_attention(q, kp, vp, t, n,
                                                             backend=FLAGS.backend)[0])
    args = (q, pool[0], pool[1], tables, jnp.full((B,), U, jnp.int32))
    return fn, args, 4.0 * B * T * Hq * U * D, 2 * B * U * Hkv * D * itemsize
  q, k, v = harness.qkv(kq, B, S, shape, dtype, T)
  if op == "shared_attention":
    fn = jax.jit(lambda q, k, v: pk.shared_attention(q, k, v, backend=FLAGS.backend)[0])
    return fn, (q, k, v), 4.0 * B * T * Hq * S * D, 2 * S * Hkv * D * itemsize
  N = -(-S // C)
  K = max(1, round((1 - FLAGS.kernels_sparsity) * N))
  ids = harness.random_chunk_ids(ki, B, Hkv, N, K)
  fn = jax.jit(lambda q, k, v, ids: pk.chunk_attention(q, k, v, ids, chunk_size=C,
                                                       backend=FLAGS.backend)[0])
  # (kv head, chunk) tiles some request reads; not pallas_kernels.grouping, which an older
  # checkout may lack.
  union = int(jnp.sum(jnp.zeros((Hkv, N), bool).at[jnp.arange(Hkv)[None, :, None], ids].set(
      True)))
  return fn, (q, k, v, ids), 4.0 * B * T * Hq * K * C * D, 2 * union * C * D * itemsize


def _shapes() -> list[tuple[shapes.Shape, int, jnp.dtype]]:
  """(heads, T, dtype) of each --kernels_shapes entry, or --shape at T=1 in --dtype."""
  out = []
  for spec in FLAGS.kernels_shapes or [f"{FLAGS.shape}/1/{FLAGS.dtype}"]:
    *heads, t, dtype = spec.split("/")
    out.append((shapes.parse("/".join(heads)), int(t), jnp.dtype(dtype)))
  return out


def main() -> None:
  import pallas_kernels as pk  # whichever checkout is first on sys.path

  bench = harness.Bench(shape=not FLAGS.kernels_shapes)
  bench.env["pallas_kernels"] = os.path.relpath(pk.__file__)  # which checkout ran
  bench.env["sizes"] = (f"S={FLAGS.kernels_shared}, U={FLAGS.kernels_unique} (page "
                        f"{FLAGS.kernels_page}), C={FLAGS.kernels_chunk} at sparsity "
                        f"{FLAGS.kernels_sparsity} (random ids)")
  table = bench.table(FLAGS.kernels_name, "kernels: default plans against the roofline floor",
                      keys=("op", "Hq", "Hkv", "D", "T", "dtype", "B"))
  key = jax.random.key(FLAGS.seed)
  for shape, T, dtype in _shapes():
    Hq, Hkv, D = shape.heads
    for B in map(int, FLAGS.kernels_batches):
      for op in FLAGS.kernels_ops:
        key, sub = jax.random.split(key)
        fn, args, flops, nbytes = _case(pk, op, sub, B, shape, T, dtype)
        seconds, error = harness.time_or_error(fn, *args)
        floor = bench.ceilings.floor_s(flops, nbytes)
        table.add(op=op, Hq=Hq, Hkv=Hkv, D=D, T=T, dtype=dtype.name, B=B, ms=seconds * 1e3,
                  floor_ms=floor * 1e3, x_floor=seconds / floor, error=error)
  table.write(notes="floor = max(bytes / read BW, FLOPs / matmul rate), from the ceilings of "
                    "this run; unique bytes = the K/V of every request.", plot=_plot)


def _plot(plt, rows: list[dict]):
  """Time over the roofline floor against B, one line per (op, shape)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for case in dict.fromkeys((r["op"], r["Hq"], r["Hkv"], r["D"], r["T"], r["dtype"])
                            for r in rows):
    rs = [r for r in rows if (r["op"], r["Hq"], r["Hkv"], r["D"], r["T"], r["dtype"]) == case]
    ax.plot([r["B"] for r in rs], [r["x_floor"] for r in rs], "o-",
            label="{} {}/{}/{} T={} {}".format(*case))
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set(xscale="log", yscale="log", xlabel="B (requests)", ylabel="time / roofline floor",
         title="kernels: default plans")
  ax.legend(fontsize=6)
  return fig
