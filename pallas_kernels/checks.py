"""Argument validation shared by the ops, their references and the implementations' configs.

Every check raises a one-line `ValueError` that names the op (or config), the argument, what was
expected in DESIGN.md's letters and what was received.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp

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


def _check_float(name: str, x, op: str) -> None:
  if not any(x.dtype == d for d in FLOAT_DTYPES):
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def _check_dtypes(op: str, q, k, v, k_name: str, v_name: str) -> None:
  for name, x in (("q", q), (k_name, k), (v_name, v)):
    _check_float(name, x, op)
  if k.dtype != v.dtype:
    raise ValueError(f"{op}: {k_name} and {v_name} must share a dtype, got {k.dtype} and "
                     f"{v.dtype}")
  if q.dtype != k.dtype:
    raise ValueError(f"{op}: q and {k_name}, {v_name} must share a dtype, got q {q.dtype} and "
                     f"{k_name}, {v_name} {k.dtype}")


def _check_gqa(op: str, Hq: int, Hkv: int, k_name: str) -> None:
  if Hkv == 0 or Hq % Hkv:
    raise ValueError(f"{op}: Hq={Hq} of q must be a multiple of Hkv={Hkv} of {k_name} (GQA)")


def check_shared_kv_inputs(q, k, v, *, op: str) -> AttentionDims:
  """Validates q[B, T, Hq, D] against a shared k, v[S, Hkv, D]; returns the dims."""
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
  return AttentionDims(B, T, Hq, Hkv, D, S)


def check_paged_inputs(q, k_pages, v_pages, block_tables, lengths, *,
                       op: str) -> tuple[AttentionDims, int]:
  """Validates q[B, T, Hq, D] against paged k, v[P, page_size, Hkv, D], block_tables[B, max_pages]
  and lengths[B]; returns (dims with S = max_pages * page_size, page_size)."""
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
  return AttentionDims(B, T, Hq, Hkv, D, block_tables.shape[1] * page_size), page_size


def check_chunk_ids(chunk_ids, dims: AttentionDims, chunk_size, *, op: str) -> int:
  """Validates chunk_ids[B, Hkv, K] (integer) and chunk_size (positive int); returns N chunks."""
  positive_int(chunk_size, name="chunk_size", where=op)
  if (chunk_ids.ndim != 3 or chunk_ids.shape[:2] != (dims.B, dims.Hkv)
      or not jnp.issubdtype(chunk_ids.dtype, jnp.integer)):
    raise ValueError(f"{op}: chunk_ids must be an integer array of shape [B={dims.B}, "
                     f"Hkv={dims.Hkv}, K], got {chunk_ids.shape} {chunk_ids.dtype}")
  return -(-dims.S // chunk_size)


def check_sketches(q, codes, scale, chunk_size, *, op: str) -> tuple[AttentionDims, int]:
  """Validates q[B, T, Hq, D] against packed sketches codes[S, Hkv, D/2] (int8) and scales
  scale[S, Hkv]; returns (dims, N chunks)."""
  positive_int(chunk_size, name="chunk_size", where=op)
  if q.ndim != 4 or q.shape[-1] % 2:
    raise ValueError(f"{op}: q must have shape [B, T, Hq, D] with D even, got {q.shape}")
  B, T, Hq, D = q.shape
  if codes.ndim != 3 or codes.shape[-1] != D // 2 or codes.dtype != jnp.int8:
    raise ValueError(f"{op}: codes must be an int8 array of shape [S, Hkv, D/2={D // 2}], got "
                     f"{codes.shape} {codes.dtype}")
  S, Hkv, _ = codes.shape
  _check_gqa(op, Hq, Hkv, "codes")
  _check_float("q", q, op)
  if scale.shape != (S, Hkv) or not jnp.issubdtype(scale.dtype, jnp.floating):
    raise ValueError(f"{op}: scale must be a float array of shape [S={S}, Hkv={Hkv}], got "
                     f"{scale.shape} {scale.dtype}")
  return AttentionDims(B, T, Hq, Hkv, D, S), -(-S // chunk_size)


def check_kv_length(kv_length, *, op: str):
  """Returns kv_length as an int32 scalar array (traced values allowed), or None."""
  if kv_length is None:
    return None
  kv_length = jnp.asarray(kv_length)
  if kv_length.ndim != 0 or not jnp.issubdtype(kv_length.dtype, jnp.integer):
    raise ValueError(f"{op}: kv_length must be an integer scalar, got shape {kv_length.shape} "
                     f"dtype {kv_length.dtype}")
  return kv_length.astype(jnp.int32)
