"""Argument validation shared by the ops, their references and the implementations' configs.

Every check raises a one-line `ValueError` that names the op (or config), the argument, what was
expected in DESIGN.md's letters and what was received.

Shapes and dtypes are always checked. Values (chunk ids, block tables, lengths, kv_length) are
checked when they are concrete: numpy arrays, Python ints, or jax.Arrays that are neither traced
(under jit, vmap, ...) nor spread over other processes (`host_values`). A traced value cannot be
read before the kernel runs; each op's docstring says what it does with a bad one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import quant
from pallas_kernels.layout import AttentionDims

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def positive_int(value, *, name: str, where: str) -> int:
  """`value` as an int >= 1 (bools refused)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
  return value


def power_of_two(value, *, name: str, where: str, minimum: int = 1) -> int:
  """`value` as a power of two >= minimum."""
  positive_int(value, name=name, where=where)
  if value < minimum or value & (value - 1):
    raise ValueError(f"{where}: {name} must be a power of two >= {minimum}, got {value}")
  return value


def multiple_of(value, step: int, *, name: str, where: str) -> int:
  """`value` as a positive multiple of step."""
  positive_int(value, name=name, where=where)
  if value % step:
    raise ValueError(f"{where}: {name} must be a multiple of {step}, got {value}")
  return value


def at_least(value, minimum: int, *, name: str, where: str) -> int:
  """`value` as an int >= minimum."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
  return value


def one_of(value, choices: tuple[int, ...], *, name: str, where: str) -> int:
  """`value` as one of the ints `choices`."""
  if isinstance(value, bool) or value not in choices:
    raise ValueError(f"{where}: {name} must be one of {choices}, got {value!r}")
  return value


def boolean(value, *, name: str, where: str) -> bool:
  """`value` as a bool (no truthy stand-ins)."""
  if not isinstance(value, bool):
    raise ValueError(f"{where}: {name} must be True or False, got {value!r}")
  return value


def knob(check: Callable[..., int], default=dataclasses.MISSING, **bounds):
  """A config field validated on construction by `check(value, **bounds, name=, where=)`."""
  return dataclasses.field(default=default,
                           metadata=dict(check=functools.partial(check, **bounds)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Base of the implementations' frozen configs: every `knob` field checks itself on
  construction, so a config that exists is one its kernel accepts (problem-dependent limits,
  such as shared memory for a head_dim, are checked when a call is planned)."""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if "check" in f.metadata:
        f.metadata["check"](getattr(self, f.name), name=f.name, where=type(self).__name__)


def host_values(x) -> np.ndarray | None:
  """x's values as a numpy array when they are known on this host now; None for traced values
  and for shape-only stand-ins (jax.ShapeDtypeStruct, as `plan` takes), which cannot be read.

  A concrete jax.Array on an accelerator is copied to the host (a small synchronous read: ids,
  tables and lengths are a few KB); under jit nothing is read.
  """
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array):
    return np.asarray(x) if x.is_fully_addressable else None
  if isinstance(x, (np.ndarray, np.generic, int)):
    return np.asarray(x)
  return None


def check_array(name: str, x, op: str) -> None:
  """x must be an array with a shape and a dtype (a list's dtype would be a guess)."""
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise ValueError(f"{op}: {name} must be an array (jax.Array, numpy array or "
                     f"jax.ShapeDtypeStruct), got {type(x).__name__}")


def offsets_32bit_unsupported(arrays) -> str | None:
  """Why Pallas Triton cannot address one of `arrays` (compiled), or None. It indexes an array
  of at most 4 GiB with 32-bit offsets (64-bit above), which overflow past 2^31 elements: only
  1-byte arrays (float8 K/V, int8 sketches) of 2-4 GiB are hit. An H200 raised an illegal
  address widening a float8 array of 3 * 2^30 elements in a Pallas Triton kernel."""
  for x in arrays:
    n = int(np.prod(x.shape))
    if n > 1 << 31 and n * jnp.dtype(x.dtype).itemsize <= 1 << 32:
      return (f"Pallas Triton indexes an array of {n} {jnp.dtype(x.dtype)} elements (more than "
              f"2^31 in at most 4 GiB) with 32-bit offsets, which overflow; split it, or use "
              f"another implementation")
  return None


def _check_nonempty(name: str, x, letters: str, op: str) -> None:
  if 0 in tuple(x.shape):
    raise ValueError(f"{op}: {name} {letters} must have no empty axis, got shape {tuple(x.shape)}")


