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
  decode_steps: decode steps it ran (it re-routes on multiples of `MoskaConfig.reroute_every`).
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
  decode_steps: int = 0
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
  def prefilling(self) -> bool:
    return self.fed < len(self.prompt)

  @property
  def done(self) -> bool:
    """It finished (see finish_reason)."""
    return self.finish_reason is not None

  def _end_reason(self) -> str | None:
    if self.tokens and self.tokens[-1] == self.eos_id:
      return "stop"
    return "length" if len(self.tokens) == self.max_new else None


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
    # Per slot its request's temperature, top_p and seed (written at admission), so a step's
    # sampling rows are gathered, not rebuilt from every request.
    self._sampling = (np.zeros((max_batch,), np.float32), np.ones((max_batch,), np.float32),
                      np.zeros((max_batch,), np.uint32))
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

    context_index: context name -> the index the step's contexts have.
    reroute_every: decode steps between a request's routings; reroute_all forces every row.
    """
    if not self.active:
      return None
    B, T, c = self.max_batch, self.prefill_chunk, self.cache
    # Per-request Python only to gather fields; the rows are written with fancy indexing.
    decode, prefilling = [], []
    for s, r in self.active.items():
      if r.fed < len(r.prompt):
        prefilling.append((r.id, s))
      else:
        decode.append((s, r))
    lane_slots = [s for _, s in sorted(prefilling)[:self.prefill_lanes]]
    decode_slots = [s for s, _ in decode]
    dec = _part(B, 1, c.block_tables.shape[1])
    d = np.array(decode_slots, np.intp)
    dec.tokens[d, 0] = [r.tokens[-1] for _, r in decode]
    dec.fed[d] = 1
    dec.tables[d], dec.lengths[d] = c.block_tables[d], c.lengths[d]
    dec.context[d] = [context_index[r.context] for _, r in decode]
    rows, live = decode_slots[:], [r for _, r in decode]  # the step's rows that hold a request
    reroute = np.full((B,), reroute_all)
    if not reroute_all:
      reroute[d] = [r.decode_steps % reroute_every == 0 for _, r in decode]
    lanes = None
    if lane_slots:
      lanes = _part(self.lane_bucket(len(lane_slots)), T, c.block_tables.shape[1])
      for lane, s in enumerate(lane_slots):
        r = self.active[s]
        chunk = r.prompt[r.fed:r.fed + T]
        lanes.tokens[lane, :len(chunk)], lanes.fed[lane] = chunk, len(chunk)
        lanes.context[lane] = context_index[r.context]
        rows.append(B + lane)
        live.append(r)
      lanes.tables[:len(lane_slots)] = c.block_tables[lane_slots]
      lanes.lengths[:len(lane_slots)] = c.lengths[lane_slots]
    # Sampling rows: padding rows are greedy; index = which of its tokens a row samples.
    n = B + (0 if lanes is None else lanes.tokens.shape[0])
    sampling = SamplingRows(np.zeros((n,), np.float32), np.ones((n,), np.float32),
                            np.zeros((n,), np.uint32), np.zeros((n,), np.int32))
    for column, per_slot in zip(sampling, self._sampling):
      column[rows] = per_slot[decode_slots + lane_slots]
    sampling.index[rows] = [len(r.tokens) for r in live]
    return StepPlan(decode_slots, lane_slots, dec, lanes, reroute, sampling,
                    any([r.keep_logits for r in live]))

  def advance(self, plan: StepPlan, next_tokens: np.ndarray,
              logits: np.ndarray | None = None) -> list[Request]:
    """Records a step that ran: the caches grew by what each slot fed; every request whose
    logits predict its next token takes next_tokens[row] (and logits[row] when kept), row = its
    decode slot or max_batch + its lane. Requests that are then done are retired (their
    `finish_reason` set). Returns the requests that took a token."""
    lengths, now = self.cache.lengths, time.perf_counter()
    lengths[plan.decode_slots] += 1
    sampled = next_tokens.tolist()
    took = []  # (slot, request, row)
    for s in plan.decode_slots:
      r = self.active[s]
      r.decode_steps += 1
      took.append((s, r, s))
    for lane, s in enumerate(plan.lane_slots):
      r, fed = self.active[s], int(plan.lanes.fed[lane])
      lengths[s] += fed
      r.fed += fed
      if not r.prefilling:  # else more prompt to feed: these logits are not a prediction yet
        took.append((s, r, self.max_batch + lane))
    for s, r, row in took:
      r.tokens.append(sampled[row])
      if r.keep_logits and logits is not None:
        r.logits.append(logits[row])
      if len(r.tokens) == 1:
        r.times["first_token"] = now
      reason = r._end_reason()
      if reason:
        self._end(r, reason, None, s)
    return [r for _, r, _ in took]

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
    return self.active.pop(slot)


def _part(B: int, T: int, max_pages: int) -> Part:
  """A host part of B rows of padding (tables: the scratch page; context 0)."""
  return Part(np.zeros((B, T), np.int32), np.zeros((B, max_pages), np.int32),
              np.zeros((B,), np.int32), np.zeros((B,), np.int32), np.zeros((B,), np.int32))
