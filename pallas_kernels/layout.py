"""Argument validation and the query layout the kernels share.

Kernels see the queries of one kv head as one matrix: the G query heads of the kv head and all
B*T query tokens are folded into the M (row) dimension, `q_rows[Hkv, M, D]` with
M = B*T*G and row index ((b*T + t)*G + g). One kv tile is then multiplied by every row at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class AttentionDims(NamedTuple):
  """Shape letters of DESIGN.md for one attention call."""

  B: int
  T: int
  Hq: int
  Hkv: int
  D: int
  S: int

  @property
  def G(self) -> int:
    return self.Hq // self.Hkv

  @property
  def M(self) -> int:
    return self.B * self.T * self.G


def _check_float(name: str, x, op: str) -> None:
  if not any(x.dtype == d for d in FLOAT_DTYPES):
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


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
  if Hkv == 0 or Hq % Hkv:
    raise ValueError(f"{op}: Hq={Hq} of q must be a multiple of Hkv={Hkv} of k (GQA)")
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_float(name, x, op)
  if k.dtype != v.dtype:
    raise ValueError(f"{op}: k and v must share a dtype, got {k.dtype} and {v.dtype}")
  if q.dtype != k.dtype:
    raise ValueError(f"{op}: q and k, v must share a dtype, got q {q.dtype} and k, v {k.dtype}")
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
  if Hkv == 0 or Hq % Hkv:
    raise ValueError(f"{op}: Hq={Hq} of q must be a multiple of Hkv={Hkv} of k_pages (GQA)")
  for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
    _check_float(name, x, op)
  if k_pages.dtype != v_pages.dtype:
    raise ValueError(f"{op}: k_pages and v_pages must share a dtype, got {k_pages.dtype} and "
                     f"{v_pages.dtype}")
  if q.dtype != k_pages.dtype:
    raise ValueError(f"{op}: q and k_pages, v_pages must share a dtype, got q {q.dtype} and "
                     f"k_pages, v_pages {k_pages.dtype}")
  if (block_tables.ndim != 2 or block_tables.shape[0] != B
      or not jnp.issubdtype(block_tables.dtype, jnp.integer)):
    raise ValueError(f"{op}: block_tables must be an integer array of shape [B={B}, max_pages], "
                     f"got {block_tables.shape} {block_tables.dtype}")
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{op}: lengths must be an integer array of shape [B={B}], got "
                     f"{lengths.shape} {lengths.dtype}")
  return AttentionDims(B, T, Hq, Hkv, D, block_tables.shape[1] * page_size), page_size


def check_chunk_ids(chunk_ids, dims, chunk_size, *, op: str) -> int:
  """Validates chunk_ids[B, Hkv, K] (integer) and chunk_size (positive int); returns N chunks."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
  if (chunk_ids.ndim != 3 or chunk_ids.shape[:2] != (dims.B, dims.Hkv)
      or not jnp.issubdtype(chunk_ids.dtype, jnp.integer)):
    raise ValueError(f"{op}: chunk_ids must be an integer array of shape [B={dims.B}, "
                     f"Hkv={dims.Hkv}, K], got {chunk_ids.shape} {chunk_ids.dtype}")
  return -(-dims.S // chunk_size)


def check_kv_length(kv_length, *, op: str):
  """Returns kv_length as an int32 scalar array (traced values allowed), or None."""
  if kv_length is None:
    return None
  kv_length = jnp.asarray(kv_length)
  if kv_length.ndim != 0 or not jnp.issubdtype(kv_length.dtype, jnp.integer):
    raise ValueError(f"{op}: kv_length must be an integer scalar, got shape {kv_length.shape} "
                     f"dtype {kv_length.dtype}")
  return kv_length.astype(jnp.int32)


def split_range(length, split, *, page_size: int, pages_per_block: int, num_splits: int):
  """(first block, end block, number of pages) of one split of a paged request (flash decoding).

  A request of `length` tokens has cdiv(length, page_size) pages in cdiv(pages, pages_per_block)
  compute blocks, cut into `num_splits` runs of cdiv(blocks, num_splits) whole blocks; split s
  owns blocks [first, end). `end` may be below `first` when the request has fewer blocks than the
  splits before it take (an empty split). Works on Python ints and on traced int32 scalars inside
  a kernel or an index map (truncating division: every operand is >= 0).
  """
  num_pages = pl.cdiv(length, page_size)
  num_blocks = pl.cdiv(num_pages, pages_per_block)
  per_split = pl.cdiv(num_blocks, num_splits)
  first = split * per_split
  return first, jnp.minimum(first + per_split, num_blocks), num_pages


def default_sm_scale(sm_scale: float | None, D: int) -> float:
  return float(D) ** -0.5 if sm_scale is None else float(sm_scale)


def fold_queries(q: jax.Array, Hkv: int) -> jax.Array:
  """q[B, T, Hq, D] -> q_rows[Hkv, B*T*G, D]."""
  B, T, Hq, D = q.shape
  G = Hq // Hkv
  return q.reshape(B, T, Hkv, G, D).transpose(2, 0, 1, 3, 4).reshape(Hkv, B * T * G, D)


def unfold_rows(x: jax.Array, B: int, T: int) -> jax.Array:
  """Inverse of fold_queries for o[Hkv, M, D] -> [B, T, Hq, D] or lse[Hkv, M] -> [B, T, Hq]."""
  Hkv, M = x.shape[:2]
  G = M // (B * T)
  tail = x.shape[2:]
  x = x.reshape(Hkv, B, T, G, *tail)
  x = jnp.moveaxis(x, 0, 2)  # [B, T, Hkv, G, ...]
  return x.reshape(B, T, Hkv * G, *tail)
