"""Default tilings and sweep candidates of the Mosaic TPU implementations, the K/V block layout,
a model of the kernels' VMEM use, and their cost estimates for XLA.

Every function takes the problem's static shape and a `TpuTarget` (never the running device), so
a TPU tiling can be planned and lowered for any TPU generation on a machine without one.

VMEM: the default tilings keep the modelled use (`vmem_bytes`) within the chip's default scoped
VMEM or three quarters of its VMEM, whichever is more (`fits`; v4 has 16 MiB in all), and so do
the sweep candidates (unique_attention halves its row tiles until they fit). A kernel that needs
more than the default scoped VMEM (large float32 blocks, D not a multiple of 128 with many heads
per block) asks for it through `vmem_limit_bytes` (`vmem_limit`). The model is not checked
against libtpu here (no TPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.layout import AttentionDims
from pallas_kernels.targets import MIB, TpuTarget
from pallas_kernels.tpu.configs import (MosaicTpuChunkConfig, MosaicTpuScoresConfig,
                                        MosaicTpuSharedConfig, MosaicTpuUniqueConfig)

# Largest key block of the chunk heuristic (keys x hb*D columns of K and of V per pipeline stage).
MAX_CHUNK_BLOCK_K = 512
# Unique attention: keys per compute block, and the fewest blocks per split.
UNIQUE_BLOCK_KEYS = 128
UNIQUE_MIN_BLOCKS_PER_SPLIT = 4
# Rows per unique-attention program at most: decode's T*G stays one tile; a prefill chunk's rows
# go in tiles of this many, each with its own [rows, keys] float32 scores in VMEM.
UNIQUE_MAX_ROWS = 512


def nbytes(*arrays) -> int:
  """Bytes of arrays (or ShapeDtypeStructs) as stored."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in arrays)


def cost(*, pairs: int, width: int, bytes_accessed: int, products: int = 2,
         softmax: bool = True) -> pl.CostEstimate:
  """What a kernel's `pallas_call` tells XLA it costs (its TPU scheduler places other work,
  e.g. a collective, beside the call by it): `pairs` (query row, key) pairs the grid visits,
  each `products` dot products of `width` (QK^T and PV; one for chunk scores) and, with a
  softmax, one exp; bytes_accessed as the grid reads and writes them (K/V once per row tile, at
  the capacity the grid spans: kv_length is traced)."""
  return pl.CostEstimate(flops=2 * products * pairs * width,
                         transcendentals=pairs if softmax else 0, bytes_accessed=bytes_accessed)


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


def _tiled(rows: int, cols: int, itemsize: int) -> int:
  """VMEM bytes of a [rows, cols] array: whole tiles of 32 / itemsize sublanes x 128 lanes."""
  sublanes = 32 // itemsize
  return math.ceil(rows / sublanes) * sublanes * math.ceil(cols / 128) * 128 * itemsize


