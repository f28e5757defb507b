"""The routed half of a MoSKA step: per-pair chunk attention and batch-aware tiles, every kernel
family, against float64 attention over each request's (tile's) chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moska_jax import routing
from moska_jax.attention import SharedLayer, routed_attention
from moska_jax.config import MoskaConfig
from tests import kernel_cases as kc
from tests.np_reference import chunk_attention_f64


@pytest.mark.parametrize("backend,interpret", [("xla", False), ("gpu", True)])
@pytest.mark.parametrize("batch_aware", [0, 1, 3])
def test_routed_attention_sees_each_request_s_chunks(backend, interpret, batch_aware):
  """Off: exactly the routed chunks. On: the union of the request's tile (a superset), equal to
  float64 attention over that union; B=7 is not a multiple of the tile."""
  B, T, G, Hkv, D, S, C, K = 7, 2, 4, 2, 32, 700, 64, 3
  rng, q, k, v = kc.shared_inputs(11 + batch_aware, B, T, G, Hkv, D, S, jnp.float32)
  N = -(-S // C)
  ids = kc.random_ids(rng, B, Hkv, N, K)
  summaries = routing.chunk_summaries(k, C, summary="mean")
  shared = SharedLayer(k, v, summaries, jnp.int32(650))
  mcfg = MoskaConfig(mode="sparse", top_k=K, chunk_size=C, batch_aware=batch_aware,
                     backend=backend, interpret=interpret)
  o, lse = jax.jit(lambda q, ids: routed_attention(q, shared, ids, mcfg))(q, ids)
  seen = np.asarray(ids)
  if batch_aware:
    order, tiles = (np.asarray(x) for x in routing.batch_aware(ids, N, batch_aware))
    tile_of = {int(b): i // batch_aware for i, b in enumerate(order)}
    seen = np.stack([np.asarray(tiles)[tile_of[b]] for b in range(B)])
    for b in range(B):  # a superset of the request's own chunks
      for h in range(Hkv):
        assert set(np.asarray(ids)[b, h]) <= set(seen[b, h][seen[b, h] >= 0])
  kc.check(o, lse, *chunk_attention_f64(q, k, v, seen, C, 650), q, jnp.float32)
