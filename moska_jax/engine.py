"""Continuous batching against shared contexts: the step executor, its loop, and `generate`.

`MoskaEngine` holds the weights, the resident shared contexts (named stores; each request reads
one), the unique cache's page pools and the compiled step; its `Scheduler` (moska_jax.scheduler)
holds the host-side request state: queue, slots, admission, each step's plan, retirement. Every
step feeds one token to every decoding slot and, while prompts are read, one chunk of
`prefill_chunk` tokens to each of at most `prefill_lanes` prefilling requests, in one jitted
program (`moska_step`, moska_jax.step): the weights and every context's shared K/V are read once
per step for all of them, and a long prompt never stops the decoding requests' tokens. The
sampling follows as a small program of its own whose branches (does any row sample, does any
use top_p) the plan decides on the host, as it decides whether the sparse step's router runs
(`Routes.due`, when `MoskaConfig.reroute_every` > 1); on a GPU the dense step has no branch on
the device's values either (such a branch makes the host wait for the device;
`step.cond_waits_for_device`), so a step's dispatch returns while the device computes. With
several contexts the sparse step still branches on a context in use.

Requests come in at any time (`submit`, thread-safe) and join at the next step; `cancel` frees
a request's slot and pages before the next step. `start()` runs the steps on a background thread
(the asynchronous engine an HTTP server sits on: `stream` bridges a request's tokens to asyncio);
without it, `generate` (and `step`) run them on the caller's thread. `generate` is the simple
synchronous API either way. The host work of a step is vectorized over its requests (the
scheduler's plan and bookkeeping), and a step's tokens reach the streams of one asyncio loop in
one hand-over (one call_soon_threadsafe, not one per token), made once the next step is
dispatched: the loop's thread takes them while the device computes, and the two threads do not
trade the GIL per token.

Sampling: a request's tokens are a function of its prompt, its context, its `Sampling`
(temperature, top_p, seed) and nothing else: alone or beside others, in any slot, at any
max_batch, in any queue order (moska_jax.sampling).

Failures: the engine is exception-safe. An exception inside a step (a device error, an
out-of-memory error, a KeyboardInterrupt) ends the requests of that step with
finish_reason "error" (all active ones when the donated page pools were lost, which are then
re-created) and frees their slots; `generate` also ends its other requests ("cancelled") before
re-raising. No request is ever left without a finish_reason, and the next call gives the tokens a
fresh engine would.

On `DeviceGroups` (disaggregated serving, moska_jax.sharding) each part of a step (the decode
part, the prefill part) is ONE jitted program over the span of the groups (`GroupsExecutor`):
`Decoder.forward` runs as a `shard_map` body in which every device holds its role's blocks
(`sharding.placement`). Per layer the unique devices write the new K/V to their pages, hand q to
the shared devices with a collective, attend to their pages while the shared devices attend to
their store rows (dense or routed there), and one collective merge brings (o, lse) back; there is
no host step between layers or groups. The last logits are sampled inside the same program.
Each device keeps one K/V memory per layer (`cache.pools`): page pools on the unique devices, the
store's rows (whole chunks) on the shared devices, so neither group holds a copy of the other's
KV; the weights are replicated on the shared devices too (the program has one block of every
argument per device; they run their copy of the dense layers on filler rows while they wait for
q). A mixed step runs its parts one after the other (their requests' pages are disjoint, so the
tokens are those of one packed step), a part without a live row not at all. Under
`jax.distributed` the groups may live in different processes: every process runs the engine with
the same arguments, and the sampled tokens and logits are replicated so each reads them. The
logits equal the one-device engine's to f32 tolerance, and `stats` counts the bytes handed
between the groups ("bytes_to_shared", "bytes_to_unique", `sharding.TransferStats`). Refused on
disaggregated groups, with a ValueError at construction: several shared contexts (the shared
devices' memory holds one store; `set_store` replaces it), `MoskaConfig.reroute_every` > 1,
`MoskaConfig.batch_aware` (the shared devices route and attend per (request, chunk) pair), and
float8 K/V (a float8 shared store or `unique_kv_dtype`: each device's K/V memory holds store rows
and pages in one array per layer in the model's dtype). A single-device `DeviceGroups` runs the
one-device step on that device (every feature, 0 bytes).

FP8 K/V (one device, any number of contexts): the shared stores may hold float8 K/V with per-head
scales (`SharedKVStore.quantized`); every store of an engine has its first store's kv dtype (one
compiled step). `unique_kv_dtype` stores the unique pages in float8 too, with per-layer per-kv-head
scales fixed when the engine is made (`kv_cache.unique_kv_scales` of the first store).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from moska_jax.config import ModelConfig, MoskaConfig, check_int
from moska_jax.kv_cache import SharedKVStore, UniqueKVCache, check_kv_dtype, unique_kv_scales
from moska_jax.model import Decoder, kv_weights_fingerprint
from moska_jax.sampling import Sampling, SamplingRows, branches, sample
from moska_jax.scheduler import Request, Scheduler, StepPlan
from moska_jax.sharding import (DeviceGroups, PlacedSharedKV, SharedConfig, TransferStats,
                                place_replicated, place_requests, place_shared_kv,
                                shared_rows_per_device)
from moska_jax.sharding.groups import SPAN
from moska_jax.sharding.shared_step import (hand_off, merge_with_unique, own_rows,
                                            shared_partial, span_context, span_map,
                                            summary_specs)
from moska_jax.step import (Routes, SharedContext, last_logits, moska_step, store_top_k,
                            zero_padding)

__all__ = ["ByteTokenizer", "MoskaEngine", "Request", "Result", "Sampling", "TokenStream",
           "sample"]

log = logging.getLogger(__name__)


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256): the built-in default; any encode/decode pair plugs in."""

  vocab = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, tokens: Sequence[int]) -> str:
    return bytes(int(t) % 256 for t in tokens).decode("utf-8", errors="replace")


@dataclasses.dataclass
class Result:
  """One finished request: its tokens, text (None when the tokenizer cannot decode), why it
  ended ("stop": eos_id, "length": max_new_tokens), and (if asked) the logits of every sampled
  token."""

  prompt: list[int]
  tokens: list[int]
  text: str | None
  logits: list[np.ndarray] | None = None
  finish_reason: str = "length"


_TRACES = [0]  # traces of `_engine_step`, all engines together


class _SwitchIntervalHolds:
  """The interpreter's thread switch interval, shared by the engines running their loops: each
  start that sets one holds it, the first saving the interpreter's value, which the last
  release restores."""

  def __init__(self):
    self._lock = threading.Lock()
    self._holders = 0
    self._saved = 0.0

  def hold(self, seconds: float) -> None:
    with self._lock:
      if self._holders == 0:
        self._saved = sys.getswitchinterval()
      self._holders += 1
      sys.setswitchinterval(seconds)

  def release(self) -> None:
    with self._lock:
      self._holders -= 1
      if self._holders == 0:
        sys.setswitchinterval(self._saved)


_SWITCH_INTERVAL = _SwitchIntervalHolds()


@dataclasses.dataclass(frozen=True, eq=False)
class _Graph:
  """A GraphDef as a static jit argument, hashed and compared by identity: one instance per
  equal GraphDef (`_graph`). A GraphDef's own hash walks the module graph, on every dispatch
  (~0.1 ms of a tiny model's step)."""

  graphdef: nnx.GraphDef


