"""fp8: shared and paged unique attention with float8 K/V against bf16 K/V and their floors.

One layer of --shape heads, bf16 queries. For each op and B the same process times the default
plan with bf16 K/V and with float8 K/V (`--fp8_dtype`, one scale per kv head, dequantized in
registers: the dots run in bf16), each against its own floor: max(K/V bytes / read bandwidth,
FLOPs / bf16 matmul rate), the bytes counted at the stored itemsize. The accuracy rows compare the
FP8 kernel with a float32 reference on the dequantized K/V (kernel error) and with the bf16
kernel on the unquantized K/V (kernel + quantization error).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import pallas_kernels as pk
from experiments import common, harness
from experiments.report import plan_note
from pallas_kernels import reference

OPS = ("shared_attention", "unique_attention")  # the ops `_inputs` builds

flags.DEFINE_list("fp8_ops", list(OPS), "fp8: ops to time.")
flags.DEFINE_list("fp8_batches", ["1", "8", "32", "128", "512"], "fp8: B values.")
flags.DEFINE_integer("fp8_shared", 1048576, "fp8: shared keys S of shared_attention.",
                     lower_bound=1)
flags.DEFINE_integer("fp8_unique", 4096, "fp8: unique tokens U per request (unique_attention).",
                     lower_bound=1)
flags.DEFINE_integer("fp8_page", 64, "fp8: page size of the unique cache.", lower_bound=1)
flags.DEFINE_enum("fp8_dtype", "float8_e4m3fn", [d.name for d in pk.quant.FP8_DTYPES],
                  "fp8: the stored K/V dtype.")
flags.DEFINE_boolean("fp8_sweep", False, "fp8: also time the FP8 call's sweep candidates and "
                     "Triton tilings with 128 / 256-key tiles and 3 / 4 stages (each one's time "
                     "in fp8_sweep.md).")
flags.DEFINE_boolean("fp8_in_program", False, "fp8: time what a call adds inside a program "
                     "(`timing.time_in_program`) instead of a program per call: for calls of "
                     "under ~0.1 ms, which a call's dispatch would time (e.g. short unique "
                     "contexts).")
flags.DEFINE_enum("fp8_implementation", "auto",
                  ["auto", *pk.implementations("shared_attention")],
                  "fp8: the implementation of every call, bf16 and float8 ('auto': --backend's "
                  "default plan; e.g. triton to time the non-Hopper path on a Hopper GPU).")
common.choices("fp8_ops", OPS)
common.validate(("fp8_implementation", "backend"),
                lambda f: f["fp8_implementation"] == "auto" or f["backend"] == "auto",
                "give --fp8_implementation or --backend, not both")
common.ints("fp8_batches")
FLAGS = flags.FLAGS


def _op(op: str):
  """fn(q, k, v, *extra, k_scale=, v_scale=) -> (o, lse) of the op's default plan."""
  fn = getattr(pk, op)
  return lambda q, k, v, *extra, **scales: fn(q, k, v, *extra, **_which(), **scales)


def _which() -> dict:
  """The implementation every call runs: --fp8_implementation, else --backend's default."""
  if FLAGS.fp8_implementation == "auto":
    return dict(backend=FLAGS.backend)
  return dict(implementation=FLAGS.fp8_implementation)


