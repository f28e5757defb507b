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
from moska_jax.kv_cache import SharedKVStore, zero_kv
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
  kv = zero_kv(cfg, (S_pad,))  # per layer (K, V): the state the forward fills in
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill_chunk_step(state, kv, tok, start):
    put = lambda store, new: jax.lax.dynamic_update_slice(store, new[0].astype(store.dtype),
                                                          (start, 0, 0))

    def attend(i, q, k, v, layer):  # attend to the store so far, then write the chunk into it
      o = shared_prefix_attention(q, k, v, *layer, start, backend)
      return o, (put(layer[0], k), put(layer[1], v))

    positions = start + jnp.arange(tok.shape[1])[None]
    _, kv = nnx.merge(graphdef, state).forward(tok, positions, attend, kv)
    return kv  # logits unused: XLA drops the LM head

  for start in range(0, S, prefill_chunk):
    tok = jnp.asarray(padded[start:start + prefill_chunk])[None]
    kv = prefill_chunk_step(state, kv, tok, jnp.int32(start))
  K, V = (tuple(layer[j] for layer in kv) for j in (0, 1))
  length = jnp.int32(S)
  summaries = tuple(routing.chunk_summaries(Ki, chunk_size, kv_length=length, summary=summary)
                    for Ki in K)
  return SharedKVStore(K, V, summaries, length, cfg, chunk_size)
