"""The frozen, self-validating configs of the Mosaic TPU implementations (one per implementation).

Blocks follow TPU tiling: query rows in multiples of 16 (bf16 sublane packing), keys in multiples
of 128 (a lane-dense score tile). Problem-dependent constraints (chunk size, page size) are
checked when a call is planned.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.checks import Config, knob, multiple_of, positive_int

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class MosaicTpuSharedConfig(Config):
  """shared_attention on Mosaic TPU: block_m query rows x block_k keys per grid step, num_splits
  grid slices along S (one per core when M is small)."""

  block_m: int = knob(multiple_of, step=16)
  block_k: int = knob(multiple_of, step=128)
  num_splits: int = knob(positive_int, 1)


@_frozen
class MosaicTpuChunkConfig(Config):
  """chunk_attention on Mosaic TPU: block_m stacked pair rows per tile, block_k keys per grid step
  (it must divide the chunk size)."""

  block_m: int = knob(multiple_of, step=16)
  block_k: int = knob(multiple_of, step=128)


@_frozen
class MosaicTpuUniqueConfig(Config):
  """unique_attention on Mosaic TPU: pages_per_block pages per compute block, num_splits runs of
  blocks per (request, kv-head group), block_m query rows per program at most (a multiple of
  16: a request's T*G rows, padded to a multiple of 16, are cut into tiles of
  min(block_m, those rows): several for a prefill chunk of many tokens)."""

  pages_per_block: int = knob(positive_int)
  num_splits: int = knob(positive_int, 1)
  block_m: int = knob(multiple_of, 512, step=16)


@_frozen
class MosaicTpuScoresConfig(Config):
  """chunk_scores on Mosaic TPU: block_m query rows x block_k sketched keys per grid step (block_k
  must divide the chunk size), chunks_per_block chunks per output block (a multiple of 128, or
  every chunk)."""

  block_m: int = knob(multiple_of, step=16)
  block_k: int = knob(multiple_of, step=128)
  chunks_per_block: int = knob(positive_int)
