"""Host-side request bookkeeping of the engine: queue, slots, admission, each step's batch,
retirement. No device work here: the engine runs the step this describes and reports back.

Every request owns a slot of the fixed batch (`max_batch`) and pages of the unique cache from
admission to retirement. Admission is in arrival order, as soon as a slot and the request's page
budget (prompt + new tokens) are free (continuous batching). While any slot is still reading its
prompt, steps are prefill steps of `prefill_chunk` tokens and the decoding slots wait (no mixed
prefill/decode batches); otherwise every active slot decodes one token.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from moska_jax.kv_cache import UniqueKVCache


@dataclasses.dataclass
class Request:
  """One request: what it asked for, where it stands, what it produced.

  id: the scheduler's number for it, unique for the scheduler's lifetime.
  fed: prompt tokens already in the unique cache.
  tokens / logits: sampled tokens, and their logits when the caller keeps them.
  """

  id: int
  prompt: list[int]
  max_new: int
  eos_id: int | None = None
  fed: int = 0
  tokens: list[int] = dataclasses.field(default_factory=list)
  logits: list[np.ndarray] = dataclasses.field(default_factory=list)

  @property
  def budget(self) -> int:
    """Unique-cache tokens it may hold: prompt + new tokens."""
    return len(self.prompt) + self.max_new

  @property
  def prefilling(self) -> bool:
    return self.fed < len(self.prompt)

  @property
  def done(self) -> bool:
    """It has max_new tokens or has just sampled eos_id (kept as its last token)."""
    if not self.tokens:
      return False
    return len(self.tokens) == self.max_new or self.tokens[-1] == self.eos_id


class StepBatch(NamedTuple):
  """What one step feeds: tokens[max_batch, T] of which the first fed[slot] are real."""

  tokens: np.ndarray
  fed: np.ndarray
  prefill: bool


class Scheduler:
  """Requests waiting, requests holding slots, and the cache pages they hold.

  Args:
    cache: the unique cache whose pages and host-side tables/lengths this manages.
    max_batch: slots (the fixed batch of the compiled steps).
    prefill_chunk: prompt tokens fed per prefill step.
  """

  def __init__(self, cache: UniqueKVCache, max_batch: int, prefill_chunk: int):
    self.cache, self.max_batch, self.prefill_chunk = cache, max_batch, prefill_chunk
    self.queue: collections.deque[Request] = collections.deque()
    self.active: dict[int, Request] = {}  # slot -> request
    self._next_id = 0

  @property
  def busy(self) -> bool:
    return bool(self.queue or self.active)

  def submit(self, prompt: Sequence[int], max_new: int, eos_id: int | None = None) -> Request:
    """Queues a request (validated by the caller: non-empty, within the page budget)."""
    request = Request(self._next_id, list(prompt), max_new, eos_id)
    self._next_id += 1
    self.queue.append(request)
    return request

  def admit(self) -> None:
    """Gives free slots to queued requests, in order, while the cache has their pages."""
    for slot in range(self.max_batch):
      if (self.queue and slot not in self.active
          and self.cache.can_allocate(self.queue[0].budget)):
        request = self.queue.popleft()
        self.cache.allocate(slot, request.budget)
        self.active[slot] = request

  def batch(self) -> StepBatch:
    """The next step: a prompt chunk for every prefilling slot, else a token for every slot."""
    prefilling = {s: r for s, r in self.active.items() if r.prefilling}
    T = self.prefill_chunk if prefilling else 1
    tokens = np.zeros((self.max_batch, T), np.int32)
    fed = np.zeros((self.max_batch,), np.int32)
    for s, r in (prefilling or self.active).items():
      chunk = r.prompt[r.fed:r.fed + T] if prefilling else r.tokens[-1:]
      tokens[s, :len(chunk)] = chunk
      fed[s] = len(chunk)
    return StepBatch(tokens, fed, bool(prefilling))

  def advance(self, batch: StepBatch, next_tokens: np.ndarray,
              logits: np.ndarray | None = None) -> list[Request]:
    """Records a step that ran: the caches grew by `fed`; every slot whose logits predict its
    next token takes next_tokens[slot] (and logits[slot] when given). Requests that are then
    done are retired. Returns the requests that took a token."""
    self.cache.lengths += batch.fed
    took = []
    for s, r in list(self.active.items()):
      if not batch.fed[s]:
        continue  # a decoding slot waiting out a prefill step
      if batch.prefill:
        r.fed += int(batch.fed[s])
        if r.prefilling:
          continue  # more prompt to feed: these logits are not a prediction yet
      r.tokens.append(int(next_tokens[s]))
      if logits is not None:
        r.logits.append(logits[s])
      took.append(r)
      if r.done:
        self.retire(s)
    return took

  def retire(self, slot: int) -> Request:
    """Ends the request in `slot`: its pages return to the cache and the slot is free."""
    self.cache.free(slot)
    return self.active.pop(slot)
