"""A Llama-style decoder (Flax NNX) whose attention is MoskaAttention.

`Decoder.forward(tokens, positions, attend, state)` runs the blocks and calls
`attend(layer, q, k, v, state[layer]) -> (o, new layer state)` for the attention of each layer,
and returns the logits with the new per-layer states: the attention's state (page pools, the
shared store being prefilled) goes in and comes out as values, so a forward is a pure function
that jit traces once. One set of weights serves every path: `Decoder.__call__` is the plain
causal decoder (the reference MoSKA must equal, and the training forward); the shared-store
prefill (`prefill`) and the MoSKA step (`step`) pass their own `attend`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moska_jax.attention import MoskaAttention, causal_attention, rope_frequencies
from moska_jax.config import ModelConfig
from pallas_kernels.checks import host_values

# attend(layer, q[B, T, Hq, D], k[B, T, Hkv, D], v, layer_state) -> (o[B, T, Hq, D], layer_state)
Attend = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def stateless(attention: Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]) -> Attend:
  """The `Attend` of an attention that keeps no state: attention(layer, q, k, v) -> o."""
  return lambda i, q, k, v, layer_state: (attention(i, q, k, v), layer_state)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
    self.gate = lin(cfg.hidden, cfg.mlp_hidden)
    self.up = lin(cfg.hidden, cfg.mlp_hidden)
    self.down = lin(cfg.mlp_hidden, cfg.hidden)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.jnp_dtype)
    self.attn = MoskaAttention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.jnp_dtype)
    self.mlp = SwiGLU(cfg, rngs=rngs)


class Decoder(nnx.Module):
  """Embedding, `cfg.layers` blocks, final RMSNorm and an LM head (untied)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.hidden, dtype=dt, param_dtype=dt, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, dt)
    self.lm_head = nnx.Linear(cfg.hidden, cfg.vocab, use_bias=False, dtype=dt, param_dtype=dt,
                              rngs=rngs)

  def forward(self, tokens: jax.Array, positions: jax.Array, attend: Attend,
              state: Sequence[Any] | None = None) -> tuple[jax.Array, tuple[Any, ...]]:
    """tokens[B, T] at positions[B, T] -> (logits[B, T, vocab] float32, new state).

    state: one entry per layer handed to `attend` (default None for every layer); the new state
    is the tuple of what `attend` returned for each layer.

    Token ids must lie in [0, vocab): concrete ones are checked (ValueError); under jit an id
    outside is not seen (the embedding would clamp it: a wrong token, or NaN logits).
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
      raise ValueError(f"Decoder: tokens must be [B, T] and positions the same shape, got "
                       f"{tokens.shape} and {positions.shape}")
    if (ids := host_values(tokens)) is not None:
      self.cfg.check_tokens(ids.reshape(-1), "Decoder")
    state = (None,) * self.cfg.layers if state is None else tuple(state)
    if len(state) != self.cfg.layers:
      raise ValueError(f"Decoder: state must hold one entry per layer ({self.cfg.layers}), got "
                       f"{len(state)}")
    inv_freq = rope_frequencies(self.cfg)
    x = self.embed(tokens)
    new_state = []
    for i, blk in enumerate(self.blocks):
      q, k, v = blk.attn.project(blk.attn_norm(x), positions, inv_freq)
      o, layer_state = attend(i, q, k, v, state[i])
      new_state.append(layer_state)
      x = x + blk.attn.output(o)
      x = x + blk.mlp(blk.mlp_norm(x))
    return self.lm_head(self.norm(x)).astype(jnp.float32), tuple(new_state)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """The plain causal decoder over tokens[B, T] at positions 0..T-1 (the reference)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    causal = stateless(lambda i, q, k, v: causal_attention(q, k, v)[0])
    return self.forward(tokens, positions, causal)[0]


def plain_logits(model: Decoder, sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """The plain causal decoder's logits [n, L, vocab] over n token sequences, each padded at the
  end to L, the longest rounded up to 64 (padding after a token cannot change its logits; fewer
  shapes to compile): the reference MoSKA is checked against. One jitted call: run eagerly, op
  by op, every sequence length compiled each of the decoder's few hundred ops anew.

  Raises:
    ValueError: no sequence, an empty one, or a token id outside [0, vocab).
  """
  if not sequences or not all(len(x) for x in sequences):
    raise ValueError("plain_logits: needs at least one sequence, each of at least one token")
  for i, x in enumerate(sequences):
    model.cfg.check_tokens(np.asarray(x).reshape(-1), f"plain_logits: sequence {i}")
  L = -(-max(len(x) for x in sequences) // 64) * 64
  tokens = jnp.asarray([list(x) + [0] * (L - len(x)) for x in sequences], jnp.int32)
  return np.asarray(_plain(*nnx.split(model), tokens))


@functools.partial(jax.jit, static_argnums=0)
def _plain(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


# The parts of a decoder's state a shared store's K/V may depend on: a superset (the last
# block's MLP and q / o projections reach no stored K/V); the final norm and the LM head
# read none of them.
KV_WEIGHTS = ("embed", "blocks")


def kv_weights_fingerprint(state: nnx.State) -> str:
  """A fingerprint of the weights a shared store's K/V depend on: the embedding and every block
  (whole) of a decoder's state (`nnx.state(model)`).

  Per numeric parameter, its values' bits weighted by odd position factors and their squares
  are summed modulo 2**32 on the device: integer sums, so the same under any sharding, platform
  or reduction order, and any single changed value changes the first. These sums, with each
  parameter's shape and dtype in flattening order, are hashed (sha256) on the host. Parameter
  names are left out: their spelling differs between Flax versions.
  """
  leaves = [x for x in jax.tree.leaves([state[k] for k in KV_WEIGHTS])
            if jnp.issubdtype(x.dtype, jnp.number)]
  sums = np.asarray(_bit_sums(leaves)) if leaves else []
  h = hashlib.sha256()
  for x, s in zip(leaves, sums, strict=True):
    h.update(f"{x.shape}:{jnp.dtype(x.dtype).name}:{int(s[0])}:{int(s[1])};".encode())
  return h.hexdigest()


@jax.jit
def _bit_sums(leaves: list[jax.Array]) -> jax.Array:
  """[len(leaves), 2] uint32: per array, sum(bits * (2 i + 1)) and sum(bits ** 2) mod 2**32."""
  out = []
  for x in leaves:
    # (8-byte values become two uint32 words each)
    uint = {1: jnp.uint8, 2: jnp.uint16}.get(jnp.dtype(x.dtype).itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32).reshape(-1)
    odd = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
    out.append(jnp.stack([jnp.sum(bits * odd, dtype=jnp.uint32),
                          jnp.sum(bits * bits, dtype=jnp.uint32)]))
  return jnp.stack(out)
