"""Pallas kernels for MoSKA: shared-KV, routed-chunk and unique (paged) attention, plus the merge.

Every op returns (o, lse) so partial attentions over disjoint key sets combine exactly with
`merge_attention_states`. Each op has a pure-jnp reference in `pallas_kernels.reference`.
"""

from pallas_kernels import reference
from pallas_kernels.backend import BACKENDS
from pallas_kernels.merge import merge_attention_states, merge_partials
from pallas_kernels.shared_attention import SharedAttentionBlocks, shared_attention

__all__ = [
    "BACKENDS",
    "SharedAttentionBlocks",
    "merge_attention_states",
    "merge_partials",
    "reference",
    "shared_attention",
]
