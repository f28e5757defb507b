"""Builds the shared KV store: the shared token sequence prefilled once, chunk by chunk.

Each prefill chunk attends to the store built so far (`shared_attention` with kv_length) merged
with causal attention inside the chunk, so memory stays bounded by chunk x S, never S x S. Keys
are stored after RoPE at positions 0..S-1 and padded to whole routing chunks C, or to 128-row
tiles when C and 128 divide one another (C = 64: the Hopper kernel's 128-key tiles), so the
padding is less than one chunk or one tile; it is masked by the store's `length`. A chunk size
that is not a multiple of the tile (C = 100) leaves S unaligned: the Hopper kernel's plan refuses
that store and the Triton kernel runs it.
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
from moska_jax.config import DEFAULT_SUMMARY, SUMMARY_KINDS, check_int
from moska_jax.kv_cache import SharedKVStore, check_kv_dtype, zero_kv
from moska_jax.model import Decoder, kv_weights_fingerprint


def build_shared_store(model: Decoder, tokens, *, chunk_size: int,
                       summary: str = DEFAULT_SUMMARY, prefill_chunk: int = 256,
                       backend: str = "auto",
                       kv_dtype: str | None = None) -> SharedKVStore:
  """Prefills the shared tokens [S] chunk by chunk into a SharedKVStore.

  Args:
    model: the decoder whose keys and values are stored.
    tokens: [S] shared token ids in [0, vocab), S >= 1.
    chunk_size: C, the routing chunk the summaries are built for.
    summary: the summary kind (a key of `routing.SUMMARIES`; default `config.DEFAULT_SUMMARY`,
      the router that keeps the answers: `MoskaConfig.summary`).
    prefill_chunk: tokens run per prefill step.
    backend: kernel backend of the prefill's shared attention.
    kv_dtype: the stored K/V format: None (the model's dtype) or "float8_e4m3fn" /
      "float8_e5m2". The prefill always runs in the model's dtype (its attention reads the full-
      precision store) and the summaries are built from the full-precision keys; then each
      layer is quantized with one scale per kv head (`SharedKVStore.quantized`).

  Raises:
    ValueError: a bad chunk_size, prefill_chunk, summary, kv_dtype or token, or tokens that
      are not one sequence (more than one row).
  """
  cfg = model.cfg
  check_kv_dtype(kv_dtype, "build_shared_store")
  for name, value in (("chunk_size", chunk_size), ("prefill_chunk", prefill_chunk)):
    check_int(value, name, "build_shared_store")
  if summary not in SUMMARY_KINDS:  # before the prefill, which may take hours
    raise ValueError(f"build_shared_store: summary must be one of {sorted(SUMMARY_KINDS)}, got "
                     f"{summary!r}")
  tokens = np.asarray(tokens)
  if tokens.ndim > 1 and math.prod(tokens.shape[:-1]) != 1:
    raise ValueError(f"build_shared_store: tokens must be one sequence [S] (or [1, S]), got "
                     f"shape {tokens.shape}")
  tokens = tokens.reshape(-1)
  if tokens.size == 0:
    raise ValueError("build_shared_store: tokens must hold at least one token (the shared "
                     "corpus is empty)")
  tokens = cfg.check_tokens(tokens, "build_shared_store: the shared corpus")
  S = tokens.shape[0]
  tile = 128
  align = max(chunk_size, tile) if max(chunk_size, tile) % min(chunk_size, tile) == 0 else (
      chunk_size)
  S_pad = -(-S // align) * align
  rows = max(S_pad, -(-S // prefill_chunk) * prefill_chunk)  # the last prefill chunk's writes
  padded = np.zeros((rows,), np.int32)
  padded[:S] = tokens
  kv = zero_kv(cfg, (rows,))  # per layer (K, V): the state the forward fills in
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
  K, V = (tuple(layer[j][:S_pad] for layer in kv) for j in (0, 1))
  length = jnp.int32(S)
  summaries = _summaries(K, length, chunk_size=chunk_size, summary=summary)
  store = SharedKVStore(K, V, summaries, length, cfg, chunk_size,
                        weights_fingerprint=kv_weights_fingerprint(nnx.state(model)))
  return store if kv_dtype is None else store.quantized(kv_dtype)


@functools.partial(jax.jit, static_argnames=("chunk_size", "summary"))
def _summaries(K: tuple[jax.Array, ...], length: jax.Array, *, chunk_size: int,
               summary: str) -> tuple[routing.ChunkSummaries, ...]:
  """Each layer's chunk summaries, in one program (op by op, the first store of a process
  compiled dozens of small ones)."""
  return tuple(routing.chunk_summaries(k, chunk_size, kv_length=length, summary=summary)
               for k in K)
