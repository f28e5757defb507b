"""kernels: each op's default plan over shapes and B, timed against its roofline floor.

One process times `shared_attention` (S shared keys), `unique_attention` (each request U unique
tokens in pages) and `chunk_attention` (S shared keys, chunks of C, each request keeping a random
(1 - sparsity) share per kv head) for every shape (Hq/Hkv/D/T/dtype) and B, with whatever
`implementation="auto"` picks. A case that fails to compile or run is a row with its error. The
ops are called with `backend=` only, so the same command times any checkout of `pallas_kernels`
(run it from a folder holding that checkout's `pallas_kernels` and this `experiments`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import flags, logging

from experiments import common, report, timing

flags.DEFINE_list("kernels_ops", ["shared_attention", "unique_attention", "chunk_attention"],
                  "kernels: ops to time.")
flags.DEFINE_list("kernels_shapes", ["32/8/128/1/bfloat16"],
                  "kernels: Hq/Hkv/D/T/dtype of each shape (T query tokens per request).")
flags.DEFINE_list("kernels_batches", ["1", "32", "128", "512"], "kernels: B values.")
flags.DEFINE_integer("kernels_shared", 131072, "kernels: shared keys S.")
flags.DEFINE_integer("kernels_unique", 4096, "kernels: unique tokens U per request.")
flags.DEFINE_integer("kernels_page", 16, "kernels: page size of the unique cache.")
flags.DEFINE_integer("kernels_chunk", 512, "kernels: chunk size C of chunk_attention.")
flags.DEFINE_float("kernels_sparsity", 0.75, "kernels: share of chunks each request skips.")
flags.DEFINE_string("kernels_name", "kernels", "kernels: base name of the files written.")
FLAGS = flags.FLAGS


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _case(pk, op: str, key, B: int, Hq: int, Hkv: int, D: int, T: int, dtype):
  """(jitted fn, args, FLOPs, bytes) of one op at one shape."""
  S, U, ps, C = (FLAGS.kernels_shared, FLAGS.kernels_unique, FLAGS.kernels_page,
                 FLAGS.kernels_chunk)
  kq, kk, kv, ki = jax.random.split(key, 4)
  q = _normal(kq, (B, T, Hq, D), dtype)
  itemsize = jnp.dtype(dtype).itemsize
  if op == "unique_attention":
    pages = -(-U // ps)
    pool = _normal(kk, (2, B * pages + 1, ps, Hkv, D), dtype)
    tables = 1 + jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
    fn = jax.jit(lambda q, kp, vp, t, n: pk.unique_attention(q, kp, vp, t, n,
                                                             backend=FLAGS.backend)[0])
    args = (q, pool[0], pool[1], tables, jnp.full((B,), U, jnp.int32))
    return fn, args, 4.0 * B * T * Hq * U * D, 2 * B * U * Hkv * D * itemsize
  k, v = _normal(kk, (S, Hkv, D), dtype), _normal(kv, (S, Hkv, D), dtype)
  if op == "shared_attention":
    fn = jax.jit(lambda q, k, v: pk.shared_attention(q, k, v, backend=FLAGS.backend)[0])
    return fn, (q, k, v), 4.0 * B * T * Hq * S * D, 2 * S * Hkv * D * itemsize
  N = -(-S // C)
  K = max(1, round((1 - FLAGS.kernels_sparsity) * N))
  ids = jax.vmap(lambda kk: jax.random.permutation(kk, N)[:K])(
      jax.random.split(ki, B * Hkv)).reshape(B, Hkv, K).astype(jnp.int32)
  fn = jax.jit(lambda q, k, v, ids: pk.chunk_attention(q, k, v, ids, chunk_size=C,
                                                       backend=FLAGS.backend)[0])
  union = int(jnp.sum(jnp.zeros((Hkv, N), bool).at[jnp.arange(Hkv)[None, :, None], ids].set(
      True)))
  return fn, (q, k, v, ids), 4.0 * B * T * Hq * K * C * D, 2 * union * C * D * itemsize


def main() -> None:
  import pallas_kernels as pk  # whichever checkout is first on sys.path

  env = common.environment()
  env["pallas_kernels"] = pk.__file__
  ceil = timing.measure_ceilings()
  key = jax.random.key(FLAGS.seed)
  rows = []
  for shape in FLAGS.kernels_shapes:
    hq, hkv, d, t, dtype_name = shape.split("/")
    Hq, Hkv, D, T, dtype = int(hq), int(hkv), int(d), int(t), jnp.dtype(dtype_name)
    for B in map(int, FLAGS.kernels_batches):
      for op in FLAGS.kernels_ops:
        key, sub = jax.random.split(key)
        row = dict(op=op, Hq=Hq, Hkv=Hkv, D=D, T=T, dtype=dtype.name, B=B, ms=math.nan,
                   floor_ms=math.nan, x_floor=math.nan, error="")
        try:
          fn, args, flops, nbytes = _case(pk, op, sub, B, Hq, Hkv, D, T, dtype)
          seconds, floor = timing.time_fn(fn, *args), ceil.floor_s(flops, nbytes)
          row.update(ms=seconds * 1e3, floor_ms=floor * 1e3, x_floor=seconds / floor)
        except Exception as e:  # noqa: BLE001  (a case that does not compile is a result)
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        logging.info("%s", row)
  env["ceilings"] = (f"bf16 matmul {ceil.matmul_flops / 1e12:.0f} TFLOP/s, copy "
                     f"{ceil.copy_bytes_per_s / 1e12:.2f} TB/s (read+write), measured in this run")
  env["sizes"] = (f"S={FLAGS.kernels_shared}, U={FLAGS.kernels_unique} (page "
                  f"{FLAGS.kernels_page}), C={FLAGS.kernels_chunk} at sparsity "
                  f"{FLAGS.kernels_sparsity} (random ids)")
  report.write_results(FLAGS.out_dir, FLAGS.kernels_name, rows, env,
                       "kernels: default plans against the roofline floor",
                       notes="floor = max(bytes / copy BW, FLOPs / matmul rate), from the "
                             "ceilings of this run; unique bytes = the K/V of every request.")
  print(report.markdown_table(rows))
