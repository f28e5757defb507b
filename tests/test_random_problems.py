"""Random problems through each attention op's default plan: what a user's first call on a model
we never measured gets.

Each run draws fresh problems (seeded by MOSKA_TEST_SEED, else by the clock; every failure names
its seed): head dims 64-256, GQA ratios 1-16, 1-8 query tokens, bf16 / f16 / f32 queries, float8
K/V with a scale per kv head, lengths that cut blocks, pages and chunks, kv_length anywhere
(static or traced), ragged paged caches with empty slots, tiles of any number of requests. Every
key no output may weigh is poisoned (NaN; 8 where the planned kernel reads it and weighs it by 0)
and each result is compared with the float64 NumPy reference on the dequantized values.

On a GPU "auto" runs the compiled kernels it plans, over MOSKA_RANDOM_PROBLEMS problems per op
(default 16), and each compiled kernel named by hand over a quarter as many; on the CPU the
interpreted Pallas kernels (GPU and TPU semantics) each run one small problem per op, redrawn
until the kernel takes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import grouping, quant
from tests import kernel_cases as kc
from tests.np_reference import (chunk_attention_f64, shared_attention_f64,
                                unique_attention_f64)

SEED = int(os.environ.get("MOSKA_TEST_SEED", time.time_ns() % 2**31))
N_GPU = int(os.environ.get("MOSKA_RANDOM_PROBLEMS", 16))
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class Problem(NamedTuple):
  """One drawn call: op(*args(poison), **kwargs) must equal `reference` (o, lse in float64).
  args takes the poison for keys the call must weigh by 0."""

  op: str
  args: Callable[[float], tuple]
  kwargs: dict
  reference: Callable[[], tuple]
  what: str


def _log_uniform(rng, lo: int, hi: int) -> int:
  return min(hi, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))


def _heads(rng, dtype):
  """(T, G, Hkv, D, name): decode mostly, speculative T up to 8; GQA 1-16; D 64-256."""
  T = int(rng.choice([1, 1, 1, 2, 4, 5, 8]))
  G, Hkv = int(rng.choice([1, 2, 4, 8, 16])), int(rng.choice([1, 2, 4, 8]))
  D = int(rng.choice([64, 80, 96, 128, 192, 256]))
  return T, G, Hkv, D, f"T={T} G={G} Hkv={Hkv} D={D} {jnp.dtype(dtype).name}"


def _keys(rng, large: int, small: int, rows: int, D: int) -> int:
  """A key count up to `large` on a GPU (`small` on the CPU), log-uniform (edge cases: a few
  keys) or in the top eighth (many blocks), whose float64 reference stays cheap: rows x keys x
  D <= 1.5e9."""
  hi = large if kc.ON_GPU else small
  n = _log_uniform(rng, 1, hi) if rng.uniform() < 0.5 else int(rng.integers(hi // 8, hi + 1))
  return max(1, min(n, int(1.5e9 // (rows * D))))


def _whole_blocks(rng, S: int) -> int:
  """S as drawn, or rounded up to a multiple of 8 (what the Hopper shared kernel's TMA takes) or
  of 128 (whole key tiles, what its chunk kernels take)."""
  step = int(rng.choice([1, 8, 128]))
  return -(-S // step) * step


def _kv_length(rng, S: int):
  """(argument, value): None, or a length anywhere in [0, S] (ends included), static or traced."""
  if rng.uniform() < 0.35:
    return None, S
  n = int(rng.choice([0, S, int(rng.integers(0, S + 1))], p=[0.05, 0.1, 0.85]))
  return (jnp.int32(n) if rng.uniform() < 0.5 else n), n


def _scaled(rng, k, v):
  """(k, v, scale kwargs, k_ref, v_ref): a quarter of the draws store K/V in float8 with one
  scale per kv head; the reference takes the dequantized values."""
  if rng.uniform() >= 0.25:
    return k, v, {}, k, v
  fmt = str(rng.choice(["float8_e4m3fn", "float8_e5m2"]))
  (ks, k_scale), (vs, v_scale) = quant.quantize(k, fmt), quant.quantize(v, fmt)
  return (ks, vs, dict(k_scale=k_scale, v_scale=v_scale), quant.dequantize(ks, k_scale),
          quant.dequantize(vs, v_scale))


def _poisoned(x, bad, poison):
  """x with `poison` where `bad` (broadcast over x's trailing axes) is True."""
  bad = jnp.asarray(bad).reshape(bad.shape + (1,) * (x.ndim - bad.ndim))
  return jnp.where(bad, jnp.asarray(poison, x.dtype), x)


def _shared(rng) -> Problem:
  dtype = DTYPES[rng.integers(3)]
  T, G, Hkv, D, name = _heads(rng, dtype)
  B = _log_uniform(rng, 1, 300 if kc.ON_GPU else 6)
  S = _whole_blocks(rng, _keys(rng, 1 << 18, 700, B * T * G * Hkv, D))
  _, q, k, v = kc.shared_inputs(int(rng.integers(2**31)), B, T, G, Hkv, D, S, dtype)
  kv_length, n = _kv_length(rng, S)
  k, v, scales, k_ref, v_ref = _scaled(rng, k, v)
  past = np.arange(S) >= n
  return Problem("shared_attention",
                 lambda p: (q, _poisoned(k, past, p), _poisoned(v, past, p)),
                 dict(kv_length=kv_length, **scales),
                 lambda: shared_attention_f64(q, k_ref, v_ref, n),
                 f"B={B} {name} S={S} kv_length={n} K/V {k.dtype.name}")


def _unique(rng) -> Problem:
  dtype = DTYPES[rng.integers(3)]
  T, G, Hkv, D, name = _heads(rng, dtype)
  B = _log_uniform(rng, 1, 200 if kc.ON_GPU else 5)
  page = int(rng.choice([16, 32, 64, 128]))
  L = max(T, _keys(rng, 1 << 14, 300, B * T * G * Hkv, D))
  lengths = [0 if rng.uniform() < 0.1 else int(rng.integers(T, L + 1)) for _ in range(B)]
  lengths[rng.integers(B)] = L
  n_pages = [-(-n // page) for n in lengths]
  P = sum(n_pages) + 2  # two pages nobody owns
  ids = iter(rng.permutation(P))
  tables = rng.integers(-3, P + 3, (B, max(n_pages) + 1))  # junk past each request's pages
  owned = np.zeros((P, page), bool)
  for b, n in enumerate(lengths):
    for j in range(n_pages[b]):
      tables[b, j] = p = next(ids)
      owned[p, :min(page, n - j * page)] = True
  q = kc.random_normal(rng, (B, T, G * Hkv, D), dtype)
  k, v = (kc.random_normal(rng, (P, page, Hkv, D), dtype) for _ in range(2))
  k, v, scales, k_ref, v_ref = _scaled(rng, k, v)
  tables, lens = jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32)
  return Problem("unique_attention",
                 lambda p: (q, _poisoned(k, ~owned, p), _poisoned(v, ~owned, p), tables, lens),
                 scales, lambda: unique_attention_f64(q, k_ref, v_ref, tables, lengths),
                 f"B={B} {name} page={page} lengths up to {L} K/V {k.dtype.name}")


def _routed(rng, tiles: bool) -> Problem:
  """chunk_attention (per-request ids), or tile_chunk_attention over tiles of R requests."""
  dtype = DTYPES[rng.integers(3)]
  T, G, Hkv, D, name = _heads(rng, dtype)
  C = int(rng.choice([16, 32, 48, 64, 100, 128, 256, 512]))
  B = _log_uniform(rng, 1, 128 if kc.ON_GPU else 5)
  S = _whole_blocks(rng, max(C // 2, _keys(rng, 1 << 17, 900, B * T * G * Hkv, D)))
  N = -(-S // C)
  K = int(rng.integers(1, N + 1))
  _, q, k, v = kc.shared_inputs(int(rng.integers(2**31)), B, T, G, Hkv, D, S, dtype)
  ids = np.array(kc.random_ids(rng, B, Hkv, N, K))
  ids[rng.uniform(size=ids.shape) < 0.1] = -1  # the router's padding
  kv_length, n = _kv_length(rng, S)
  k, v, scales, k_ref, v_ref = _scaled(rng, k, v)
  what = f"B={B} {name} S={S} C={C} K={K} kv_length={n} K/V {k.dtype.name}"
  per_request = ids
  if tiles:
    R = int(rng.choice([d for d in range(1, B + 1) if B % d == 0]))  # requests per tile
    ids = np.asarray(grouping.tile_union(jnp.asarray(ids), N, R))
    per_request = np.repeat(ids, R, axis=0)
    what += f" R={R}"
  listed = np.zeros((S, Hkv), bool)
  for h in range(Hkv):
    for c in np.unique(ids[:, h]):
      listed[max(c, 0) * C:(c + 1) * C, h] = c >= 0
  unread = ~listed  # no implementation reads a chunk nobody lists: NaN, whatever the plan
  past = listed & (np.arange(S) >= n)[:, None]

  def args(p):
    k_in, v_in = (_poisoned(_poisoned(x, past, p), unread, jnp.nan) for x in (k, v))
    return q, k_in, v_in, jnp.asarray(ids)

  return Problem("tile_chunk_attention" if tiles else "chunk_attention", args,
                 dict(chunk_size=C, kv_length=kv_length, **scales),
                 lambda: chunk_attention_f64(q, k_ref, v_ref, per_request, C, n), what)


DRAWS = {"shared_attention": _shared, "unique_attention": _unique,
         "chunk_attention": lambda rng: _routed(rng, tiles=False),
         "tile_chunk_attention": lambda rng: _routed(rng, tiles=True)}


def _runs() -> list:
  """(op, implementation, interpret, problem index): on a GPU "auto" over N_GPU problems and
  each compiled kernel named by hand (its default plan) over a quarter as many; elsewhere the
  two interpreted Pallas kernels."""
  if not kc.ON_GPU:
    return [pytest.param(op, impl, True, 0, id=f"{op}-{impl}-interpret") for op in DRAWS
            for impl in ("triton", "mosaic_tpu") if impl in pk.implementations(op)]
  compiled = ("triton", "mosaic_gpu") if kc.ON_HOPPER else ("triton",)
  return [pytest.param(op, impl, False, i, id=f"{op}-{impl}-{i}") for op in DRAWS
          for impl in ("auto", *compiled) if impl == "auto" or impl in pk.implementations(op)
          for i in range(N_GPU if impl == "auto" else max(1, N_GPU // 4))]


@pytest.mark.parametrize("op,implementation,interpret,i", _runs())
def test_random_problem_matches_f64(op, implementation, interpret, i):
  rng = np.random.default_rng([SEED, i, sum(map(ord, op))])
  for _ in range(50):  # an interpreted kernel refuses some draws (e.g. TPU block rules): redraw
    problem = DRAWS[op](rng)
    try:
      plan = pk.plan(op, *problem.args(jnp.nan), implementation=implementation,
                     interpret=interpret, **problem.kwargs)
      break
    except ValueError as e:
      if "cannot run this call" not in str(e):
        raise
  else:
    pytest.fail(f"{implementation} refused 50 draws of {op} (MOSKA_TEST_SEED={SEED})")
  # mosaic_gpu reads the whole key tile that holds a sequence's end and weighs the keys past it
  # by 0, so they must be finite there; the other kernels never read them.
  poison = 8.0 if plan.implementation == "mosaic_gpu" else jnp.nan
  args = problem.args(poison)
  o, lse = kc.run(getattr(pk, op), *args, implementation=implementation, interpret=interpret,
                  **problem.kwargs)
  try:
    kc.check(o, lse, *problem.reference(), args[0], args[0].dtype.type)
  except AssertionError as e:
    raise AssertionError(f"{op} {problem.what}, plan {plan} (MOSKA_TEST_SEED={SEED}): "
                         f"{e}") from None