def check_sm_scale(sm_scale, *, op: str) -> None:
  """sm_scale: None (1/sqrt(D)) or a finite real number (a NaN or inf scale poisons every row)."""
  if sm_scale is None:
    return
  if (isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float, np.integer, np.floating))
      or not np.isfinite(sm_scale)):
    raise ValueError(f"{op}: sm_scale must be None or a finite real number, got {sm_scale!r}")


def _check_float(name: str, x, op: str) -> None:
  if not any(x.dtype == d for d in FLOAT_DTYPES):
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def _check_dtypes(op: str, q, k, v, k_name: str, v_name: str) -> None:
  _check_float("q", q, op)
  if k.dtype != v.dtype:
    raise ValueError(f"{op}: {k_name} and {v_name} must share a dtype, got {k.dtype} and "
                     f"{v.dtype}")
  if quant.is_fp8(k.dtype):  # scaled KV: float8 storage, the dots in q's dtype
    return
  for name, x in ((k_name, k), (v_name, v)):
    _check_float(name, x, op)
  if q.dtype != k.dtype:
    raise ValueError(f"{op}: q and {k_name}, {v_name} must share a dtype, got q {q.dtype} and "
                     f"{k_name}, {v_name} {k.dtype} (or store {k_name}, {v_name} in float8 with "
                     "scales)")


def check_kv_scales(k_scale, v_scale, Hkv: int, *, op: str):
  """(k_scale, v_scale) as float32 [Hkv] arrays or None: per kv head dequantization scales of
  scaled (e.g. float8) K/V (`pallas_kernels.quant`); give both or neither."""
  if (k_scale is None) != (v_scale is None):
    raise ValueError(f"{op}: give k_scale and v_scale together (or neither)")
  if k_scale is None:
    return None, None
  out = []
  for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
    x = x if hasattr(x, "dtype") else jnp.asarray(x)  # arrays, tracers, ShapeDtypeStructs
    if x.shape != (Hkv,) or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{op}: {name} must be a float array of shape [Hkv={Hkv}], got "
                       f"{x.shape} {x.dtype}")
    values = host_values(x)  # traced scales cannot be read: not checked
    if values is not None and not np.all(np.isfinite(values) & (values > 0)):
      raise ValueError(f"{op}: {name} must be finite and > 0 (k = k_scale[h] * stored), got "
                       f"{values.tolist()}")
    out.append(x if x.dtype == jnp.float32 else x.astype(jnp.float32))
  return tuple(out)


def check_scales(dims, sm_scale, k_scale, v_scale, *, op: str) -> dict:
  """The scale fields of every op's `dispatch.Problem`, checked: sm_scale (`check_sm_scale`) and
  the K/V dequantization scales (`check_kv_scales`)."""
  check_sm_scale(sm_scale, op=op)
  k_scale, v_scale = check_kv_scales(k_scale, v_scale, dims.Hkv, op=op)
  return dict(sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale)


def _check_gqa(op: str, Hq: int, Hkv: int, k_name: str) -> None:
  if Hkv == 0 or Hq % Hkv:
    raise ValueError(f"{op}: Hq={Hq} of q must be a multiple of Hkv={Hkv} of {k_name} (GQA)")


