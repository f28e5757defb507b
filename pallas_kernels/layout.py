"""The query layout the kernels share, and the shape letters of one call.

Kernels see the queries of one kv head as one matrix: the G query heads of the kv head and all
B*T query tokens are folded into the M (row) dimension, `q_rows[Hkv, M, D]` with
M = B*T*G and row index ((b*T + t)*G + g). One kv tile is then multiplied by every row at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


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


def tile_split_range(length, split, tile_start, tile_rows: int, *, T: int, G: int,
                     page_size: int, pages_per_block: int, num_splits: int):
  """`split_range` for one row tile of a request's T*G query rows (rows tile_start ..
  tile_start + tile_rows - 1; row r is query r // G, at position length - T + r // G): the end
  cut after the block holding the tile's last real query, past which every key is masked for all
  of its rows (a prefill chunk's early tiles skip the request's last blocks)."""
  first, end, num_pages = split_range(length, split, page_size=page_size,
                                      pages_per_block=pages_per_block, num_splits=num_splits)
  last_row = jnp.minimum(tile_start + tile_rows - 1, T * G - 1)
  seen = jnp.maximum(length - T + last_row // G + 1, 0)  # keys the tile's last query sees
  return first, jnp.minimum(end, pl.cdiv(seen, pages_per_block * page_size)), num_pages


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
