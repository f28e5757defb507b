"""`shared_attention`: every request's queries against one shared KV, as one GEMM-shaped attention.

The G query heads of each kv head and all B*T query tokens are folded into the matmul M dimension
(`layout.fold_queries`), so each K/V tile is read once per step for the whole batch, not once per
request. Small M is bandwidth-bound: S is split across programs (flash decoding) and the partial
states are merged by log-sum-exp. Large M is compute-bound: M is tiled and each tile runs at
tensor-core rate.

Implementations: "xla" (the reference), "triton" (any GPU), "mosaic_gpu" (Hopper: TMA, wgmma,
warp specialization), "mosaic_tpu".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import checks, dispatch, layout, targets
from pallas_kernels.dispatch import Implementation, Partials
from pallas_kernels.gpu import mosaic_attention, triton_shared, widen
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.gpu.configs import MosaicGpuSharedConfig, TritonSharedConfig
from pallas_kernels.numerics import default_sm_scale
from pallas_kernels.reference import shared_attention_ref
from pallas_kernels.tpu import mosaic_shared
from pallas_kernels.tpu import tuning as tpu_tuning
from pallas_kernels.tpu.configs import MosaicTpuSharedConfig

OP_NAME = "shared_attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedProblem(dispatch.Problem):
  k: Any  # [S, Hkv, D]
  v: Any
  kv_length: Any  # int32 scalar or None


def _problem(q, k, v, *, sm_scale=None, kv_length=None, k_scale=None,
             v_scale=None) -> SharedProblem:
  dims = checks.check_shared_kv_inputs(q, k, v, op=OP_NAME)
  return SharedProblem(q=q, k=k, v=v, dims=dims,
                       **checks.check_scales(dims, sm_scale, k_scale, v_scale, op=OP_NAME),
                       kv_length=checks.check_kv_length(kv_length, dims.S, op=OP_NAME))


def _rows(p: SharedProblem, block_m: int) -> tuple[jax.Array, jax.Array, float]:
  """Folded q_rows[Hkv, M', D] padded to whole row blocks, valid keys n, and the score scale."""
  q_rows = layout.fold_queries(p.q, p.dims.Hkv)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, -p.dims.M % block_m), (0, 0)))
  n = jnp.int32(p.dims.S) if p.kv_length is None else jnp.clip(p.kv_length, 0, p.dims.S)
  return q_rows, n, default_sm_scale(p.sm_scale, p.dims.D)


def _run_xla(p: SharedProblem, config, interpret):
  del config, interpret
  return shared_attention_ref(p.q, p.k, p.v, sm_scale=p.sm_scale, kv_length=p.kv_length)


def _run_triton(p: SharedProblem, c: TritonSharedConfig, interpret):
  q_rows, n, scale = _rows(p, c.block_m)
  attend = functools.partial(
      triton_shared.shared_attention_partials, scale=scale, block_m=c.block_m,
      block_k=c.block_k, num_splits=c.num_splits, num_warps=c.num_warps,
      num_stages=c.num_stages, interpret=interpret)
  return Partials(*_attend(attend, p, q_rows, n, widen_kv=c.widen_kv, interpret=interpret), 0)


def _run_mosaic_gpu(p: SharedProblem, c: MosaicGpuSharedConfig, interpret):
  del interpret
  q_rows, n, scale = _rows(p, c.rows_per_cta)
  attend = functools.partial(
      mosaic_attention.shared_attention_partials, scale=scale, block_k=c.block_k,
      num_splits=c.num_splits, num_stages=c.num_stages, consumers=c.consumers,
      split_keys=c.split_keys)
  return Partials(*_attend(attend, p, q_rows, n, widen_kv=c.widen_kv, widen_v=c.widen_v,
                           interpret=False), 0)


def _attend(attend, p: SharedProblem, q_rows, n, *, widen_kv: bool, widen_v: bool = False,
            interpret: bool):
  """attend(q_rows, k, v, n) on the problem's K/V, K/V or only V widened first as the config's
  knobs of those names say."""
  if widen_kv or widen_v:
    return _widened(attend, q_rows, p.k, p.v, n, p.dtype, widen_k=widen_kv,
                    traced=p.kv_length is not None, interpret=interpret)
  return attend(q_rows, p.k, p.v, n)


def _widened(attend, q_rows, k, v, n, dtype, *, widen_k: bool, traced: bool, interpret: bool):
  """attend(q_rows, k, v, n) on float8 K and V widened to `dtype` first, or (not widen_k) V
  only, to float16 (exact, as both: e4m3 / e5m2 -> float16 is one conversion instruction; the
  scales stay folded around the kernel, `Problem.scaled`), in `widen.widen`'s one Pallas pass
  (1.6x faster than XLA's convert on an H200). The widening waits for this call's queries (an
  optimization barrier), so XLA neither starts it early, holding several transient copies (the
  layers of a step are unrolled), nor shares one copy between calls; with a traced kv_length it
  runs only when a key is valid: a context no request reads costs nothing, as in the kernel."""

  def run(q_rows, k, v, n):
    wide = functools.partial(widen.widen, interpret=interpret)
    if widen_k:
      return attend(q_rows, wide(k, dtype), wide(v, dtype), n)
    return attend(q_rows, k, wide(v, jnp.float16), n)

  q_rows, k, v = lax.optimization_barrier((q_rows, k, v))
  if not traced:
    return run(q_rows, k, v, n)
  o, lse = jax.eval_shape(run, q_rows, k, v, n)
  empty = lambda *_: (jnp.zeros(o.shape, o.dtype), jnp.full(lse.shape, -jnp.inf, lse.dtype))
  return lax.cond(n > 0, run, empty, q_rows, k, v, n)