@functools.cache
def _graph(graphdef: nnx.GraphDef) -> _Graph:
  return _Graph(graphdef)


@functools.partial(jax.jit, static_argnames=("graph", "mcfg", "due"), donate_argnums=(2, 3))
def _engine_step(state, contexts, pools, ids, parts, reroute, unique_scales, *, graph, mcfg,
                 due):
  """One engine step on one device: `moska_step` and each row's last logits. Module-level, so
  engines of the same model and MoskaConfig share its compilations. due: whether a row of
  `reroute` is set (`Routes.due`), decided on the host."""
  _TRACES[0] += 1
  routes = None if ids is None else Routes(ids, reroute, due)
  logits, pools, ids = moska_step(nnx.merge(graph.graphdef, state), contexts, pools, parts, mcfg,
                                  routes=routes, unique_scales=unique_scales)
  last = jnp.concatenate([last_logits(lg, p.fed) for lg, p in zip(logits, parts)])
  return last, pools, ids


# The step's sampling, a program of its own whose branches the plan decides on the host
# (`sampling.branches`): a branch decided on the device (lax.cond) makes a GPU host wait for the
# device, so the step's dispatch would return only once its layers had run.
_sample_step = jax.jit(sample, static_argnames=("draw", "nucleus"))


@dataclasses.dataclass
class _Resident:
  """A loaded context: its store, token count, K, and the form the step reads."""

  store: SharedKVStore
  length: int
  top_k: int | None
  view: SharedContext | None  # None on disaggregated groups: the store is in the K/V memory


