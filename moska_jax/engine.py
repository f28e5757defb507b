"""Batched generation against one shared store: admission, chunked unique prefill, decode, retire.

Every request owns a slot of a fixed batch (`max_batch`) and pages of the unique cache. Each
engine step is one of two jit-compiled functions with fixed shapes: a prefill step that feeds
`prefill_chunk` prompt tokens to the slots still reading their prompt, or a decode step that
feeds one token to every slot. Both run `moska_step` (moska_jax.step), so all active requests
attend to the shared KV together (the batched GEMM). Finished requests free their pages and slot,
and queued requests are admitted as soon as pages allow (continuous batching); none is dropped,
and results come back in request order.

On `DeviceGroups` (disaggregated serving, `moska_jax.sharding`) the weights and the unique cache
live on the unique group and every layer's shared K/V/summaries on the shared group, whole chunks
per "kv" device. One jitted program cannot span two disjoint device sets, so a step is then
orchestrated from Python: `Decoder.forward` runs eagerly on the unique group with the same
`moska_attend` as the jitted step (moska_jax.step), built from parts that run where their data
lives: `zero_padding`, the unique half (`unique_partial`: write_pages + unique_attention, jitted,
pools donated) and `merge_halves` on the unique group, and the shared half by
`shared_attention_step` (q out, dense or routed attention sharded over "kv", (o, lse) back).
Dispatch is asynchronous and the shared half is issued first, so the two halves of a layer are
in flight together. The same path serves a single-device `DeviceGroups`.

Scheduling is simple on purpose: while any slot is still reading its prompt, steps are prefill
steps and the decoding slots wait (no mixed prefill/decode batches).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moska_jax.attention import unique_partial
from moska_jax.config import MoskaConfig
from moska_jax.kv_cache import SharedKVStore, UniqueKVCache
from moska_jax.model import Decoder
from moska_jax.sharding import (DeviceGroups, place_shared_kv, place_unique, send_to_shared,
                                shared_attention_step)
from moska_jax.step import moska_attend, moska_step, step_positions


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256): the built-in default; any encode/decode pair plugs in."""

  vocab = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, tokens: Sequence[int]) -> str:
    return bytes(int(t) % 256 for t in tokens).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to top_p mass."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"Sampling: need temperature >= 0 and 0 < top_p <= 1, got {self}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [B] from logits [B, V]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # always keeps the top token
  choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _sampler(sampling: Sampling):
  """One compiled sampler per Sampling (it is frozen, so hashable)."""
  return jax.jit(functools.partial(sample, sampling=sampling))


@dataclasses.dataclass
class Result:
  """One finished request: its tokens, text (None when the tokenizer cannot decode), and (if
  asked) the logits of every sampled token."""

  prompt: list[int]
  tokens: list[int]
  text: str | None
  logits: list[np.ndarray] | None = None


@dataclasses.dataclass
class _Active:
  index: int
  prompt: list[int]
  max_new: int
  fed: int = 0  # prompt tokens already in the cache
  tokens: list[int] = dataclasses.field(default_factory=list)
  logits: list[np.ndarray] = dataclasses.field(default_factory=list)


