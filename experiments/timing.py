"""Device timing and the ceilings every benchmark reports against.

`time_fn` returns the median over `samples` of the mean time of `inner` back-to-back async calls
(the host keeps the device queue full, so launch gaps stay out of kernels longer than dispatch).
`time_in_program` returns what one call adds inside a program (chained calls in one jit), for
kernels shorter than the host's dispatch of a program of their own.
`measure_ceilings` times a large bf16 matmul and a large elementwise copy in the same process.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


# Seconds `time_fn` spends per function by default: on CPU, where timings are smoke runs (as
# `measure_ceilings`' sizes there), a tenth of an accelerator's.
BUDGET_S = 2.0
CPU_BUDGET_S = 0.2


def time_fn(fn: Callable, *args, warmup: int = 3, inner: int = 10, samples: int = 15,
            budget_s: float | None = None) -> float:
  """Median seconds per call of fn(*args) after warm-up (compilation excluded).

  Slow functions get fewer calls: inner and samples shrink so that timing takes about budget_s
  (default `BUDGET_S`, `CPU_BUDGET_S` on CPU), with at least 3 samples of 1 call.
  """
  if budget_s is None:
    budget_s = CPU_BUDGET_S if jax.default_backend() == "cpu" else BUDGET_S
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  est = max(time.perf_counter() - t0, 1e-6)
  inner = max(1, min(inner, int(0.02 / est)))
  samples = max(3, min(samples, int(budget_s / (est * inner))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


ROUNDS = 16  # `round_time`: a round is what 1 + ROUNDS rounds add over 1, per round


def round_time(program: Callable[[int], Callable], *args, rounds: int = ROUNDS,
               time: Callable[..., float] = time_fn) -> tuple[float, float]:
  """(seconds one round adds inside a program, seconds of a program of one round):
  (t(program(1 + rounds)) - t(program(1))) / rounds and t(program(1)), each timed by `time`.
  program(n) is a jitted program of n rounds that run in order; the program of one round also
  pays its own launch, which sets it for rounds shorter than the host's dispatch."""
  one = time(program(1), *args)
  return (time(program(1 + rounds), *args) - one) / rounds, one


def time_in_program(fn: Callable, *args, rounds: int = ROUNDS,
                    budget_s: float | None = None) -> float:
  """Seconds one call of fn(*args) adds inside a jitted program (`round_time`), the calls
  chained in one program (each one's first argument waits for the previous call's output, so
  XLA neither merges nor reorders them).

  This is a kernel's cost inside a model step, launch gaps between its kernels included; a
  program of one call also pays the host's dispatch, which sets `time_fn` for calls shorter
  than about 0.1 ms (on an H200 a 28 us attention timed 66 us per call). args[0] must be a
  floating array; budget_s: `time_fn`'s, per program timed.
  """

  def chained(n: int):
    def run(x, *rest):
      firsts = []
      for _ in range(n):
        first = jax.tree.leaves(fn(x, *rest))[0].reshape(-1)[0]
        firsts.append(first.astype(jnp.float32))
        x = x + (first * 0).astype(x.dtype)  # a dependency, not a change
      return jnp.stack(firsts)
    return jax.jit(run)

  added, _ = round_time(chained, *args, rounds=rounds,
                        time=functools.partial(time_fn, budget_s=budget_s))
  if added <= 0:  # the calls were merged or removed, or the noise exceeds them: no result
    raise RuntimeError(f"time_in_program: {rounds} more calls added {added * 1e6:.2f} us each")
  return added


@dataclasses.dataclass(frozen=True)
class Ceilings:
  """Measured in the same run: matmul rates (FLOP/s, bf16 and FP8 operands, and float32 at IEEE
  precision, what the kernels run for float32 inputs: `pallas_kernels.numerics`), the streaming
  read bandwidth the kernels' floors use (they read K/V and write little), and the copy bandwidth
  (read + write) for the ops that write as much as they read."""

  matmul_flops: float
  read_bytes_per_s: float
  copy_bytes_per_s: float
  fp8_matmul_flops: float = float("nan")
  f32_matmul_flops: float = float("nan")

  def floor_s(self, flops: float, bytes_read: float, *, fp8: bool = False,
              f32: bool = False) -> float:
    """Roofline floor: max(bytes read / read bandwidth, FLOPs / the matmul rate of the operands:
    bf16 / f16, FP8 with fp8, float32 IEEE with f32)."""
    rate = self.fp8_matmul_flops if fp8 else self.f32_matmul_flops if f32 else self.matmul_flops
    return max(bytes_read / self.read_bytes_per_s, flops / rate)

  def describe(self) -> str:
    """One line for result headers."""
    return (f"bf16 matmul {self.matmul_flops / 1e12:.0f} TFLOP/s, FP8 matmul "
            f"{self.fp8_matmul_flops / 1e12:.0f} TFLOP/s, float32 (IEEE) matmul "
            f"{self.f32_matmul_flops / 1e12:.0f} TFLOP/s, streaming read "
            f"{self.read_bytes_per_s / 1e12:.2f} TB/s, copy {self.copy_bytes_per_s / 1e12:.2f} "
            "TB/s (read + write), measured in this run")


def _matmul_rate(n: int, dtype, precision=None) -> float:
  """FLOP/s of an n^3 matmul with `dtype` operands (float32 accumulation) on random data; NaN
  where the platform has no such matmul."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision,
                                    preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  try:
    return 2.0 * n**3 / time_fn(mm, a, b)
  except Exception:  # noqa: BLE001  (e.g. no FP8 GEMM on this platform)
    return float("nan")


def measure_ceilings(matmul_n: int | None = None, read_bytes: int | None = None) -> Ceilings:
  """Times n^3 bf16, FP8 and float32 (IEEE) matmuls, a streaming read (a sum) of `read_bytes`
  of bf16, and an elementwise pass over half as much (read + write).

  Defaults: 8192^3 and 4 GiB on accelerators; small sizes on CPU (smoke runs only).
  """
  on_cpu = jax.default_backend() == "cpu"
  matmul_n = matmul_n or (512 if on_cpu else 8192)
  read_bytes = read_bytes or ((16 << 20) if on_cpu else (4 << 30))
  if on_cpu:  # NumPy draws the smoke run's buffer ~5x faster than a compiled jax.random
    x = jnp.asarray(np.random.default_rng(1).standard_normal(read_bytes // 2, np.float32),
                    jnp.bfloat16)
  else:  # drawn on the device: no 4 GiB host transfer
    x = jax.random.normal(jax.random.key(1), (read_bytes // 2,), jnp.bfloat16)
  t_read = time_fn(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x)
  half = x[:x.size // 2]
  t_copy = time_fn(jax.jit(lambda x: x + jnp.bfloat16(1)), half)  # one read + one write each
  del x
  return Ceilings(_matmul_rate(matmul_n, jnp.bfloat16), read_bytes / t_read,
                  2.0 * half.nbytes / t_copy,
                  _matmul_rate(matmul_n, jnp.float8_e4m3fn) if not on_cpu else float("nan"),
                  _matmul_rate(matmul_n, jnp.float32, jax.lax.Precision.HIGHEST))
