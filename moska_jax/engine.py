"""Batched generation against a shared store: the step executor and `generate`.

`MoskaEngine` holds the weights, the shared store as the step reads it, the unique cache's page
pools and the compiled step; its `Scheduler` (moska_jax.scheduler) holds the host-side request
state: queue, slots, admission, retirement. Each step has one of two fixed shapes, a prefill
step of `prefill_chunk` prompt tokens per slot or a decode step of one token per slot, and runs
`moska_step` (moska_jax.step) in one jitted program, so all active requests attend to the shared
KV together (the batched GEMM). Results come back in request order.

On `DeviceGroups` (disaggregated serving, moska_jax.sharding) a step is ONE jitted program over
the span of the groups (`GroupsExecutor`): `Decoder.forward` runs as a `shard_map` body in which
every device holds its role's blocks (`sharding.placement`). Per layer the unique devices write
the new K/V to their pages, hand q to the shared devices with a collective, attend to their
pages while the shared devices attend to their store rows (dense or routed there), and one
collective merge brings (o, lse) back; there is no host step between layers or groups. Each
device keeps one K/V memory per layer (`cache.pools`): page pools on the unique devices, the
store's rows (whole chunks) on the shared devices, so neither group holds a copy of the other's
KV; the weights are replicated on the shared devices too (the program has one block of every
argument per device; they run their copy of the dense layers on filler rows while they wait for
q). Under `jax.distributed` the groups may live in different processes: every process runs
`generate` with the same arguments, and the logits are replicated so each reads them. The logits
equal the one-device engine's to f32 tolerance, and `stats` counts the bytes handed between the
groups ("bytes_to_shared", "bytes_to_unique", `sharding.TransferStats`). A single-device
`DeviceGroups` runs the one-device step on that device (0 bytes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from moska_jax.config import ModelConfig, MoskaConfig
from moska_jax.kv_cache import SharedKVStore, UniqueKVCache
from moska_jax.model import Decoder
from moska_jax.scheduler import Request, Scheduler, StepBatch
from moska_jax.sharding import (DeviceGroups, PlacedSharedKV, SharedConfig, TransferStats,
                                place_replicated, place_requests, place_shared_kv,
                                shared_rows_per_device)
from moska_jax.sharding.groups import SPAN
from moska_jax.sharding.shared_step import (hand_off, merge_with_unique, own_rows,
                                            shared_partial, span_context, span_map)
from moska_jax.step import moska_step, step_positions, zero_padding


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
      step on the default device. The requests are split over the unique devices
      (`ShardingRules.requests`) when max_batch is a multiple of their number of shards, else
      every unique device serves all of them.

  Attributes:
    cache: the `UniqueKVCache` (page pools, block tables, lengths); on disaggregated groups its
      pools are per layer the span K/V memory (pages on the unique devices, the store's rows on
      the shared devices).
    scheduler: the `Scheduler` of the requests.
    shared_kv: per layer the shared store as the step reads it: `attention.SharedLayer` on one
      device, `sharding.PlacedSharedKV` (views of the K/V memory) on disaggregated groups.
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
    self._groups = None
    if groups is not None and not groups.colocated:
      self._groups = GroupsExecutor(model.cfg, self.graphdef, self.state, groups, moska_config,
                                    self.cache, self._counted)
      self.state = self._groups.state
    else:
      if groups is not None:  # both groups are one device: the one-device step, on it
        self.state, self.cache.pools = jax.device_put((self.state, self.cache.pools),
                                                     groups.unique_devices[0])
      self._step = jax.jit(self._counted(self._local_step), donate_argnums=(2,))
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
    if self._groups is not None:
      self._groups.set_store(store, self.cache)
      self.shared_kv = self._groups.layers(self.cache.pools)
    elif self.groups is not None:
      self.shared_kv = jax.device_put(store.layers, self.groups.unique_devices[0])
    else:
      self.shared_kv = store.layers

  def compilations(self) -> int:
    """Traces of the compiled step so far (2 at most: the prefill and the decode shape)."""
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

  def _run(self, batch: StepBatch) -> jax.Array:
    """Runs one step over every slot; updates the page pools and returns logits[B, T, V]."""
    c = self.cache
    if self._groups is not None:
      logits, c.pools = self._groups.run(batch, c, self.stats)
      self.shared_kv = self._groups.layers(c.pools)
      return logits
    logits, c.pools = self._step(self.state, self.shared_kv, c.pools, jnp.asarray(c.block_tables),
                                 jnp.asarray(c.lengths), jnp.asarray(batch.tokens),
                                 jnp.asarray(batch.fed))
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


class GroupsExecutor:
  """The engine's step on disaggregated `DeviceGroups`: one jitted program over their span.

  See the module docstring for the data flow. The engine owns one: `set_store` places a store in
  the K/V memory (keeping the unique devices' pages), `run` runs a step.

  Args:
    model_config: the decoder's config.
    graphdef, state: the split decoder (`nnx.split`); the state is replicated over the span.
    groups: disjoint device groups.
    mcfg: dense or sparse shared attention ("sparse" is routed on the shared devices), the kernel
      backend and interpret mode.
    cache: the engine's `UniqueKVCache` (its page size, pages and batch size the memory must hold).
    counted: wraps the step function to count its traces.
  """

  def __init__(self, model_config: ModelConfig, graphdef, state, groups: DeviceGroups,
               mcfg: MoskaConfig, cache: UniqueKVCache, counted):
    if mcfg.batch_aware:  # each shared device attends to its own chunks, per (request, chunk)
      raise ValueError(f"MoskaEngine: MoskaConfig.batch_aware={mcfg.batch_aware} is not supported "
                       "on device groups; use batch_aware=0 there")
    self.model_config, self.graphdef, self.groups, self.mcfg = model_config, graphdef, groups, mcfg
    # Host values (the same in every process) -> every span device: no cross-process copy.
    self.state = place_replicated(groups, jax.tree.map(np.asarray, state))
    self.batch, self.page_size = cache.block_tables.shape[0], cache.page_size
    self.pool_rows = cache.num_pages * cache.page_size
    self.rows = 0  # R, each device's K/V rows per layer; set by set_store
    self._step = jax.jit(counted(self._program), static_argnums=0, donate_argnums=2)

  def set_store(self, store: SharedKVStore, cache: UniqueKVCache) -> None:
    """Puts `store` on the shared devices; cache.pools becomes the K/V memory.

    R, the rows per device, holds the store's rows over the shared devices (whole chunks) and the
    unique pools (whole pages); it only grows, and the pages already written stay. When the pools
    need more rows than a shared device's part of the store, the shared blocks are padded, and the
    shared kernels, which split a device's R rows statically, find no keys in part of their
    splits: num_pages * page_size <= S / num_shared keeps the shared attention at full speed.
    """
    C, page, sparse = store.chunk_size, self.page_size, self.mcfg.mode == "sparse"
    whole = math.lcm(C, page)
    R = max(self.rows, shared_rows_per_device(self.groups, store.k[0].shape[0], C, page),
            -(-self.pool_rows // whole) * whole)

    def kept(x):
      """The unique devices' blocks of x (span memory of self.rows rows), padded to R rows."""
      def block(i, device):
        data = next(s.data for s in x.addressable_shards if s.device == device)
        return data if R == self.rows else jnp.pad(data, ((0, R - self.rows), (0, 0), (0, 0)))
      return block

    placed = tuple(
        place_shared_kv(self.groups, k, v, s if sparse else None, chunk_size=C,
                        kv_length=int(store.length), rows_per_device=R,
                        unique_blocks=(kept(pool[0]), kept(pool[1])) if self.rows else None)
        for k, v, s, pool in zip(store.k, store.v, store.summaries, cache.pools))
    cache.pools = tuple((p.k, p.v) for p in placed)
    self.rows, self.chunk_size = R, C
    self.summaries = tuple(p.summaries for p in placed) if sparse else ()
    self.kv_length, self.shared_length = placed[0].kv_length, int(store.length)
    mcfg = self.mcfg
    self.cfg = SharedConfig(
        "routed" if sparse else "dense",
        mcfg.chunks_kept(store.summaries[0].num_chunks) if sparse else None,
        tuple(mcfg.always_include) if sparse else (), C if sparse else None, None,
        mcfg.backend, mcfg.interpret, mcfg.int8_scorer)

  def layers(self, pools) -> tuple[PlacedSharedKV, ...]:
    """Per layer the shared store as the step reads it (views of the K/V memory `pools`)."""
    summaries = self.summaries or (None,) * len(pools)
    return tuple(PlacedSharedKV(k, v, s, self.kv_length, self.chunk_size)
                 for (k, v), s in zip(pools, summaries))

  def run(self, batch: StepBatch, cache: UniqueKVCache, stats: collections.Counter):
    """One step over every slot -> (this process's copy of logits[B, T, V], new pools); adds the
    bytes handed between the groups to `stats`."""
    c, T = cache, batch.tokens.shape[1]
    requests = place_requests(
        self.groups, (batch.tokens, step_positions(self.shared_length, c.lengths, T),
                      c.block_tables, c.lengths, batch.fed), self.batch)
    logits, pools = self._step(self.cfg, self.state, c.pools, self.summaries, self.kv_length,
                               *requests)
    m = self.model_config
    moved = TransferStats.of_step(self.groups, (self.batch, T, m.num_heads, m.head_dim),
                                  m.jnp_dtype)
    stats["bytes_to_shared"] += m.layers * moved.bytes_to_shared
    stats["bytes_to_unique"] += m.layers * moved.bytes_to_unique
    return logits.addressable_data(0), pools

  def _program(self, cfg: SharedConfig, state, pools, summaries, kv_length, tokens, positions,
               tables, lengths, fed):
    groups, page, B = self.groups, self.page_size, self.batch
    mcfg = self.mcfg

    def body(state, pools, summaries, kv_length, tokens, positions, tables, lengths, fed):
      ctx = span_context(groups, B)
      T = tokens.shape[1]
      # Shared devices write past every table (dropped) and see no unique keys; their copy of
      # the dense layers runs on the filler rows of shard 0 while they wait for q.
      start = jnp.where(ctx.unique, lengths, tables.shape[1] * page)
      seen = jnp.where(ctx.unique, lengths + T, 0)

      def attend(i, q, k, v, memory):
        q_all = hand_off(ctx, zero_padding(q, fed))
        k_pages, v_pages = pk.write_pages(*(x.reshape(-1, page, *x.shape[1:]) for x in memory),
                                          tables, start, k, v)
        # q from the hand-off: the unique kernel waits for it, so q leaves first and both
        # groups attend at once.
        unique = pk.unique_attention(own_rows(ctx, q_all), k_pages, v_pages, tables, seen,
                                     backend=mcfg.backend, interpret=mcfg.interpret)
        memory = tuple(x.reshape(-1, *x.shape[2:]) for x in (k_pages, v_pages))
        shared = shared_partial(ctx, q_all, *memory, kv_length, cfg,
                                summaries=summaries[i] if summaries else None)
        o, _ = merge_with_unique(ctx, unique, shared)
        return own_rows(ctx, o).astype(q.dtype), memory

      logits, pools = nnx.merge(self.graphdef, state).forward(tokens, positions, attend, pools)
      return hand_off(ctx, logits), pools

    rows = jax.tree.map(lambda x: P() if x.ndim == 0 else P(SPAN), summaries)
    in_specs = (P(), P(SPAN), rows, P()) + (P(SPAN),) * 5
    return span_map(body, groups, in_specs, (P(), P(SPAN)))(
        state, pools, summaries, kv_length, tokens, positions, tables, lengths, fed)