def _run_mosaic_tpu(p: SharedProblem, c: MosaicTpuSharedConfig, interpret):
  q_rows, n, scale = _rows(p, c.block_m)
  o, lse = mosaic_shared.shared_attention_partials(
      q_rows, p.k, p.v, n, scale=scale, block_m=c.block_m, block_k=c.block_k,
      num_splits=c.num_splits, interpret=dispatch.tpu_interpret(interpret),
      vmem_limit_bytes=tpu_tuning.vmem_limit(tpu_tuning.shared_vmem(p.dims, p.dtype, c),
                                             targets.current("tpu")))
  return Partials(o, lse, 0)


def _choose(p: SharedProblem, platform: str, target, interpret: bool) -> str:
  if platform == "tpu":
    return "mosaic_tpu"
  return gpu_tuning.shared_implementation(p.dims, p.dtype, target, interpret, kv_dtype=p.k.dtype)


OP = dispatch.register(dispatch.Op(OP_NAME, _problem, {
    "xla": Implementation("xla", None, _run_xla),
    "triton": Implementation(
        "triton", "gpu", _run_triton, TritonSharedConfig,
        default_config=lambda p, t: gpu_tuning.triton_shared(p.dims, p.dtype, t,
                                                             kv_dtype=p.k.dtype),
        candidates=lambda p, t: gpu_tuning.triton_shared_candidates(p.dims, p.dtype, t,
                                                                    kv_dtype=p.k.dtype),
        unsupported=lambda p, c, t, i: gpu_tuning.triton_shared_unsupported(
            p.dims, p.dtype, c, t, kv_dtype=p.k.dtype),
        offsets_32bit=True),
    "mosaic_gpu": Implementation(
        "mosaic_gpu", "gpu", _run_mosaic_gpu, MosaicGpuSharedConfig,
        default_config=lambda p, t: gpu_tuning.mosaic_shared(p.dims, p.dtype, t,
                                                             kv_dtype=p.k.dtype),
        candidates=lambda p, t: gpu_tuning.mosaic_shared_candidates(p.dims, p.dtype, t,
                                                                    kv_dtype=p.k.dtype),
        unsupported=lambda p, c, t, i: gpu_tuning.mosaic_shared_unsupported(
            p.dims, p.dtype, c, t, i, kv_dtype=p.k.dtype),
        interpretable=False),
    "mosaic_tpu": Implementation(
        "mosaic_tpu", "tpu", _run_mosaic_tpu, MosaicTpuSharedConfig,
        default_config=lambda p, t: tpu_tuning.shared(p.dims, p.dtype, t),
        candidates=lambda p, t: tpu_tuning.shared_candidates(p.dims, p.dtype, t)),
}, _choose))


def shared_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
                     kv_length=None, k_scale=None, v_scale=None, implementation: str = "auto",
                     config: Any = None, interpret: bool = False,
                     backend: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of all queries q[B, T, Hq, D] over the shared k, v[S, Hkv, D].

  Args:
    q: [B, T, Hq, D] queries of B requests, T tokens each; query head h reads kv head h // G.
    k, v: [S, Hkv, D] the shared keys / values (one copy for every request).
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar: keys [0, kv_length) are valid; in [0, S] (traced: clamped).
    k_scale, v_scale: optional [Hkv] float32 dequantization scales of scaled K/V (e.g. float8:
      k = k_scale[h] * stored; `pallas_kernels.quant`); give both or neither.
    implementation, config, interpret, backend: which kernel runs, see `dispatch.call`
      (implementations: `implementations("shared_attention")`; configs: e.g. `TritonSharedConfig`).
      On a GPU, float8 K/V under many 16-bit query rows (`gpu.tuning.mosaic_shared`,
      `triton_shared`) are widened before the kernel, K/V to the query dtype or (Mosaic GPU,
      e4m3 keys) V only to float16: a transient copy of twice the bytes widened, and with a
      traced kv_length a `lax.cond` on kv_length > 0 (on a GPU the host waits for its
      predicate); a config with widen_kv=False (and widen_v=False) keeps them float8 in the
      kernel.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32 (natural log); rows with no valid key
    give o = 0, lse = -inf. Keys past kv_length reach no output, with one exception:
    "mosaic_gpu" reads the whole key tile (64 or 128 keys) that holds kv_length and weighs the
    keys past it by 0, so they must be finite there (NaN or inf would reach o); the other
    implementations never read them.
  """
  return dispatch.call(OP, (q, k, v), dict(sm_scale=sm_scale, kv_length=kv_length,
                                           k_scale=k_scale, v_scale=v_scale),
                       implementation=implementation, backend=backend, config=config,
                       interpret=interpret)
