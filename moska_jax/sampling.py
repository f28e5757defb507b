"""Per-request sampling: each request draws its tokens from its own random stream.

The noise of a request's j-th sampled token comes from `fold_in(key(seed), j)`, its seed and
the token's index alone, and is drawn per row (`vmap`), so a request's tokens are a function of
its prompt, its `Sampling` (temperature, top_p, seed) and its context only: the same alone or
beside other requests, in any slot, at any max_batch and in any queue order (vLLM's per-request
seed). Greedy rows (temperature 0) take the argmax and use no noise.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SEED_RANGE = 1 << 32  # seeds are uint32: jax.random.key's range


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one request picks its tokens.

  temperature: 0 = greedy (argmax); > 0 samples softmax(logits / temperature).
  top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: all).
  seed: the request's random stream, an int in [0, 2**32); None with temperature > 0 lets the
    engine draw one (kept in `Request.sampling`, so the request can be replayed).
  """

  temperature: float = 0.0
  top_p: float = 1.0
  seed: int | None = None

  def __post_init__(self):
    t, p = self.temperature, self.top_p
    number = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_))
    # Rows sample in float32: a larger temperature would be inf there. A Python float bound: an
    # int too large for a float compares with it exactly (a NumPy one would overflow)
    if not number(t) or not 0 <= t <= float(np.finfo(np.float32).max):
      raise ValueError(f"Sampling.temperature must be a number in [0, float32 max], got {t!r}")
    if not number(p) or not 0 < p <= 1:
      raise ValueError(f"Sampling.top_p must be a number in (0, 1], got {p!r}")
    s = self.seed
    if s is not None and (isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))
                          or not 0 <= s < SEED_RANGE):
      raise ValueError(f"Sampling.seed must be None or an int in [0, 2**32), got {s!r}")
    # NumPy scalars in, Python numbers kept: the engine hashes and compares them as such
    object.__setattr__(self, "temperature", float(t))
    object.__setattr__(self, "top_p", float(p))
    object.__setattr__(self, "seed", None if s is None else int(s))

  def seeded(self) -> Sampling:
    """This sampling with a drawn seed when it samples (temperature > 0) without one: what a
    request keeps, so that it can be replayed."""
    if self.temperature > 0 and self.seed is None:
      return dataclasses.replace(self, seed=secrets.randbelow(SEED_RANGE))
    return self


class SamplingRows(NamedTuple):
  """Each row's sampling parameters, [R] each: temperature, top_p (float32), seed (uint32) and
  index (int32, which of its request's tokens the row samples)."""

  temperature: jax.Array
  top_p: jax.Array
  seed: jax.Array
  index: jax.Array


def _nucleus(scaled: jax.Array, top_p: jax.Array) -> jax.Array:
  """[R, V] mask of each row's nucleus: the fewest most likely tokens whose mass reaches top_p
  (ties ranked by token id, as a stable sort leaves them; a threshold on the logits would keep
  every token tied with the last one), the most likely token always (also for a top_p that
  rounds to 0 in float32)."""
  order = jnp.argsort(-scaled, axis=-1, stable=True)
  probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
  kept = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]).at[:, 0].set(True)
  rows = jnp.arange(scaled.shape[0])[:, None]
  return jnp.zeros(scaled.shape, bool).at[rows, order].set(kept)


def branches(rows: SamplingRows) -> dict[str, bool]:
  """The branches `sample` takes for rows held on the host (NumPy): `draw`, whether any row
  samples, and `nucleus`, whether any sampled row keeps top_p < 1."""
  hot = np.asarray(rows.temperature) > 0
  return dict(draw=bool(hot.any()), nucleus=bool((hot & (np.asarray(rows.top_p) < 1)).any()))


def sample(logits: jax.Array, rows: SamplingRows, *, draw: bool, nucleus: bool) -> jax.Array:
  """Next tokens [R] int32 from logits [R, V], each row with its own parameters and stream.

  Noise is drawn in vocabulary order and top_p masks tokens in place, so a row's token never
  depends on which branch the batch takes (whether any row samples, whether any row has
  top_p < 1).

  draw, nucleus: those branches, as `branches(rows)` gives them from the rows on the host
    (static under jit; True is always right, only slower). They are not decided on the device:
    a `lax.cond` would make a GPU host wait until the device has computed its predicate.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not draw:
    return greedy
  hot = rows.temperature > 0
  keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(rows.seed, rows.index)
  # Shifted by the row's largest logit first: a tiny temperature sends the others to -inf, never
  # every positive logit to +inf (where categorical would take the first, not the largest).
  scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / jnp.where(
      hot, rows.temperature, 1.0)[:, None]
  keep = (_nucleus(scaled, rows.top_p) if nucleus else jnp.ones(scaled.shape, bool)) | (
      rows.top_p >= 1)[:, None]
  masked = jnp.where(keep, scaled, -jnp.inf)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(hot, drawn, greedy)
