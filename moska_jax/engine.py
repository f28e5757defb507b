"""Continuous batching against shared contexts: the step executor, its loop, and `generate`.

`MoskaEngine` holds the weights, the resident shared contexts (named stores; each request reads
one), the unique cache's page pools and the compiled step; its `Scheduler` (moska_jax.scheduler)
holds the host-side request state: queue, slots, admission, each step's plan, retirement. Every
step feeds one token to every decoding slot and, while prompts are read, one chunk of
`prefill_chunk` tokens to each of at most `prefill_lanes` prefilling requests, in one jitted
program (`moska_step`, moska_jax.step): the weights and every context's shared K/V are read once
per step for all of them, and a long prompt never stops the decoding requests' tokens.

Requests come in at any time (`submit`, thread-safe) and join at the next step; `cancel` frees
a request's slot and pages before the next step. `start()` runs the steps on a background thread
(the asynchronous engine an HTTP server sits on: `stream` bridges a request's tokens to asyncio);
without it, `generate` (and `step`) run them on the caller's thread. `generate` is the simple
synchronous API either way.

Sampling: a request's tokens are a function of its prompt, its context, its `Sampling`
(temperature, top_p, seed) and nothing else: alone or beside others, in any slot, at any
max_batch, in any queue order (moska_jax.sampling).

Failures: the engine is exception-safe. An exception inside a step (a device error, an
out-of-memory error, a KeyboardInterrupt) ends the requests of that step with
finish_reason "error" (all active ones when the donated page pools were lost, which are then
re-created) and frees their slots; `generate` also ends its other requests ("cancelled") before
re-raising. No request is ever left without a finish_reason, and the next call gives the tokens a
fresh engine would.

On `DeviceGroups` (disaggregated serving, moska_jax.sharding) the weights and page pools live on
the unique group and every layer's shared K/V (plus the summaries when sparse) on the shared
group, whole chunks per "kv" device. One jitted program cannot span two disjoint device sets, so
the step is orchestrated from Python, one forward per part of the step: `Decoder.forward` runs
eagerly on the unique group with the same `moska_attend` as the one-device step, built from
parts that run where their data lives: `zero_padding`, the unique half (`unique_partial`,
jitted, pools donated) and `merge_halves` on the unique group, and the shared half by
`sharding.shared_attention_step` per context in use (q out, dense or routed attention sharded
over "kv", (o, lse) back). Dispatch is asynchronous and the shared half is issued first, so the
two halves of a layer are in flight together. The logits equal the one-device engine's to f32
tolerance, and `stats` counts the bytes moved between the groups ("bytes_to_shared",
"bytes_to_unique"). A single-device `DeviceGroups` takes the same path (0 bytes). Reusing chunk
selections (`reroute_every` > 1) is not supported there yet.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moska_jax.attention import unique_partial
from moska_jax.config import MoskaConfig
from moska_jax.kv_cache import SharedKVStore, UniqueKVCache, zero_kv
from moska_jax.model import Decoder
from moska_jax.sampling import SEED_RANGE, Sampling, SamplingRows, sample
from moska_jax.scheduler import Request, Scheduler, StepPlan
from moska_jax.sharding import (DeviceGroups, place_shared_kv, place_unique, send_to_shared,
                                shared_attention_step)
from moska_jax.step import (Routes, SharedContext, host_parts, last_logits, moska_attend,
                            moska_step, store_top_k)

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


@functools.partial(jax.jit, static_argnames=("graphdef", "mcfg"), donate_argnums=(2, 3))
def _engine_step(state, contexts, pools, ids, parts, reroute, sampling, *, graphdef, mcfg):
  """One engine step on one device: `moska_step`, each row's last logits, sampling. Module-level,
  so engines of the same model and MoskaConfig share its compilations."""
  _TRACES[0] += 1
  routes = None if ids is None else Routes(ids, reroute)
  logits, pools, ids = moska_step(nnx.merge(graphdef, state), contexts, pools, parts, mcfg,
                                  routes=routes)
  last = jnp.concatenate([last_logits(lg, p.fed) for lg, p in zip(logits, parts)])
  return sample(last, sampling), last, pools, ids


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"MoskaEngine: {name} must be an int >= {minimum}, got {value!r}")
  return int(value)


@dataclasses.dataclass
class _Resident:
  """A loaded context: its store, token count, K, and the form the step reads."""

  store: SharedKVStore
  length: int
  top_k: int | None
  view: object  # SharedContext on one device; per layer PlacedSharedKV on groups


class MoskaEngine:
  """Serves many requests against named shared contexts with MoSKA attention.

  Args:
    model: the Decoder whose weights built the shared stores.
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
    groups: run disaggregated on these device groups (see the module docstring); None: one jitted
      step on the default device. Per-request arrays go over the groups' request axis when a
      part's batch is a multiple of its size, else they are replicated.
    default_context: the name of `shared_store` when it is one store.

  Attributes:
    cache: the `UniqueKVCache` (page pools, block tables, lengths).
    scheduler: the `Scheduler` of the requests.
    stats: counters "steps_prefill" (steps with a prefill part), "steps_decode", "tokens"
      (sampled), "prefill_tokens", "seconds" (in steps), "requests_<finish reason>" (+ on
      groups "bytes_to_shared", "bytes_to_unique").
    last_step_seconds: wall time of the latest step.
  """

  def __init__(self, model: Decoder, shared_store: SharedKVStore | Mapping[str, SharedKVStore],
               moska_config: MoskaConfig, *, max_batch: int, num_pages: int, page_size: int = 16,
               max_request_tokens: int | None = None, prefill_chunk: int = 32,
               prefill_lanes: int | None = None, tokenizer=None,
               groups: DeviceGroups | None = None, default_context: str = "default"):
    self.model_config, self.mcfg, self.groups = model.cfg, moska_config, groups
    max_batch = _check_int("max_batch", max_batch, 1)
    num_pages = _check_int("num_pages", num_pages, 2)
    page_size = _check_int("page_size", page_size, 1)
    prefill_chunk = _check_int("prefill_chunk", prefill_chunk, 1)
    prefill_lanes = _check_int("prefill_lanes", prefill_lanes or min(max_batch, 4), 1)
    budget = (num_pages - 1) * page_size
    max_request_tokens = _check_int("max_request_tokens", budget if max_request_tokens is None
                                    else max_request_tokens, 2)
    if groups is not None and moska_config.reroute_every > 1:
      raise ValueError(f"MoskaEngine: reroute_every={moska_config.reroute_every} (reusing chunk "
                       f"selections) is not supported on DeviceGroups yet; use reroute_every=1")
    # A prefill step writes prefill_chunk tokens from a request's length on, past its last page
    # when the prompt ends inside the chunk: spare table entries (the scratch page) take those
    # padding writes, so no kernel ever sees a length beyond its table.
    self.cache = UniqueKVCache(
        model.cfg, max_batch=max_batch, num_pages=num_pages, page_size=page_size,
        max_pages_per_request=-(-(max_request_tokens + prefill_chunk - 1) // page_size))
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
    self.graphdef, self.state = nnx.split(model)
    self.stats: collections.Counter = collections.Counter()
    self.last_step_seconds = 0.0
    self._traces = 0
    self._ids = None  # reused chunk selections per layer [B, Hkv, K] (sparse, reroute_every > 1)
    self._reroute_all = True
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._wake = threading.Event()
    self._drive = threading.RLock()  # held by whoever runs steps
    self._thread: threading.Thread | None = None
    self._stopping = False
    if groups is not None:
      self.state = place_unique(groups, self.state, specs=groups.rules.weights)
      self.cache.pools = place_unique(groups, self.cache.pools, specs=groups.rules.pages)
      self._model = nnx.merge(self.graphdef, self.state)
      self._unique = jax.jit(self._counted(functools.partial(unique_partial, mcfg=moska_config)),
                             donate_argnums=(3,))
      self._sample = jax.jit(sample)
    self._contexts: dict[str, _Resident] = {}
    stores = dict(shared_store) if isinstance(shared_store, Mapping) else {
        default_context: shared_store}
    if not stores:
      raise ValueError("MoskaEngine: shared_store must hold at least one context")
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
    one device, `sharding.PlacedSharedKV` on groups."""
    view = self._contexts[self.default_context].view
    return view.layers if isinstance(view, SharedContext) else view

  def set_store(self, store: SharedKVStore) -> None:
    """Serves `store` as the default context from the next step on (`load_context`)."""
    self.load_context(self.default_context, store)

  def load_context(self, name: str, store: SharedKVStore) -> None:
    """Makes `store` resident as context `name` (replacing one of that name) from the next step
    on; on groups it is placed on the shared group first. Requests of other contexts keep
    running; a set of contexts the step has not seen compiles once.

    Raises:
      ValueError: an empty name, or the store was built for another model, or (sparse) its chunk
        size or summary kind differs from the engine's MoskaConfig.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"load_context: name must be a non-empty str, got {name!r}")
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
      raise ValueError(f"unknown context {name!r}; resident contexts: {sorted(self._contexts)}")
    return self._contexts[name]

  def _check_store(self, store: SharedKVStore) -> None:
    mcfg = self.mcfg
    if not isinstance(store, SharedKVStore):
      raise ValueError(f"MoskaEngine: a shared store must be a SharedKVStore, got "
                       f"{type(store).__name__}")
    if store.model_config != self.model_config:
      raise ValueError("MoskaEngine: the shared store was built for a different model config")
    if mcfg.mode == "sparse" and mcfg.chunk_size != store.chunk_size:
      raise ValueError(f"MoskaEngine: moska_config.chunk_size={mcfg.chunk_size} must match the "
                       f"store's chunk_size={store.chunk_size}")
    if mcfg.mode == "sparse" and mcfg.summary != store.summaries[0].kind:
      raise ValueError(f"MoskaEngine: moska_config.summary={mcfg.summary!r} must match the "
                       f"store's summaries ({store.summaries[0].kind!r}); see "
                       f"SharedKVStore.with_summaries")

  def _load(self, name: str, store: SharedKVStore) -> None:
    self._check_store(store)
    length, top_k = int(store.length), store_top_k(store, self.mcfg)
    if self.groups is None:
      view = SharedContext(store.layers, top_k)
    else:
      (n,), _ = send_to_shared(self.groups, np.int32(length))
      sparse = self.mcfg.mode == "sparse"
      view = tuple(place_shared_kv(self.groups, k, v, s if sparse else None,
                                   chunk_size=store.chunk_size, kv_length=n)
                   for k, v, s in zip(store.k, store.v, store.summaries))
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
    elif isinstance(prompt, (Sequence, np.ndarray)) and not isinstance(prompt, (bytes, bytearray)):
      ids = prompt
    else:
      raise ValueError(f"{what} must be a str or a sequence of token ids, got "
                       f"{type(prompt).__name__}")
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in ids):
      raise ValueError(f"{what}: token ids must be ints, got {list(ids)[:8]!r}...")
    ids = self.model_config.check_tokens(np.asarray(ids, np.int64), what).tolist()
    if not ids:
      raise ValueError(f"{what} is empty")
    return ids

  def check_request(self, tokens: Sequence[int], max_new_tokens: int, *,
                    context: str | None = None, what: str = "request") -> str:
    """Validates a request of encoded `tokens`; returns its context's name.

    Raises:
      ValueError: max_new_tokens < 1, a request over the page budget, an unknown context.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
        max_new_tokens < 1):
      raise ValueError(f"{what}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    need = len(tokens) + int(max_new_tokens)
    if need > self.max_request_tokens or not self.cache.fits(need):
      raise ValueError(f"{what} needs {need} tokens of unique cache ({len(tokens)} prompt + "
                       f"{max_new_tokens} new); the page budget allows "
                       f"{self._request_limit()} per request")
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
      ValueError: a bad prompt, max_new_tokens, sampling, eos_id or context.
    """
    tokens = self.encode(prompt)
    context = self.check_request(tokens, max_new_tokens, context=context)
    return self._submit(tokens, max_new_tokens, sampling, eos_id, context, return_logits,
                        on_event)

  def _submit(self, tokens, max_new_tokens, sampling, eos_id, context, return_logits,
              on_event) -> Request:
    if not isinstance(sampling, Sampling):
      raise ValueError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if eos_id is not None:
      self.model_config.check_tokens([eos_id], "eos_id")
    if sampling.temperature > 0 and sampling.seed is None:
      sampling = dataclasses.replace(sampling, seed=secrets.randbelow(SEED_RANGE))
    r = self.scheduler.new_request(tokens, int(max_new_tokens), eos_id, context=context,
                                   sampling=sampling, keep_logits=return_logits,
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
    step. A finished request is left as it is."""
    self._post(functools.partial(self._cancel, request))

  def _cancel(self, r: Request) -> None:
    if not r.done and (r in self.scheduler.queue or r in self.scheduler.active.values()):
      self._finish(r, "cancelled")

  def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
    self.scheduler.finish(r, reason, error)
    self._notify_done(r)

  def _notify_done(self, r: Request) -> None:
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
    """Runs fn on the stepping thread and waits for it (at once when no loop runs)."""
    if not self.running or threading.current_thread() is self._thread:
      with self._drive:
        fn()
      return
    done = concurrent.futures.Future()

    def command():
      try:
        done.set_result(fn())
      except Exception as e:  # handed back to the caller
        done.set_exception(e)

    self._post(command)
    done.result()

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

  def start(self) -> None:
    """Runs the steps on a background thread until `stop`: submitted requests join at the
    next step, whoever submitted them."""
    if self.running:
      return
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

  def _serve_forever(self) -> None:
    while not self._stopping:
      self._wake.clear()
      try:
        with self._drive:
          worked = self.step()
      except Exception:  # the step's requests got their error; keep serving the others
        log.exception("engine step failed")
        worked = True
      if not worked:
        self._wake.wait()

  def step(self) -> bool:
    """Applies pending submissions and cancellations, admits queued requests and runs one step
    over the active ones. Returns whether anything was done. One thread at a time (the loop's,
    or the caller's when no loop runs).

    Raises:
      whatever the step raised, after ending its requests (see the module docstring).
    """
    with self._drive:
      worked = self._apply_inbox()
      self.scheduler.admit()
      plan = self.scheduler.plan(self._context_index, self.mcfg.reroute_every,
                                 self._reroute_all)
      if plan is None:
        return worked
      t0 = time.perf_counter()
      try:
        tokens, logits = self._run(plan)
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
        if r.on_event is not None:
          try:
            r.on_event(r, r.tokens[-1])
          except Exception:
            log.exception("on_event of request %d failed; cancelling it", r.id)
            if not r.done:
              self._finish(r, "cancelled", "its on_event callback raised")
        if r.done:
          self._notify_done(r)
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
      pools = zero_kv(self.model_config, (self.cache.num_pages, self.cache.page_size))
      if self.groups is not None:
        pools = place_unique(self.groups, pools, specs=self.groups.rules.pages)
      self.cache.pools = pools
    self._ids, self._reroute_all = None, True

  # ---- running a step -------------------------------------------------------------------------

  def compilations(self) -> int:
    """Compilations this engine's steps caused: one per step shape (the decode-only step, and a
    mixed step per prefill lane count used: powers of two up to prefill_lanes) and per set of
    contexts, none for shapes an engine of the same model and MoskaConfig compiled before; on
    groups, traces of the per-part unique program."""
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

  def _run(self, plan: StepPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """Runs one step; returns the sampled tokens [max_batch + lanes] and, when a request keeps
    them, their logits."""
    rows = SamplingRows(*(jnp.asarray(a) for a in plan.sampling))
    if self.groups is None:
      traces = _TRACES[0]
      tokens, last, self.cache.pools, self._ids = _engine_step(
          self.state, self._step_contexts, self.cache.pools, self._route_ids(),
          host_parts(plan.parts), jnp.asarray(plan.reroute), rows, graphdef=self.graphdef,
          mcfg=self.mcfg)
      self._traces += _TRACES[0] - traces
    else:
      last = self._run_on_groups(plan)
      tokens = self._sample(last, rows)
    return np.asarray(tokens), (np.asarray(last) if plan.keep_logits else None)

  def _run_on_groups(self, plan: StepPlan) -> jax.Array:
    """One forward per part with real rows (parts without any are skipped: their rows get zero
    logits); returns the last logits of every row [max_batch + lanes, V] on the default
    device."""
    lasts = []
    for part, rows in ((plan.decode, plan.decode_slots), (plan.lanes, plan.lane_slots)):
      if part is None:
        continue
      B, T = part.tokens.shape
      if not rows:
        lasts.append(np.zeros((B, self.model_config.vocab), np.float32))
        continue
      starts = np.array([r.length for r in self._contexts.values()], np.int32)[part.context]
      positions = (starts + part.lengths)[:, None] + np.arange(T, dtype=np.int32)[None]
      axis = 0 if B % self.groups.request_shards == 0 else None
      tokens, positions, tables, lengths, fed = place_unique(
          self.groups, (part.tokens, positions, part.tables, part.lengths, part.fed),
          batch_axis=axis)
      unique = lambda qs, ks, vs, pages: (lambda out, pages: ([out], pages))(
          *self._unique(qs[0], ks[0], vs[0], pages, tables=tables, lengths=lengths))
      shared = functools.partial(self._shared_on_groups, part.context[part.fed > 0], axis,
                                 part.context)
      attend = moska_attend(shared, unique, [(B, T)], [fed])
      logits, state = self._model.forward(tokens, positions, attend,
                                          [(p, None) for p in self.cache.pools])
      self.cache.pools = tuple(s[0] for s in state)
      lasts.append(np.asarray(last_logits(logits, fed)))
    return jnp.asarray(np.concatenate(lasts))

  def _shared_on_groups(self, live_contexts, axis, row_contexts, i, qs, ids):
    """The shared half of layer i on the shared group, per context a live row reads (rows keep
    their own context's (o, lse)); counts the bytes moved."""
    (q,) = qs
    names = list(self._contexts)
    out = None
    for c in sorted(set(live_contexts.tolist())):
      res = self._contexts[names[c]]
      s, mcfg = res.view[i], self.mcfg
      o, lse, moved = shared_attention_step(
          self.groups, q, s.k, s.v, kv_length=s.kv_length, summaries=s.summaries,
          top_k=res.top_k, always_include=mcfg.always_include, chunk_size=s.chunk_size,
          backend=mcfg.backend, interpret=mcfg.interpret)
      self.stats["bytes_to_shared"] += moved.bytes_to_shared
      self.stats["bytes_to_unique"] += moved.bytes_to_unique
      if out is None:
        out = (o, lse)
      else:
        mine = place_unique(self.groups, row_contexts == c, batch_axis=axis)
        out = (jnp.where(mine[:, None, None, None], o, out[0]),
               jnp.where(mine[:, None, None], lse, out[1]))
    return [out], ids

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
    samplings = [sampling] * n if isinstance(sampling, Sampling) else list(sampling)
    contexts = [context] * n if context is None or isinstance(context, str) else list(context)
    if len(samplings) != n or len(contexts) != n:
      raise ValueError(f"generate: give one sampling and one context, or one per prompt "
                       f"({n}); got {len(samplings)} and {len(contexts)}")
    encoded = [self.encode(p, f"generate: prompt {i}") for i, p in enumerate(prompts)]
    contexts = [self.check_request(p, max_new_tokens, context=c, what=f"generate: prompt {i}")
                for i, (p, c) in enumerate(zip(encoded, contexts))]
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
        with self._drive:
          self._apply_inbox()
      raise
    for i, r in enumerate(requests):
      if r.finish_reason in ("error", "cancelled"):
        raise RuntimeError(f"generate: prompt {i} ended with {r.finish_reason}: {r.error}")
    return [self._result(r) for r in requests]

  def warmup(self) -> None:
    """Compiles every step shape now (the decode step, a mixed step per prefill lane count)
    with throw-away requests on the default context, then clears `stats`."""
    lanes = sorted({self.scheduler.lane_bucket(n) for n in range(1, self.prefill_lanes + 1)})
    for n in lanes:
      self.generate([[0]] * n, 2)
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
             context: str | None = None) -> TokenStream:
    """Submits a request whose tokens arrive in the running asyncio loop: `async for token in
    engine.stream(...)`. Leaving the iteration early (a client gone) cancels it. Needs the
    background loop (`start`).

    Raises:
      RuntimeError: no background loop runs, or no asyncio loop runs in this thread.
      ValueError: as for `submit`.
    """
    if not self.running:
      raise RuntimeError("stream: start() the engine's loop first")
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    on_event = lambda r, token: loop.call_soon_threadsafe(tokens.put_nowait, token)
    request = self.submit(prompt, max_new_tokens, sampling, eos_id=eos_id, context=context,
                          on_event=on_event)
    return TokenStream(self, request, tokens)


class TokenStream:
  """A request's tokens as an async iterator (from `MoskaEngine.stream`); `request` is the
  engine's `Request` (finish_reason, tokens, times). Closing it early cancels the request."""

  def __init__(self, engine: MoskaEngine, request: Request, tokens: asyncio.Queue):
    self.engine, self.request, self._tokens = engine, request, tokens

  def __aiter__(self) -> TokenStream:
    return self

  async def __anext__(self) -> int:
    token = await self._tokens.get()
    if token is None:
      if self.request.finish_reason == "error":
        raise RuntimeError(f"request {self.request.id} failed: {self.request.error}")
      raise StopAsyncIteration
    return token

  def cancel(self) -> None:
    """Ends the request now (its slot and pages free before the next step)."""
    self.engine.cancel(self.request)

  async def __aenter__(self) -> TokenStream:
    return self

  async def __aexit__(self, *exc) -> None:
    if not self.request.done:
      self.cancel()
