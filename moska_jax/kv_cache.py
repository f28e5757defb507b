"""The shared KV store (built once by `prefill.build_shared_store`, saved with orbax) and the
paged unique KV cache.

Every layer's K, V (and page pool) is its own array, so a jitted step reads a layer without
slicing a copy out of a stacked array and updates pools in place.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moska_jax import checkpoint, routing
from moska_jax.attention import SharedLayer
from moska_jax.config import ModelConfig


def zero_kv(cfg: ModelConfig, rows: tuple[int, ...]) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """Per layer a zero (k, v) pair of shape [*rows, Hkv, D] in the model's dtype."""
  zeros = lambda: jnp.zeros((*rows, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
  return tuple((zeros(), zeros()) for _ in range(cfg.layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedKVStore:
  """Per-layer shared K, V [S_pad, Hkv, D] (RoPE applied), chunk summaries, token count.

  Keys sit at positions 0..S-1; S_pad rounds S up (to the routing chunk and the kernels' tiles)
  and the padding is masked by `length`.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  summaries: tuple[routing.ChunkSummaries, ...]
  length: jax.Array  # int32 scalar: valid shared tokens S
  model_config: ModelConfig = dataclasses.field(metadata=dict(static=True))
  chunk_size: int = dataclasses.field(metadata=dict(static=True))

  @property
  def layers(self) -> tuple[SharedLayer, ...]:
    """Each layer's K, V, summaries and length as the attention reads them."""
    return tuple(SharedLayer(k, v, s, self.length)
                 for k, v, s in zip(self.k, self.v, self.summaries, strict=True))

  def with_summaries(self, chunk_size: int, summary: str = "mean") -> SharedKVStore:
    """The same K/V routed at another chunk size or summary kind (summaries recomputed)."""
    summaries = tuple(routing.chunk_summaries(k, chunk_size, kv_length=self.length,
                                              summary=summary) for k in self.k)
    return dataclasses.replace(self, summaries=summaries, chunk_size=chunk_size)


def _arrays(store: SharedKVStore) -> dict:
  """The tree of arrays a store is saved as (orbax)."""
  return dict(k=list(store.k), v=list(store.v), length=store.length,
              summaries=[list(s.arrays) for s in store.summaries],
              num_valid_chunks=[s.num_valid_chunks for s in store.summaries])


def save_shared_store(path: str, store: SharedKVStore, *, overwrite: bool = False) -> None:
  """Saves the store under directory `path`, atomically and with a checksum per file.

  Layout: `path/store.json` (the config, chunk size, summary kind, rows), `path/arrays` (orbax)
  and `path/checksums.json` (the size and sha256 of every file). The directory is written beside
  `path` and renamed into place once complete and durable (`checkpoint.atomic_directory`): a save
  that fails or is killed leaves the old store (or none) loadable, never a half-written one.

  Args:
    path: the directory to write; it must not exist unless overwrite=True.
    store: the store.
    overwrite: replace an existing store at `path`, only once the new one is complete.

  Raises:
    FileExistsError: `path` exists (and overwrite is False, or it is not a store).
    TypeError: store is not a SharedKVStore.
  """
  if not isinstance(store, SharedKVStore):
    raise TypeError(f"save_shared_store: store must be a SharedKVStore, got "
                    f"{type(store).__name__}")
  meta = dict(model_config=store.model_config.to_dict(), chunk_size=store.chunk_size,
              summary=store.summaries[0].kind, rows=store.k[0].shape[0])
  arrays = _arrays(store)
  with checkpoint.atomic_directory(path, overwrite=overwrite, marker="store.json",
                                   what="save_shared_store") as tmp:
    with open(os.path.join(tmp, "store.json"), "w") as f:
      json.dump(meta, f, indent=1)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, "arrays"), arrays)
    ckpt.wait_until_finished()
    checkpoint.write_checksums(tmp)


def load_shared_store(path: str, model_config: ModelConfig | None = None, *,
                      verify: bool = True) -> SharedKVStore:
  """Restores a store saved by `save_shared_store`.

  Args:
    path: the store's directory.
    model_config: if given, the config the store must have been built with.
    verify: check every file against `checksums.json` before reading it (each file is read
      once more to hash it); False only to load a store saved before checksums existed
      (damage is then found only where orbax cannot read it).

  Raises:
    FileNotFoundError: no store at `path`.
    ValueError: `model_config` is given and differs from the config the store was built with,
      or the store is damaged or incomplete (the error names the file).
  """
  what = "load_shared_store"
  path = os.path.abspath(path)
  checkpoint.settle(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}: no shared store at {path} (no such directory)")
  if verify:
    checkpoint.verify_files(path, what)
  meta = checkpoint.read_json(path, "store.json", what)
  try:
    built_for = ModelConfig.from_dict(meta["model_config"])
    C, summary, rows = meta["chunk_size"], meta["summary"], meta["rows"]
    if summary not in routing.SUMMARIES or not isinstance(C, int) or not isinstance(rows, int):
      raise ValueError(f"summary {summary!r}, chunk_size {C!r}, rows {rows!r}")
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{what}: {os.path.join(path, 'store.json')} is damaged: "
                     f"{type(e).__name__}: {e}") from None
  if model_config is not None and model_config != built_for:
    raise ValueError(f"{what}: the store at {path} was built for {built_for}, not for "
                     f"{model_config}")
  cfg = built_for
  kv = jax.ShapeDtypeStruct((rows, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  summary_shapes = jax.eval_shape(
      lambda k: list(routing.chunk_summaries(k, C, summary=summary).arrays), kv)
  a = checkpoint.restore_arrays(os.path.join(path, "arrays"),
                                dict(k=[kv] * cfg.layers, v=[kv] * cfg.layers, length=scalar,
                                     summaries=[summary_shapes] * cfg.layers,
                                     num_valid_chunks=[scalar] * cfg.layers), what)
  summaries = tuple(routing.ChunkSummaries(tuple(arr), n, summary, C)
                    for arr, n in zip(a["summaries"], a["num_valid_chunks"]))
  return SharedKVStore(tuple(a["k"]), tuple(a["v"]), summaries, a["length"], built_for, C)


class UniqueKVCache:
  """The paged unique KV of up to `max_batch` requests: one page pool per layer.

  pools: per layer (k_pages, v_pages) [num_pages, page_size, Hkv, D], the state a MoSKA step
  takes and returns (`moska_jax.step`). block_tables [max_batch, max_pages_per_request] and
  lengths [max_batch] (tokens cached per slot) are host arrays.

  Page 0 is a scratch page no request owns: unused block-table entries point at it, so the fixed-
  shape step can write padding tokens anywhere without touching another request's pages.
  Allocation is host-side (a free list); the pools live on the device.
  """

  def __init__(self, cfg: ModelConfig, *, max_batch: int, num_pages: int, page_size: int,
               max_pages_per_request: int):
    if num_pages < 2 or page_size < 1 or max_batch < 1 or max_pages_per_request < 1:
      raise ValueError("UniqueKVCache: need num_pages >= 2 (page 0 is scratch), page_size, "
                       f"max_batch and max_pages_per_request >= 1; got {num_pages}, {page_size}, "
                       f"{max_batch}, {max_pages_per_request}")
    self.pools = zero_kv(cfg, (num_pages, page_size))
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