class MoskaEngine:
  """Serves many prompts against one SharedKVStore with MoSKA attention.

  Args:
    model: the Decoder whose weights were used to build `shared_store`.
    shared_store: the prefilled shared context.
    moska_config: dense / sparse routing and the kernel backend.
    max_batch: concurrent requests (the fixed batch of the compiled steps).
    num_pages, page_size: the unique-cache page budget (page 0 is scratch).
    max_request_tokens: prompt + new tokens one request may hold (default: the whole budget).
    prefill_chunk: prompt tokens fed per prefill step.
    tokenizer: an object with encode(str) -> list[int] and decode(list[int]) -> str, or a plain
      callable str -> list[int] (results then carry no text); default: UTF-8 bytes.
    groups: run disaggregated on these device groups (see the module docstring); None: one jitted
      step on the default device. Per-request arrays go over the groups' request axis when
      max_batch is a multiple of its size, else they are replicated. `shared_kv` then holds the
      placed store (one `PlacedSharedKV` per layer) and `stats` counts the bytes moved between
      the groups ("bytes_to_shared", "bytes_to_unique").
  """

  def __init__(self, model: Decoder, shared_store: SharedKVStore, moska_config: MoskaConfig, *,
               max_batch: int, num_pages: int, page_size: int = 16,
               max_request_tokens: int | None = None, prefill_chunk: int = 32, tokenizer=None,
               groups: DeviceGroups | None = None):
    if shared_store.model_config != model.cfg:
      raise ValueError("MoskaEngine: the shared store was built for a different model config")
    if moska_config.mode == "sparse" and moska_config.chunk_size != shared_store.chunk_size:
      raise ValueError(f"MoskaEngine: moska_config.chunk_size={moska_config.chunk_size} must "
                       f"match the store's chunk_size={shared_store.chunk_size}")
    if moska_config.mode == "sparse" and moska_config.summary != shared_store.summaries[0].kind:
      raise ValueError(f"MoskaEngine: moska_config.summary={moska_config.summary!r} must match "
                       f"the store's summaries ({shared_store.summaries[0].kind!r}); see "
                       f"SharedKVStore.with_summaries")
    max_request_tokens = max_request_tokens or (num_pages - 1) * page_size
    # A prefill step writes prefill_chunk tokens from a request's length on, past its last page
    # when the prompt ends inside the chunk: spare table entries (the scratch page) take those
    # padding writes, so no kernel ever sees a length beyond its table.
    self.cache = UniqueKVCache(
        model.cfg, max_batch=max_batch, num_pages=num_pages, page_size=page_size,
        max_pages_per_request=-(-(max_request_tokens + prefill_chunk - 1) // page_size))
    self.store, self.mcfg, self.max_batch = shared_store, moska_config, max_batch
    self.prefill_chunk = prefill_chunk
    self.max_request_tokens = max_request_tokens
    tokenizer = tokenizer or ByteTokenizer()
    if hasattr(tokenizer, "encode"):
      self._encode, self._decode = tokenizer.encode, getattr(tokenizer, "decode", None)
    elif callable(tokenizer):
      self._encode, self._decode = tokenizer, None
    else:
      raise ValueError(f"MoskaEngine: tokenizer must have encode() or be callable, got "
                       f"{type(tokenizer).__name__}")
    self.graphdef, self.state = nnx.split(model)
    self.stats = collections.Counter()
    self.groups = groups
    if groups is None:
      self._step = jax.jit(self._step_impl, donate_argnums=(2,))
    else:
      self._place(groups)

  def _place(self, groups: DeviceGroups) -> None:
    """Puts weights and unique cache on the unique group and the shared store on the shared one."""
    store, c = self.store, self.cache
    self.state = place_unique(groups, self.state, specs=groups.rules.weights)
    c.pools = place_unique(groups, c.pools, specs=groups.rules.pages)
    self._model = nnx.merge(self.graphdef, self.state)
    self._batch_axis = 0 if self.max_batch % groups.request_shards == 0 else None
    self._shared_length = int(store.length)
    sparse = self.mcfg.mode == "sparse"
    (length,), _ = send_to_shared(groups, np.int32(self._shared_length))
    self.shared_kv = tuple(
        place_shared_kv(groups, k, v, s if sparse else None, chunk_size=store.chunk_size,
                        kv_length=length)
        for k, v, s in zip(store.k, store.v, store.summaries))
    # K from the store's own chunk count, as `shared_partial` does (placement may pad chunks).
    self._top_k = self.mcfg.chunks_kept(store.summaries[0].num_chunks) if sparse else None
    self._unique_step = jax.jit(functools.partial(unique_partial, mcfg=self.mcfg),
                                donate_argnums=(3,))

  def _step_impl(self, state, shared, pools, tables, lengths, tokens, fed):
    return moska_step(nnx.merge(self.graphdef, state), shared, pools, tables, lengths, tokens,
                      self.mcfg, fed=fed)

  def compilations(self) -> int:
    """Distinct compiled step shapes so far (2 at most: prefill and decode); with groups, those
    of the per-layer unique program."""
    return (self._step if self.groups is None else self._unique_step)._cache_size()

  def _shared_on_groups(self, i: int, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The shared half of layer i on the shared group; counts the bytes moved."""
    s, mcfg = self.shared_kv[i], self.mcfg
    o, lse, moved = shared_attention_step(
        self.groups, q, s.k, s.v, kv_length=s.kv_length, summaries=s.summaries, top_k=self._top_k,
        always_include=mcfg.always_include, chunk_size=s.chunk_size, backend=mcfg.backend,
        interpret=mcfg.interpret)
    self.stats["bytes_to_shared"] += moved.bytes_to_shared
    self.stats["bytes_to_unique"] += moved.bytes_to_unique
    return o, lse

  def _run_groups(self, tokens: np.ndarray, fed: np.ndarray) -> jax.Array:
    """The disaggregated step (module docstring): eager forward, jitted parts per layer."""
    c = self.cache
    positions = step_positions(self._shared_length, c.lengths, tokens.shape[1])
    tokens, positions, tables, lengths, fed = place_unique(
        self.groups, (tokens, positions, c.block_tables, c.lengths, fed),
        batch_axis=self._batch_axis)
    unique = functools.partial(self._unique_step, tables=tables, lengths=lengths)
    attend = moska_attend(self._shared_on_groups, unique, fed)
    logits, c.pools = self._model.forward(tokens, positions, attend, c.pools)
    return logits

  def _run(self, tokens: np.ndarray, fed: np.ndarray) -> jax.Array:
    if self.groups is not None:
      return self._run_groups(tokens, fed)
    c = self.cache
    logits, c.pools = self._step(self.state, self.store.layers, c.pools,
                                 jnp.asarray(c.block_tables), jnp.asarray(c.lengths),
                                 jnp.asarray(tokens), jnp.asarray(fed))
    return logits

  def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), *, key: jax.Array | None = None,
               eos_id: int | None = None, return_logits: bool = False) -> list[Result]:
    """Generates up to max_new_tokens for every prompt; results in prompt order.

    A request ends after max_new_tokens or once it samples `eos_id` (kept as its last token);
    its slot and pages go to the next queued request at once.

    Raises:
      ValueError: an empty prompt, max_new_tokens < 1, or a request longer than the page budget.
    """
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    encoded = [list(self._encode(p)) if isinstance(p, str) else [int(t) for t in p]
               for p in prompts]
    for i, p in enumerate(encoded):
      if not p:
        raise ValueError(f"generate: prompt {i} is empty")
      need = len(p) + max_new_tokens
      if need > self.max_request_tokens or not self.cache.fits(need):
        raise ValueError(f"generate: prompt {i} needs {need} tokens of unique cache; the page "
                         f"budget allows {self.max_request_tokens} per request")
    if sampling.temperature > 0 and key is None:
      raise ValueError("generate: sampling with temperature > 0 needs an explicit PRNG key")
    key = jax.random.key(0) if key is None else key  # greedy: the key is never used
    sample_fn = _sampler(sampling)
    queue = collections.deque(enumerate(encoded))
    active: dict[int, _Active] = {}
    results: list[Result | None] = [None] * len(encoded)
    t0 = time.perf_counter()
    while queue or active:
      for slot in range(self.max_batch):  # admit while slots and pages allow
        if queue and slot not in active and self.cache.can_allocate(
            len(queue[0][1]) + max_new_tokens):
          i, p = queue.popleft()
          self.cache.allocate(slot, len(p) + max_new_tokens)
          active[slot] = _Active(i, p, max_new_tokens)
      prefilling = {s: a for s, a in active.items() if a.fed < len(a.prompt)}
      T = self.prefill_chunk if prefilling else 1
      tokens = np.zeros((self.max_batch, T), np.int32)
      fed = np.zeros((self.max_batch,), np.int32)
      for s, a in (prefilling or active).items():
        chunk = a.prompt[a.fed:a.fed + T] if prefilling else a.tokens[-1:]
        tokens[s, :len(chunk)] = chunk
        fed[s] = len(chunk)
      logits = self._run(tokens, fed)
      last = logits[jnp.arange(self.max_batch), jnp.maximum(jnp.asarray(fed) - 1, 0)]
      key, sub = jax.random.split(key)
      nxt = np.asarray(sample_fn(last, sub))
      last = np.asarray(last) if return_logits else None
      self.cache.lengths += fed
      self.stats["steps_prefill" if prefilling else "steps_decode"] += 1
      for s, a in list((prefilling or active).items()):
        a.fed += int(fed[s]) if prefilling else 0
        if prefilling and a.fed < len(a.prompt):
          continue  # more prompt to feed: these logits are not a prediction yet
        a.tokens.append(int(nxt[s]))
        if return_logits:
          a.logits.append(last[s])
        self.stats["tokens"] += 1
        if len(a.tokens) == a.max_new or a.tokens[-1] == eos_id:
          text = self._decode(a.tokens) if self._decode else None
          results[a.index] = Result(a.prompt, a.tokens, text, a.logits if return_logits else None)
          self.cache.free(s)
          del active[s]
    self.stats["seconds"] += time.perf_counter() - t0
    return results
