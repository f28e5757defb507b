"""The plain decoder as a reference for the engine tests: jitted, one batch of sequences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _plain(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def plain_logits(model, sequences) -> np.ndarray:
  """The plain causal decoder's logits [n, L, vocab] over n token sequences, each padded at the
  end to L, the longest rounded up to 64 (padding after a token cannot change its logits; fewer
  shapes to compile). One jitted call: run eagerly, op by op, every sequence length compiled
  each of the decoder's few hundred ops anew."""
  L = -(-max(len(x) for x in sequences) // 64) * 64
  tokens = jnp.asarray([list(x) + [0] * (L - len(x)) for x in sequences], jnp.int32)
  return np.asarray(_plain(*nnx.split(model), tokens))
