"""One MoSKA step of the decoder over a batch of requests, as a pure function of its state.

A step feeds T tokens to each of B requests (T = 1: decode; T > 1: a chunk of the unique prompt).
In every layer `moska_attend` zeroes the padding query rows, runs the shared half (dense or
routed attention over the shared store) and the unique half (the new K/V appended to the
request's pages, then paged attention), and merges the two partials exactly. The page pools are
the decoder's per-layer state: they go in and come out as values (`Decoder.forward`).

`moska_step` is that step on one device: pure and jittable (the engine jits it; experiments
call it directly). The disaggregated engine runs the same parts (`zero_padding`, the kernels) in
one program over both device groups and merges the halves across them
(`moska_jax.engine.GroupsExecutor`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from moska_jax.attention import SharedLayer, shared_partial, unique_partial
from moska_jax.config import MoskaConfig
from moska_jax.model import Attend, Decoder

Pages = tuple[jax.Array, jax.Array]  # one layer's (k_pages, v_pages) [P, page_size, Hkv, D]
# shared(layer, q[B, T, Hq, D]) -> (o, lse) over the shared KV
SharedPart = Callable[[int, jax.Array], tuple[jax.Array, jax.Array]]
# unique(q, k, v, pages) -> ((o, lse), pages): `unique_partial` with the step's tables and lengths
UniquePart = Callable[[jax.Array, jax.Array, jax.Array, Pages],
                      tuple[tuple[jax.Array, jax.Array], Pages]]

# zero_padding and merge_halves are jitted so that an eager caller runs each as one program;
# inside a jitted step they are inlined.


@jax.jit
def zero_padding(q: jax.Array, fed: jax.Array) -> jax.Array:
  """Zeroes the query rows past fed[b] (padding of a fixed-shape step): their outputs are never
  read, and a zero row takes no part in the router's score (`routing.route`), so padding cannot
  steer routing."""
  valid = jnp.arange(q.shape[1])[None, :] < fed[:, None]
  return jnp.where(valid[:, :, None, None], q, jnp.zeros((), q.dtype))


@jax.jit
def merge_halves(o_u: jax.Array, lse_u: jax.Array, o_s: jax.Array, lse_s: jax.Array) -> jax.Array:
  """The attention output over unique + shared KV from the two partials."""
  return pk.merge_attention_states(o_u, lse_u, o_s, lse_s)[0]


def moska_attend(shared: SharedPart, unique: UniquePart, fed: jax.Array | None) -> Attend:
  """The decoder's `attend` for a MoSKA step; its layer state is the layer's `Pages`.

  Args:
    shared: the shared half (`shared_partial` on one device; the cross-group step on groups).
    unique: the unique half (`unique_partial` bound to the step's tables and lengths).
    fed: [B] real tokens per request (the rest of the T rows is padding), or None (all real).
  """
  def attend(i, q, k, v, pages):
    if fed is not None:
      q = zero_padding(q, fed)
    o_s, lse_s = shared(i, q)  # issued first: on device groups it runs beside the unique half
    (o_u, lse_u), pages = unique(q, k, v, pages)
    return merge_halves(o_u, lse_u, o_s, lse_s), pages

  return attend


def step_positions(shared_length, lengths, T: int):
  """Positions [B, T] of the step's tokens: after the shared tokens and each request's cache."""
  return shared_length + lengths[:, None] + np.arange(T, dtype=np.int32)[None]


def moska_step(model: Decoder, shared: Sequence[SharedLayer], pools: Sequence[Pages],
               tables: jax.Array, lengths: jax.Array, tokens: jax.Array, mcfg: MoskaConfig, *,
               fed: jax.Array | None = None) -> tuple[jax.Array, tuple[Pages, ...]]:
  """Feeds tokens[B, T] to every request; pure, so it can be jitted (donate `pools`).

  Args:
    model: the decoder (inside jit: `nnx.merge(graphdef, state)`).
    shared: per layer the shared store's `SharedLayer` (`SharedKVStore.layers`).
    pools: per layer the unique cache's `Pages`.
    tables: [B, max_pages] int32 page ids of each request.
    lengths: [B] int32 tokens each request has cached before this step.
    tokens: [B, T] int32.
    mcfg: dense or sparse shared attention, kernel backend.
    fed: [B] int32, the first fed[b] tokens of row b are real and the rest padding (default:
      all T).

  Returns:
    logits [B, T, vocab] float32 and the updated pools (the T tokens written at each request's
    lengths[b] onward).
  """
  unique = functools.partial(unique_partial, tables=tables, lengths=lengths, mcfg=mcfg)
  attend = moska_attend(lambda i, q: shared_partial(q, shared[i], mcfg), unique, fed)
  return model.forward(tokens, step_positions(shared[0].length, lengths, tokens.shape[1]), attend,
                       pools)
