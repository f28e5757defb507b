"""Host-side request bookkeeping of the engine: queue, slots, admission, each step's plan,
retirement. No device work here: the engine runs the step this plans and reports back.

Every request owns a slot of the fixed batch (`max_batch`) and pages of the unique cache from
admission to retirement. Admission is in arrival order, as soon as a slot and the request's page
budget (prompt + new tokens) are free (continuous batching). Every step has a decode part, one
token for each slot whose prompt is read (all of them, so a prompt being read never delays their
tokens), and, while prompts are being read, a prefill part: `prefill_chunk` prompt tokens for
each of at most `prefill_lanes` prefilling requests, oldest first (the per-step prefill budget is
prefill_chunk x prefill_lanes tokens). The prefill part's lane count is rounded up to a power of
two (capped at prefill_lanes), so a step has one of a few fixed shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moska_jax.kv_cache import UniqueKVCache
from moska_jax.sampling import Sampling, SamplingRows
from moska_jax.step import Part

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclasses.dataclass(eq=False)
class Request:
  """One request: what it asked for, where it stands, what it produced.

  id: the scheduler's number for it, unique for the scheduler's lifetime.
  context: the name of the shared context it reads.
  sampling: its `Sampling`, the seed resolved when it samples.
  keep_logits: keep the logits of every sampled token in `logits`.
  on_event: called by the thread running the steps with (request, token) for each new token and
    (request, None) once it finished; it must not block.
  fed: prompt tokens already in the unique cache.
  tokens / logits: sampled tokens, and their logits when kept.
  decode_steps: decode steps it ran, one per token after its first (it re-routes on multiples
    of `MoskaConfig.reroute_every`).
  finish_reason: None while it runs, then one of FINISH_REASONS ("stop": it sampled eos_id, kept
    as its last token; "length": max_new tokens; "cancelled"; "error": see `error`).
  times: perf_counter seconds of "submitted", "admitted", "first_token", "finished".
  """

  id: int
  prompt: list[int]
  max_new: int
  eos_id: int | None = None
  context: str = "default"
  sampling: Sampling = Sampling()
  keep_logits: bool = False
  on_event: Callable[[Request, int | None], None] | None = None
  fed: int = 0
  tokens: list[int] = dataclasses.field(default_factory=list)
  logits: list[np.ndarray] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None
  times: dict[str, float] = dataclasses.field(default_factory=dict)
  finished_event: threading.Event = dataclasses.field(default_factory=threading.Event,
                                                      repr=False)

  @property
  def budget(self) -> int:
    """Unique-cache tokens it may hold: prompt + new tokens."""
    return len(self.prompt) + self.max_new

  @property
  def decode_steps(self) -> int:
    """Decode steps it ran: one per token after its first (the prefill's)."""
    return max(len(self.tokens) - 1, 0)

  @property
  def prefilling(self) -> bool:
    return self.fed < len(self.prompt)

  @property
  def done(self) -> bool:
    """It finished (see finish_reason)."""
    return self.finish_reason is not None


@dataclasses.dataclass
class StepPlan:
  """One step: the decode part (every slot, one token; rows of slots not decoding are padding
  whose writes land in the scratch page) and, while prompts are read, the prefill part (one lane
  per prefilling request). `sampling` has one row per decode slot, then one per lane."""

  decode_slots: list[int]
  lane_slots: list[int]
  decode: Part
  lanes: Part | None
  reroute: np.ndarray  # [max_batch] bool
  sampling: SamplingRows
  keep_logits: bool

  @property
  def prefill(self) -> bool:
    return self.lanes is not None

  @property
  def parts(self) -> tuple[Part, ...]:
    return (self.decode,) if self.lanes is None else (self.decode, self.lanes)


class Scheduler:
  """Requests waiting, requests holding slots, and the cache pages they hold.

  What a step needs of its requests is also kept per slot in NumPy columns (written at
  admission and by `advance`), so planning and recording a step of many requests is vectorized;
  Python runs per request only to take its last token (`Request.tokens` stays the truth: a
  token callback may replace the last one, which the next step then feeds), to append its new
  one, and for requests that start, finish or read their prompt.

  Args:
    cache: the unique cache whose pages and host-side tables/lengths this manages.
    max_batch: slots (the decode part of every step).
    prefill_chunk: prompt tokens a prefilling request feeds per step.
    prefill_lanes: prefilling requests fed per step at most (default: max_batch).
  """

  def __init__(self, cache: UniqueKVCache, max_batch: int, prefill_chunk: int,
               prefill_lanes: int | None = None):
    self.cache, self.max_batch, self.prefill_chunk = cache, max_batch, prefill_chunk
    self.prefill_lanes = prefill_lanes or max_batch
    self.queue: collections.deque[Request] = collections.deque()
    self.active: dict[int, Request] = {}  # slot -> request
    B = max_batch
    # Per slot: its request's temperature, top_p, seed; whether it holds a request and whether
    # that one decodes (its prompt is read); its token count, eos_id (-1: none), max_new,
    # keep_logits, and its context's index under `_indexed` (-1: not looked up yet).
    self._sampling = (np.zeros((B,), np.float32), np.ones((B,), np.float32),
                      np.zeros((B,), np.uint32))
    self._held, self._decoding = np.zeros((B,), bool), np.zeros((B,), bool)
    self._count = np.zeros((B,), np.int32)
    self._eos, self._max_new = np.full((B,), -1, np.int64), np.zeros((B,), np.int32)
    self._keep = np.zeros((B,), bool)
    self._context, self._indexed = np.zeros((B,), np.int32), None
    self._next_id = 0
    self._id_lock = threading.Lock()

  @property
  def busy(self) -> bool:
    return bool(self.queue or self.active)

  def new_request(self, prompt: Sequence[int], max_new: int, eos_id: int | None = None,
                  **fields) -> Request:
    """A request with the next id (thread-safe), not queued yet (see `enqueue`)."""
    with self._id_lock:
      rid, self._next_id = self._next_id, self._next_id + 1
    request = Request(rid, list(prompt), max_new, eos_id, **fields)
    request.times["submitted"] = time.perf_counter()
    return request

  def enqueue(self, request: Request) -> Request:
    """Queues a request (validated by the caller: non-empty, within the page budget)."""
    self.queue.append(request)
    return request

  def submit(self, prompt: Sequence[int], max_new: int, eos_id: int | None = None,
             **fields) -> Request:
    """`new_request` + `enqueue`."""
    return self.enqueue(self.new_request(prompt, max_new, eos_id, **fields))

  def admit(self) -> list[Request]:
    """Gives free slots to queued requests, in order, while the cache has their pages: every
    request that fits joins in one pass."""
    admitted = []
    if not self.queue:
      return admitted
    now = time.perf_counter()
    for slot in range(self.max_batch):
      if not self.queue or not self.cache.can_allocate(self.queue[0].budget):
        break
      if slot in self.active:
        continue
      request = self.queue.popleft()
      self.cache.allocate(slot, request.budget)
      self.active[slot] = request
      sampling = request.sampling
      for column, value in zip(self._sampling, (sampling.temperature, sampling.top_p,
                                                sampling.seed or 0)):
        column[slot] = value
      self._held[slot], self._count[slot], self._context[slot] = True, 0, -1
      self._eos[slot] = -1 if request.eos_id is None else request.eos_id
      self._max_new[slot], self._keep[slot] = request.max_new, request.keep_logits
      request.times["admitted"] = now
      admitted.append(request)
    return admitted

  def lane_bucket(self, n: int) -> int:
    """Lanes of a prefill part feeding n requests: the next power of two, at most
    prefill_lanes."""
    return min(1 << max(n - 1, 0).bit_length(), self.prefill_lanes)

  def plan(self, context_index: Mapping[str, int], reroute_every: int = 1,
           reroute_all: bool = False) -> StepPlan | None:
    """The next step over the active requests (None when there is none).

    context_index: context name -> the index the step's contexts have (a slot's index is
      looked up again whenever the mapping changes).
    reroute_every: decode steps between a request's routings; reroute_all forces every row.
    """
    if not self.active:
      return None
    B, T, c = self.max_batch, self.prefill_chunk, self.cache
    if context_index != self._indexed:  # a few names: cheaper than a lookup per request
      self._context[self._held], self._indexed = -1, dict(context_index)
    for s in np.flatnonzero(self._context < 0).tolist():
      self._context[s] = context_index[self.active[s].context]
    decoding = self._decoding
    d = np.flatnonzero(decoding)
    decode_slots = d.tolist()
    last = np.zeros((B,), np.int32)
    last[d] = [self.active[s].tokens[-1] for s in decode_slots]
    lane_slots = sorted(np.flatnonzero(self._held & ~decoding).tolist(),
                        key=lambda s: self.active[s].id)[:self.prefill_lanes]
    # The decode part: every slot a row; rows of slots not decoding are padding.
    dec = Part(last[:, None],
               np.where(decoding[:, None], c.block_tables, 0),
               np.where(decoding, c.lengths, 0), decoding.astype(np.int32),
               np.where(decoding, self._context, 0))
    reroute = np.full((B,), reroute_all)
    if not reroute_all:
      reroute = decoding & ((self._count - 1) % reroute_every == 0)
    lanes, lane = None, np.array(lane_slots, np.intp)
    if lane_slots:
      lanes = _part(self.lane_bucket(len(lane_slots)), T, c.block_tables.shape[1])
      for i, s in enumerate(lane_slots):
        r = self.active[s]
        chunk = r.prompt[r.fed:r.fed + T]
        lanes.tokens[i, :len(chunk)], lanes.fed[i] = chunk, len(chunk)
      n = len(lane_slots)
      lanes.tables[:n], lanes.lengths[:n] = c.block_tables[lane], c.lengths[lane]
      lanes.context[:n] = self._context[lane]
    # Sampling rows: a decode slot's row is its slot, a lane's max_batch + its lane; padding
    # rows are greedy; index = which of its tokens a row samples.
    n = B + (0 if lanes is None else lanes.tokens.shape[0])
    rows, slots = np.concatenate([d, B + np.arange(len(lane))]), np.concatenate([d, lane])
    sampling = SamplingRows(np.zeros((n,), np.float32), np.ones((n,), np.float32),
                            np.zeros((n,), np.uint32), np.zeros((n,), np.int32))
    for column, per_slot in zip(sampling, self._sampling + (self._count,)):
      column[rows] = per_slot[slots]
    return StepPlan(decode_slots, lane_slots, dec, lanes, reroute, sampling,
                    bool(self._keep[slots].any()))

  def advance(self, plan: StepPlan, next_tokens: np.ndarray,
              logits: np.ndarray | None = None) -> list[Request]:
    """Records a step that ran: the caches grew by what each slot fed; every request whose
    logits predict its next token takes next_tokens[row] (and logits[row] when kept), row = its
    decode slot or max_batch + its lane. Requests that are then done are retired (their
    `finish_reason` set). Returns the requests that took a token."""
    lengths, now = self.cache.lengths, time.perf_counter()
    slots = plan.decode_slots[:]
    rows = slots[:]
    lengths[slots] += 1
    for lane, s in enumerate(plan.lane_slots):
      r, fed = self.active[s], int(plan.lanes.fed[lane])
      lengths[s] += fed
      r.fed += fed
      if not r.prefilling:  # else more prompt to feed: these logits are not a prediction yet
        self._decoding[s] = True
        slots.append(s)
        rows.append(self.max_batch + lane)
    tokens = np.asarray(next_tokens)[rows]
    self._count[slots] += 1
    took = [self.active[s] for s in slots]
    for r, token in zip(took, tokens.tolist()):
      r.tokens.append(token)
    count = self._count[slots]
    for i in np.flatnonzero(count == 1).tolist():
      took[i].times["first_token"] = now
    if logits is not None:
      for i in np.flatnonzero(self._keep[slots]).tolist():
        took[i].logits.append(logits[rows[i]])
    stop = tokens == self._eos[slots]
    for i in np.flatnonzero(stop | (count == self._max_new[slots])).tolist():
      self._end(took[i], "stop" if stop[i] else "length", None, slots[i])
    return took

  def slot_of(self, request: Request) -> int | None:
    for s, r in self.active.items():
      if r is request:
        return s
    return None

  def finish(self, request: Request, reason: str, error: str | None = None) -> None:
    """Ends a request, queued or active: its slot and pages are free at once. The caller
    notifies it (`Request.on_event`, `finished_event`)."""
    if reason not in FINISH_REASONS:
      raise ValueError(f"finish: reason must be one of {FINISH_REASONS}, got {reason!r}")
    slot = self.slot_of(request)
    if slot is None and request in self.queue:
      self.queue.remove(request)
    self._end(request, reason, error, slot)

  def _end(self, request: Request, reason: str, error: str | None, slot: int | None) -> None:
    if slot is not None:
      self.retire(slot)
    request.finish_reason, request.error = reason, error
    request.times["finished"] = time.perf_counter()

  def retire(self, slot: int) -> Request:
    """Frees `slot`: its pages return to the cache."""
    self.cache.free(slot)
    self._held[slot] = self._decoding[slot] = False
    self._context[slot] = 0
    return self.active.pop(slot)


def _part(B: int, T: int, max_pages: int) -> Part:
  """A host part of B rows of padding (tables: the scratch page; context 0)."""
  return Part(np.zeros((B, T), np.int32), np.zeros((B, max_pages), np.int32),
              np.zeros((B,), np.int32), np.zeros((B,), np.int32), np.zeros((B,), np.int32))
