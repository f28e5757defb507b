"""The synthetic long-context key-value retrieval task of `train_retrieval` and `accuracy`.

A document (the shared context) is BOS followed by records `key value filler filler` (or `value
key filler filler` with value_first): every key
appears once, its value is uniform at random, and the two filler tokens are noise. A question (the
unique context) is `QUERY key`; the answer is the key's value, one token. Keys, values and filler
come from disjoint ranges of one small vocabulary, and every document draws a fresh pairing, so
the only way to answer is to find the record in the context (an induction head: attend to the
position whose previous token is the key, copy its token). Chance is 1 / num_values.

Training sequences are `document, QUERY k1 v1, QUERY k2 v2, ...`: the loss is on the answers only.
Questions ask distinct records, at most a quarter of them: asking (nearly) all records lets a model
answer the last questions by elimination (the value of the record not asked yet), a shortcut a
first version of this task taught instead of retrieval.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BOS, QUERY = 1, 2
_SPECIALS = 4  # 0 (pad) and 3 are reserved
RECORD = 4  # tokens per record: key, value, filler, filler
FILLERS = 16


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
  """Vocabulary layout: specials, then keys, then values, then filler tokens."""

  num_keys: int = 2048
  num_values: int = 128
  value_first: bool = False  # records `value key ...`: the question's key then matches a token

  @property
  def vocab(self) -> int:
    return _SPECIALS + self.num_keys + self.num_values + FILLERS

  @property
  def first_value(self) -> int:
    return _SPECIALS + self.num_keys

  def records_for(self, doc_tokens: int) -> int:
    """Records in a document of `doc_tokens` tokens (BOS included)."""
    n = (doc_tokens - 1) // RECORD
    if not 1 <= n <= self.num_keys:
      raise ValueError(f"RetrievalTask: a document of {doc_tokens} tokens holds {n} records; "
                       f"need 1..num_keys={self.num_keys} (4 tokens a record)")
    return n

  def max_questions(self, doc_tokens: int) -> int:
    """Questions one training sequence may ask: a quarter of its records (at least one)."""
    return max(1, self.records_for(doc_tokens) // 4)

  def documents(self, rng: np.random.Generator, batch: int, doc_tokens: int,
                key_pool: int | None = None):
    """batch documents -> (tokens[batch, doc_tokens] int32, keys[batch, n], values[batch, n]).

    key_pool: draw keys from the first key_pool keys only (default all; at least n).
    """
    n = self.records_for(doc_tokens)
    pool = self.num_keys if key_pool is None else key_pool
    if not n <= pool <= self.num_keys:
      raise ValueError(f"RetrievalTask: key_pool must be in [{n}, {self.num_keys}], got {pool}")
    keys = _SPECIALS + np.argsort(rng.random((batch, pool)), axis=1)[:, :n]
    values = self.first_value + rng.integers(0, self.num_values, (batch, n))
    filler = self.first_value + self.num_values + rng.integers(0, FILLERS, (batch, n, 2))
    pair = (values, keys) if self.value_first else (keys, values)
    records = np.concatenate([pair[0][..., None], pair[1][..., None], filler], axis=2)
    tokens = np.full((batch, doc_tokens), BOS, np.int32)
    tokens[:, 1:1 + n * RECORD] = records.reshape(batch, -1)
    tail = doc_tokens - 1 - n * RECORD  # fewer than RECORD tokens left: filler
    tokens[:, doc_tokens - tail:] = self.first_value + self.num_values
    return tokens, keys.astype(np.int32), values.astype(np.int32)

  def training_batch(self, rng: np.random.Generator, batch: int, doc_tokens: int,
                     questions: int, key_pool: int | None = None):
    """(tokens[batch, L], targets[batch, L]) with L = doc_tokens + 3 * questions.

    targets[b, t] is the token that must follow position t (an answer), or -1 (no loss).
    """
    tokens, keys, values = self.documents(rng, batch, doc_tokens, key_pool)
    n = keys.shape[1]
    if not 1 <= questions <= self.max_questions(doc_tokens):
      raise ValueError(f"RetrievalTask: ask 1..{self.max_questions(doc_tokens)} questions of a "
                       f"{n}-record document, got {questions}")
    pick = np.argsort(rng.random((batch, n)), axis=1)[:, :questions]
    qk = np.take_along_axis(keys, pick, 1)
    qv = np.take_along_axis(values, pick, 1)
    qa = np.stack([np.full_like(qk, QUERY), qk, qv], axis=2).reshape(batch, -1)
    seq = np.concatenate([tokens, qa], axis=1)
    targets = np.full(seq.shape, -1, np.int32)
    answer_pos = doc_tokens + 3 * np.arange(questions) + 1  # the key's position
    targets[:, answer_pos] = qv
    return seq, targets

  def questions(self, keys: np.ndarray, rng: np.random.Generator, count: int):
    """`count` distinct records of one document's keys[n] -> (prompts [QUERY, key], indices)."""
    idx = rng.choice(keys.shape[0], size=min(count, keys.shape[0]), replace=False)
    return [[QUERY, int(keys[i])] for i in idx], idx
