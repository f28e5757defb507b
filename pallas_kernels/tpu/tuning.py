"""Default tilings and sweep candidates of the Mosaic TPU implementations, and the K/V block layout.

Every function takes the problem's static shape and a `TpuTarget` (never the running device), so
a TPU tiling can be planned and lowered for any TPU generation on a machine without one.
"""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels.layout import AttentionDims
from pallas_kernels.targets import TpuTarget
from pallas_kernels.tpu.configs import (MosaicTpuChunkConfig, MosaicTpuScoresConfig,
                                        MosaicTpuSharedConfig, MosaicTpuUniqueConfig)

# Largest key block of the chunk heuristic (keys x hb*D columns of K and of V per pipeline stage).
MAX_CHUNK_BLOCK_K = 512
# Unique attention: keys per compute block, and the fewest blocks per split.
UNIQUE_BLOCK_KEYS = 128
UNIQUE_MIN_BLOCKS_PER_SPLIT = 4


def heads_per_block(Hkv: int, D: int) -> int:
  """Fewest kv heads whose D columns make a lane-dense (multiple of 128) block, else all.

  K/V are viewed as [S, Hkv*D]; a block takes hb heads' columns, so its minor dimension hb*D
  follows the (8, 128) tiling rule.
  """
  for hb in range(1, Hkv + 1):
    if Hkv % hb == 0 and (hb * D) % 128 == 0:
      return hb
  return Hkv


def _rows16(rows: float, cap: int = 256) -> int:
  return min(cap, max(16, 16 * math.ceil(rows / 16)))


def shared(dims: AttentionDims, target: TpuTarget) -> MosaicTpuSharedConfig:
  """block_m up to 256 rows, 512-key blocks, S split only while programs leave a core idle."""
  block_m = _rows16(dims.M)
  block_k = 512 if dims.S >= 512 else 128
  programs = dims.Hkv * math.ceil(dims.M / block_m)
  splits = max(1, min(math.ceil(dims.S / block_k), target.num_cores // programs))
  return MosaicTpuSharedConfig(block_m=block_m, block_k=block_k, num_splits=splits)


def shared_candidates(dims: AttentionDims, target: TpuTarget) -> list[MosaicTpuSharedConfig]:
  base = shared(dims, target)
  return [base, *(dataclasses.replace(base, block_k=bk) for bk in (128, 256, 1024)
                  if bk != base.block_k)]


def unique_rows(T: int, G: int) -> int:
  """Query rows of one (request, kv head) padded to the bf16 sublane tile: a multiple of 16."""
  return 16 * math.ceil(T * G / 16)


def unique(dims: AttentionDims, page_size: int, target: TpuTarget) -> MosaicTpuUniqueConfig:
  """~UNIQUE_BLOCK_KEYS keys per block; split a request's pages only while programs leave a
  core idle."""
  pages_per_block = max(1, UNIQUE_BLOCK_KEYS // page_size)
  max_blocks = math.ceil(dims.S / (page_size * pages_per_block))
  programs = dims.B * (dims.Hkv // heads_per_block(dims.Hkv, dims.D))
  splits = min(math.ceil(target.num_cores / programs), max_blocks // UNIQUE_MIN_BLOCKS_PER_SPLIT)
  return MosaicTpuUniqueConfig(pages_per_block=pages_per_block, num_splits=max(1, splits))


def unique_unsupported(page_size: int) -> str | None:
  if page_size % 8:
    return f"page_size must be a multiple of 8 (sublane tiling of a page block), got {page_size}"
  return None


def unique_candidates(dims: AttentionDims, page_size: int,
                      target: TpuTarget) -> list[MosaicTpuUniqueConfig]:
  base = unique(dims, page_size, target)
  return [base, *(dataclasses.replace(base, pages_per_block=max(1, keys // page_size))
                  for keys in (64, 256, 512) if max(1, keys // page_size) != base.pages_per_block)]


def chunk(dims: AttentionDims, top_k: int, chunk_size: int,
          target: TpuTarget) -> MosaicTpuChunkConfig:
  """block_m near the rows a chosen chunk gets; a chunk of up to MAX_CHUNK_BLOCK_K keys is one
  key block (resident across all of its tiles: the index map does not change between them, so
  no re-copy); longer chunks stream 512 / 256 / 128 keys."""
  del target
  rows = dims.B * dims.T * dims.G * top_k / math.ceil(dims.S / chunk_size)
  fits = [b for b in (chunk_size, 512, 256, 128) if b <= MAX_CHUNK_BLOCK_K and b % 128 == 0
          and chunk_size % b == 0]
  block_k = fits[0] if fits else 128  # no 128-multiple divides C: refused by chunk_unsupported
  return MosaicTpuChunkConfig(block_m=_rows16(rows), block_k=block_k)


def chunk_unsupported(chunk_size: int, config: MosaicTpuChunkConfig) -> str | None:
  if chunk_size % config.block_k:
    return (f"chunk_size must be a multiple of config.block_k, got chunk_size={chunk_size}, "
            f"block_k={config.block_k}")
  return None


def scores(dims: AttentionDims, chunk_size: int, target: TpuTarget) -> MosaicTpuScoresConfig:
  """Row blocks as in shared_attention; the largest of 512 / 256 / 128 keys that divides the
  chunk; 128 chunks per output block (or all of them)."""
  del target
  n_chunks = math.ceil(dims.S / chunk_size)
  fits = [b for b in (512, 256, 128) if chunk_size % b == 0]
  return MosaicTpuScoresConfig(block_m=_rows16(dims.M), block_k=fits[0] if fits else 128,
                               chunks_per_block=n_chunks if n_chunks <= 128 else 128)


def scores_unsupported(dims: AttentionDims, chunk_size: int,
                       config: MosaicTpuScoresConfig) -> str | None:
  n_chunks = math.ceil(dims.S / chunk_size)
  if chunk_size % config.block_k:
    return (f"chunk_size must be a multiple of config.block_k (a multiple of 128), got "
            f"chunk_size={chunk_size}, block_k={config.block_k}")
  if config.chunks_per_block % 128 and config.chunks_per_block != n_chunks:
    return (f"config.chunks_per_block must be a multiple of 128 or all N={n_chunks} chunks, got "
            f"{config.chunks_per_block}")
  return None