class MoskaEngine:
  """Serves many requests against named shared contexts with MoSKA attention.

  Args:
    model: the Decoder whose weights built the shared stores (checked against a store's
      `weights_fingerprint`).
    shared_store: the shared context, a `SharedKVStore` (named `default_context`) or a mapping
      name -> store (the first is the default); more can be loaded later (`load_context`).
    moska_config: dense / sparse routing, reuse of routes, and the kernel backend.
    max_batch: concurrent requests (the decode part of every step).
    num_pages, page_size: the unique-cache page budget (page 0 is scratch).
    max_request_tokens: prompt + new tokens one request may hold (default: the whole budget).
    prefill_chunk: prompt tokens a prefilling request feeds per step.
    prefill_lanes: prefilling requests fed per step (default min(max_batch, 4)); the per-step
      prefill budget is prefill_chunk x prefill_lanes tokens.
    tokenizer: an object with encode(str) -> list[int] and decode(list[int]) -> str, or a plain
      callable str -> list[int] (results then carry no text); default: UTF-8 bytes.
    groups: run disaggregated on these device groups (see the module docstring: one context,
      reroute_every 1, batch_aware 0); None: one jitted step on the default device. A part's
      requests are split over the unique devices (`ShardingRules.requests`) when its batch is a
      multiple of their number of shards, else every unique device serves all of them.
    default_context: the name of `shared_store` when it is one store.
    unique_kv_dtype: the unique pages' format: None (the model's dtype) or "float8_e4m3fn" /
      "float8_e5m2", with per-layer per-kv-head scales fixed now from the first store's
      (`kv_cache.unique_kv_scales`: the same projections make both; 2x headroom; larger values
      saturate). An engine option beside the page budget, not a MoskaConfig field: it shapes the
      cache's memory, not how the shared KV is attended.

  Attributes:
    cache: the `UniqueKVCache` (page pools, block tables, lengths); on disaggregated groups its
      pools are per layer the span K/V memory (pages on the unique devices, the store's rows on
      the shared devices).
    scheduler: the `Scheduler` of the requests.
    stats: counters "steps_prefill" (steps with a prefill part), "steps_decode", "tokens"
      (sampled), "prefill_tokens", "seconds" (in steps), "host_seconds" (the stepping thread's
      work in steps, from taking commands to the callbacks, less the wait for the sampled tokens:
      the host time the device is not computing under; on disaggregated groups, whose parts are
      fetched one by one, it holds their device time too), "dispatch_seconds" (of that, the
      calls of the jitted step and its sampler: enqueueing their work, choosing the sampler's
      form, and a compilation when a shape is new; on disaggregated groups also their parts'
      device time), "requests_<finish reason>" (+ on
      groups "bytes_to_shared", "bytes_to_unique").
    last_step_seconds: wall time of the latest step.
  """

  def __init__(self, model: Decoder, shared_store: SharedKVStore | Mapping[str, SharedKVStore],
               moska_config: MoskaConfig, *, max_batch: int, num_pages: int, page_size: int = 16,
               max_request_tokens: int | None = None, prefill_chunk: int = 32,
               prefill_lanes: int | None = None, tokenizer=None,
               groups: DeviceGroups | None = None, default_context: str = "default",
               unique_kv_dtype: str | None = None):
    self.model_config, self.mcfg, self.groups = model.cfg, moska_config, groups
    self._disaggregated = groups is not None and not groups.colocated
    max_batch = check_int(max_batch, "max_batch", "MoskaEngine")
    num_pages = check_int(num_pages, "num_pages", "MoskaEngine", minimum=2)
    page_size = check_int(page_size, "page_size", "MoskaEngine")
    prefill_chunk = check_int(prefill_chunk, "prefill_chunk", "MoskaEngine")
    prefill_lanes = check_int(min(max_batch, 4) if prefill_lanes is None else prefill_lanes,
                              "prefill_lanes", "MoskaEngine")
    budget = (num_pages - 1) * page_size  # one page is the scratch page
    if max_request_tokens is None and budget < 2:
      raise ValueError(f"MoskaEngine: (num_pages - 1) * page_size, the tokens a request may hold, "
                       f"must be >= 2 (a prompt token and a new one), got num_pages={num_pages}, "
                       f"page_size={page_size}")
    max_request_tokens = check_int(budget if max_request_tokens is None else max_request_tokens,
                                   "max_request_tokens", "MoskaEngine", minimum=2)
    if max_request_tokens > budget:  # it sizes every slot's block table
      raise ValueError(f"MoskaEngine: max_request_tokens must be at most (num_pages - 1) * "
                       f"page_size = {budget}, the tokens the page pool holds, got "
                       f"{max_request_tokens}")
    if self._disaggregated:
      GroupsExecutor.check_config(moska_config)
    stores = dict(shared_store) if isinstance(shared_store, Mapping) else {
        default_context: shared_store}
    if not stores:
      raise ValueError("MoskaEngine: shared_store must hold at least one context")
    first = next(iter(stores.values()))
    self.graphdef, self.state = nnx.split(model)
    self._fingerprint: str | None = None  # the model's, once a store with one is checked
    # Every store of the engine has the first one's K/V format (`_check_store`).
    self.shared_kv_dtype = first.kv_dtype if isinstance(first, SharedKVStore) else None
    self._check_store(first)
    unique_dtype = check_kv_dtype(unique_kv_dtype, "MoskaEngine", "unique_kv_dtype")
    if unique_dtype is not None and self._disaggregated:
      raise ValueError(f"MoskaEngine: unique_kv_dtype={unique_kv_dtype!r} is not supported on "
                       f"disaggregated DeviceGroups (their K/V memory holds store rows and pages "
                       f"in one array per layer, in the model's dtype); use unique_kv_dtype=None "
                       f"there, or run on one device (groups=None)")
    # A prefill step writes prefill_chunk tokens from a request's length on, past its last page
    # when the prompt ends inside the chunk: spare table entries (the scratch page) take those
    # padding writes, so no kernel ever sees a length beyond its table.
    self.cache = UniqueKVCache(
        model.cfg, max_batch=max_batch, num_pages=num_pages, page_size=page_size,
        max_pages_per_request=-(-(max_request_tokens + prefill_chunk - 1) // page_size),
        kv_dtype=unique_dtype,
        scales=None if unique_dtype is None else unique_kv_scales(first, unique_dtype))
    self.scheduler = Scheduler(self.cache, max_batch, prefill_chunk, prefill_lanes)
    self.max_batch, self.max_request_tokens = max_batch, max_request_tokens
    self.prefill_chunk, self.prefill_lanes = prefill_chunk, prefill_lanes
    tokenizer = tokenizer or ByteTokenizer()
    if hasattr(tokenizer, "encode"):
      self._encode, self._decode = tokenizer.encode, getattr(tokenizer, "decode", None)
    elif callable(tokenizer):
      self._encode, self._decode = tokenizer, None
    else:
      raise ValueError(f"MoskaEngine: tokenizer must have encode() or be callable, got "
                       f"{type(tokenizer).__name__}")
    self._graph = _graph(self.graphdef)
    self.stats: collections.Counter = collections.Counter()
    self.last_step_seconds = 0.0
    self._traces = 0
    self._ids = None  # reused chunk selections per layer [B, Hkv, K] (sparse, reroute_every > 1)
    self._reroute_all = True
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    # The streams' events not handed over yet, per asyncio loop.
    self._events: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, int | None]]] = (
        collections.defaultdict(list))
    self._wake = threading.Event()
    self._drive = threading.RLock()  # held by whoever runs steps
    self._stepping = False  # inside `_step` (its callbacks run there)
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._holds_switch_interval = False  # it set the interpreter's (start), stop() releases
    self._contexts: dict[str, _Resident] = {}
    self._groups: GroupsExecutor | None = None
    if self._disaggregated:
      if len(stores) > 1:
        raise ValueError(f"MoskaEngine: shared_store holds {len(stores)} contexts "
                         f"({sorted(stores)}); disaggregated DeviceGroups serve one (the shared "
                         f"devices' K/V memory holds one store): give one store, or run on one "
                         f"device (groups=None)")
      self._groups = GroupsExecutor(model.cfg, self.graphdef, self.state, groups, moska_config,
                                    self.cache, self._counted)
      self.state = self._groups.state
    elif groups is not None:  # both groups are one device: the one-device step, on it
      self.state, self.cache.pools, self.cache.scales = jax.device_put(
          (self.state, self.cache.pools, self.cache.scales), groups.unique_devices[0])
    self.default_context = next(iter(stores))
    for name, store in stores.items():
      self._load(name, store)

  # ---- contexts -------------------------------------------------------------------------------

  @property
  def contexts(self) -> tuple[str, ...]:
    """The resident contexts' names (the default first among equals: see default_context)."""
    return tuple(self._contexts)

  def context_tokens(self, name: str) -> int:
    """S, the shared tokens of context `name`."""
    return self._resident(name).length

  def context_top_k(self, name: str) -> int | None:
    """K, the chunks a request of context `name` attends per kv head (sparse), else None."""
    return self._resident(name).top_k

  @property
  def store(self) -> SharedKVStore:
    """The default context's store."""
    return self._contexts[self.default_context].store

  @property
  def shared_kv(self) -> tuple:
    """Per layer the default context's store as the step reads it: `attention.SharedLayer` on
    one device, `sharding.PlacedSharedKV` (views of the K/V memory) on disaggregated groups."""
    if self._groups is not None:
      return self._groups.layers(self.cache.pools)
    return self._contexts[self.default_context].view.layers

  def set_store(self, store: SharedKVStore) -> None:
    """Serves `store` as the default context from the next step on (`load_context`)."""
    self.load_context(self.default_context, store)

  def load_context(self, name: str, store: SharedKVStore) -> None:
    """Makes `store` resident as context `name` (replacing one of that name) from the next step
    on; on disaggregated groups it is placed on the shared devices first. Requests of other
    contexts keep running; a set of contexts the step has not seen compiles once. Replacing a
    context ends its running requests ("cancelled": their unique K/V attended to the old
    store, at its positions); its queued ones start on the new store.

    Raises:
      ValueError: an empty name, or the store was built for another model config or by other
        weights (`SharedKVStore.weights_fingerprint`), or (sparse) its chunk size or summary
        kind differs from the engine's MoskaConfig, or its K/V format
        (`SharedKVStore.kv_dtype`) from the engine's first store's, or a second context (or a
        float8 store) on disaggregated groups.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"load_context: name must be a non-empty str, got {name!r}")
    if self._groups is not None and name not in self._contexts:
      raise ValueError(f"load_context: disaggregated DeviceGroups serve one context "
                       f"({self.default_context!r}; the shared devices' K/V memory holds one "
                       f"store), got a second one, {name!r}; replace the store with "
                       f"set_store, or run on one device (groups=None)")
    self._check_store(store)
    self._in_loop(functools.partial(self._load, name, store))

  def unload_context(self, name: str) -> None:
    """Drops context `name`; its queued and active requests end ("cancelled") at once.

    Raises:
      ValueError: an unknown context, or the default one.
    """
    self._resident(name)
    if name == self.default_context:
      raise ValueError(f"unload_context: {name!r} is the default context (requests naming none "
                       f"read it); it cannot be unloaded")
    self._in_loop(functools.partial(self._unload, name))

  def _resident(self, name: str) -> _Resident:
    if name not in self._contexts:
      raise unknown_context(name, self._contexts)
    return self._contexts[name]

  def _check_store(self, store: SharedKVStore) -> None:
    mcfg = self.mcfg
    if not isinstance(store, SharedKVStore):
      raise ValueError(f"MoskaEngine: a shared store must be a SharedKVStore, got "
                       f"{type(store).__name__}")
    if store.model_config != self.model_config:
      raise ValueError("MoskaEngine: the shared store was built for a different model config")
    if store.weights_fingerprint is not None:
      self._fingerprint = self._fingerprint or kv_weights_fingerprint(self.state)
      if store.weights_fingerprint != self._fingerprint:
        raise ValueError(f"MoskaEngine: the shared store was built by other weights than this "
                         f"model's (weights fingerprint {store.weights_fingerprint[:12]}... in "
                         f"the store, {self._fingerprint[:12]}... for the model's embedding and "
                         f"blocks: `moska_jax.kv_weights_fingerprint`); rebuild it with this "
                         f"model (build_shared_store) or serve the weights that built it")
    fmt = lambda kv_dtype: kv_dtype or f"unscaled {self.model_config.dtype}"
    if store.kv_dtype != self.shared_kv_dtype:
      raise ValueError(f"MoskaEngine: the shared store's K/V are {fmt(store.kv_dtype)}; this "
                       f"engine serves {fmt(self.shared_kv_dtype)} stores (its first store's "
                       f"kv_dtype, which its compiled step reads)")
    want = jnp.dtype(store.kv_dtype or self.model_config.jnp_dtype)
    if any(x.dtype != want for x in store.k + store.v):
      raise ValueError(f"MoskaEngine: a {fmt(store.kv_dtype)} store must hold K, V in {want.name}, "
                       f"got {sorted({x.dtype.name for x in store.k + store.v})}")
    if store.kv_dtype is not None and self._disaggregated:
      raise ValueError(f"MoskaEngine: float8 shared stores (kv_dtype {store.kv_dtype!r}) are not "
                       f"supported on disaggregated DeviceGroups (each device's K/V memory holds "
                       f"store rows and pages in one array per layer, in the model's dtype); give "
                       f"a store in the model's dtype, or run on one device (groups=None)")
    if mcfg.mode == "sparse" and mcfg.chunk_size != store.chunk_size:
      raise ValueError(f"MoskaEngine: moska_config.chunk_size={mcfg.chunk_size} must match the "
                       f"store's chunk_size={store.chunk_size}")
    held = -(-int(store.length) // store.chunk_size)  # chunks that hold shared tokens
    if mcfg.mode == "sparse" and any(c >= held for c in mcfg.always_include):
      raise ValueError(f"MoskaEngine: MoskaConfig.always_include={mcfg.always_include} names "
                       f"chunks past the store's {held} chunks of {store.chunk_size} tokens "
                       f"(ids in [0, {held}))")
    if mcfg.mode == "sparse" and mcfg.summary != store.summaries[0].kind:
      raise ValueError(f"MoskaEngine: moska_config.summary={mcfg.summary!r} must match the "
                       f"store's summaries ({store.summaries[0].kind!r}); see "
                       f"SharedKVStore.with_summaries")

  def _load(self, name: str, store: SharedKVStore) -> None:
    self._check_store(store)
    length, top_k = int(store.length), store_top_k(store, self.mcfg)
    if self._groups is not None:
      self._groups.set_store(store, top_k, self.cache)
      view = None
    elif self.groups is not None:  # one device
      view = SharedContext(jax.device_put(store.layers, self.groups.unique_devices[0]), top_k)
    else:
      view = SharedContext(store.layers, top_k)
    if name in self._contexts:  # once the new store is in place (a failure keeps them running)
      for r in [r for r in self.scheduler.active.values() if r.context == name]:
        self._finish(r, "cancelled", f"context {name!r} was replaced")
    self._contexts[name] = _Resident(store, length, top_k, view)
    self._contexts_changed()

  def _unload(self, name: str) -> None:
    if name not in self._contexts:
      return
    doomed = [r for r in list(self.scheduler.queue) + list(self.scheduler.active.values())
              if r.context == name]
    for r in doomed:
      self._finish(r, "cancelled", f"context {name!r} was unloaded")
    del self._contexts[name]
    self._contexts_changed()

  def _contexts_changed(self) -> None:
    self._context_index = {n: i for i, n in enumerate(self._contexts)}
    self._step_contexts = tuple(r.view for r in self._contexts.values())
    self._ids, self._reroute_all = None, True  # K may have changed: every request re-routes

  # ---- requests -------------------------------------------------------------------------------

  def encode(self, prompt, what: str = "prompt") -> list[int]:
    """A prompt (str, or a sequence of token ids) as validated token ids.

    Raises:
      ValueError: not a str or a sequence of ints, empty, or an id outside [0, vocab).
    """
    if isinstance(prompt, str):
      ids = self._encode(prompt)
    elif (isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray))) or (
        isinstance(prompt, np.ndarray) and prompt.ndim == 1):
      ids = prompt
    else:
      raise ValueError(f"{what} must be a str or a sequence of token ids, got "
                       f"{type(prompt).__name__}")
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in ids):
      raise ValueError(f"{what}: token ids must be ints, got {list(ids)[:8]!r}...")
    try:
      ids = np.asarray(ids, np.int64)
    except OverflowError:
      raise ValueError(f"{what}: token ids must be in [0, {self.model_config.vocab}), got one "
                       f"beyond int64") from None
    ids = self.model_config.check_tokens(ids, what).tolist()
    if not ids:
      raise ValueError(f"{what} is empty")
    return ids

  def check_request(self, tokens: Sequence[int], max_new_tokens: int, *,
                    context: str | None = None, what: str = "request") -> str:
    """Validates a request of encoded `tokens`; returns its context's name.

    Raises:
      ValueError: max_new_tokens < 1, a request over the page budget, an unknown context.
    """
    check_int(max_new_tokens, "max_new_tokens", what)
    need = len(tokens) + int(max_new_tokens)
    if need > self.max_request_tokens or not self.cache.fits(need):
      raise over_budget(what, len(tokens), max_new_tokens, self._request_limit())
    context = self.default_context if context is None else context
    self._resident(context)
    return context

  def _request_limit(self) -> int:
    """The most tokens (prompt + new) one request may hold."""
    c = self.cache
    return min(self.max_request_tokens,
               c.page_size * min(c.num_pages - 1, c.block_tables.shape[1]))

  def submit(self, prompt: str | Sequence[int], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, eos_id: int | None = None,
             context: str | None = None, return_logits: bool = False,
             on_event: Callable[[Request, int | None], None] | None = None) -> Request:
    """Queues one request (thread-safe); it joins the batch at the next step.

    Args:
      prompt: text (encoded by the tokenizer) or token ids.
      max_new_tokens: tokens to generate at most (>= 1).
      sampling: temperature, top_p, seed (drawn here when None and temperature > 0).
      eos_id: a token that ends the request (kept as its last token).
      context: the resident context it reads (default: `default_context`).
      return_logits: keep the logits of every sampled token.
      on_event: called on the stepping thread with (request, token) per token and
        (request, None) when it finished; it must not block (an exception cancels the request).

    Returns:
      the `Request`; `request.finished_event` is set once it finished.

    Raises:
      ValueError: a bad prompt, max_new_tokens, sampling, eos_id, context, return_logits or
        on_event.
    """
    tokens = self.encode(prompt)
    context = self.check_request(tokens, max_new_tokens, context=context)
    check_sampling(self.model_config, sampling, eos_id)
    return self._submit(tokens, max_new_tokens, sampling, eos_id, context, return_logits,
                        on_event)

  def _submit(self, tokens, max_new_tokens, sampling, eos_id, context, return_logits,
              on_event) -> Request:
    """Posts a checked request (`check_request`, `check_sampling`) to the loop."""
    if on_event is not None and not callable(on_event):
      raise ValueError(f"on_event must be callable or None, got {type(on_event).__name__}")
    if not isinstance(return_logits, (bool, np.bool_)):
      raise ValueError(f"return_logits must be a bool, got {return_logits!r}")
    r = self.scheduler.new_request(tokens, int(max_new_tokens), eos_id, context=context,
                                   sampling=sampling.seeded(), keep_logits=return_logits,
                                   on_event=on_event)
    self._post(functools.partial(self._enqueue, r))
    return r

  def _enqueue(self, r: Request) -> None:
    if r.context not in self._contexts:  # unloaded since it was submitted
      self._finish(r, "cancelled", f"context {r.context!r} was unloaded")
    else:
      self.scheduler.enqueue(r)

  def cancel(self, request: Request) -> None:
    """Ends `request` ("cancelled"; thread-safe): its slot and pages are free before the next
    step. A finished request is left as it is.

    Raises:
      TypeError: `request` is not a `Request` (e.g. the `TokenStream` that wraps one: cancel
        `stream.request`).
    """
    if not isinstance(request, Request):
      raise TypeError(f"cancel: request must be a Request (what submit returns; a stream's is "
                      f"stream.request), got {type(request).__name__}")
    self._post(functools.partial(self._cancel, request))

  def _cancel(self, r: Request) -> None:
    if not r.done and (r in self.scheduler.queue or r in self.scheduler.active.values()):
      self._finish(r, "cancelled")

  def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
    self.scheduler.finish(r, reason, error)
    self._notify_done(r)

  def _notify_done(self, r: Request) -> None:
    if r.finished_event.is_set():  # ended already (e.g. by a callback earlier in its step)
      return
    self.stats[f"requests_{r.finish_reason}"] += 1
    if r.on_event is not None:
      try:
        r.on_event(r, None)
      except Exception:  # a client's callback must not stop the engine
        log.exception("on_event of request %d failed", r.id)
    r.finished_event.set()

  @property
  def queue_length(self) -> int:
    """Requests submitted and not admitted yet (approximate while steps run)."""
    return len(self.scheduler.queue) + self._inbox.qsize()

  @property
  def active_requests(self) -> int:
    return len(self.scheduler.active)

  # ---- the loop -------------------------------------------------------------------------------

  def _post(self, command: Callable[[], None]) -> None:
    """Runs `command` on the stepping thread before the next step."""
    self._inbox.put(command)
    self._wake.set()

  def _in_loop(self, fn: Callable[[], None]) -> None:
    """Runs fn on the stepping thread and waits for it (at once when no loop runs, after the
    commands posted before it: a submit then an unload_context of its context cancels it, as
    the loop would)."""
    if not self.running or threading.current_thread() is self._thread:
      with self._driving():
        if not self.running and not self._stepping:  # (a callback of a step: after it)
          self._apply_inbox()
        fn()
      return
    done = concurrent.futures.Future()

    def command():
      try:
        done.set_result(fn())
      except Exception as e:  # handed back to the caller
        done.set_exception(e)

    self._post(command)
    while not concurrent.futures.wait([done], timeout=0.05).done:
      if not self.running:  # the loop stopped before it took the command: run it here
        with self._driving():
          self._apply_inbox()
    done.result()

  @contextlib.contextmanager
  def _driving(self):
    """Holds `_drive`; the streams' events of the work done are handed over on leaving."""
    with self._drive:
      try:
        yield
      finally:
        self._flush_events()

  def _flush_events(self) -> None:
    """Hands the streams' pending events to their asyncio loops: one call_soon_threadsafe per
    loop (one wake-up of its thread per step, not one per token), in order."""
    if not self._events:
      return
    pending, self._events = self._events, collections.defaultdict(list)
    hand_over(pending)

  def _apply_inbox(self) -> bool:
    worked = False
    while True:
      try:
        command = self._inbox.get_nowait()
      except queue.Empty:
        return worked
      command()
      worked = True

  @property
  def running(self) -> bool:
    """Whether a background thread runs the steps (`start`)."""
    return self._thread is not None and self._thread.is_alive()

  def start(self, switch_interval: float | None = 2e-4) -> None:
    """Runs the steps on a background thread until `stop`: submitted requests join at the
    next step, whoever submitted them.

    Args:
      switch_interval: the interpreter's thread switch interval while the loop runs, in seconds
        (`sys.setswitchinterval`), or None to leave it. The stepping thread, back from the
        device, waits up to this long for the GIL while another thread runs Python (an asyncio
        loop answering many streams): CPython's default 5 ms would stretch a step of a few ms
        several times over. The interpreter's own value comes back when the last engine that
        set one stops. An engine already running ignores the call, its interval included.

    Raises:
      ValueError: switch_interval not None and not > 0.
    """
    if switch_interval is not None and not switch_interval > 0:
      raise ValueError(f"start: switch_interval must be > 0 seconds or None, got "
                       f"{switch_interval!r}")
    if self.running:
      return
    if switch_interval is not None:
      _SWITCH_INTERVAL.hold(switch_interval)
      self._holds_switch_interval = True
    self._stopping = False
    self._thread = threading.Thread(target=self._serve_forever, name="moska-engine", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Stops the background thread (requests in flight stay; a later start resumes them)."""
    if self._thread is None:
      return
    self._stopping = True
    self._wake.set()
    self._thread.join()
    self._thread = None
    if self._holds_switch_interval:
      _SWITCH_INTERVAL.release()
      self._holds_switch_interval = False

  def _serve_forever(self) -> None:
    while not self._stopping:
      self._wake.clear()
      try:
        with self._drive:
          worked = self._step()
          if not worked:
            self._flush_events()
      except Exception:  # the step's requests got their error; keep serving the others
        log.exception("engine step failed")
        worked = True
      if not worked:
        self._wake.wait()  # idle: blocks until a command arrives (no polling)
    with self._drive:
      self._flush_events()

  def step(self) -> bool:
    """Applies pending submissions and cancellations, admits queued requests and runs one step
    over the active ones. Returns whether anything was done. One thread at a time (the loop's,
    or the caller's when no loop runs).

    Raises:
      whatever the step raised, after ending its requests (see the module docstring).
    """
    with self._driving():
      return self._step()

  def _step(self) -> bool:
    """`step`, leaving the streams' events of its tokens pending: the background loop hands
    them over once the next step is dispatched (or when it goes idle), so the asyncio threads
    take them while the device computes, not while this thread plans."""
    start = time.perf_counter()
    self._stepping = True
    try:
      return self._step_once(start)
    finally:
      self._stepping = False

  def _step_once(self, start: float) -> bool:
    """`_step`'s work; start: when the step began (host time counts from there)."""
    worked = self._apply_inbox()
    self.scheduler.admit()
    plan = self.scheduler.plan(self._context_index, self.mcfg.reroute_every, self._reroute_all)
    if plan is None:
      return worked
    t0 = time.perf_counter()
    try:
      tokens, logits = self._run(plan)
      self.stats["dispatch_seconds"] += time.perf_counter() - t0
      self._flush_events()
      waited = time.perf_counter()
      tokens, logits = np.asarray(tokens), None if logits is None else np.asarray(logits)
      waited = time.perf_counter() - waited
      self._reroute_all = False
      took = self.scheduler.advance(plan, tokens, logits)
    except BaseException as e:
      self._abort(plan, e)
      raise
    self.last_step_seconds = time.perf_counter() - t0
    self.stats["seconds"] += self.last_step_seconds
    self.stats["steps_prefill" if plan.prefill else "steps_decode"] += 1
    self.stats["tokens"] += len(took)
    if plan.prefill:
      self.stats["prefill_tokens"] += int(plan.lanes.fed.sum())
    for r in took:
      if r.finished_event.is_set():  # ended by an earlier callback of this step (an unload)
        continue
      if r.on_event is not None:
        try:
          r.on_event(r, r.tokens[-1])
        except Exception:
          log.exception("on_event of request %d failed; cancelling it", r.id)
          if not r.done:  # ended here, notified once below
            self.scheduler.finish(r, "cancelled", "its on_event callback raised")
      if r.done:
        self._notify_done(r)
    self.stats["host_seconds"] += time.perf_counter() - start - waited
    return True

  def _abort(self, plan: StepPlan, error: BaseException) -> None:
    """After a failed step: ends its requests (all active ones when the donated pools were
    lost, which are re-created) and frees their slots."""
    message = f"{type(error).__name__}: {error}"
    pools_lost = any(x.is_deleted() for x in jax.tree.leaves(self.cache.pools))
    slots = (list(self.scheduler.active) if pools_lost
             else [s for s in plan.decode_slots + plan.lane_slots if s in self.scheduler.active])
    for s in slots:
      self._finish(self.scheduler.active[s], "error", message)
    if pools_lost:
      if self._groups is not None:  # the K/V memory anew: zero pages, the store's rows
        self._groups.set_store(self.store, self.context_top_k(self.default_context), self.cache,
                               keep_pages=False)
      else:
        pools = self.cache.zero_pools()
        self.cache.pools = pools if self.groups is None else jax.device_put(
            pools, self.groups.unique_devices[0])
    self._ids, self._reroute_all = None, True

  # ---- running a step -------------------------------------------------------------------------

  def compilations(self) -> int:
    """Compilations this engine's steps caused: one per step shape (the decode-only step, and a
    mixed step per prefill lane count used: powers of two up to prefill_lanes), per set of
    contexts and, with `MoskaConfig.reroute_every` > 1, per whether a row re-routes; none for
    shapes an engine of the same model and MoskaConfig compiled before; on disaggregated
    groups, traces of this engine's span program (one per part shape: the decode part and a
    prefill part per lane count; and per sampling form, `sampling.branches`). The sampler's
    small programs are not counted. These are traces: XLA compiles a traced shape again for
    arrays placed differently (an engine on one-device `DeviceGroups` commits its arrays to that
    device, so it compiles the steps an engine without groups compiled, and reports 0)."""
    return self._traces

  def _counted(self, fn):
    """fn, counting its traces (one per compiled shape) in `compilations()`."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      self._traces += 1
      return fn(*args, **kwargs)
    return traced

  def _route_ids(self):
    """The reused chunk selections (created at the first step that needs them), or None."""
    if self.mcfg.mode != "sparse" or self.mcfg.reroute_every == 1:
      return None
    if self._ids is None:
      K = max(r.top_k for r in self._contexts.values())
      shape = (self.max_batch, self.model_config.num_kv_heads, K)
      self._ids = tuple(jnp.full(shape, -1, jnp.int32) for _ in range(self.model_config.layers))
    return self._ids

  def route_ids(self) -> tuple[np.ndarray, ...] | None:
    """The chunk selections decoding requests reuse (per layer [max_batch, Hkv, K], row = slot),
    when `MoskaConfig.reroute_every` > 1; else None."""
    return None if self._ids is None else tuple(np.asarray(x) for x in self._ids)

  def _run(self, plan: StepPlan) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray | None]:
    """Runs one step; returns the sampled tokens [max_batch + lanes] and, when a request keeps
    them, their logits: on one device, arrays still being computed (the step is dispatched)."""
    if self._groups is not None:
      return self._groups.run(plan, self.cache, self.stats)
    traces = _TRACES[0]
    # The plan's NumPy arrays go to the jitted step as they are: its C++ dispatch copies them
    # to the device, cheaper than a jnp.asarray each.
    ids = self._route_ids()
    last, self.cache.pools, self._ids = _engine_step(
        self.state, self._step_contexts, self.cache.pools, ids, plan.parts, plan.reroute,
        self.cache.scales, graph=self._graph, mcfg=self.mcfg,
        due=ids is not None and bool(plan.reroute.any()))
    self._traces += _TRACES[0] - traces
    tokens = _sample_step(last, plan.sampling, **branches(plan.sampling))
    return tokens, (last if plan.keep_logits else None)

  # ---- the synchronous API --------------------------------------------------------------------

  def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
               sampling: Sampling | Sequence[Sampling] = Sampling(), *,
               eos_id: int | None = None, return_logits: bool = False,
               context: str | Sequence[str] | None = None) -> list[Result]:
    """Generates up to max_new_tokens for every prompt; results in prompt order.

    A request ends after max_new_tokens or once it samples `eos_id` (kept as its last token);
    its slot and pages go to the next queued request at once. Runs the steps on this thread, or
    waits for the background loop when it runs (`start`); other requests in flight are served
    alongside.

    Args:
      prompts: a list of prompts, each a str or a sequence of token ids.
      sampling: one `Sampling` for all, or one per prompt.
      context: the context every prompt reads, or one per prompt (default: default_context).

    Raises:
      ValueError: prompts given as one str, a bad prompt (empty, not tokens, an id outside the
        vocabulary), max_new_tokens < 1, a request over the page budget, an unknown context.
      RuntimeError: a request ended with an error.
    """
    if isinstance(prompts, (str, bytes)):
      raise ValueError("generate: prompts must be a list of prompts, got one str; pass "
                       "[prompt]")
    prompts = list(prompts)
    n = len(prompts)

    def per_prompt(value, name: str, one: bool) -> list:
      if one:
        return [value] * n
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"generate: {name} must be one for every prompt or a sequence of one "
                         f"per prompt, got {value!r}")
      return list(value)

    samplings = per_prompt(sampling, "sampling", isinstance(sampling, Sampling))
    contexts = per_prompt(context, "context", context is None or isinstance(context, str))
    if len(samplings) != n or len(contexts) != n:
      raise ValueError(f"generate: give one sampling and one context, or one per prompt "
                       f"({n}); got {len(samplings)} and {len(contexts)}")
    encoded = [self.encode(p, f"generate: prompt {i}") for i, p in enumerate(prompts)]
    contexts = [self.check_request(p, max_new_tokens, context=c, what=f"generate: prompt {i}")
                for i, (p, c) in enumerate(zip(encoded, contexts))]
    for s in samplings:  # every prompt is checked before the first is submitted
      check_sampling(self.model_config, s, eos_id)
    requests = [self._submit(p, max_new_tokens, s, eos_id, c, return_logits, None)
                for p, s, c in zip(encoded, samplings, contexts)]
    try:
      if self.running:
        for r in requests:
          r.finished_event.wait()
      else:
        with self._drive:
          while not all(r.done for r in requests):
            if not self.step():
              raise RuntimeError("generate: the engine has requests it cannot admit")
    except BaseException:
      for r in requests:
        self.cancel(r)
      if not self.running:
        with self._driving():
          self._apply_inbox()
      raise
    for i, r in enumerate(requests):
      if r.finish_reason in ("error", "cancelled"):
        raise RuntimeError(f"generate: prompt {i} ended with {r.finish_reason}: {r.error}")
    return [self._result(r) for r in requests]

  def warmup(self) -> None:
    """Compiles every step shape now (the decode step, a mixed step per prefill lane count;
    with `MoskaConfig.reroute_every` > 1 each with and without a row due to re-route), and the
    sampler's greedy, sampling and top_p forms for their row counts, with throw-away requests
    on the default context, then clears `stats`."""
    lanes = sorted({self.scheduler.lane_bucket(n) for n in range(1, self.prefill_lanes + 1)})
    reuse = self._route_ids() is not None
    for n in lanes:
      for first, sampling in enumerate((Sampling(), Sampling(temperature=1.0, seed=0),
                                        Sampling(temperature=1.0, top_p=0.5, seed=0))):
        # The mixed step routes when every row is told to (first), and reuses otherwise; the
        # decode steps route at their first step and reuse at the next. Only ever set here:
        # clearing it could drop a re-route a loaded context asked for.
        if reuse and first == 0:
          self._reroute_all = True
        self.generate([[0]] * n, min(3 if reuse else 2, self._request_limit() - 1), sampling)
    self.stats.clear()

  def _result(self, r: Request) -> Result:
    text = self._decode(r.tokens) if self._decode else None
    return Result(r.prompt, r.tokens, text, r.logits if r.keep_logits else None,
                  r.finish_reason)

  def decode(self, tokens: Sequence[int]) -> str | None:
    """Text of tokens (None without a decoding tokenizer)."""
    return self._decode(tokens) if self._decode else None

  def stream(self, prompt: str | Sequence[int], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, eos_id: int | None = None,
             context: str | None = None, stream_interval: int = 1) -> TokenStream:
    """Submits a request whose tokens arrive in the running asyncio loop: `async for token in
    engine.stream(...)`. To end it early (a client gone), iterate inside `async with
    engine.stream(...) as s:` (leaving the block cancels an unfinished request) or call
    `s.cancel()`: a `break` out of a bare `async for` leaves it running to its end. Needs the
    background loop (`start`).

    stream_interval: a consumer waiting for tokens is woken once this many have arrived (or the
      request ended), to take them in one go (`TokenStream.drain`): fewer wake-ups and writes
      per token for a server streaming many requests, at the cost of that many steps between
      its deliveries (SGLang's --stream-interval).

    Raises:
      RuntimeError: no background loop runs, or no asyncio loop runs in this thread.
      ValueError: as for `submit`; stream_interval not a positive int.
    """
    if not self.running:
      raise RuntimeError("stream: start() the engine's loop first")
    check_int(stream_interval, "stream_interval", "stream")
    stream = TokenStream(self, asyncio.get_running_loop(), stream_interval)
    stream.request = self.submit(prompt, max_new_tokens, sampling, eos_id=eos_id,
                                 context=context,
                                 on_event=lambda r, token: self._events[stream.loop].append(
                                     (stream, token)))
    return stream


def over_budget(what: str, prompt_tokens: int, max_new_tokens: int, limit: int) -> ValueError:
  """The error of a request whose prompt + new tokens exceed the per-request page budget."""
  return ValueError(f"{what} needs {prompt_tokens + max_new_tokens} tokens of unique cache "
                    f"({prompt_tokens} prompt + {max_new_tokens} new); the page budget allows "
                    f"{limit} per request")


def check_sampling(model_config: ModelConfig, sampling: Sampling, eos_id: int | None) -> None:
  """Raises ValueError unless sampling is a `Sampling` and eos_id None or a token id."""
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be a Sampling, got {type(sampling).__name__}")
  if eos_id is not None:
    model_config.check_tokens([eos_id], "eos_id")


def unknown_context(name: str, resident: Collection[str]) -> ValueError:
  """The error of a request naming a context that is not resident."""
  return ValueError(f"unknown context {name!r}; resident contexts: {sorted(resident)}")


def hand_over(pending: Mapping[asyncio.AbstractEventLoop, Sequence[tuple[TokenStream,
                                                                          int | None]]]) -> None:
  """Hands the streams' events to their asyncio loops: one call_soon_threadsafe per loop."""
  for loop, events in pending.items():
    try:
      loop.call_soon_threadsafe(_deliver, events)
    except RuntimeError:  # the loop closed: nobody iterates its streams any more
      pass


def _deliver(events: Sequence[tuple[TokenStream, int | None]]) -> None:
  """On an asyncio loop: its streams' events of a step, in order."""
  for stream, token in events:
    stream._put(token)


class TokenStream:
  """A request's tokens as an async iterator (from `MoskaEngine.stream`); `request` is the
  engine's `Request` (finish_reason, tokens, times). Leaving its `async with` block before the
  end, or `cancel()`, cancels the request.

  The engine hands each step's tokens of all streams of one asyncio loop over in one
  call_soon_threadsafe; a stream buffers its own in a deque, so a consumer that fell behind reads
  them without suspending. A waiting consumer is woken once `interval` tokens are buffered (or
  the request ended)."""

  def __init__(self, engine: MoskaEngine, loop: asyncio.AbstractEventLoop, interval: int = 1):
    self.engine, self.loop, self.interval = engine, loop, interval
    self.request: Request | None = None  # set by `MoskaEngine.stream` once submitted
    self._tokens: collections.deque[int | None] = collections.deque()  # None: the end
    self._waiter: asyncio.Future | None = None

  def _put(self, token: int | None) -> None:
    self._tokens.append(token)
    if (self._waiter is not None and not self._waiter.done()
        and (token is None or len(self._tokens) >= self.interval)):
      self._waiter.set_result(None)

  def __aiter__(self) -> TokenStream:
    return self

  async def __anext__(self) -> int:
    while not self._tokens:
      self._waiter = self.loop.create_future()
      try:
        await self._waiter
      finally:
        self._waiter = None
    token = self._tokens[0]
    if token is None:  # kept: iterating again ends again
      if self.request.finish_reason == "error":
        raise RuntimeError(f"request {self.request.id} failed: {self.request.error}")
      raise StopAsyncIteration
    self._tokens.popleft()
    return token

  def drain(self) -> list[int]:
    """The tokens that arrived and were not read yet, taken without waiting (the end stays for
    the iteration to report): a consumer that fell behind handles them in one go."""
    out = []
    while self._tokens and self._tokens[0] is not None:
      out.append(self._tokens.popleft())
    return out

  def cancel(self) -> None:
    """Ends the request now (its slot and pages free before the next step)."""
    self.engine.cancel(self.request)

  async def __aenter__(self) -> TokenStream:
    return self

  async def __aexit__(self, *exc) -> None:
    if not self.request.done:
      self.cancel()


class GroupsExecutor:
  """The engine's step on disaggregated `DeviceGroups`: per part, one jitted program over their
  span.

  See the module docstring for the data flow. The engine owns one: `set_store` places the store
  in the K/V memory (keeping the unique devices' pages), `run` runs a step part by part.

  Args:
    model_config: the decoder's config.
    graphdef, state: the split decoder (`nnx.split`); the state is replicated over the span.
    groups: disjoint device groups.
    mcfg: dense or sparse shared attention ("sparse" is routed on the shared devices), the
      int8 scorer, the kernel backend and interpret mode (see `check_config`).
    cache: the engine's `UniqueKVCache` (its page size and pages the memory must hold).
    counted: wraps the step function to count its traces.
  """

  def __init__(self, model_config: ModelConfig, graphdef, state, groups: DeviceGroups,
               mcfg: MoskaConfig, cache: UniqueKVCache, counted):
    self.check_config(mcfg)
    self.model_config, self.graphdef, self.groups, self.mcfg = model_config, graphdef, groups, mcfg
    # Host values (the same in every process) -> every span device: no cross-process copy.
    self.state = place_replicated(groups, jax.tree.map(np.asarray, state))
    self.page_size = cache.page_size
    self.pool_rows = cache.num_pages * cache.page_size
    self.rows = 0  # R, each device's K/V rows per layer; set by set_store
    self._step = jax.jit(counted(self._program), static_argnums=(0, 1, 2),
                         static_argnames=("draw", "nucleus"), donate_argnums=4)

  @staticmethod
  def check_config(mcfg: MoskaConfig) -> None:
    """Refuses the MoskaConfig options the span program does not run.

    Raises:
      ValueError: reroute_every > 1 (reused chunk selections would be state kept per request on
        the shared devices) or batch_aware > 0 (each shared device attends to its own chunks,
        per (request, chunk) pair).
    """
    if mcfg.reroute_every > 1:
      raise ValueError(f"MoskaEngine: MoskaConfig.reroute_every={mcfg.reroute_every} (reusing "
                       f"chunk selections) is not supported on disaggregated DeviceGroups; use "
                       f"reroute_every=1 there")
    if mcfg.batch_aware:
      raise ValueError(f"MoskaEngine: MoskaConfig.batch_aware={mcfg.batch_aware} is not "
                       f"supported on disaggregated DeviceGroups; use batch_aware=0 there")

  def set_store(self, store: SharedKVStore, top_k: int | None, cache: UniqueKVCache, *,
                keep_pages: bool = True) -> None:
    """Puts `store` (routed with K = top_k when sparse) on the shared devices; cache.pools
    becomes the K/V memory.

    R, the rows per device, holds the store's rows over the shared devices (whole chunks) and the
    unique pools (whole pages); it only grows, and the pages already written stay (zero pages
    instead with keep_pages=False, after the memory was lost). When the pools need more rows
    than a shared device's part of the store, the shared blocks are padded, and the shared
    kernels, which split a device's R rows statically, find no keys in part of their splits:
    num_pages * page_size <= S / num_shared keeps the shared attention at full speed.
    """
    C, page, sparse = store.chunk_size, self.page_size, self.mcfg.mode == "sparse"
    whole = math.lcm(C, page)
    # Whole chunks of this store and whole pages: the rows of an earlier store (of another
    # chunk size, in dense mode) are rounded up too.
    R = -(-max(self.rows, shared_rows_per_device(self.groups, store.k[0].shape[0], C, page),
               self.pool_rows) // whole) * whole
    keep = keep_pages and self.rows > 0

    def kept(x):
      """The unique devices' blocks of x (span memory of self.rows rows), padded to R rows."""
      def block(i, device):
        data = next(s.data for s in x.addressable_shards if s.device == device)
        return data if R == self.rows else jnp.pad(data, ((0, R - self.rows), (0, 0), (0, 0)))
      return block

    placed = tuple(
        place_shared_kv(self.groups, k, v, s if sparse else None, chunk_size=C,
                        kv_length=int(store.length), rows_per_device=R,
                        unique_blocks=(kept(pool[0]), kept(pool[1])) if keep else None)
        for k, v, s, pool in zip(store.k, store.v, store.summaries, cache.pools))
    cache.pools = tuple((p.k, p.v) for p in placed)
    self.rows, self.chunk_size = R, C
    self.summaries = tuple(p.summaries for p in placed) if sparse else ()
    self.kv_length, self.shared_length = placed[0].kv_length, int(store.length)
    mcfg = self.mcfg
    self.cfg = SharedConfig("routed" if sparse else "dense", top_k,
                            tuple(mcfg.always_include) if sparse else (), C if sparse else None,
                            None, mcfg.backend, mcfg.interpret, mcfg.int8_scorer)

  def layers(self, pools) -> tuple[PlacedSharedKV, ...]:
    """Per layer the shared store as the step reads it (views of the K/V memory `pools`)."""
    summaries = self.summaries or (None,) * len(pools)
    return tuple(PlacedSharedKV(k, v, s, self.kv_length, self.chunk_size)
                 for (k, v), s in zip(pools, summaries))

  def run(self, plan: StepPlan, cache: UniqueKVCache, stats: collections.Counter
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """One step, one span program per part with a live row (the rows of a part without any are
    never read: zero tokens and logits); updates cache.pools and adds the bytes handed between
    the groups to `stats`. Returns the sampled tokens [max_batch + lanes] and, when a request
    keeps them, the last logits [max_batch + lanes, V] (this process's copy)."""
    m, groups = self.model_config, self.groups
    tokens, lasts, start = [], [], 0
    for part in plan.parts:
      B, T = part.tokens.shape
      rows = SamplingRows(*(np.asarray(a[start:start + B]) for a in plan.sampling))
      start += B
      if not np.any(part.fed):
        tokens.append(np.zeros((B,), np.int32))
        if plan.keep_logits:
          lasts.append(np.zeros((B, m.vocab), np.float32))
        continue
      positions = (self.shared_length + part.lengths)[:, None] + np.arange(T, dtype=np.int32)
      # A decode row is its slot, whose pages live on its shard's devices; a prefill lane is
      # not: lanes run on every unique device, so each pool holds every prompt's pages.
      replicated = part is plan.lanes
      requests = place_requests(groups, (part.tokens, part.tables, part.lengths, part.fed,
                                         positions), B, replicated)
      sampled, last, cache.pools = self._step(self.cfg, B, replicated, self.state, cache.pools,
                                              self.summaries, self.kv_length, requests,
                                              place_replicated(groups, rows), **branches(rows))
      moved = TransferStats.of_step(groups, (B, T, m.num_heads, m.head_dim), m.jnp_dtype,
                                    replicated=replicated)
      stats["bytes_to_shared"] += (m.layers * moved.bytes_to_shared + TransferStats.of_logits(
          groups, B, m.vocab, replicated).bytes_to_shared)
      stats["bytes_to_unique"] += m.layers * moved.bytes_to_unique
      tokens.append(np.asarray(sampled.addressable_data(0)))
      if plan.keep_logits:
        lasts.append(np.asarray(last.addressable_data(0)))
    return np.concatenate(tokens), (np.concatenate(lasts) if plan.keep_logits else None)

  def _program(self, cfg: SharedConfig, batch: int, replicated: bool, state, pools, summaries,
               kv_length, requests: tuple, sampling: SamplingRows, *, draw: bool,
               nucleus: bool):
    """One part of `batch` requests on the span -> (sampled tokens [B], last logits [B, V], new
    pools); requests: the part's (tokens, tables, lengths, fed, positions) span arrays, split
    over the request shards or (`replicated`) on every unique device."""
    groups, page, mcfg = self.groups, self.page_size, self.mcfg

    def body(state, pools, summaries, kv_length, requests, sampling):
      tokens, tables, lengths, fed, positions = requests
      ctx = span_context(groups, batch, replicated)
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
      last = hand_off(ctx, last_logits(logits, fed))
      return sample(last, sampling, draw=draw, nucleus=nucleus), last, pools

    rows = tuple(summary_specs(s) for s in summaries)
    in_specs = (P(), P(SPAN), rows, P(), P(SPAN), P())
    return span_map(body, groups, in_specs, (P(), P(), P(SPAN)))(
        state, pools, summaries, kv_length, requests, sampling)
