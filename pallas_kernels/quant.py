"""Scaled (quantized) K/V: FP8 storage with one dequantization scale per kv head.

A layer's keys and values may be stored in float8 (half the bytes of bf16) as k = k_scale[h] *
k_stored and v = v_scale[h] * v_stored, one float32 scale per kv head h. The kernels never
multiply by the scales: q . (s k) = (s q) . k folds the key scale into the queries before the
kernel, and softmax(.) (s v) = s softmax(.) v scales the output after it; a kernel only loads the
float8 tiles and widens them to the query dtype in registers (`widen`), or (Mosaic GPU) multiplies
float8 keys on the FP8 tensor cores by the queries split in float8 terms (`split_rows`). (Shared
attention with many query rows on a GPU widens the whole K/V, or only V, once before its kernel
instead: `widen_kv` / `widen_v` of `MosaicGpuSharedConfig`, `widen_kv` of `TritonSharedConfig`.)

Every rounding to float8 here sits behind an optimization barrier: inside one jit XLA:GPU may
fold a float32 -> float8 -> float32 round trip into nothing (it allows excess precision), which
on an H200 left `dequantize(quantize_with(x))` unrounded and the second query term zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
_FP8_MAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.float8_e5m2): 57344.0}


def is_fp8(dtype) -> bool:
  return jnp.dtype(dtype) in FP8_DTYPES


def widen(x: jax.Array, dtype) -> jax.Array:
  """A loaded K/V tile in the dtype its dots run in (float8 -> the query dtype; else as is)."""
  return x.astype(dtype) if is_fp8(x.dtype) else x


def split_rows(x: jax.Array, dtype, terms: int) -> tuple[jax.Array, jax.Array]:
  """x[..., D] as `terms` float8 rows [terms, ..., D] and inv_scale[...] float32 with
  x ~ inv_scale * (sum of the terms): each term rounds what the ones before it left, so two
  e4m3 terms (or three e5m2) carry about bfloat16's 8 significant bits. Each row is scaled by a
  power of two (exact) that puts its largest magnitude at or under half the format's largest,
  so a term's rounding stays finite; a NaN stays NaN (and so does each dot with its row)."""
  dtype = _check_fp8(dtype, "split_rows")
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  log2 = jnp.floor(jnp.log2(_FP8_MAX[dtype] / 2 / jnp.where(amax > 0, amax, 1.0)))
  # normal float32 powers of two both ways; ldexp is exact where exp2 and 1 / x may not be
  e = jnp.clip(log2, -126, 126).astype(jnp.int32)
  rest, out = jnp.ldexp(x, e), []
  for _ in range(terms):
    out.append(to_fp8(rest, dtype))
    rest = rest - out[-1].astype(jnp.float32)
  return jnp.stack(out), jnp.ldexp(jnp.ones(e.shape[:-1], jnp.float32), -e[..., 0])


def scale_heads(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x[B, T, Hq, D] times scale[Hkv] of each query head's kv head (h // G), in x's dtype."""
  G = x.shape[2] // scale.shape[0]
  per_head = jnp.repeat(scale.astype(jnp.float32), G)[:, None]
  return (x.astype(jnp.float32) * per_head).astype(x.dtype)


def quantize(x: jax.Array, dtype="float8_e4m3fn", axis: int = -2) -> tuple[jax.Array, jax.Array]:
  """x[..., Hkv, D] -> (x_stored in `dtype`, scale[Hkv] float32) with x ~ scale * x_stored.

  One scale per kv head (the axis `axis`), the largest magnitude of that head over all other
  axes mapped to the format's largest finite value; an all-zero head gets scale 1.
  """
  dtype = _check_fp8(dtype, "quantize")
  axis = axis % x.ndim
  others = tuple(i for i in range(x.ndim) if i != axis)
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=others)
  scale = jnp.where(amax > 0, amax / _FP8_MAX[dtype], 1.0)
  return quantize_with(x, scale, dtype, axis), scale


def quantize_with(x: jax.Array, scale: jax.Array, dtype, axis: int = -2) -> jax.Array:
  """x / scale (scale[Hkv] along kv-head axis `axis`) in float8 `dtype`, saturated to the
  format's finite range: with a scale fixed in advance (new tokens written to a float8 page
  pool) a value past scale * max becomes +-max, never inf or NaN (float8_e4m3fn has no inf)."""
  dtype = _check_fp8(dtype, "quantize_with")
  shape = [1] * x.ndim
  shape[axis % x.ndim] = -1
  top = _FP8_MAX[dtype]
  scaled = x.astype(jnp.float32) / scale.astype(jnp.float32).reshape(shape)
  return to_fp8(jnp.clip(scaled, -top, top), dtype)


def to_fp8(x: jax.Array, dtype) -> jax.Array:
  """x rounded to float8 `dtype`, kept rounded when a consumer in the same jit widens it again
  (module docstring)."""
  return lax.optimization_barrier(x.astype(dtype))


def _check_fp8(dtype, where: str):
  dtype = jnp.dtype(dtype)
  if dtype not in FP8_DTYPES:
    raise ValueError(f"{where}: dtype must be one of {[d.name for d in FP8_DTYPES]}, got "
                     f"{dtype.name}")
  return dtype


def dequantize(x: jax.Array, scale: jax.Array, dtype=jnp.float32, axis: int = -2) -> jax.Array:
  """scale * x_stored, the scale broadcast along kv-head axis `axis`."""
  shape = [1] * x.ndim
  shape[axis % x.ndim] = -1
  return (x.astype(jnp.float32) * scale.reshape(shape)).astype(dtype)