def vmem_bytes(*, rows: int, keys: int, D: int, hb: int, q_heads: int, dtype,
               out_dtype=jnp.float32, kv_blocks: int = 1) -> int:
  """A model of a kernel's VMEM use for one grid step.

  The pipeline double-buffers every block: K and V (kv_blocks blocks of keys / kv_blocks rows x
  hb * D columns each) and the q, o and lse blocks of q_heads heads x rows rows. The online
  softmax state (m, l, acc) of those heads stays resident, and one head at a time holds float32
  scores, probabilities and mask [rows, keys] and its K, V slices [keys, D].
  """
  size, out_size = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
  kv = 2 * kv_blocks * _tiled(keys // kv_blocks, hb * D, size)
  blocks = q_heads * (_tiled(rows, D, size) + _tiled(rows, D, out_size) + _tiled(rows, 1, 4))
  state = q_heads * (2 * _tiled(rows, 1, 4) + _tiled(rows, D, 4))
  work = 3 * _tiled(rows, keys, 4) + 2 * _tiled(keys, D, size)
  return 2 * (kv + blocks) + state + work


def vmem_limit(need: int, target: TpuTarget) -> int | None:
  """`vmem_limit_bytes` of a kernel that needs `need` bytes (`vmem_bytes`): None (the default
  scoped VMEM) while that holds it, else need and a quarter more (the model is rough) in whole
  MiB, at most the core's VMEM."""
  if need <= target.scoped_vmem_bytes:
    return None
  return min(target.vmem_bytes, math.ceil(need * 1.25 / MIB) * MIB)


def fits(need: int, target: TpuTarget) -> bool:
  """Whether a default tiling may need `need` bytes of VMEM (module docstring)."""
  return need <= max(target.scoped_vmem_bytes, target.vmem_bytes * 3 // 4)


def shared_vmem(dims: AttentionDims, dtype, config: MosaicTpuSharedConfig) -> int:
  """A block holds hb kv heads' query rows and K/V columns."""
  hb = heads_per_block(dims.Hkv, dims.D)
  return vmem_bytes(rows=config.block_m, keys=config.block_k, D=dims.D, hb=hb, q_heads=hb,
                    dtype=dtype)


def shared(dims: AttentionDims, dtype, target: TpuTarget) -> MosaicTpuSharedConfig:
  """block_m up to 256 rows, 512-key blocks (fewer where VMEM is short), S split only while
  programs leave a core idle."""
  block_m = _rows16(dims.M)
  block_k = 512 if dims.S >= 512 else 128
  while block_k > 128 and not fits(shared_vmem(
      dims, dtype, MosaicTpuSharedConfig(block_m=block_m, block_k=block_k)), target):
    block_k //= 2
  programs = dims.Hkv * math.ceil(dims.M / block_m)
  splits = max(1, min(math.ceil(dims.S / block_k), target.num_cores // programs))
  return MosaicTpuSharedConfig(block_m=block_m, block_k=block_k, num_splits=splits)


def shared_candidates(dims: AttentionDims, dtype,
                      target: TpuTarget) -> list[MosaicTpuSharedConfig]:
  base = shared(dims, dtype, target)
  others = (dataclasses.replace(base, block_k=bk) for bk in (128, 256, 1024) if bk != base.block_k)
  return [base, *(c for c in others if fits(shared_vmem(dims, dtype, c), target))]


def unique_rows(T: int, G: int) -> int:
  """Query rows of one (request, kv head) padded to the bf16 sublane tile: a multiple of 16."""
  return 16 * math.ceil(T * G / 16)


def unique_block_m(T: int, G: int, config: MosaicTpuUniqueConfig) -> int:
  """Rows per program: config.block_m, or fewer where a request has fewer (padded) rows."""
  return min(config.block_m, unique_rows(T, G))


def unique_vmem(dims: AttentionDims, page_size: int, dtype,
                config: MosaicTpuUniqueConfig) -> int:
  """A program holds one row tile of a (request, kv-head block)."""
  hb = heads_per_block(dims.Hkv, dims.D)
  return vmem_bytes(rows=unique_block_m(dims.T, dims.G, config),
                    keys=config.pages_per_block * page_size, D=dims.D, hb=hb, q_heads=hb,
                    dtype=dtype, kv_blocks=config.pages_per_block)


def unique(dims: AttentionDims, page_size: int, dtype,
           target: TpuTarget) -> MosaicTpuUniqueConfig:
  """~UNIQUE_BLOCK_KEYS keys per block, equal row tiles of at most UNIQUE_MAX_ROWS rows, halving
  the cap until the modelled VMEM fits (`fits`: many heads per block, e.g. D=80 with Hkv=32, hold
  hb times a tile's rows); split a request's pages only while programs leave a core idle."""
  pages_per_block = max(1, UNIQUE_BLOCK_KEYS // page_size)
  rows = unique_rows(dims.T, dims.G)
  cap = UNIQUE_MAX_ROWS
  while True:
    block_m = 16 * math.ceil(rows / math.ceil(rows / cap) / 16)  # balanced tiles
    config = MosaicTpuUniqueConfig(pages_per_block=pages_per_block, block_m=block_m)
    if cap == 16 or fits(unique_vmem(dims, page_size, dtype, config), target):
      break
    cap //= 2
  max_blocks = math.ceil(dims.S / (page_size * pages_per_block))
  programs = (dims.B * (dims.Hkv // heads_per_block(dims.Hkv, dims.D))
              * math.ceil(dims.T * dims.G / block_m))
  splits = min(math.ceil(target.num_cores / programs), max_blocks // UNIQUE_MIN_BLOCKS_PER_SPLIT)
  return dataclasses.replace(config, num_splits=max(1, splits))


def unique_unsupported(dims: AttentionDims, page_size: int, dtype,
                       config: MosaicTpuUniqueConfig, target: TpuTarget) -> str | None:
  """Why the Mosaic TPU kernel cannot run this problem with this config, or None."""
  if page_size % 8:
    return f"page_size must be a multiple of 8 (sublane tiling of a page block), got {page_size}"
  need = unique_vmem(dims, page_size, dtype, config)
  if need > target.vmem_bytes:
    return (f"its blocks need ~{need // MIB} MiB of VMEM for row tiles of "
            f"{unique_block_m(dims.T, dims.G, config)} query rows and {config.pages_per_block} "
            f"pages; {target.name} has {target.vmem_bytes // MIB} MiB (a smaller block_m or "
            f"pages_per_block fits)")
  return None


def unique_candidates(dims: AttentionDims, page_size: int, dtype,
                      target: TpuTarget) -> list[MosaicTpuUniqueConfig]:
  """The default, other keys per block, and half the rows per tile (where a tile has more than
  16), those that fit."""
  base = unique(dims, page_size, dtype, target)
  others = [dataclasses.replace(base, pages_per_block=max(1, keys // page_size))
            for keys in (64, 256, 512) if max(1, keys // page_size) != base.pages_per_block]
  if unique_block_m(dims.T, dims.G, base) > 16:
    others.append(dataclasses.replace(
        base, block_m=16 * math.ceil(unique_block_m(dims.T, dims.G, base) / 32)))
  return [base, *(c for c in others if fits(unique_vmem(dims, page_size, dtype, c), target))]


def chunk_vmem(dims: AttentionDims, dtype, config: MosaicTpuChunkConfig) -> int:
  """A tile is one kv head's rows (o in the input dtype) against hb heads' K/V columns."""
  return vmem_bytes(rows=config.block_m, keys=config.block_k, D=dims.D,
                    hb=heads_per_block(dims.Hkv, dims.D), q_heads=1, dtype=dtype,
                    out_dtype=dtype)


def chunk(dims: AttentionDims, top_k: int, chunk_size: int, dtype,
          target: TpuTarget) -> MosaicTpuChunkConfig:
  """block_m near the rows a chosen chunk gets; a chunk of up to MAX_CHUNK_BLOCK_K keys is one
  key block (resident across all of its tiles: the index map does not change between them, so
  no re-copy); longer chunks (or a short VMEM) stream 512 / 256 / 128 keys."""
  block_m = _rows16(dims.B * dims.T * dims.G * top_k / math.ceil(dims.S / chunk_size))
  configs = [MosaicTpuChunkConfig(block_m=block_m, block_k=b) for b in (chunk_size, 512, 256, 128)
             if b <= MAX_CHUNK_BLOCK_K and b % 128 == 0 and chunk_size % b == 0]
  if not configs:  # no 128-multiple divides C: refused by chunk_unsupported
    return MosaicTpuChunkConfig(block_m=block_m, block_k=128)
  return next((c for c in configs if fits(chunk_vmem(dims, dtype, c), target)), configs[-1])


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
  blocks = [b for b in (512, 256, 128) if chunk_size % b == 0]
  return MosaicTpuScoresConfig(block_m=_rows16(dims.M), block_k=blocks[0] if blocks else 128,
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
