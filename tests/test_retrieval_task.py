"""The synthetic retrieval task: documents, training targets and questions are consistent."""

import numpy as np
import pytest

from experiments.retrieval import BOS, QUERY, RECORD, RetrievalTask


def test_documents_hold_each_key_once_with_its_value():
  task = RetrievalTask(num_keys=64, num_values=16)
  tokens, keys, values = task.documents(np.random.default_rng(0), 3, 131)
  assert tokens.shape == (3, 131) and keys.shape == (3, 32)
  for b in range(3):
    assert tokens[b, 0] == BOS and len(set(keys[b])) == keys.shape[1]
    rec = tokens[b, 1:1 + 32 * RECORD].reshape(32, RECORD)
    np.testing.assert_array_equal(rec[:, 0], keys[b])
    np.testing.assert_array_equal(rec[:, 1], values[b])
    assert np.all((4 <= keys[b]) & (keys[b] < task.first_value))
    assert np.all((task.first_value <= values[b]) & (values[b] < task.first_value + 16))
    assert np.all(tokens[b] < task.vocab)
  swapped, keys, values = RetrievalTask(64, 16, value_first=True).documents(
      np.random.default_rng(0), 1, 131)
  rec = swapped[0, 1:1 + 32 * RECORD].reshape(32, RECORD)
  np.testing.assert_array_equal(rec[:, :2], np.stack([values[0], keys[0]], 1))


def test_training_targets_are_the_asked_keys_values():
  task = RetrievalTask(num_keys=64, num_values=16)
  seq, tgt = task.training_batch(np.random.default_rng(1), 2, 65, questions=4)
  assert seq.shape == tgt.shape == (2, 65 + 12)
  for b in range(2):
    doc = seq[b, 1:65].reshape(16, RECORD)
    lookup = dict(zip(doc[:, 0], doc[:, 1]))
    pos = np.nonzero(tgt[b] >= 0)[0]
    assert len(pos) == 4 and len(set(seq[b, pos])) == 4  # distinct records
    for p in pos:  # the target follows `QUERY key` and is that key's value; it is also next token
      assert seq[b, p - 1] == QUERY and tgt[b, p] == lookup[seq[b, p]] == seq[b, p + 1]


def test_questions_are_distinct_records_and_lengths_are_checked():
  task = RetrievalTask(num_keys=64, num_values=16)
  _, keys, _ = task.documents(np.random.default_rng(2), 1, 101)
  prompts, idx = task.questions(keys[0], np.random.default_rng(3), 10)
  assert len(set(idx)) == 10 and all(p == [QUERY, keys[0, i]] for p, i in zip(prompts, idx))
  with pytest.raises(ValueError, match="num_keys=64"):
    task.documents(np.random.default_rng(0), 1, 4 * 64 + 8)
  with pytest.raises(ValueError, match="ask 1..4 questions"):  # elimination would pay off
    task.training_batch(np.random.default_rng(0), 1, 65, questions=5)
