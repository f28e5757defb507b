"""Pallas kernels for MoSKA: shared-KV, routed-chunk and unique (paged) attention, the merge, and
the chunk scorer of the router.

Every op returns (o, lse) so partial attentions over disjoint key sets combine exactly with
`merge_attention_states`, and takes `implementation=` ("auto" or a name from
`implementations(op)`) with that implementation's own `config=`; `plan` shows what a call would
run and `sweep` what to time; `tuning_table` holds the measured plans "auto" prefers on a chip. Each
op has a pure-jnp reference in `pallas_kernels.reference`.
"""

from pallas_kernels import quant, reference, targets, tuning_table
from pallas_kernels.chunk_attention import chunk_attention
from pallas_kernels.chunk_scores import chunk_scores
from pallas_kernels.dispatch import BACKENDS, Plan, implementations, plan, plans_used, sweep
from pallas_kernels.gpu.configs import (MosaicGpuChunkConfig, MosaicGpuScoresConfig,
                                        MosaicGpuSharedConfig, MosaicGpuTileConfig,
                                        MosaicGpuUniqueConfig,
                                        TritonChunkConfig, TritonScoresConfig,
                                        TritonSharedConfig, TritonUniqueConfig)
from pallas_kernels.merge import merge_attention_states, merge_partials
from pallas_kernels.shared_attention import shared_attention
from pallas_kernels.tile_chunk_attention import tile_chunk_attention
from pallas_kernels.tpu.configs import (MosaicTpuChunkConfig, MosaicTpuScoresConfig,
                                        MosaicTpuSharedConfig, MosaicTpuUniqueConfig)
from pallas_kernels.unique_attention import unique_attention, write_pages

__all__ = [
    "BACKENDS",
    "MosaicGpuChunkConfig",
    "MosaicGpuScoresConfig",
    "MosaicGpuSharedConfig",
    "MosaicGpuTileConfig",
    "MosaicGpuUniqueConfig",
    "MosaicTpuChunkConfig",
    "MosaicTpuScoresConfig",
    "MosaicTpuSharedConfig",
    "MosaicTpuUniqueConfig",
    "Plan",
    "TritonChunkConfig",
    "TritonScoresConfig",
    "TritonSharedConfig",
    "TritonUniqueConfig",
    "chunk_attention",
    "chunk_scores",
    "implementations",
    "merge_attention_states",
    "merge_partials",
    "plan",
    "plans_used",
    "reference",
    "shared_attention",
    "sweep",
    "targets",
    "tile_chunk_attention",
    "tuning_table",
    "unique_attention",
    "write_pages",
]
