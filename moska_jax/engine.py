"""Batched generation against a shared store: the step executor and `generate`.

`MoskaEngine` holds the weights, the shared store as the step reads it, the unique cache's page
pools and the compiled step; its `Scheduler` (moska_jax.scheduler) holds the host-side request
state: queue, slots, admission, retirement. Each step has one of two fixed shapes, a prefill
step of `prefill_chunk` prompt tokens per slot or a decode step of one token per slot, and runs
`moska_step` (moska_jax.step) in one jitted program, so all active requests attend to the shared
KV together (the batched GEMM). Results come back in request order.

On `DeviceGroups` (disaggregated serving, moska_jax.sharding) the weights and page pools live on
the unique group and every layer's shared K/V (plus the summaries when sparse) on the shared
group, whole chunks per "kv" device. One jitted program cannot span two disjoint device sets, so
the step is orchestrated from Python: `Decoder.forward` runs eagerly on the unique group with the
same `moska_attend` as the one-device step, built from parts that run where their data lives:
`zero_padding`, the unique half (`unique_partial`, jitted, pools donated) and `merge_halves` on
the unique group, and the shared half by `sharding.shared_attention_step` (q out, dense or routed
attention sharded over "kv", (o, lse) back). Dispatch is asynchronous and the shared half is
issued first, so the two halves of a layer are in flight together. The logits equal the
one-device engine's to f32 tolerance, and `stats` counts the bytes moved between the groups
("bytes_to_shared", "bytes_to_unique"). A single-device `DeviceGroups` takes the same path
(0 bytes). A fully jitted disaggregated step would keep `moska_attend` and trace its parts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moska_jax.attention import unique_partial
from moska_jax.config import MoskaConfig
from moska_jax.kv_cache import SharedKVStore, UniqueKVCache
from moska_jax.model import Decoder
from moska_jax.scheduler import Request, Scheduler, StepBatch
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


class MoskaEngine:
  """Serves many prompts against a SharedKVStore with MoSKA attention.

  Args:
    model: the Decoder whose weights were used to build `shared_store`.
    shared_store: the prefilled shared context (swap it later with `set_store`).
    moska_config: dense / sparse routing and the kernel backend.
    max_batch: concurrent requests (the fixed batch of the compiled steps).
    num_pages, page_size: the unique-cache page budget (page 0 is scratch).
    max_request_tokens: prompt + new tokens one request may hold (default: the whole budget).
    prefill_chunk: prompt tokens fed per prefill step.
    tokenizer: an object with encode(str) -> list[int] and decode(list[int]) -> str, or a plain
      callable str -> list[int] (results then carry no text); default: UTF-8 bytes.
    groups: run disaggregated on these device groups (see the module docstring); None: one jitted
      step on the default device. Per-request arrays go over the groups' request axis when
      max_batch is a multiple of its size, else they are replicated.

  Attributes:
    cache: the `UniqueKVCache` (page pools, block tables, lengths).
    scheduler: the `Scheduler` of the requests.
    shared_kv: per layer the shared store as the step reads it: `attention.SharedLayer` on one
      device, `sharding.PlacedSharedKV` on groups.
    stats: counters "steps_prefill", "steps_decode", "tokens", "seconds" (+ on groups
      "bytes_to_shared", "bytes_to_unique").
  """

  def __init__(self, model: Decoder, shared_store: SharedKVStore, moska_config: MoskaConfig, *,
               max_batch: int, num_pages: int, page_size: int = 16,
               max_request_tokens: int | None = None, prefill_chunk: int = 32, tokenizer=None,
               groups: DeviceGroups | None = None):
    self.model_config, self.mcfg, self.groups = model.cfg, moska_config, groups
    max_request_tokens = max_request_tokens or (num_pages - 1) * page_size
    # A prefill step writes prefill_chunk tokens from a request's length on, past its last page
    # when the prompt ends inside the chunk: spare table entries (the scratch page) take those
    # padding writes, so no kernel ever sees a length beyond its table.
    self.cache = UniqueKVCache(
        model.cfg, max_batch=max_batch, num_pages=num_pages, page_size=page_size,
        max_pages_per_request=-(-(max_request_tokens + prefill_chunk - 1) // page_size))
    self.scheduler = Scheduler(self.cache, max_batch, prefill_chunk)
    self.max_batch, self.max_request_tokens = max_batch, max_request_tokens
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
    self._traces = 0
    if groups is None:
      self._step = jax.jit(self._counted(self._local_step), donate_argnums=(2,))
    else:
      self.state = place_unique(groups, self.state, specs=groups.rules.weights)
      self.cache.pools = place_unique(groups, self.cache.pools, specs=groups.rules.pages)
      self._model = nnx.merge(self.graphdef, self.state)
      self._batch_axis = 0 if max_batch % groups.request_shards == 0 else None
      self._unique = jax.jit(self._counted(functools.partial(unique_partial, mcfg=moska_config)),
                             donate_argnums=(3,))
    self.set_store(shared_store)

  @property
  def store(self) -> SharedKVStore:
    """The shared store being served."""
    return self._store

  def set_store(self, store: SharedKVStore) -> None:
    """Serves `store` from the next step on; on groups it is placed on the shared group first.

    A store of the same shapes as the one before reuses the compiled step.

    Raises:
      ValueError: the store was built for another model, or (sparse) its chunk size or summary
        kind differs from the engine's MoskaConfig.
    """
    mcfg = self.mcfg
    if store.model_config != self.model_config:
      raise ValueError("MoskaEngine: the shared store was built for a different model config")
    if mcfg.mode == "sparse" and mcfg.chunk_size != store.chunk_size:
      raise ValueError(f"MoskaEngine: moska_config.chunk_size={mcfg.chunk_size} must match the "
                       f"store's chunk_size={store.chunk_size}")
    if mcfg.mode == "sparse" and mcfg.summary != store.summaries[0].kind:
      raise ValueError(f"MoskaEngine: moska_config.summary={mcfg.summary!r} must match the "
                       f"store's summaries ({store.summaries[0].kind!r}); see "
                       f"SharedKVStore.with_summaries")
    self._store = store
    if self.groups is None:
      self.shared_kv = store.layers
      return
    sparse = mcfg.mode == "sparse"
    self._shared_length = int(store.length)
    (length,), _ = send_to_shared(self.groups, np.int32(self._shared_length))
    self.shared_kv = tuple(
        place_shared_kv(self.groups, k, v, s if sparse else None, chunk_size=store.chunk_size,
                        kv_length=length)
        for k, v, s in zip(store.k, store.v, store.summaries))
    # K from the store's own chunk count, as `shared_partial` does (placement may pad chunks).
    self._top_k = mcfg.chunks_kept(store.summaries[0].num_chunks) if sparse else None

  def compilations(self) -> int:
    """Traces of the compiled step so far (2 at most: the prefill and the decode shape); on
    groups, of the per-layer unique program."""
    return self._traces

  def _counted(self, fn):
    """fn, counting its traces (one per compiled shape) in `compilations()`."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      self._traces += 1
      return fn(*args, **kwargs)
    return traced

  def _local_step(self, state, shared, pools, tables, lengths, tokens, fed):
    return moska_step(nnx.merge(self.graphdef, state), shared, pools, tables, lengths, tokens,
                      self.mcfg, fed=fed)

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

  def _run(self, batch: StepBatch) -> jax.Array:
    """Runs one step over every slot; updates the page pools and returns logits[B, T, V]."""
    c = self.cache
    if self.groups is None:
      logits, c.pools = self._step(self.state, self.shared_kv, c.pools,
                                   jnp.asarray(c.block_tables), jnp.asarray(c.lengths),
                                   jnp.asarray(batch.tokens), jnp.asarray(batch.fed))
      return logits
    positions = step_positions(self._shared_length, c.lengths, batch.tokens.shape[1])
    tokens, positions, tables, lengths, fed = place_unique(
        self.groups, (batch.tokens, positions, c.block_tables, c.lengths, batch.fed),
        batch_axis=self._batch_axis)
    unique = functools.partial(self._unique, tables=tables, lengths=lengths)
    attend = moska_attend(self._shared_on_groups, unique, fed)
    logits, c.pools = self._model.forward(tokens, positions, attend, c.pools)
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
    order = {self.scheduler.submit(p, max_new_tokens, eos_id).id: i
             for i, p in enumerate(encoded)}
    results: list[Result | None] = [None] * len(encoded)
    t0 = time.perf_counter()
    while self.scheduler.busy:
      self.scheduler.admit()
      batch = self.scheduler.batch()
      logits = self._run(batch)
      last = logits[jnp.arange(self.max_batch), jnp.maximum(jnp.asarray(batch.fed) - 1, 0)]
      key, sub = jax.random.split(key)
      nxt = np.asarray(sample_fn(last, sub))
      self.stats["steps_prefill" if batch.prefill else "steps_decode"] += 1
      for r in self.scheduler.advance(batch, nxt, np.asarray(last) if return_logits else None):
        self.stats["tokens"] += 1
        if r.done and r.id in order:
          results[order[r.id]] = self._result(r, return_logits)
    self.stats["seconds"] += time.perf_counter() - t0
    return results

  def _result(self, r: Request, return_logits: bool) -> Result:
    text = self._decode(r.tokens) if self._decode else None
    return Result(r.prompt, r.tokens, text, r.logits if return_logits else None)