def check_shared_kv_inputs(q, k, v, *, op: str) -> AttentionDims:
  """Validates q[B, T, Hq, D] against a shared k, v[S, Hkv, D]; returns the dims."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_array(name, x, op)
  if q.ndim != 4:
    raise ValueError(f"{op}: q must have shape [B, T, Hq, D], got {q.shape}")
  B, T, Hq, D = q.shape
  if k.ndim != 3:
    raise ValueError(f"{op}: k must have shape [S, Hkv, D], got {k.shape}")
  S, Hkv, Dk = k.shape
  if Dk != D:
    raise ValueError(f"{op}: k must have shape [S, Hkv, D={D}] (D of q), got {k.shape}")
  if v.shape != k.shape:
    raise ValueError(f"{op}: v must have the shape of k {k.shape}, got {v.shape}")
  _check_gqa(op, Hq, Hkv, "k")
  _check_dtypes(op, q, k, v, "k", "v")
  _check_nonempty("q", q, "[B, T, Hq, D]", op)
  _check_nonempty("k", k, "[S, Hkv, D]", op)
  return AttentionDims(B, T, Hq, Hkv, D, S)


def check_paged_inputs(q, k_pages, v_pages, block_tables, lengths, *,
                       op: str) -> tuple[AttentionDims, int]:
  """Validates q[B, T, Hq, D] against paged k, v[P, page_size, Hkv, D], block_tables[B, max_pages]
  and lengths[B]; returns (dims with S = max_pages * page_size, page_size).

  Concrete lengths must lie in [0, max_pages * page_size], and the live entries of a concrete
  table (the first ceil(lengths[b] / page_size) of row b) in [0, P); entries past them are never
  read and may hold anything."""
  for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages),
                  ("block_tables", block_tables), ("lengths", lengths)):
    check_array(name, x, op)
  if q.ndim != 4:
    raise ValueError(f"{op}: q must have shape [B, T, Hq, D], got {q.shape}")
  B, T, Hq, D = q.shape
  if k_pages.ndim != 4 or k_pages.shape[-1] != D:
    raise ValueError(f"{op}: k_pages must have shape [P, page_size, Hkv, D={D}] (D of q), "
                     f"got {k_pages.shape}")
  _, page_size, Hkv, _ = k_pages.shape
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"{op}: v_pages must have the shape of k_pages {k_pages.shape}, "
                     f"got {v_pages.shape}")
  _check_gqa(op, Hq, Hkv, "k_pages")
  _check_dtypes(op, q, k_pages, v_pages, "k_pages", "v_pages")
  if (block_tables.ndim != 2 or block_tables.shape[0] != B
      or not jnp.issubdtype(block_tables.dtype, jnp.integer)):
    raise ValueError(f"{op}: block_tables must be an integer array of shape [B={B}, max_pages], "
                     f"got {block_tables.shape} {block_tables.dtype}")
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{op}: lengths must be an integer array of shape [B={B}], got "
                     f"{lengths.shape} {lengths.dtype}")
  _check_nonempty("q", q, "[B, T, Hq, D]", op)
  _check_nonempty("k_pages", k_pages, "[P, page_size, Hkv, D]", op)
  _check_nonempty("block_tables", block_tables, "[B, max_pages]", op)
  check_live_pages(block_tables, lengths, num_pages=k_pages.shape[0], page_size=page_size, op=op)
  return AttentionDims(B, T, Hq, Hkv, D, block_tables.shape[1] * page_size), page_size


def check_live_pages(block_tables, lengths, *, num_pages: int, page_size: int, op: str,
                     lengths_name: str = "lengths", new_tokens: int = 0) -> None:
  """Concrete lengths[B] in [0, max_pages * page_size], and the table ids of the pages they
  cover in [0, P) (with new_tokens > 0: the pages those tokens are written to as well, up to the
  end of the table)."""
  n = host_values(lengths)
  if n is None:
    return
  max_pages = block_tables.shape[1]
  cap = max_pages * page_size
  bad = np.flatnonzero((n < 0) | (n > cap))
  if bad.size:
    b = int(bad[0])
    raise ValueError(f"{op}: {lengths_name}[{b}] = {int(n[b])} must be in [0, max_pages * "
                     f"page_size = {max_pages} * {page_size} = {cap}]")
  tables = host_values(block_tables)
  if tables is None:
    return
  live = np.minimum(-(-(n.astype(np.int64) + new_tokens) // page_size), max_pages)
  bad = np.argwhere((np.arange(max_pages) < live[:, None])
                    & ((tables < 0) | (tables >= num_pages)))
  if len(bad):
    b, i = (int(x) for x in bad[0])
    raise ValueError(f"{op}: block_tables[{b}, {i}] = {int(tables[b, i])} must be a page id in "
                     f"[0, P={num_pages}): it is one of the {int(live[b])} pages request {b} "
                     f"{'reads or writes' if new_tokens else 'reads'} ({lengths_name}[{b}] = "
                     f"{int(n[b])}, page_size = {page_size})")


def check_chunk_ids(chunk_ids, dims: AttentionDims, chunk_size, *, op: str,
                    name: str = "chunk_ids", row: str = "request") -> int:
  """Validates chunk_ids[B, Hkv, K] (integer) and chunk_size (positive int); returns N chunks.

  Concrete ids must not repeat a chunk in [0, N) within one (row, kv head): kernels that group
  pairs by chunk would count it twice. Ids outside [0, N) select nothing and may repeat."""
  positive_int(chunk_size, name="chunk_size", where=op)
  check_array(name, chunk_ids, op)
  if (chunk_ids.ndim != 3 or chunk_ids.shape[:2] != (dims.B, dims.Hkv)
      or not jnp.issubdtype(chunk_ids.dtype, jnp.integer)):
    raise ValueError(f"{op}: {name} must be an integer array of shape [B={dims.B}, "
                     f"Hkv={dims.Hkv}, K], got {chunk_ids.shape} {chunk_ids.dtype}")
  num_chunks = -(-dims.S // chunk_size)
  ids = host_values(chunk_ids)
  int32 = np.iinfo(np.int32)
  if ids is not None and ids.size and (ids.min() < int32.min or ids.max() > int32.max):
    # the kernels read int32 ids: a wider one would wrap around to a real chunk
    raise ValueError(f"{op}: {name} must fit int32 (ids outside [0, N={num_chunks}) select "
                     f"nothing), got values in [{ids.min()}, {ids.max()}]")
  if ids is not None and ids.shape[-1] > 1:
    K = ids.shape[-1]
    # Ids that select nothing become distinct negatives, so only real chunks can collide.
    key = np.where((ids >= 0) & (ids < num_chunks), ids.astype(np.int64), -1 - np.arange(K))
    key = np.sort(key, axis=-1)
    dup = np.argwhere(key[..., 1:] == key[..., :-1])
    if len(dup):
      b, h, i = (int(x) for x in dup[0])
      raise ValueError(f"{op}: {name}[{b}, {h}] (the chunks of {row} {b}, kv head {h}) holds "
                       f"chunk {int(key[b, h, i])} twice; the ids of a row must be distinct "
                       f"(ids outside [0, N={num_chunks}) select nothing and may repeat)")
  return num_chunks


def check_sketches(q, codes, scale, chunk_size, *, op: str) -> tuple[AttentionDims, int]:
  """Validates q[B, T, Hq, D] against sketches codes[S, Hkv, D/2] (int8, packed 4-bit) or
  codes[S, Hkv, D] (int8, 8-bit) and scales scale[S, Hkv] (per key) or scale[N, Hkv] (per
  chunk); returns (dims, N chunks)."""
  positive_int(chunk_size, name="chunk_size", where=op)
  for name, x in (("q", q), ("codes", codes), ("scale", scale)):
    check_array(name, x, op)
  if q.ndim != 4 or q.shape[-1] % 2:
    raise ValueError(f"{op}: q must have shape [B, T, Hq, D] with D even, got {q.shape}")
  B, T, Hq, D = q.shape
  if codes.ndim != 3 or codes.shape[-1] not in (D // 2, D) or codes.dtype != jnp.int8:
    raise ValueError(f"{op}: codes must be an int8 array of shape [S, Hkv, D/2={D // 2}] "
                     f"(packed 4-bit) or [S, Hkv, D={D}] (8-bit), got {codes.shape} "
                     f"{codes.dtype}")
  S, Hkv, _ = codes.shape
  N = -(-S // chunk_size)
  _check_gqa(op, Hq, Hkv, "codes")
  _check_float("q", q, op)
  if scale.shape not in ((S, Hkv), (N, Hkv)) or not jnp.issubdtype(scale.dtype, jnp.floating):
    raise ValueError(f"{op}: scale must be a float array of shape [S={S}, Hkv={Hkv}] (per key) "
                     f"or [N={N}, Hkv={Hkv}] (per chunk), got {scale.shape} {scale.dtype}")
  if scale.shape[0] != S:  # a per-chunk scale factors out of the chunk's max only if >= 0
    values = host_values(scale)
    if values is not None and np.any(values < 0):
      raise ValueError(f"{op}: per-chunk scales must be >= 0 (a chunk's max is taken before "
                       f"scaling), got a minimum of {float(values.min())}")
  _check_nonempty("q", q, "[B, T, Hq, D]", op)
  _check_nonempty("codes", codes, "[S, Hkv, D/2 or D]", op)
  return AttentionDims(B, T, Hq, Hkv, D, S), N


def check_kv_length(kv_length, S: int, *, op: str, name: str = "kv_length", bound: str = "S"):
  """Returns kv_length as an int32 scalar array (traced values allowed), or None; a concrete
  one must lie in [0, S] (`name` / `bound` label the argument and its limit in errors)."""
  if kv_length is None:
    return None
  if isinstance(kv_length, bool):
    raise ValueError(f"{op}: {name} must be an integer scalar, got {kv_length!r}")
  n = host_values(kv_length)
  if isinstance(kv_length, int) and not 0 <= kv_length <= S:  # before int32 could overflow
    raise ValueError(f"{op}: {name} must be in [0, {bound}={S}], got {kv_length}")
  stand_in = isinstance(kv_length, jax.ShapeDtypeStruct)  # `plan`'s: a shape, no value
  kv_length = kv_length if stand_in else jnp.asarray(kv_length)
  if kv_length.ndim != 0 or not jnp.issubdtype(kv_length.dtype, jnp.integer):
    raise ValueError(f"{op}: {name} must be an integer scalar, got shape {kv_length.shape} "
                     f"dtype {kv_length.dtype}")
  if n is not None and not 0 <= int(n) <= S:
    raise ValueError(f"{op}: {name} must be in [0, {bound}={S}], got {int(n)}")
  return jax.ShapeDtypeStruct((), jnp.int32) if stand_in else kv_length.astype(jnp.int32)