def _inputs(op: str, key, B: int, bench) -> tuple:
  """(q, k, v, extra args, FLOPs, K/V elements read) of one case; k, v in --dtype."""
  Hq, Hkv, D = bench.shape.heads
  dtype = jnp.dtype(FLAGS.dtype)
  kq, kk, kv = jax.random.split(key, 3)
  q = harness.normal(kq, (B, 1, Hq, D), dtype)
  if op == "shared_attention":
    S = FLAGS.fp8_shared
    k, v = (harness.normal(x, (S, Hkv, D), dtype) for x in (kk, kv))
    return q, k, v, (), 4.0 * B * Hq * S * D, 2 * S * Hkv * D
  U, ps = FLAGS.fp8_unique, FLAGS.fp8_page
  pages = -(-U // ps)
  k, v = (harness.normal(x, (B * pages + 1, ps, Hkv, D), dtype) for x in (kk, kv))
  tables = 1 + jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
  return (q, k, v, (tables, jnp.full((B,), U, jnp.int32)), 4.0 * B * Hq * U * D,
          2 * B * U * Hkv * D)


def _sweep(op: str, args: tuple, k_scale, v_scale) -> list[pk.Plan]:
  """The FP8 call's sweep candidates after its default, plus Triton tilings of its default with
  128 / 256-key tiles and 3 / 4 stages, widening in the kernel (a float8 tile is half the bytes
  of a bf16 one)."""
  plans = pk.sweep(op, *args, **_which(), k_scale=k_scale, v_scale=v_scale)
  if FLAGS.fp8_implementation != "auto":  # (a sweep spans every implementation of the platform)
    plans = [p for p in plans if p.implementation == FLAGS.fp8_implementation]
  first = plans[0]
  if first.implementation == "triton" and hasattr(first.config, "block_k"):
    plans += [first._replace(config=dataclasses.replace(first.config, block_k=bk, num_stages=st,
                                                        widen_kv=False))
              for bk in (128, 256) for st in (3, 4)]
  return list(dict.fromkeys(plans))[1:]


def _time(fn, *args) -> tuple[float, str]:
  return harness.time_or_error(fn, *args, in_program=FLAGS.fp8_in_program)


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _accuracy(op: str, bench) -> dict:
  """Errors of the FP8 kernel at B=8 (module docstring), with per-head gains on K/V."""
  q, k, v, extra, _, _ = _inputs(op, jax.random.key(FLAGS.seed + 7), 8, bench)
  gain = jnp.geomspace(0.25, 4.0, k.shape[-2]).astype(k.dtype)[:, None]  # scales differ per head
  k, v = k * gain, v * (gain[::-1])
  axis = -2
  (k8, ks), (v8, vs) = pk.quant.quantize(k, FLAGS.fp8_dtype, axis), pk.quant.quantize(
      v, FLAGS.fp8_dtype, axis)
  run = jax.jit(_op(op))
  o8 = run(q, k8, v8, *extra, k_scale=ks, v_scale=vs)[0]
  o16 = run(q, k, v, *extra)[0]
  deq = lambda x, s: pk.quant.dequantize(x, s, jnp.float32, axis)
  ref = getattr(reference, f"{op}_ref")
  o_ref = jax.jit(ref)(q.astype(jnp.float32), deq(k8, ks), deq(v8, vs), *extra)[0]
  return dict(kernel_rel_err=_rel(o8, o_ref), vs_bf16_rel_err=_rel(o8, o16))


def main() -> None:
  bench = harness.Bench()
  table = bench.table("fp8", "fp8: float8 K/V against bf16 K/V and the roofline floors",
                      keys=("op", "B"))
  swept = bench.table("fp8_sweep", "fp8: every sweep candidate of the float8 K/V call",
                      keys=("op", "B", "plan"))
  key = jax.random.key(FLAGS.seed)
  fp8_itemsize = jnp.dtype(FLAGS.fp8_dtype).itemsize
  for op in FLAGS.fp8_ops:
    errors = _accuracy(op, bench)
    for B in map(int, FLAGS.fp8_batches):
      key, sub = jax.random.split(key)
      q, k, v, extra, flops, elements = _inputs(op, sub, B, bench)
      fn = jax.jit(_op(op))
      t16, err16 = _time(fn, q, k, v, *extra)
      plan16 = plan_note(pk.plan(op, q, k, v, *extra, **_which()))
      (k8, ks), (v8, vs) = pk.quant.quantize(k, FLAGS.fp8_dtype), pk.quant.quantize(
          v, FLAGS.fp8_dtype)
      del k, v  # the largest cases hold only one precision at a time
      t8, err8 = _time(lambda *a: fn(*a, k_scale=ks, v_scale=vs), q, k8, v8, *extra)
      plan8 = pk.plan(op, q, k8, v8, *extra, **_which(), k_scale=ks, v_scale=vs)
      floor16 = bench.ceilings.floor_s(flops, elements * jnp.dtype(FLAGS.dtype).itemsize)
      floor8 = bench.ceilings.floor_s(flops, elements * fp8_itemsize)
      best8, best_plan = t8, plan8
      for p in _sweep(op, (q, k8, v8, *extra), ks, vs) if FLAGS.fp8_sweep else ():
        t, err = _time(harness.jit_plan(p, k_scale=ks, v_scale=vs), q, k8, v8, *extra)
        swept.add(op=op, B=B, plan=plan_note(p), ms=t * 1e3, x_floor=t / floor8,
                  x_default=t / t8, note=err)
        if t < best8:
          best8, best_plan = t, p
      table.add(op=op, B=B, bf16_ms=t16 * 1e3, fp8_ms=t8 * 1e3, fp8_speedup=t16 / t8,
                bf16_x_floor=t16 / floor16, fp8_x_floor=t8 / floor8,
                fp8_floor_ms=floor8 * 1e3, fp8_tbps=elements * fp8_itemsize / t8 / 1e12,
                best_fp8_ms=best8 * 1e3, best_fp8_x_floor=best8 / floor8,
                **errors, plan_bf16=plan16, plan_fp8=plan_note(plan8),
                best_plan_fp8=plan_note(best_plan),
                note=f"{err16} {err8}".strip())
      del k8, v8
  bench.env["sizes"] = (f"S={FLAGS.fp8_shared} (shared_attention), U={FLAGS.fp8_unique} per "
                        f"request in pages of {FLAGS.fp8_page} (unique_attention), "
                        f"{FLAGS.fp8_dtype} with one scale per kv head")
  bench.env["timing"] = ("inside a program (what a call adds)" if FLAGS.fp8_in_program
                         else "a program per call")
  if swept.rows:
    swept.write(notes="Each candidate of the float8 call's sweep (the default plan is fp8.md's "
                      "fp8_ms); x_floor as in fp8.md, x_default = time / the default plan's.",
                show=False)
  table.write(notes="x_floor = time / max(K/V bytes / read BW, FLOPs / bf16 matmul rate), the "
                    "bytes at each run's itemsize. fp8_speedup = bf16 time / fp8 time. "
                    "kernel_rel_err: FP8 kernel vs a float32 reference on the dequantized K/V; "
                    "vs_bf16_rel_err: vs the bf16 kernel on the unquantized K/V (B=8, K/V "
                    "scaled by per-head gains 0.25-4).", plot=_plot,
              show=("op", "B", "bf16_ms", "fp8_ms", "fp8_speedup", "fp8_x_floor", "best_fp8_ms",
                    "best_fp8_x_floor", "vs_bf16_rel_err", "best_plan_fp8"))


def _plot(plt, rows: list[dict]):
  fig, ax = plt.subplots(figsize=(6, 4))
  for op in dict.fromkeys(r["op"] for r in rows):
    rs = [r for r in rows if r["op"] == op]
    for kv in ("bf16", "fp8"):
      ax.plot([r["B"] for r in rs], [r[f"{kv}_x_floor"] for r in rs],
              "o-" if kv == "fp8" else "s--", label=f"{op}, {kv} K/V")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set(xscale="log", yscale="log", xlabel="B (requests)", ylabel="time / roofline floor",
         title="fp8 vs bf16 K/V")
  ax.legend(fontsize=7)
  return fig
