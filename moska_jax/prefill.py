"""Builds the shared KV store: the shared token sequence prefilled once, chunk by chunk.

Each prefill chunk attends to the store built so far (`shared_attention` with kv_length) merged
with causal attention inside the chunk, so memory stays bounded by chunk x S, never S x S. Keys
are stored after RoPE at positions 0..S-1, padded to a multiple of the prefill chunk, the routing
chunk and 128 (the Hopper kernel's tile); the padding is masked by the store's `length`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moska_jax import routing
from moska_jax.attention import shared_prefix_attention
from moska_jax.kv_cache import SharedKVStore
from moska_jax.model import Decoder


def build_shared_store(model: Decoder, tokens, *, chunk_size: int, summary: str = "mean",
                       prefill_chunk: int = 256, backend: str = "auto") -> SharedKVStore:
  """Prefills the shared tokens [S] chunk by chunk into a SharedKVStore.

  Args:
    model: the decoder whose keys and values are stored.
    tokens: [S] shared token ids, S >= 1.
    chunk_size: C, the routing chunk the summaries are built for.
    summary: the summary kind (a key of `routing.SUMMARIES`).
    prefill_chunk: tokens run per prefill step.
    backend: kernel backend of the prefill's shared attention.
  """
  cfg = model.cfg
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  S = tokens.shape[0]
  if S == 0:
    raise ValueError("build_shared_store: tokens must hold at least one token")
  if chunk_size < 1 or prefill_chunk < 1:
    raise ValueError(f"build_shared_store: chunk_size and prefill_chunk must be >= 1, got "
                     f"{chunk_size}, {prefill_chunk}")
  align = math.lcm(prefill_chunk, chunk_size, 128)
  S_pad = -(-S // align) * align
  padded = np.zeros((S_pad,), np.int32)
  padded[:S] = tokens
  shape = (S_pad, cfg.num_kv_heads, cfg.head_dim)
  K = tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.layers))
  V = tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.layers))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def prefill_chunk_step(state, K, V, tok, start):
    m = nnx.merge(graphdef, state)
    new_kv = []

    def attend(i, q, k, v):
      new_kv.append((k[0], v[0]))
      return shared_prefix_attention(q, k, v, K[i], V[i], start, backend)

    positions = start + jnp.arange(tok.shape[1])[None]
    m.forward(tok, positions, attend)  # logits unused: XLA drops the LM head
    put = lambda store, new: jax.lax.dynamic_update_slice(store, new.astype(store.dtype),
                                                          (start, 0, 0))
    return (tuple(put(Ki, kv[0]) for Ki, kv in zip(K, new_kv)),
            tuple(put(Vi, kv[1]) for Vi, kv in zip(V, new_kv)))

  for start in range(0, S, prefill_chunk):
    tok = jnp.asarray(padded[start:start + prefill_chunk])[None]
    K, V = prefill_chunk_step(state, K, V, tok, jnp.int32(start))
  length = jnp.int32(S)
  summaries = tuple(routing.chunk_summaries(Ki, chunk_size, kv_length=length, summary=summary)
                    for Ki in K)
  return SharedKVStore(K, V, summaries, length, cfg, chunk_size)
