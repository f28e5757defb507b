"""A peer reference: a tiny random Llama-3.1-style model saved by Hugging Face `transformers`, with
the logits and greedy tokens transformers computed for it (tests/data/make_hf_reference.py says
how and with which versions). The plain decoder and MoskaEngine, dense and sparse at top_k = N,
must reproduce them from the safetensors file alone."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from moska_jax import MoskaConfig, MoskaEngine, build_shared_store
from moska_jax.checkpoint import load_hf_llama
from moska_jax.config import ModelConfig, RopeScaling

pytest.importorskip("safetensors")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf_llama_tiny")
# float32 on both sides; the sequences are ~2,500 tokens with peaked attention.
RTOL, ATOL = 1e-4, 1e-4


def model_config(directory: str) -> ModelConfig:
  """The ModelConfig of a Hugging Face Llama config.json with llama3 RoPE scaling (transformers 5
  writes `rope_parameters`, 4.x `rope_scaling` beside a top-level `rope_theta`)."""
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  rope = hf.get("rope_parameters") or hf["rope_scaling"]
  assert rope["rope_type"] == "llama3", rope
  return ModelConfig(
      vocab=hf["vocab_size"], layers=hf["num_hidden_layers"], hidden=hf["hidden_size"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf["head_dim"], mlp_hidden=hf["intermediate_size"],
      rope_theta=rope.get("rope_theta", hf.get("rope_theta")),
      rope_scaling=RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                               high_freq_factor=rope["high_freq_factor"],
                               original_max_position=rope["original_max_position_embeddings"]),
      norm_eps=hf["rms_norm_eps"], dtype="float32")


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(DATA, "reference.npz")) as z:
    out = dict(z)
  out["prompts"] = [out.pop(f"prompt_{r}").tolist() for r in range(len(out["tokens"]))]
  return out


@pytest.fixture(scope="module")
def model():
  return load_hf_llama(DATA, model_config(DATA))


# The plain decoder over ~2,500 tokens is bound by its run time (attention over every pair of
# tokens): compiled at XLA's default optimization level, not the suite's 0 (conftest.py, for
# compile time), it runs ~2.5x faster on the CPU.
_plain = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens),
                 static_argnums=0, compiler_options={"xla_backend_optimization_level": 3})


def _full_logits(model, ref, rows) -> list[np.ndarray]:
  """Plain decoder logits over [shared + prompt r + its first NEW - 1 greedy tokens], for each r
  of rows (one batch, padded at the end: padding after a token cannot change its logits)."""
  seqs = [ref["shared"].tolist() + ref["prompts"][r] + ref["tokens"][r, :-1].tolist() for r in rows]
  L = max(map(len, seqs))
  tokens = np.array([seq + [0] * (L - len(seq)) for seq in seqs], np.int32)
  logits = np.asarray(_plain(*nnx.split(model), tokens))
  return [lg[:len(seq)] for lg, seq in zip(logits, seqs)]


def test_reference_exercises_llama3_rope_scaling(ref):
  cfg = model_config(DATA)
  assert cfg.rope_scaling is not None and cfg.num_heads > cfg.num_kv_heads
  assert len(ref["shared"]) > 8 * cfg.rope_scaling.original_max_position
  assert ref["margin"] > 100 * ATOL  # greedy choices are not decided by rounding


def test_plain_decoder_matches_transformers(model, ref):
  new = ref["tokens"].shape[1]
  rows = range(len(ref["prompts"]))
  for r, logits in zip(rows, _full_logits(model, ref, rows)):
    np.testing.assert_allclose(logits[-new:], ref["step_logits"][r], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(logits[-new:].argmax(-1), ref["tokens"][r])
    if r == 0:
      np.testing.assert_allclose(logits[ref["positions"]], ref["position_logits"], rtol=RTOL,
                                 atol=ATOL)


def test_without_rope_scaling_the_logits_differ(model, ref):
  # The reference must be able to catch a wrong RoPE: the same weights, unscaled frequencies.
  unscaled = load_hf_llama(DATA, dataclasses.replace(model.cfg, rope_scaling=None))
  (logits,) = _full_logits(unscaled, ref, [0])
  new = ref["tokens"].shape[1]
  assert np.abs(logits[-new:] - ref["step_logits"][0]).max() > 1000 * ATOL


@pytest.fixture(scope="module")
def store(model, ref):
  return build_shared_store(model, ref["shared"], chunk_size=256)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_engine_matches_transformers(model, ref, store, mode):
  n = store.summaries[0].num_chunks
  mcfg = (MoskaConfig() if mode == "dense" else
          MoskaConfig(mode="sparse", top_k=n, chunk_size=store.chunk_size))
  engine = MoskaEngine(model, store, mcfg, max_batch=len(ref["prompts"]), num_pages=16)
  results = engine.generate(ref["prompts"], ref["tokens"].shape[1], return_logits=True)
  for r, res in enumerate(results):
    assert res.tokens == ref["tokens"][r].tolist(), (mode, r)
    np.testing.assert_allclose(np.stack(res.logits), ref["step_logits"][r], rtol=RTOL, atol=ATOL)
