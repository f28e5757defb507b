"""`shared_attention`: every request's queries against one shared KV, as one GEMM-shaped attention.

The G query heads of each kv head and all B*T query tokens are folded into the matmul M dimension
(`layout.fold_queries`), so each K/V tile is read once per step for the whole batch, not once per
request. Small M is bandwidth-bound: S is split across programs (flash decoding) and the partial
states are merged by log-sum-exp. Large M is compute-bound: M is tiled and each tile runs at
tensor-core rate. `SharedAttentionBlocks` holds the tiling; `choose_blocks` is the heuristic.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import layout, merge
from pallas_kernels.backend import is_hopper, log_once, num_cores, resolve_backend
from pallas_kernels.reference import shared_attention_ref


@dataclasses.dataclass(frozen=True)
class SharedAttentionBlocks:
  """Tiling of one shared-attention call (override the heuristic with an instance).

  block_m: query rows per program; block_k: keys per inner tile; num_splits: programs along S;
  num_warps: Triton warps; num_stages: pipeline depth (Triton stages, or Mosaic GPU K/V slots);
  kernel: GPU kernel, "triton" (any GPU) or "mosaic" (Hopper wgmma, block_m = 128, bf16/f16).
  """

  block_m: int
  block_k: int
  num_splits: int
  num_warps: int = 4
  num_stages: int = 2
  kernel: str = "triton"


# Rows (B*T*G) from which the Hopper wgmma kernel beats the Triton kernel: below it the problem is
# bandwidth-bound and the Triton kernel's finer row blocks stream KV at full speed.
MOSAIC_MIN_ROWS = 256


def choose_blocks(dims: layout.AttentionDims, backend: str,
                  dtype=jnp.bfloat16) -> SharedAttentionBlocks:
  """Heuristic tiling from (M, S).

  M is tiled first; S is then split so that the programs fill the chip in about one wave on GPU
  (fewer, longer programs measured best on H100 at every B: a partly filled second wave costs
  more than the merge of more splits saves), and in two on TPU (the two cores of a megacore chip).
  Large M on Hopper (bf16/f16) goes to the Mosaic GPU wgmma kernel.
  """
  from pallas_kernels.gpu import shared_attention_mgpu as mgpu

  M, S = dims.M, dims.S
  kernel = "triton"
  if backend == "tpu":
    block_m = min(256, max(16, 16 * math.ceil(M / 16)))
    block_k = 512 if S >= 512 else 128
    warps, stages = 4, 2
  elif M >= MOSAIC_MIN_ROWS and is_hopper() and mgpu.supported(dtype, dims.D, S, 128):
    kernel, block_m, block_k, warps, stages = "mosaic", mgpu.ROWS_PER_CTA, 128, 4, 2
  else:
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_k = 64 if block_m >= 128 else 128
    warps, stages = (8, 3) if block_m >= 128 else (4, 3)
  programs = dims.Hkv * math.ceil(M / block_m)
  n_tiles = math.ceil(S / block_k)
  target = num_cores() if backend == "gpu" else 2
  splits = max(1, min(n_tiles, target // programs))
  return SharedAttentionBlocks(block_m, block_k, splits, warps, stages, kernel)


def _check_blocks(blocks: SharedAttentionBlocks, backend: str, q, S: int, interpret: bool) -> None:
  from pallas_kernels.gpu import shared_attention_mgpu as mgpu

  if blocks.kernel not in ("triton", "mosaic") or (blocks.kernel == "mosaic" and backend != "gpu"):
    raise ValueError(f"shared_attention: blocks.kernel must be 'triton' or (GPU only) 'mosaic', "
                     f"got {blocks.kernel!r} for backend {backend!r}")
  if blocks.kernel == "mosaic":
    if interpret or not mgpu.supported(q.dtype, q.shape[-1], S, blocks.block_k):
      raise ValueError("shared_attention: the mosaic kernel needs a Hopper GPU (no interpret "
                       "mode), bf16/f16 inputs, D a multiple of 64 and S a multiple of "
                       f"blocks.block_k; got dtype {q.dtype}, D={q.shape[-1]}, S={S}, "
                       f"block_k={blocks.block_k}")
    if blocks.block_m != mgpu.ROWS_PER_CTA:
      raise ValueError(f"shared_attention: the mosaic kernel needs blocks.block_m="
                       f"{mgpu.ROWS_PER_CTA}, got {blocks.block_m}")
  elif backend == "gpu":
    for name in ("block_m", "block_k"):
      x = getattr(blocks, name)
      if x < 16 or x & (x - 1):
        raise ValueError(f"shared_attention: blocks.{name} must be a power of two >= 16 on GPU, "
                         f"got {x}")
  else:
    if blocks.block_m % 16 or blocks.block_k % 128:
      raise ValueError("shared_attention: on TPU blocks.block_m must be a multiple of 16 and "
                       f"blocks.block_k of 128, got {blocks.block_m}, {blocks.block_k}")
  if blocks.num_splits < 1:
    raise ValueError(f"shared_attention: blocks.num_splits must be >= 1, got {blocks.num_splits}")


def shared_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
                     kv_length=None, backend: str = "auto", interpret: bool = False,
                     blocks: SharedAttentionBlocks | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of all queries q[B, T, Hq, D] over the shared k, v[S, Hkv, D].

  Args:
    q: [B, T, Hq, D] queries of B requests, T tokens each; query head h reads kv head h // G.
    k, v: [S, Hkv, D] the shared keys / values (one copy for every request).
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar (may be traced): only keys [0, kv_length) are valid.
    backend: "auto" (GPU kernel on GPU, TPU kernel on TPU, XLA reference elsewhere), "gpu",
      "tpu" or "xla".
    interpret: run the chosen Pallas kernel in interpret mode (TPU interpret mode for "tpu").
    blocks: tiling override; default `choose_blocks`.

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32 (natural log); rows with no valid key
    give o = 0, lse = -inf.
  """
  dims = layout.check_shared_kv_inputs(q, k, v, op="shared_attention")
  kv_length = layout.check_kv_length(kv_length, op="shared_attention")
  which = resolve_backend(backend, op="shared_attention", interpret=interpret)
  if which == "xla":
    return shared_attention_ref(q, k, v, sm_scale=sm_scale, kv_length=kv_length)
  blocks = blocks or choose_blocks(dims, which, q.dtype)
  _check_blocks(blocks, which, q, dims.S, interpret)
  B, T, _, Hkv, D, S = dims
  scale = layout.default_sm_scale(sm_scale, D)
  n = jnp.int32(S) if kv_length is None else jnp.clip(kv_length, 0, S)
  q_rows = layout.fold_queries(q, Hkv)
  M = q_rows.shape[1]
  pad = -M % blocks.block_m
  q_rows = jnp.pad(q_rows, ((0, 0), (0, pad), (0, 0)))
  log_once(f"shared_attention: {blocks.kernel if which == 'gpu' else 'mosaic-tpu'} kernel")
  if blocks.kernel == "mosaic":
    from pallas_kernels.gpu import shared_attention_mgpu as kernel

    o, lse = kernel.shared_attention_partials(
        q_rows, k, v, n, scale=scale, block_k=blocks.block_k, num_splits=blocks.num_splits,
        num_stages=blocks.num_stages)
  elif which == "gpu":
    from pallas_kernels.gpu import shared_attention as kernel

    o, lse = kernel.shared_attention_partials(
        q_rows, k, v, n, scale=scale, block_m=blocks.block_m, block_k=blocks.block_k,
        num_splits=blocks.num_splits, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages, interpret=interpret)
  else:
    from pallas_kernels.backend import tpu_interpret
    from pallas_kernels.tpu import shared_attention as kernel

    o, lse = kernel.shared_attention_partials(
        q_rows, k, v, n, scale=scale, block_m=blocks.block_m, block_k=blocks.block_k,
        num_splits=blocks.num_splits, interpret=tpu_interpret(interpret))
  o, lse = merge.merge_partials(o, lse, axis=0) if o.shape[0] > 1 else (o[0], lse[0])
  return layout.unfold_rows(o[:, :M], B, T).astype(q.dtype), layout.unfold_rows(lse[:, :M], B, T)
