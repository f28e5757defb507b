"""Bad inputs to the router (`chunk_summaries`, `route`, `oracle_route`): each is refused with a
ValueError naming the argument and the allowed range; traced lengths are not read."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moska_jax import routing
from tests.np_reference import random_normal

RNG = np.random.default_rng(0)
S, HKV, D, C = 256, 2, 16, 64  # N = 4
K = random_normal(RNG, (S, HKV, D), jnp.float32)
Q = random_normal(RNG, (2, 1, 4, D), jnp.float32)


@functools.cache
def _sums():
  """K's chunk summaries, computed at first use: not while every xdist worker collects."""
  return routing.chunk_summaries(K, C)


def _means():
  return _sums().arrays[0]

_SUMMARIES_BAD = [
    ("k-list", dict(k=K.tolist()), "k must be an array"),
    ("k-rank2", dict(k=K[:, 0]), "k must have shape [S, Hkv, D]"),
    ("k-rank4", dict(k=K[None]), "k must have shape [S, Hkv, D]"),
    ("k-int", dict(k=K.astype(jnp.int32)), "a float dtype"),
    ("k-empty", dict(k=K[:0]), "no empty axis"),
    ("chunk_size-0", dict(chunk_size=0), "chunk_size must be a positive int"),
    ("chunk_size-neg", dict(chunk_size=-64), "chunk_size must be a positive int"),
    ("chunk_size-float", dict(chunk_size=64.0), "chunk_size must be a positive int"),
    ("chunk_size-bool", dict(chunk_size=True), "chunk_size must be a positive int"),
    ("chunk_size-str", dict(chunk_size="64"), "chunk_size must be a positive int"),
    ("kv_length-neg", dict(kv_length=-1), "kv_length must be in [0, S=256], got -1"),
    ("kv_length-past-S", dict(kv_length=S + 1), "got 257"),
    ("kv_length-jnp-past-S", dict(kv_length=jnp.int32(1000)), "got 1000"),
    ("kv_length-vector", dict(kv_length=jnp.asarray([1, 2])), "kv_length must be a scalar"),
    ("kv_length-float", dict(kv_length=3.5), "kv_length must be an integer scalar"),
    ("kv_length-bool", dict(kv_length=False), "kv_length must be an integer scalar"),
    ("summary-unknown", dict(summary="median"), "summary must be one of"),
    ("summary-none", dict(summary=None), "summary must be one of"),
]


@pytest.mark.parametrize("kwargs,match", [pytest.param(*c[1:], id=c[0]) for c in _SUMMARIES_BAD])
def test_chunk_summaries_refuses(kwargs, match):
  args = dict(dict(k=K, chunk_size=C), **kwargs)
  with pytest.raises(ValueError) as e:
    routing.chunk_summaries(**args)
  assert match in str(e.value), str(e.value)


