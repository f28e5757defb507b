"""What every kernel test shares: tolerances, the (implementation, interpret) grid, input builders.

Each op's tests run one body per implementation: the Pallas kernels in interpret mode on any
machine ("triton" with GPU semantics, "mosaic_tpu" in TPU interpret mode), the XLA reference, and
the compiled GPU kernels where a GPU is present ("mosaic_gpu" on Hopper only). Interpret modes
fill unwritten outputs with NaN, and the builders poison every input element a kernel must not
read, so a missing write or mask shows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from tests.np_reference import random_normal, rel_err

TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-2, 2e-2),
       jnp.float16: (2e-3, 5e-3)}  # (rel err of o, abs err of lse)

ON_GPU = jax.default_backend() == "gpu"
ON_HOPPER = ON_GPU and pk.targets.current("gpu").is_hopper


def implementations(op: str, *, compiled: bool = True) -> list:
  """pytest params (implementation, interpret) for every implementation of `op`: interpreted
  Pallas kernels and XLA everywhere, compiled GPU kernels only on a GPU (skipped otherwise)."""
  params = [pytest.param("xla", False, id="xla")]
  names = pk.implementations(op)
  params += [pytest.param(n, True, id=f"{n}-interpret") for n in ("triton", "mosaic_tpu")
             if n in names]
  if compiled:
    params.append(pytest.param("triton", False, id="triton-gpu",
                               marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU")))
    if "mosaic_gpu" in names:
      params.append(pytest.param("mosaic_gpu", False, id="mosaic_gpu",
                                 marks=pytest.mark.skipif(not ON_HOPPER, reason="needs Hopper")))
  return params


def pairwise(factors: Mapping[str, Sequence]) -> list[dict]:
  """Rows of values of `factors` covering every pair of values of any two factors (greedy)."""
  names = list(factors)

  def pairs(row: dict) -> set:
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}

  candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]
  todo = set().union(*map(pairs, candidates))
  rows = []
  while todo:
    row = max(candidates, key=lambda r: len(pairs(r) & todo))
    rows.append(row)
    todo -= pairs(row)
  return rows


def implementations_pairwise(op: str, **factors: Mapping[str, object]) -> list:
  """pytest params (implementation, interpret, *one value per factor) covering every pair of
  values of any two of (implementation, *factors): each implementation meets every value of every
  factor, instead of the full product. factors: name -> {id: value}."""
  impls = implementations(op)
  rows = pairwise({"impl": range(len(impls)), **{k: list(v) for k, v in factors.items()}})
  params = []
  for row in sorted(rows, key=lambda r: r["impl"]):
    impl = impls[row["impl"]]
    ids = [row[k] for k in factors]
    params.append(pytest.param(*impl.values, *(factors[k][i] for k, i in zip(factors, ids)),
                               marks=impl.marks, id="-".join([impl.id, *ids])))
  return params


def float_dtype(implementation: str):
  """The float dtype a test gives an implementation: float32, bfloat16 for "mosaic_gpu" (its
  wgmma takes only 2-byte floats)."""
  return jnp.bfloat16 if implementation == "mosaic_gpu" else jnp.float32


def run(fn, *args, implementation: str, interpret: bool, **kwargs):
  """fn(*args, **kwargs) of an op under jit (eager interpret mode dispatches op by op: 10x
  slower). Array kwargs (kv_length) are traced."""
  static = {k: v for k, v in kwargs.items() if not isinstance(v, jax.Array)}
  traced = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  f = jax.jit(lambda args, traced: fn(*args, implementation=implementation, interpret=interpret,
                                      **static, **traced))
  return f(args, traced)


def plan_or_skip(op: str, *args, implementation: str, interpret: bool, **kwargs) -> pk.Plan:
  """The plan of a call; a problem the implementation refuses (e.g. mosaic_gpu with D=80) is a
  skip for that case, with the refusal as the reason."""
  try:
    return pk.plan(op, *args, implementation=implementation, interpret=interpret, **kwargs)
  except ValueError as e:
    if "cannot run this call" in str(e):
      pytest.skip(str(e))
    raise


def check(o, lse, o_ref, lse_ref, q, dtype) -> None:
  """Shapes, dtypes, no NaN / unwritten element, and closeness to the float64 reference."""
  assert o.shape == q.shape and o.dtype == q.dtype
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o, np.float32))), "unwritten or unmasked output (NaN)"
  assert not np.any(np.isnan(np.asarray(lse)))
  o_tol, lse_tol = TOL[dtype]
  assert rel_err(o, o_ref) < o_tol
  np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=lse_tol, atol=lse_tol)


def shared_inputs(seed: int, B, T, G, Hkv, D, S, dtype):
  """Fresh random q[B, T, G*Hkv, D] and k, v[S, Hkv, D] (never zeros) and the rng."""
  rng = np.random.default_rng(seed)
  q = random_normal(rng, (B, T, G * Hkv, D), dtype)
  k = random_normal(rng, (S, Hkv, D), dtype)
  v = random_normal(rng, (S, Hkv, D), dtype)
  return rng, q, k, v


def paged_inputs(seed: int, T, G, Hkv, D, page_size, lengths, dtype, poison=True):
  """Random queries and a shuffled, poisoned page pool holding each request's `lengths`.

  Every slot no request owns (spare pages, the tail of each request's last page) holds NaN
  (poison=True), or 8: finite, for a kernel that reads the whole tile holding a request's last
  token and weighs the slots past it by 0 (poison="finite": mosaic_gpu), yet far enough from
  the random keys and values that any weight on them shows (and small enough not to set a
  float8 scale); block-table entries past each request's pages are junk ids (negative or past
  the pool).
  """
  rng = np.random.default_rng(seed)
  B = len(lengths)
  n_pages = [-(-n // page_size) for n in lengths]
  max_pages = max(n_pages) + 2  # table columns past every request: junk
  P = sum(n_pages) + 3  # spare pages nobody owns
  ids = iter(rng.permutation(P))
  tables = rng.integers(-3, P + 3, (B, max_pages))
  owned = np.zeros((P, page_size), bool)
  for b, n in enumerate(lengths):
    for i in range(n_pages[b]):
      tables[b, i] = page = next(ids)
      owned[page, :min(page_size, n - i * page_size)] = True
  kv = rng.standard_normal((2, P, page_size, Hkv, D)).astype(np.float32)
  if poison:
    kv[:, ~owned] = 8.0 if poison == "finite" else np.nan
  q = random_normal(rng, (B, T, G * Hkv, D), dtype)
  k_pages, v_pages = (jnp.asarray(x).astype(dtype) for x in kv)
  return q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32)


def random_ids(rng, B, Hkv, N, K, pattern="random"):
  """Duplicate-free chunk ids [B, Hkv, K].

  "shaped": chunk 0 is chosen by every request, chunk N-1 by request 0 only, chunk 1 by none,
  and request B-1 pads its last slot with -1.
  """
  ids = np.zeros((B, Hkv, K), np.int32)
  for b in range(B):
    for h in range(Hkv):
      if pattern == "random":
        ids[b, h] = rng.permutation(N)[:K]
      else:
        special = [0, N - 1] if b == 0 else [0]
        rest = rng.permutation(np.arange(2, N - 1))[:K - len(special)]
        ids[b, h] = rng.permutation([*special, *rest])
  if pattern == "shaped":
    ids[B - 1, :, -1] = -1
  return jnp.asarray(ids)


def poison_outside(x, keep):
  """x with NaN wherever `keep` (broadcast over x's trailing axes) is False."""
  keep = np.asarray(keep)
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim)), x, jnp.nan)
