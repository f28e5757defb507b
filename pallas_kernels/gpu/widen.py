"""One streaming pass that widens a float8 array to a wider float dtype on a GPU (Pallas Triton).

Shared attention with many query rows widens float8 K/V (or V only) once before its kernel
(`MosaicGpuSharedConfig.widen_kv` / `widen_v`, `TritonSharedConfig.widen_kv`). XLA's convert moves
1-byte elements at about 2.4 TB/s on an H200 (1.31 ms for V of one layer at S = 1M); this kernel,
one flat block of BLOCK elements per program, moves the same 3 GiB (1 byte read, 2 written per
element) at about 4.0 TB/s (0.80-0.82 ms), above XLA's own 2-byte elementwise copy (3.3 TB/s).
A Mosaic GPU version (a TMA pipeline per CTA) reached 3.5-3.6 TB/s, so Triton lowers this pass on
every GPU (experiments/results/fp8_widen_pass.md). Both float8 formats widen exactly to float16,
bfloat16 and float32.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import checks, quant
from pallas_kernels.gpu import softmax

BLOCK = 4096  # elements a program widens: 32 per thread of 4 warps, 16-byte loads
NUM_WARPS = 4
logger = logging.getLogger("pallas_kernels")
WIDE_DTYPES = tuple(map(jnp.dtype, (jnp.float16, jnp.bfloat16, jnp.float32)))


def _kernel(x_ref, o_ref):
  o_ref[...] = softmax.widen(x_ref[...], o_ref.dtype)


def widen(x: jax.Array, dtype, *, interpret: bool = False) -> jax.Array:
  """x (float8_e4m3fn or float8_e5m2, any shape) as `dtype` (float16, bfloat16 or float32): the
  values `x.astype(dtype)` gives (exact), in one Pallas pass over the flattened array (or XLA's
  convert where Pallas Triton cannot address it: `checks.offsets_32bit_unsupported`)."""
  if not quant.is_fp8(x.dtype):
    raise ValueError(f"widen: x.dtype must be one of {[str(d) for d in quant.FP8_DTYPES]}, "
                     f"got {x.dtype}")
  if jnp.dtype(dtype) not in WIDE_DTYPES:
    raise ValueError(f"widen: dtype must be one of {[str(d) for d in WIDE_DTYPES]}, got "
                     f"{jnp.dtype(dtype)}")
  flat = x.reshape(-1)
  if flat.size == 0:
    return x.astype(dtype)
  if why := checks.offsets_32bit_unsupported([flat]):  # XLA's convert: exact, ~1.6x slower
    logger.info("widen: %s: XLA's convert widens it", why)
    return x.astype(dtype)
  # Triton blocks are powers of two; the last program's block is masked past the end
  block = min(BLOCK, pl.next_power_of_2(flat.size))
  out = pl.pallas_call(
      _kernel,
      grid=(pl.cdiv(flat.size, block),),
      in_specs=[pl.BlockSpec((block,), lambda i: (i,))],
      out_specs=pl.BlockSpec((block,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct(flat.shape, dtype),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="widen_fp8",
  )(flat)
  return out.reshape(x.shape)
