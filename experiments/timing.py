"""Device timing and the ceilings every benchmark reports against.

`time_fn` returns the median over `samples` of the mean time of `inner` back-to-back async calls
(the host keeps the device queue full, so launch gaps stay out of kernels longer than dispatch).
`measure_ceilings` times a large bf16 matmul and a large elementwise copy in the same process.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def time_fn(fn: Callable, *args, warmup: int = 3, inner: int = 10, samples: int = 15,
            budget_s: float = 2.0) -> float:
  """Median seconds per call of fn(*args) after warm-up (compilation excluded).

  Slow functions get fewer calls: inner and samples shrink so that timing takes about budget_s,
  with at least 3 samples of 1 call.
  """
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


@dataclasses.dataclass(frozen=True)
class Ceilings:
  """Measured in the same run: bf16 matmul rate (FLOP/s) and copy bandwidth (bytes/s, R+W)."""

  matmul_flops: float
  copy_bytes_per_s: float

  def floor_s(self, flops: float, bytes_moved: float) -> float:
    """Roofline floor: max(bytes / bandwidth, FLOPs / matmul rate)."""
    return max(bytes_moved / self.copy_bytes_per_s, flops / self.matmul_flops)


def measure_ceilings(matmul_n: int | None = None, copy_bytes: int | None = None) -> Ceilings:
  """Times an n^3 bf16 matmul and an elementwise pass over `copy_bytes` of bf16 (read + write).

  Defaults: 8192^3 and 2 GiB on accelerators; small sizes on CPU (smoke runs only).
  """
  on_cpu = jax.default_backend() == "cpu"
  matmul_n = matmul_n or (512 if on_cpu else 8192)
  copy_bytes = copy_bytes or ((16 << 20) if on_cpu else (2 << 30))
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (matmul_n, matmul_n), jnp.bfloat16)
  b = jax.random.normal(key_b, (matmul_n, matmul_n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
  t_mm = time_fn(mm, a, b)
  x = jax.random.normal(key_a, (copy_bytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda x: x + jnp.bfloat16(1))  # one read + one write of every element
  t_cp = time_fn(copy, x)
  return Ceilings(2.0 * matmul_n**3 / t_mm, 2.0 * x.nbytes / t_cp)
