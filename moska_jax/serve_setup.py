"""What `python -m moska_jax.serve` serves, importable without its command-line flags: the
engine built from a spec (a model preset or checkpoint, contexts from paths, a tokenizer), and
the stores of contexts loaded while serving (`engine_context_store`, the loader an
`EngineProcess` runs in its core)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

DEFAULT_CONTEXT = (
    "MoSKA, Mixture of Shared KV Attention, serves many concurrent requests that share one "
    "large context. Every request's queries attend to the same shared keys and values, so the "
    "engine stacks the queries of all requests into one matrix and reads the shared KV once per "
    "step: the shared part of attention becomes one compute-bound matrix product instead of a "
    "memory-bound product per request. Each request keeps a short unique context of its own in "
    "a paged cache, and the two partial attentions are merged exactly by their log-sum-exp. "
    "The shared KV is cut into chunks, like experts of a mixture: a router keeps the chunks a "
    "request needs and skips the rest. This server answers OpenAI-style completion requests; "
    "a request may name the shared context it reads with the context field.\n")


class TokenizerJson:
  """A Hugging Face `tokenizers` tokenizer.json as the engine's encode / decode pair."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # the serve extra

    self._tok = Tokenizer.from_file(path)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, tokens: Sequence[int]) -> str:
    return self._tok.decode([int(t) for t in tokens], skip_special_tokens=False)


def build_tokenizer(path: str | None):
  """A tokenizer.json's tokenizer, or UTF-8 bytes when path is None."""
  from moska_jax.engine import ByteTokenizer

  return TokenizerJson(path) if path else ByteTokenizer()


def context_store(decoder, path: str | None, encode: Callable[[str], list[int]], mcfg):
  """The store a --context PATH names: a saved store's directory (`save_shared_store`; its
  summaries remade at mcfg's chunk size and summary kind in sparse mode), else a UTF-8 text file
  encoded by `encode` and prefilled through `decoder` (None: the built-in default text)."""
  from moska_jax.kv_cache import load_shared_store
  from moska_jax.prefill import build_shared_store

  if path is not None and os.path.isdir(path):
    store = load_shared_store(path, decoder.cfg)
    if mcfg.mode == "sparse" and (store.chunk_size, store.summaries[0].kind) != (
        mcfg.chunk_size, mcfg.summary):
      store = store.with_summaries(mcfg.chunk_size, mcfg.summary)
  else:
    if path is None:
      text = DEFAULT_CONTEXT
    else:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    store = build_shared_store(decoder, np.asarray(encode(text), np.int32),
                               chunk_size=mcfg.chunk_size, summary=mcfg.summary,
                               backend=mcfg.backend)
  logging.info("context from %s: %d shared tokens", path or "the default text", int(store.length))
  return store


def engine_context_store(engine, path: str | None):
  """`context_store` for a built engine: its model, tokenizer and MoskaConfig. As a
  `functools.partial(engine_context_store, path=PATH)` it is the loader
  `EngineProcess.load_context` runs in the engine's process."""
  from flax import nnx

  return context_store(nnx.merge(engine.graphdef, engine.state), path, engine.encode,
                       engine.mcfg)


def build_engine(*, model: str = "tiny", checkpoint: str | None = None,
                 contexts: dict[str, str] | None = None, max_batch: int = 8,
                 num_pages: int = 256, page_size: int = 16, prefill_chunk: int = 32,
                 prefill_lanes: int | None = None, mode: str = "dense", sparsity: float = 0.75,
                 chunk_size: int = 128, backend: str = "auto", tokenizer: str | None = None,
                 seed: int = 0):
  """The engine `python -m moska_jax.serve` serves (the arguments are its flags)."""
  from flax import nnx

  from moska_jax import checkpoint as ckpt
  from moska_jax.config import MoskaConfig, llama3_1_8b, tiny
  from moska_jax.engine import ByteTokenizer, MoskaEngine
  from moska_jax.model import Decoder

  presets = {"tiny": tiny, "llama3_1_8b": llama3_1_8b}
  if checkpoint:
    decoder = ckpt.load_params(checkpoint)
  elif model in presets:
    decoder = Decoder(presets[model](), rngs=nnx.Rngs(seed))
  else:
    raise ValueError(f"--model must be one of {sorted(presets)} (or give --checkpoint), got "
                     f"{model!r}")
  if checkpoint and not tokenizer and decoder.cfg.vocab != ByteTokenizer.vocab:
    # Trained weights answer in their own token ids: bytes would misread prompt and answer.
    raise ValueError(f"--checkpoint: a model of {decoder.cfg.vocab} token ids needs its "
                     f"--tokenizer (a tokenizer.json); the default tokenizer is UTF-8 bytes "
                     f"({ByteTokenizer.vocab} ids)")
  tok = build_tokenizer(tokenizer)
  mcfg = MoskaConfig(mode=mode, chunk_size=chunk_size, backend=backend,
                     sparsity=sparsity if mode == "sparse" else None)
  stores = {name: context_store(decoder, path, tok.encode, mcfg)
            for name, path in (contexts or {"default": None}).items()}
  return MoskaEngine(decoder, stores, mcfg, max_batch=max_batch, num_pages=num_pages,
                     page_size=page_size, prefill_chunk=prefill_chunk,
                     prefill_lanes=prefill_lanes, tokenizer=tok)
