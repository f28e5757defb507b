"""The shared KV store (built once, saved with orbax) and the paged unique KV cache.

`build_shared_store` prefills the shared token sequence in chunks: each chunk attends to the
store built so far (`shared_attention` with kv_length) merged with causal attention inside the
chunk, so memory stays bounded by chunk x S, never S x S. Keys are stored after RoPE at positions
0..S-1, padded to a multiple of the routing chunk and of 128 (the Hopper kernel's tile); the
padding is masked by `length`. Every layer's K, V (and page pool) is its own array, so a jitted
step reads a layer without slicing a copy out of a stacked array and updates pools in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moska_jax import routing
from moska_jax.attention import SharedLayer, shared_prefix_attention
from moska_jax.checkpoint import restore_arrays
from moska_jax.config import ModelConfig
from moska_jax.model import Decoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedKVStore:
  """Per-layer shared K, V [S_pad, Hkv, D] (RoPE applied), chunk summaries, token count."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  summaries: tuple[routing.ChunkSummaries, ...]
  length: jax.Array  # int32 scalar: valid shared tokens S
  model_config: ModelConfig = dataclasses.field(metadata=dict(static=True))
  chunk_size: int = dataclasses.field(metadata=dict(static=True))

  def layer(self, i: int) -> SharedLayer:
    return SharedLayer(self.k[i], self.v[i], self.summaries[i], self.length)

  def with_summaries(self, chunk_size: int, summary: str = "mean") -> SharedKVStore:
    """The same K/V routed at another chunk size or summary kind (summaries recomputed)."""
    summaries = tuple(routing.chunk_summaries(k, chunk_size, kv_length=self.length,
                                              summary=summary) for k in self.k)
    return dataclasses.replace(self, summaries=summaries, chunk_size=chunk_size)


def build_shared_store(model: Decoder, tokens, *, chunk_size: int, summary: str = "mean",
                       prefill_chunk: int = 256, backend: str = "auto") -> SharedKVStore:
  """Prefills the shared tokens [S] chunk by chunk into a SharedKVStore."""
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


def save_shared_store(path: str, store: SharedKVStore) -> None:
  """Saves the store under directory `path` (orbax arrays + a JSON header); path must not exist."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=False)
  meta = dict(model_config=store.model_config.to_dict(), chunk_size=store.chunk_size,
              summary=store.summaries[0].kind, rows=store.k[0].shape[0])
  with open(os.path.join(path, "store.json"), "w") as f:
    json.dump(meta, f, indent=1)
  arrays = dict(k=list(store.k), v=list(store.v), length=store.length,
                summaries=[list(s.arrays) for s in store.summaries],
                num_valid_chunks=[s.num_valid_chunks for s in store.summaries])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "arrays"), arrays)
  ckpt.wait_until_finished()


def load_shared_store(path: str, model_config: ModelConfig | None = None) -> SharedKVStore:
  """Restores a store saved by `save_shared_store`.

  Raises:
    ValueError: `model_config` is given and differs from the config the store was built with.
  """
  path = os.path.abspath(path)
  with open(os.path.join(path, "store.json")) as f:
    meta = json.load(f)
  built_for = ModelConfig.from_dict(meta["model_config"])
  if model_config is not None and model_config != built_for:
    raise ValueError(f"load_shared_store: the store at {path} was built for {built_for}, not for "
                     f"{model_config}")
  cfg, C = built_for, meta["chunk_size"]
  kv = jax.ShapeDtypeStruct((meta["rows"], cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  summary = jax.eval_shape(lambda k: list(routing.chunk_summaries(k, C, summary=meta["summary"])
                                          .arrays), kv)  # the kind's array shapes
  a = restore_arrays(os.path.join(path, "arrays"),
                     dict(k=[kv] * cfg.layers, v=[kv] * cfg.layers, length=scalar,
                          summaries=[summary] * cfg.layers,
                          num_valid_chunks=[scalar] * cfg.layers))
  summaries = tuple(routing.ChunkSummaries(tuple(arr), n, meta["summary"], C)
                    for arr, n in zip(a["summaries"], a["num_valid_chunks"]))
  return SharedKVStore(tuple(a["k"]), tuple(a["v"]), summaries, a["length"], built_for,
                       meta["chunk_size"])


class UniqueKVCache:
  """The paged unique KV of up to `max_batch` requests: one page pool per layer.

  Page 0 is a scratch page no request owns: unused block-table entries point at it, so the fixed-
  shape step can write padding tokens anywhere without touching another request's pages.
  Allocation is host-side (a free list); the arrays live on the device.
  """

  def __init__(self, cfg: ModelConfig, *, max_batch: int, num_pages: int, page_size: int,
               max_pages_per_request: int):
    if num_pages < 2 or page_size < 1 or max_batch < 1 or max_pages_per_request < 1:
      raise ValueError("UniqueKVCache: need num_pages >= 2 (page 0 is scratch), page_size, "
                       f"max_batch and max_pages_per_request >= 1; got {num_pages}, {page_size}, "
                       f"{max_batch}, {max_pages_per_request}")
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    self.k_pages = tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.layers))
    self.v_pages = tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.layers))
    self.page_size, self.num_pages = page_size, num_pages
    self.block_tables = np.zeros((max_batch, max_pages_per_request), np.int32)
    self.lengths = np.zeros((max_batch,), np.int32)
    self.free_pages = list(range(num_pages - 1, 0, -1))
    self.owned: dict[int, list[int]] = {}

  def pages_for(self, tokens: int) -> int:
    return -(-tokens // self.page_size)

  def fits(self, tokens: int) -> bool:
    """Whether a request of `tokens` tokens fits in an empty cache."""
    return self.pages_for(tokens) <= min(self.num_pages - 1, self.block_tables.shape[1])

  def can_allocate(self, tokens: int) -> bool:
    return self.pages_for(tokens) <= min(len(self.free_pages), self.block_tables.shape[1])

  def allocate(self, slot: int, tokens: int) -> None:
    """Gives `slot` pages for `tokens` tokens (its length restarts at 0)."""
    n = self.pages_for(tokens)
    if slot in self.owned:
      raise ValueError(f"UniqueKVCache: slot {slot} already holds pages")
    if not self.can_allocate(tokens):
      raise ValueError(f"UniqueKVCache: {tokens} tokens need {n} pages; {len(self.free_pages)} "
                       f"free, at most {self.block_tables.shape[1]} per request")
    pages = [self.free_pages.pop() for _ in range(n)]
    self.owned[slot] = pages
    self.block_tables[slot] = 0
    self.block_tables[slot, :n] = pages
    self.lengths[slot] = 0

  def free(self, slot: int) -> None:
    """Returns the slot's pages to the pool."""
    self.free_pages.extend(reversed(self.owned.pop(slot)))
    self.block_tables[slot] = 0
    self.lengths[slot] = 0
