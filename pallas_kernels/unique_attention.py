"""`unique_attention`: each request's newest queries against its own paged, ragged KV cache.

Every request owns a list of pages (`block_tables[b]`) in one pool `k_pages, v_pages[P, page_size,
Hkv, D]` and a length. This path reads every valid page once per step and is bandwidth-bound; the
kernels fold the G query heads and T tokens of a request's kv head into the rows of one matmul,
read several pages per compute block, skip pages past each request's length, and split each
request's pages across programs (flash decoding) when there are few requests, merging the partial
states by log-sum-exp. `UniqueAttentionBlocks` holds the tiling; `choose_blocks` is the heuristic.
`write_pages` appends new tokens to the pages (in place when the caller donates the pool).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import layout, merge
from pallas_kernels.backend import num_cores, resolve_backend, tpu_interpret
from pallas_kernels.reference import unique_attention_ref

# Keys per compute block: 128 keys x D=128 in bf16 is 32 KiB of K and of V per pipeline stage.
BLOCK_KEYS = 128
# Fewest compute blocks per split: below it the partial outputs cost more than the split gains.
MIN_BLOCKS_PER_SPLIT = 4


@dataclasses.dataclass(frozen=True)
class UniqueAttentionBlocks:
  """Tiling of one unique-attention call (override the heuristic with an instance).

  pages_per_block: pages per compute block (GPU: times page_size a power of two >= 16);
  num_splits: programs per (request, kv head) along the request's pages;
  num_warps / num_stages: Triton launch knobs (GPU only).
  """

  pages_per_block: int
  num_splits: int
  num_warps: int = 4
  num_stages: int = 2


def _rows(T: int, G: int, backend: str) -> int:
  """Padded query rows per (request, kv head): a power of two >= 16 on GPU (tl.dot), else 16k."""
  n = T * G
  if backend == "gpu":
    return max(16, 1 << (n - 1).bit_length())
  return 16 * math.ceil(n / 16)


def choose_blocks(dims: layout.AttentionDims, page_size: int,
                  backend: str) -> UniqueAttentionBlocks:
  """Heuristic: ~BLOCK_KEYS keys per block, then split pages until ~4 programs per core (GPU).

  dims.S is the padded capacity max_pages * page_size; the splits follow each request's own
  length at run time, so the padded size only caps how many splits are worth having.
  """
  pages_per_block = max(1, BLOCK_KEYS // page_size)
  max_blocks = math.ceil(dims.S / (page_size * pages_per_block))
  if backend == "gpu":
    programs, target = dims.B * dims.Hkv, 4 * num_cores()
  else:
    from pallas_kernels.tpu.shared_attention import heads_per_block

    programs, target = dims.B * (dims.Hkv // heads_per_block(dims.Hkv, dims.D)), 2  # megacore
  splits = min(math.ceil(target / programs), max_blocks // MIN_BLOCKS_PER_SPLIT)
  warps = 8 if _rows(dims.T, dims.G, backend) >= 128 else 4
  return UniqueAttentionBlocks(pages_per_block, max(1, splits), num_warps=warps, num_stages=2)


def _check_blocks(blocks: UniqueAttentionBlocks, page_size: int, backend: str) -> None:
  if blocks.pages_per_block < 1 or blocks.num_splits < 1:
    raise ValueError("unique_attention: blocks.pages_per_block and blocks.num_splits must be >= 1, "
                     f"got {blocks.pages_per_block}, {blocks.num_splits}")
  if backend == "gpu":
    block_k = blocks.pages_per_block * page_size
    if block_k < 16 or block_k & (block_k - 1):
      raise ValueError("unique_attention: on GPU page_size * blocks.pages_per_block must be a "
                       f"power of two >= 16, got {page_size} * {blocks.pages_per_block}")
  elif page_size % 8:
    raise ValueError(f"unique_attention: on TPU page_size must be a multiple of 8, got {page_size}")


def unique_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                     block_tables: jax.Array, lengths: jax.Array, *,
                     sm_scale: float | None = None, backend: str = "auto",
                     interpret: bool = False,
                     blocks: UniqueAttentionBlocks | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each request's T newest queries over its own paged KV cache.

  Args:
    q: [B, T, Hq, D] the T newest tokens of each request (T = 1 in decode); query head h reads
      kv head h // G. Query t of request b sits at position lengths[b] - T + t and attends
      causally to the positions <= its own.
    k_pages, v_pages: [P, page_size, Hkv, D] one pool of pages shared by all requests.
    block_tables: [B, max_pages] int page ids of each request in order; entries past a request's
      length are never read.
    lengths: [B] int tokens in each request's cache including the T new ones (already written,
      see `write_pages`); clamped to [0, max_pages * page_size]. 0 marks an empty batch slot.
    sm_scale: score scale, default 1/sqrt(D).
    backend: "auto" (GPU kernel on GPU, TPU kernel on TPU, XLA reference elsewhere), "gpu",
      "tpu" or "xla".
    interpret: run the chosen Pallas kernel in interpret mode (TPU interpret mode for "tpu").
    blocks: tiling override; default `choose_blocks`.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32 (natural log); a query with no key
    (length 0) gives o = 0, lse = -inf.
  """
  dims, page_size = layout.check_paged_inputs(q, k_pages, v_pages, block_tables, lengths,
                                       op="unique_attention")
  which = resolve_backend(backend, op="unique_attention", interpret=interpret)
  if which == "xla":
    return unique_attention_ref(q, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale)
  blocks = blocks or choose_blocks(dims, page_size, which)
  _check_blocks(blocks, page_size, which)
  B, T, _, Hkv, D, S = dims
  G = dims.G
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, S)
  q_rows = layout.fold_queries(q, Hkv).reshape(Hkv, B, T * G, D)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, _rows(T, G, which) - T * G), (0, 0)))
  args = (q_rows, k_pages, v_pages, block_tables.astype(jnp.int32), lengths)
  scale = layout.default_sm_scale(sm_scale, D)
  if which == "gpu":
    from pallas_kernels.gpu import unique_attention as kernel

    o, lse = kernel.unique_attention_partials(
        *args, T=T, G=G, scale=scale, pages_per_block=blocks.pages_per_block,
        num_splits=blocks.num_splits, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        interpret=interpret)
  else:
    from pallas_kernels.tpu import unique_attention as kernel

    o, lse = kernel.unique_attention_partials(
        *args, T=T, G=G, scale=scale, pages_per_block=blocks.pages_per_block,
        num_splits=blocks.num_splits, interpret=tpu_interpret(interpret))
  o, lse = o[..., :T * G, :], lse[..., :T * G]  # drop the padded rows before the merge reads them
  o, lse = merge.merge_partials(o, lse, axis=0) if o.shape[0] > 1 else (o[0], lse[0])
  o = layout.unfold_rows(o.reshape(Hkv, B * T * G, D), B, T)
  return o.astype(q.dtype), layout.unfold_rows(lse.reshape(Hkv, B * T * G), B, T)


