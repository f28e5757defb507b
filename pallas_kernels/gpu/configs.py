"""The frozen, self-validating configs of the GPU implementations (one per implementation).

A config holds only its own kernel's knobs and checks them on construction; constraints that
depend on the problem (chunk size, S, dtype, head_dim) or the chip (shared memory, Hopper) are
checked when a call is planned (`pallas_kernels.plan`).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.checks import (Config, at_least, boolean, knob, multiple_of, one_of,
                                   positive_int, power_of_two)

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


def _warps(value, *, name: str, where: str) -> int:
  power_of_two(value, name=name, where=where)
  if value > 16:
    raise ValueError(f"{where}: {name} must be at most 16, got {value}")
  return value


@_frozen
class TritonSharedConfig(Config):
  """shared_attention on the Triton lowering: block_m query rows x block_k keys per step (powers
  of two >= 16, for tl.dot), num_splits programs along S (flash decoding), num_warps per
  program, num_stages of software pipelining in the key loop; widen_kv (float8 K/V only) as for
  `MosaicGpuSharedConfig`: one widening pass before the kernel instead of every row tile's
  program widening every K/V tile it loads."""

  block_m: int = knob(power_of_two, minimum=16)
  block_k: int = knob(power_of_two, minimum=16)
  num_splits: int = knob(positive_int, 1)
  num_warps: int = knob(_warps, 4)
  num_stages: int = knob(positive_int, 2)
  widen_kv: bool = knob(boolean, False)


@_frozen
class TritonChunkConfig(Config):
  """chunk_attention on the Triton lowering: block_m stacked pair rows per tile, block_k keys per
  step within a chunk (powers of two >= 16); num_warps, num_stages as for shared_attention."""

  block_m: int = knob(power_of_two, minimum=16)
  block_k: int = knob(power_of_two, minimum=16)
  num_warps: int = knob(_warps, 4)
  num_stages: int = knob(positive_int, 2)


@_frozen
class TritonUniqueConfig(Config):
  """unique_attention on the Triton lowering: pages_per_block pages per compute block
  (pages_per_block * page_size must be a power of two >= 16), num_splits programs per
  (request, kv head) along its pages; block_m query rows per program at most (a request's T*G
  rows of a kv head are cut into tiles of min(block_m, T*G rounded up to a power of two >= 16):
  several for a prefill chunk of many tokens); num_warps, num_stages as for shared_attention."""

  pages_per_block: int = knob(positive_int)
  block_m: int = knob(power_of_two, 128, minimum=16)
  num_splits: int = knob(positive_int, 1)
  num_warps: int = knob(_warps, 4)
  num_stages: int = knob(positive_int, 2)


@_frozen
class _MosaicGpuAttentionConfig(Config):
  """The knobs of the Mosaic GPU attention kernel (`gpu.mosaic_attention`): block_k keys per TMA
  tile (a multiple of 64: the (8, 64) shared-memory tiling), num_stages K/V slots in the
  shared-memory ring (>= 2; a multiple of consumers with split_keys: each consumer owns its
  slots), num_splits CTAs along the keys per row tile, consumers (1-3 warpgroups) and
  split_keys (the consumers share 64 rows and take turns over the key tiles, each writing its
  own partial: small M where one consumer's chain of wgmma, softmax and float8 widening, not
  HBM, limits the rate)."""

  block_k: int = knob(multiple_of, 128, step=64)
  num_stages: int = knob(at_least, 2, minimum=2)
  num_splits: int = knob(positive_int, 1)
  consumers: int = knob(one_of, 2, choices=(1, 2, 3))
  split_keys: bool = knob(boolean, False)

  def __post_init__(self):
    super().__post_init__()
    from pallas_kernels.gpu import mosaic_attention  # the kernel's rule, not a copy of it
    where = type(self).__name__
    if problem := mosaic_attention.schedule_problem(self.consumers, self.split_keys):
      raise ValueError(f"{where}: {problem}")
    if self.split_keys and self.num_stages % self.consumers:
      raise ValueError(f"{where}: split_keys needs num_stages a multiple of consumers="
                       f"{self.consumers}, got {self.num_stages}")

  @property
  def rows_per_cta(self) -> int:
    """Query rows one CTA owns (`mosaic_attention.rows_per_cta`)."""
    from pallas_kernels.gpu import mosaic_attention  # the kernel's tile, not a copy of it
    return mosaic_attention.rows_per_cta(self.consumers, self.split_keys)


@_frozen
class MosaicGpuSharedConfig(_MosaicGpuAttentionConfig):
  """shared_attention on Mosaic GPU (Hopper): each CTA owns consumers x 64 query rows (one 64-row
  consumer warpgroup for small M, a ping-pong pair for large M), or 64 rows shared by two or
  three consumers with split_keys; S split in num_splits CTAs per row tile. Knobs:
  `_MosaicGpuAttentionConfig`, and widen_kv (float8 K/V only): widen K/V to the query dtype in
  one XLA pass before the kernel, which then reads them as such (a transient copy of twice the
  float8 bytes), instead of every row tile's CTA widening every K/V tile in shared memory; or
  widen_v: widen V only, to float16 (half that pass), K stays float8 and QK^T on the FP8 tensor
  cores."""

  widen_kv: bool = knob(boolean, False)
  widen_v: bool = knob(boolean, False)

  def __post_init__(self):
    super().__post_init__()
    if self.widen_kv and self.widen_v:
      raise ValueError("MosaicGpuSharedConfig: widen_kv widens V too; set at most one of "
                       "widen_kv and widen_v")


@_frozen
class MosaicGpuUniqueConfig(_MosaicGpuAttentionConfig):
  """unique_attention on Mosaic GPU (Hopper): one CTA per (request, kv head, split of its
  tokens) owning the request's T * G query rows (at most 64) with one consumer warpgroup; a tile
  is whole pages (or part of one page), by one TMA copy each. Knobs: block_k, num_stages,
  num_splits of `_MosaicGpuAttentionConfig`; consumers=1, split_keys=False only (see
  `mosaic_attention.attention_over_ranges`)."""

  consumers: int = knob(one_of, 1, choices=(1,))


@_frozen
class MosaicGpuTileConfig(_MosaicGpuAttentionConfig):
  """tile_chunk_attention on Mosaic GPU (Hopper): one CTA per (64 * consumers rows of a tile, kv
  head, split of the tile's chunk list), the list's chunks gathered by TMA into one key stream
  (`mosaic_attention.list_attention_partials`). Knobs: block_k, num_stages, num_splits of
  `_MosaicGpuAttentionConfig`; consumers 1 (64 rows) or 2 (a ping-pong pair on 128 rows,
  sharing each K/V tile), split_keys=False only."""

  consumers: int = knob(one_of, 1, choices=(1, 2))

  def __post_init__(self):
    super().__post_init__()
    if self.split_keys:  # the kernel refuses it over paged keys
      raise ValueError("MosaicGpuTileConfig: split_keys must be False (the tile's chunks are "
                       "gathered page by page)")


@_frozen
class MosaicGpuChunkConfig(Config):
  """chunk_attention on Mosaic GPU (Hopper): one CTA per (128-row tile, chunk: a ping-pong pair
  of consumers); block_k and num_stages as for shared_attention."""

  block_k: int = knob(multiple_of, 128, step=64)
  num_stages: int = knob(at_least, 4, minimum=2)


@_frozen
class TritonScoresConfig(Config):
  """chunk_scores on the Triton lowering: block_m query rows x block_k sketched keys per step,
  chunks_per_program chunks per program (powers of two). Three pipeline stages measured 9-17%
  faster than two at every B from 1 to 512 on an H200 (S=1M, 64-wide 8-bit codes;
  experiments/results/sparse_probes.md)."""

  block_m: int = knob(power_of_two, minimum=16)
  block_k: int = knob(power_of_two, minimum=16)
  chunks_per_program: int = knob(power_of_two, 8)
  num_warps: int = knob(_warps, 4)
  num_stages: int = knob(positive_int, 3)


@_frozen
class MosaicGpuScoresConfig(Config):
  """chunk_scores on Mosaic GPU (Hopper; int8 rows, 8-bit codes with per-chunk scales): one CTA
  per (consumers x 64 query rows, kv head, run of chunks_per_cta chunks), block_k codes per TMA
  tile (a multiple of 16 dividing the chunk size, at most 256: the integer wgmma's N),
  num_stages ring slots, consumers 1 or 2 warpgroups (64 rows each) reading the same tiles."""

  block_k: int = knob(multiple_of, 128, step=16)
  chunks_per_cta: int = knob(positive_int, 16)
  num_stages: int = knob(at_least, 4, minimum=2)
  consumers: int = knob(one_of, 2, choices=(1, 2))

  def __post_init__(self):
    super().__post_init__()
    if self.block_k > 256:
      raise ValueError(f"MosaicGpuScoresConfig: block_k must be at most 256 (the wgmma N), got "
                       f"{self.block_k}")