_ROUTE_BAD = [
    ("q-list", dict(q=Q.tolist()), "q must be an array"),
    ("q-rank3", dict(q=Q[0]), "q must have shape [B, T, Hq, D=16]"),
    ("q-other-D", dict(q=Q[..., :8]), "q must have shape [B, T, Hq, D=16]"),
    ("q-gqa", dict(q=Q[:, :, :3]), "Hq a multiple of Hkv=2"),
    ("q-int", dict(q=Q.astype(jnp.int32)), "a float dtype"),
    ("q-empty", dict(q=Q[:0]), "no empty axis"),
    ("top_k-0", dict(top_k=0), "top_k must be an int in [1, N=4]"),
    ("top_k-past-N", dict(top_k=5), "top_k must be an int in [1, N=4], got 5"),
    ("top_k-float", dict(top_k=2.0), "top_k must be an int in [1, N=4]"),
    ("top_k-bool", dict(top_k=True), "top_k must be an int in [1, N=4]"),
    ("top_k-str", dict(top_k="2"), "top_k must be an int in [1, N=4]"),
    ("forced-repeated", dict(always_include=(1, 1)), "distinct chunk ids in [0, N=4)"),
    ("forced-too-many", dict(top_k=1, always_include=(0, 1)), "at most top_k=1"),
    ("forced-past-N", dict(always_include=(4,)), "in [0, N=4)"),
    ("forced-negative", dict(always_include=(-1,)), "in [0, N=4)"),
    ("forced-float", dict(always_include=(1.0,)), "sequence of int chunk ids"),
    ("forced-bool", dict(always_include=(True,)), "sequence of int chunk ids"),
    ("forced-str", dict(always_include="01"), "sequence of int chunk ids"),
    ("num_valid-neg", dict(num_valid_chunks=-1), "num_valid_chunks must be in [0, N=4], got -1"),
    ("num_valid-past-N", dict(num_valid_chunks=5), "num_valid_chunks must be in [0, N=4], got 5"),
    ("num_valid-float", dict(num_valid_chunks=2.0), "num_valid_chunks must be an integer scalar"),
    ("num_valid-vector", dict(num_valid_chunks=jnp.ones(2, jnp.int32)), "integer scalar"),
    ("summaries-rank2", dict(summaries=lambda: _means()[:, 0]),
     "summaries must be ChunkSummaries or"),
    ("summaries-int", dict(summaries=lambda: _means().astype(jnp.int32)), "a float array"),
    ("summaries-list", dict(summaries=lambda: _means().tolist()),
     "summaries must be ChunkSummaries or"),
    ("summaries-other-heads", dict(summaries=lambda: _means()[:, :1].repeat(3, 1)),
     "multiple of Hkv=3"),
]


@pytest.mark.parametrize("kwargs,match", [pytest.param(*c[1:], id=c[0]) for c in _ROUTE_BAD])
def test_route_refuses(kwargs, match):
  # A summaries parameter built from _means() comes as a function of no arguments.
  kwargs = {k: v() if k == "summaries" and callable(v) else v for k, v in kwargs.items()}
  args = dict(dict(q=Q, summaries=_sums(), top_k=2), **kwargs)
  with pytest.raises(ValueError) as e:
    routing.route(**args)
  assert match in str(e.value) and str(e.value).startswith("route: "), str(e.value)


_ORACLE_BAD = [
    ("k-other-D", dict(k=K[..., :8]), "q must have shape [B, T, Hq, D=8]"),
    ("k-rank2", dict(k=K[0]), "k must have shape [S, Hkv, D]"),
    ("chunk_size-0", dict(chunk_size=0), "chunk_size must be a positive int"),
    ("top_k-past-N", dict(top_k=9), "top_k must be an int in [1, N=4]"),
    ("kv_length-neg", dict(kv_length=-3), "kv_length must be in [0, S=256], got -3"),
    ("kv_length-past-S", dict(kv_length=S * 2), "got 512"),
    ("forced-past-N", dict(always_include=(7,)), "in [0, N=4)"),
    ("q-int", dict(q=Q.astype(jnp.int8)), "a float dtype"),
]


@pytest.mark.parametrize("kwargs,match", [pytest.param(*c[1:], id=c[0]) for c in _ORACLE_BAD])
def test_oracle_route_refuses(kwargs, match):
  args = dict(dict(q=Q, k=K, top_k=2, chunk_size=C), **kwargs)
  with pytest.raises(ValueError) as e:
    routing.oracle_route(**args)
  assert match in str(e.value) and str(e.value).startswith("oracle_route: "), str(e.value)


def test_traced_lengths_are_not_read():
  """Under jit a length cannot be checked: it is clamped (documented), never refused."""
  s = jax.jit(lambda n: routing.chunk_summaries(K, C, kv_length=n))(jnp.int32(10 * S))
  assert int(s.num_valid_chunks) == S // C
  ids = jax.jit(lambda n: routing.route(Q, _sums(), 2, num_valid_chunks=n))(jnp.int32(1))
  assert np.all(np.asarray(ids)[..., 0] == 0) and np.all(np.asarray(ids)[..., 1] == -1)
