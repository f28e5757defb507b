"""kernels: each op's plans over shapes and B, timed against its roofline floor and cuDNN.

One process times `shared_attention` (S shared keys), `unique_attention` (each request U unique
tokens in pages) and `chunk_attention` (S shared keys, chunks of C, each request keeping a random
(1 - sparsity) share per kv head) for every shape (heads, T, dtype) and B: the plan
`implementation="auto"` picks and, with --kernels_implementations, the default plan of each named
implementation the op has (a row per implementation, so the table says where each wins); for
shared_attention also cuDNN's flash attention over the stacked queries (`cudnn_ms`, GPU only). A
case that fails to plan, compile or run is a row with its error. --kernels_kv_dtype times K/V
stored as float8 (one scale per kv head), e.g. where each implementation wins on float8 pages.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import flags

from experiments import common, harness, shapes, timing
from experiments.report import plan_note
from pallas_kernels import implementations, quant

OPS = ("shared_attention", "unique_attention", "chunk_attention")  # the ops `case` builds
# 'auto' and every implementation name of OPS (an op without one skips it)
IMPLEMENTATIONS = ("auto", *dict.fromkeys(n for op in OPS for n in implementations(op)))
SHAPE_SPECS = ("HEADS/T/dtype specs (HEADS a --shape value: a name or Hq/Hkv/D; T >= 1 query "
               "tokens per request; dtype e.g. bfloat16)")


def parse_shape(spec: str) -> tuple[shapes.Shape, int, jnp.dtype]:
  """(heads, T, dtype) of one HEADS/T/dtype spec; ValueError or TypeError when malformed."""
  heads, t, dtype = spec.rsplit("/", 2)
  if int(t) < 1:
    raise ValueError(f"T={t} < 1")
  return shapes.parse(heads), int(t), jnp.dtype(dtype)


flags.DEFINE_list("kernels_ops", list(OPS), "kernels: ops to time.")
flags.DEFINE_list("kernels_shapes", [],
                  "kernels: HEADS/T/dtype of each shape, HEADS a --shape value (a name or "
                  "Hq/Hkv/D), T query tokens per request (default: --shape at T=1 in --dtype).")
flags.DEFINE_list("kernels_batches", ["1", "32", "128", "512"], "kernels: B values.")
flags.DEFINE_list("kernels_implementations", ["auto"],
                  "kernels: 'auto' (--backend's choice) and / or implementation names, each "
                  "timed with its default config.")
flags.DEFINE_integer("kernels_shared", 131072, "kernels: shared keys S.", lower_bound=1)
flags.DEFINE_integer("kernels_unique", 4096, "kernels: unique tokens U per request.",
                     lower_bound=1)
flags.DEFINE_integer("kernels_page", 16, "kernels: page size of the unique cache.", lower_bound=1)
flags.DEFINE_integer("kernels_chunk", 512, "kernels: chunk size C of chunk_attention.",
                     lower_bound=1)
flags.DEFINE_float("kernels_sparsity", 0.75, "kernels: share of chunks each request skips.")
flags.DEFINE_enum("kernels_kv_dtype", "model", ["model", *(d.name for d in quant.FP8_DTYPES)],
                  "kernels: K/V in the query dtype ('model') or float8 with one scale per kv "
                  "head (the floor counts their bytes; no cuDNN row).")
flags.DEFINE_string("kernels_name", "kernels", "kernels: base name of the files written.")
common.choices("kernels_ops", OPS)
common.validate_items("kernels_shapes", parse_shape, SHAPE_SPECS, empty=True)
common.ints("kernels_batches")
common.choices("kernels_implementations", IMPLEMENTATIONS)
common.fraction("kernels_sparsity")
FLAGS = flags.FLAGS


class Case(NamedTuple):
  """One op at one shape: its array arguments, its static keyword arguments, and the FLOPs and
  bytes of its roofline floor."""

  args: tuple
  static: dict
  flops: float
  nbytes: float


def _stored(k, v, kv_dtype) -> tuple[tuple, dict]:
  """(k, v) as the op reads them and its scale arguments: float8 with one scale per kv head
  (`quant.quantize`) for a float8 kv_dtype, else as given and none."""
  if kv_dtype is None:
    return (k, v), {}
  (k8, k_scale), (v8, v_scale) = quant.quantize(k, kv_dtype), quant.quantize(v, kv_dtype)
  return (k8, v8), dict(k_scale=k_scale, v_scale=v_scale)


def case(op: str, key, B: int, shape: shapes.Shape, T: int, dtype, *, S: int, U: int,
         page_size: int, chunk_size: int, sparsity: float, kv_dtype=None) -> Case:
  """Random inputs of `op` (never zeros) and its floor's FLOPs and bytes; K/V in the query dtype,
  or float8 with scales (static arguments) for a float8 kv_dtype."""
  Hq, Hkv, D = shape.heads
  kq, kk, ki = jax.random.split(key, 3)
  itemsize = jnp.dtype(kv_dtype or dtype).itemsize
  if op == "unique_attention":
    q = harness.normal(kq, (B, T, Hq, D), dtype)
    pages = -(-U // page_size)
    pool = harness.normal(kk, (2, B * pages + 1, page_size, Hkv, D), dtype)
    pools, scales = _stored(pool[0], pool[1], kv_dtype)
    tables = 1 + jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
    args = (q, *pools, tables, jnp.full((B,), U, jnp.int32))
    return Case(args, scales, 4.0 * B * T * Hq * U * D, 2 * B * U * Hkv * D * itemsize)
  q, k, v = harness.qkv(kq, B, S, shape, dtype, T)
  (k, v), scales = _stored(k, v, kv_dtype)
  if op == "shared_attention":
    return Case((q, k, v), scales, 4.0 * B * T * Hq * S * D, 2 * S * Hkv * D * itemsize)
  N = -(-S // chunk_size)
  K = max(1, round((1 - sparsity) * N))
  ids = harness.random_chunk_ids(ki, B, Hkv, N, K)
  # (kv head, chunk) tiles some request reads
  union = int(jnp.sum(jnp.zeros((Hkv, N), bool).at[jnp.arange(Hkv)[None, :, None], ids].set(
      True)))
  return Case((q, k, v, ids), dict(chunk_size=chunk_size, **scales),
              4.0 * B * T * Hq * K * chunk_size * D, 2 * union * chunk_size * D * itemsize)


def flag_case(op: str, key, B: int, shape: shapes.Shape, T: int, dtype) -> Case:
  """`case` at the --kernels_* sizes."""
  return case(op, key, B, shape, T, dtype, S=FLAGS.kernels_shared, U=FLAGS.kernels_unique,
              page_size=FLAGS.kernels_page, chunk_size=FLAGS.kernels_chunk,
              sparsity=FLAGS.kernels_sparsity, kv_dtype=_kv_dtype())


def _kv_dtype():
  """--kernels_kv_dtype as a dtype; None: K/V in the query dtype."""
  return None if FLAGS.kernels_kv_dtype == "model" else jnp.dtype(FLAGS.kernels_kv_dtype)


def parse_shapes(specs: list[str]) -> list[tuple[shapes.Shape, int, jnp.dtype]]:
  """(heads, T, dtype) of each HEADS/T/dtype spec, or --shape at T=1 in --dtype when empty."""
  return [parse_shape(spec) for spec in specs or [f"{FLAGS.shape}/1/{FLAGS.dtype}"]]


def _plan(pk, op: str, c: Case, implementation: str):
  if implementation == "auto":
    return pk.plan(op, *c.args, backend=FLAGS.backend, **c.static)
  return pk.plan(op, *c.args, implementation=implementation, **c.static)


def _cudnn_ms(c: Case) -> float:
  """cuDNN's flash attention on the stacked queries (GPU only; nan elsewhere or if refused)."""
  if jax.default_backend() != "gpu":
    return math.nan
  from experiments.shared_attention import cudnn_attention

  seconds, _ = harness.time_or_error(jax.jit(cudnn_attention), *c.args, in_program=True)
  return seconds * 1e3