def write_pages(k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                lengths_before: jax.Array, k_new: jax.Array,
                v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes the T new tokens of each request into its pages; returns the updated pools.

  Token t of request b goes to position lengths_before[b] + t, i.e. page
  block_tables[b, pos // page_size], slot pos % page_size. Positions past the table
  (>= max_pages * page_size) are dropped. Afterwards call `unique_attention` with
  lengths = lengths_before + T.

  The update is in place only when the caller donates the pools to a jitted step, e.g.::

      write = jax.jit(write_pages, donate_argnums=(0, 1))
      k_pages, v_pages = write(k_pages, v_pages, block_tables, lengths, k_new, v_new)

  (without donation XLA copies both pools every step).

  Args:
    k_pages, v_pages: [P, page_size, Hkv, D] the page pools.
    block_tables: [B, max_pages] int page ids of each request.
    lengths_before: [B] int tokens already in each request's cache.
    k_new, v_new: [B, T, Hkv, D] the new keys and values (cast to the pools' dtype).
  """
  P, page_size, Hkv, D = k_pages.shape
  B, max_pages = block_tables.shape
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"write_pages: v_pages must have the shape of k_pages {k_pages.shape}, "
                     f"got {v_pages.shape}")
  if k_new.ndim != 4 or k_new.shape[0] != B or k_new.shape[2:] != (Hkv, D):
    raise ValueError(f"write_pages: k_new must have shape [B={B}, T, Hkv={Hkv}, D={D}], got "
                     f"{k_new.shape}")
  if v_new.shape != k_new.shape:
    raise ValueError(f"write_pages: v_new must have the shape of k_new {k_new.shape}, got "
                     f"{v_new.shape}")
  if lengths_before.shape != (B,):
    raise ValueError(f"write_pages: lengths_before must have shape [B={B}], got "
                     f"{lengths_before.shape}")
  pos = lengths_before.astype(jnp.int32)[:, None] + jnp.arange(k_new.shape[1])  # [B, T]
  slot = pos // page_size
  page = jnp.take_along_axis(block_tables.astype(jnp.int32), jnp.clip(slot, 0, max_pages - 1),
                             axis=1)
  page = jnp.where((pos >= 0) & (slot < max_pages), page, P)  # P is out of range: dropped
  offset = pos % page_size
  k_pages = k_pages.at[page, offset].set(k_new.astype(k_pages.dtype), mode="drop")
  v_pages = v_pages.at[page, offset].set(v_new.astype(v_pages.dtype), mode="drop")
  return k_pages, v_pages
