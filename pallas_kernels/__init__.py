"""Pallas kernels for MoSKA: shared-KV, routed-chunk and unique (paged) attention, plus the merge.

Every op returns (o, lse) so partial attentions over disjoint key sets combine exactly with
`merge_attention_states`. Each op has a pure-jnp reference in `pallas_kernels.reference`.
"""

from pallas_kernels import reference
from pallas_kernels.backend import BACKENDS
from pallas_kernels.chunk_attention import ChunkAttentionBlocks, chunk_attention
from pallas_kernels.merge import merge_attention_states, merge_partials
from pallas_kernels.shared_attention import SharedAttentionBlocks, shared_attention
from pallas_kernels.unique_attention import UniqueAttentionBlocks, unique_attention, write_pages

__all__ = [
    "BACKENDS",
    "ChunkAttentionBlocks",
    "SharedAttentionBlocks",
    "UniqueAttentionBlocks",
    "chunk_attention",
    "merge_attention_states",
    "merge_partials",
    "reference",
    "shared_attention",
    "unique_attention",
    "write_pages",
]