def main() -> None:
  import pallas_kernels as pk  # whichever checkout is first on sys.path

  bench = harness.Bench(shape=not FLAGS.kernels_shapes)
  bench.env["pallas_kernels"] = os.path.relpath(pk.__file__)  # which checkout ran
  bench.env["sizes"] = (f"S={FLAGS.kernels_shared}, U={FLAGS.kernels_unique} (page "
                        f"{FLAGS.kernels_page}), C={FLAGS.kernels_chunk} at sparsity "
                        f"{FLAGS.kernels_sparsity} (random ids)")
  table = bench.table(FLAGS.kernels_name, "kernels: plans against the roofline floor and cuDNN",
                      keys=("op", "implementation", "Hq", "Hkv", "D", "T", "dtype", "kv_dtype",
                            "B"))
  key = jax.random.key(FLAGS.seed)
  for shape, T, dtype in parse_shapes(FLAGS.kernels_shapes):
    Hq, Hkv, D = shape.heads
    for B in map(int, FLAGS.kernels_batches):
      for op in FLAGS.kernels_ops:
        key, sub = jax.random.split(key)
        c = flag_case(op, sub, B, shape, T, dtype)
        floor = bench.ceilings.floor_s(c.flops, c.nbytes, f32=dtype == jnp.float32)
        cudnn_ms = (_cudnn_ms(c) if op == "shared_attention" and _kv_dtype() is None
                    else math.nan)
        place = dict(device=jax.devices()[0].device_kind, S=FLAGS.kernels_unique if op ==
                     "unique_attention" else FLAGS.kernels_shared,
                     kv_dtype=(_kv_dtype() or dtype).name)
        for implementation in FLAGS.kernels_implementations:
          if implementation not in ("auto", *pk.implementations(op)):
            continue  # e.g. mosaic_tpu on a GPU, or an implementation this op lacks
          try:
            plan = _plan(pk, op, c, implementation)
          except ValueError as e:
            table.add(op=op, **place, implementation=implementation, Hq=Hq, Hkv=Hkv, D=D, T=T,
                      dtype=dtype.name, B=B, ms=math.nan, floor_ms=floor * 1e3, x_floor=math.nan,
                      cudnn_ms=cudnn_ms, call_ms=math.nan, plan="", error=str(e)[:200])
            continue
          fn = harness.jit_plan(plan, **c.static)
          seconds, error = harness.time_or_error(fn, *c.args, in_program=True)
          call, _ = harness.time_or_error(fn, *c.args)
          table.add(op=op, **place, implementation=implementation, Hq=Hq, Hkv=Hkv, D=D, T=T,
                    dtype=dtype.name, B=B, ms=seconds * 1e3, floor_ms=floor * 1e3,
                    x_floor=seconds / floor, cudnn_ms=cudnn_ms, call_ms=call * 1e3,
                    plan=plan_note(plan), error=error)
  table.write(notes="ms: what one call adds inside a jitted program (`timing.time_in_program`: "
                    f"{1 + timing.ROUNDS} chained calls in one program minus one, over "
                    f"{timing.ROUNDS}; the kernels and the "
                    "gaps between them, not the host's dispatch); call_ms: a program of one call "
                    "per call (`timing.time_fn`), dispatch included. "
                    "floor = max(bytes / read BW, FLOPs / matmul rate of the dtype: bf16 / f16, "
                    "float32 at IEEE precision; float8 K/V: their bytes, the query dtype's rate, "
                    "as the kernels spend a bf16 product's time on each float8 one), from the "
                    "ceilings of this run; unique bytes = "
                    "the K/V of every request (S: its U). cudnn_ms: "
                    "jax.nn.dot_product_attention(implementation='cudnn') over the B*T queries "
                    "stacked as one sequence (shared_attention only), timed inside a program "
                    "like ms.", plot=_plot)


def _plot(plt, rows: list[dict]):
  """Time over the roofline floor against B, one line per (op, shape)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  cols = ("op", "implementation", "Hq", "Hkv", "D", "T", "dtype")
  for line in dict.fromkeys(tuple(r[c] for c in cols) for r in rows):
    rs = [r for r in rows if tuple(r[c] for c in cols) == line]
    ax.plot([r["B"] for r in rs], [r["x_floor"] for r in rs], "o-",
            label="{} {} {}/{}/{} T={} {}".format(*line))
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set(xscale="log", yscale="log", xlabel="B (requests)", ylabel="time / roofline floor",
         title="kernels: plans")
  ax.legend(fontsize=6)
  return fig
