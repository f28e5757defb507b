"""`chunk_scores`: how strongly each query row could attend to each chunk, from key sketches.

The router's scorer (MoSKA's MoE-style routing): every shared key is kept as a sketch
(`pallas_kernels.sketch`) around its chunk's center, which the caller adds: 4-bit codes in
[-7, 7] with a scale per key, or 8-bit codes in [-127, 127] with a scale per key or one per
chunk (then the kernels take the max of the raw code logits and scale once per chunk). A
chunk's score for a query row is its largest sketched logit. Like shared_attention, the query
rows of all requests are stacked, so the sketches (1/16 to 1/8 of the bf16 K/V bytes) are read
once for the whole batch, and only one float per (row, chunk) is written: no [rows, keys]
logits reach HBM.

With `int8=True` each query row is quantized to int8 (a per-row scale, multiplied back into its
scores) and the dots run on the int8 tensor cores / MXU: a ranking within about 1% of the float
one. On an H200 (Triton; S=1M, C=512, 64-wide 8-bit codes, the whole router) int8 rows took
1.04 ms against 1.62 for bf16 rows at B=128, 3.67 against 6.17 at B=512 and 0.24 against 0.29
at B=8 (experiments/results/sparse_pareto.md).

Implementations: "xla" (the reference), "triton" (any GPU), "mosaic_gpu" (Hopper; int8 rows over
8-bit codes with per-chunk scales, the router's default sketch: what "auto" runs where the
codes are too large for Triton's 32-bit offsets), "mosaic_tpu".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import checks, dispatch, layout, sketch
from pallas_kernels.dispatch import Implementation
from pallas_kernels.gpu import mosaic_scores as mosaic_gpu_scores
from pallas_kernels.gpu import softmax, triton_scores
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.gpu.configs import MosaicGpuScoresConfig, TritonScoresConfig
from pallas_kernels.reference import chunk_scores_ref
from pallas_kernels.tpu import mosaic_scores
from pallas_kernels.tpu import tuning as tpu_tuning
from pallas_kernels.tpu.configs import MosaicTpuScoresConfig

OP_NAME = "chunk_scores"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoresProblem(dispatch.Problem):
  codes: Any  # [S, Hkv, D/2] (packed 4-bit) or [S, Hkv, D] (8-bit) int8
  scale: Any  # [S, Hkv] per key or [N, Hkv] per chunk
  chunk_size: int
  num_chunks: int
  kv_length: Any  # int32 scalar or None
  int8: bool

  @property
  def key_scale(self):
    """The per-key scales the kernels multiply in, or None for per-chunk scales (`_unfold`
    applies those: a non-negative scale shared by a chunk's keys factors out of its max)."""
    return self.scale if self.scale.shape[0] == self.dims.S else None


def _problem(q, codes, scale, *, chunk_size, kv_length=None, int8=False) -> ScoresProblem:
  dims, n_chunks = checks.check_sketches(q, codes, scale, chunk_size, op=OP_NAME)
  return ScoresProblem(q=q, codes=codes, scale=scale, dims=dims, sm_scale=None,
                       chunk_size=chunk_size, num_chunks=n_chunks,
                       kv_length=checks.check_kv_length(kv_length, dims.S, op=OP_NAME),
                       int8=checks.boolean(int8, name="int8", where=OP_NAME))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per row: x[..., D] -> (int8 codes, float32 scale [...]), x ~ scale * codes.
  A positive row scale factors out of every max the scorer takes."""
  scale = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1), 1e-30) / 127
  return jnp.round(x / scale[..., None]).astype(jnp.int8), scale


def _query_parts(p: ScoresProblem, block_m: int) -> tuple:
  """The folded query rows as the parts the codes multiply (`sketch.split`: the two halves of D
  for packed codes, else all of D), int8 with their row scales when p.int8, else in the query
  dtype, padded to whole row blocks; and the valid keys."""
  q_rows = layout.fold_queries(p.q, p.dims.Hkv)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, -p.dims.M % block_m), (0, 0)))
  row_scale = None
  if p.int8:
    q_rows, row_scale = quantize_rows(q_rows)
  n = jnp.int32(p.dims.S) if p.kv_length is None else jnp.clip(p.kv_length, 0, p.dims.S)
  return sketch.split(q_rows, sketch.is_packed(p.codes.shape[-1], p.dims.D)), row_scale, n


def _unfold(p: ScoresProblem, out: jax.Array, row_scale) -> jax.Array:
  out = out[:, :p.dims.M, :p.num_chunks]
  if p.key_scale is None:  # per-chunk scales [N, Hkv]; -inf (no valid key) must stay -inf
    out = jnp.where(out > -jnp.inf, out * p.scale.T[:, None, :].astype(jnp.float32), out)
  out = out if row_scale is None else out * row_scale[:, :p.dims.M, None]
  return layout.unfold_rows(out, p.dims.B, p.dims.T)


def _run_xla(p: ScoresProblem, config, interpret):
  del config, interpret
  if not p.int8:
    return chunk_scores_ref(p.q, p.codes, p.scale, chunk_size=p.chunk_size,
                            kv_length=p.kv_length)
  q, row_scale = quantize_rows(p.q)  # integer-valued: the float reference dot is exact
  out = chunk_scores_ref(q.astype(jnp.float32), p.codes, p.scale, chunk_size=p.chunk_size,
                         kv_length=p.kv_length)
  return out * row_scale[..., None]


def _at_least(x, keys: int):
  """x[S, ...] (codes or per-key scales) padded to `keys` rows if shorter: a key tile is a
  slice of whole tiles' rows; kv_length masks the padding."""
  if x is None or x.shape[0] >= keys:
    return x
  return jnp.pad(x, ((0, keys - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _run_triton(p: ScoresProblem, c: TritonScoresConfig, interpret):
  q_parts, row_scale, n = _query_parts(p, c.block_m)
  codes, key_scale = _at_least(p.codes, c.block_k), _at_least(p.key_scale, c.block_k)
  out = triton_scores.chunk_scores(
      q_parts, codes, key_scale, n, chunk_size=p.chunk_size, block_m=c.block_m,
      block_k=c.block_k, chunks_per_program=c.chunks_per_program, num_warps=c.num_warps,
      num_stages=c.num_stages, precision=None if p.int8 else softmax.dot_precision(
          p.dtype, interpret), interpret=interpret)
  return _unfold(p, out, row_scale)


def _run_mosaic_gpu(p: ScoresProblem, c: MosaicGpuScoresConfig, interpret):
  del interpret  # no interpret mode (refused when planned)
  (q8,), row_scale, n = _query_parts(p, c.consumers * mosaic_gpu_scores.BLOCK_Q)
  out = mosaic_gpu_scores.chunk_scores(
      q8, _at_least(p.codes, c.block_k), n, chunk_size=p.chunk_size, block_k=c.block_k,
      chunks_per_cta=c.chunks_per_cta, num_stages=c.num_stages, consumers=c.consumers)
  return _unfold(p, jnp.swapaxes(out, 1, 2), row_scale)


def _mosaic_gpu_unsupported(p: ScoresProblem, c: MosaicGpuScoresConfig, target,
                            interpret) -> str | None:
  if not p.int8:
    return "it needs int8 query rows (int8=True)"
  if sketch.is_packed(p.codes.shape[-1], p.dims.D) or p.key_scale is not None:
    return "it needs 8-bit codes with one scale per chunk (scale [N, Hkv])"
  return gpu_tuning.mosaic_scores_unsupported(p.dims, p.chunk_size, c, target, interpret)


def _choose(p: ScoresProblem, platform: str, target, interpret: bool) -> str:
  """Mosaic TPU on a TPU. On a GPU the first of Triton, then Mosaic GPU, that can run the call
  with its default config: Triton is 1.05-1.5x of its floor and 1.3-1.7x faster than the Mosaic
  GPU scorer at every B from 1 to 512 on an H200 (S=1M, 64-wide codes, int8 rows;
  experiments/results/sparse_mosaic_scorer.md), which takes over where Triton refuses, e.g.
  codes past its 32-bit offsets (Hopper; int8 rows over 8-bit codes with per-chunk scales).
  Neither: Triton, whose refusal then names what stops it."""
  if platform == "tpu":
    return "mosaic_tpu"
  for name in ("triton", "mosaic_gpu"):
    impl = OP.implementations[name]
    if impl.why_not(p, impl.default_config(p, target), target, interpret) is None:
      return name
  return "triton"


def _run_mosaic_tpu(p: ScoresProblem, c: MosaicTpuScoresConfig, interpret):
  q_parts, row_scale, n = _query_parts(p, c.block_m)
  scale_t = None if p.key_scale is None else p.key_scale.T.astype(jnp.float32)
  out = mosaic_scores.chunk_scores(
      q_parts, p.codes, scale_t, n, chunk_size=p.chunk_size, block_m=c.block_m,
      block_k=c.block_k, chunks_per_block=c.chunks_per_block,
      interpret=dispatch.tpu_interpret(interpret))
  return _unfold(p, out, row_scale)


OP = dispatch.register(dispatch.Op(OP_NAME, _problem, {
    "xla": Implementation("xla", None, _run_xla),
    "triton": Implementation(
        "triton", "gpu", _run_triton, TritonScoresConfig,
        default_config=lambda p, t: gpu_tuning.triton_scores(p.dims, p.chunk_size, t),
        candidates=lambda p, t: gpu_tuning.triton_scores_candidates(p.dims, p.chunk_size, t),
        offsets_32bit=True),
    "mosaic_gpu": Implementation(
        "mosaic_gpu", "gpu", _run_mosaic_gpu, MosaicGpuScoresConfig,
        default_config=lambda p, t: gpu_tuning.mosaic_scores_config(p.dims, p.chunk_size, t),
        candidates=lambda p, t: gpu_tuning.mosaic_scores_candidates(p.dims, p.chunk_size, t),
        unsupported=_mosaic_gpu_unsupported, interpretable=False),
    "mosaic_tpu": Implementation(
        "mosaic_tpu", "tpu", _run_mosaic_tpu, MosaicTpuScoresConfig,
        default_config=lambda p, t: tpu_tuning.scores(p.dims, p.chunk_size, t),
        unsupported=lambda p, c, t, i: tpu_tuning.scores_unsupported(p.dims, p.chunk_size, c)),
}, _choose))


def chunk_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, *, chunk_size: int,
                 kv_length=None, int8: bool = False, implementation: str = "auto",
                 config: Any = None, interpret: bool = False,
                 backend: str | None = None) -> jax.Array:
  """Largest sketched logit of every query row in every chunk of the shared keys.

  Args:
    q: [B, T, Hq, D] queries (D even); query head h reads kv head h // G.
    codes: [S, Hkv, D/2] int8 packed 4-bit sketches of the shared keys (`sketch.pack`), or
      [S, Hkv, D] int8 8-bit ones (`pallas_kernels.sketch`).
    scale: [S, Hkv] float per-key scales (a key is left out only by kv_length), or [N, Hkv]
      non-negative per-chunk scales shared by each chunk's keys (the 8-bit sketches' layout:
      the kernels then take the raw code logits' max and scale once per chunk, no per-key
      multiply; a concrete negative one is refused, a traced one cannot be checked).
    chunk_size: C; chunk n is keys [n*C, (n+1)*C), the last one may be partial.
    kv_length: optional int scalar: keys [0, kv_length) count; in [0, S] (traced: clamped).
    int8: quantize each query row to int8 and score on the int8 matrix units (module docstring).
    implementation, config, interpret, backend: which kernel runs, see `dispatch.call`
      (implementations: `implementations("chunk_scores")`; configs: e.g. `TritonScoresConfig`).

  Returns:
    [B, T, Hq, N] float32: for query row (b, t, h) and chunk n, the max over its valid keys s of
    scale[s] * (q . code[s]) (scale[n] for per-chunk scales); -inf for a chunk with no valid
    key. Kernels multiply in the query dtype (bf16 queries: bf16 products, float32 sums), or in
    int8: a ranking, within rounding of the float32 reference.
  """
  return dispatch.call(OP, (q, codes, scale),
                       dict(chunk_size=chunk_size, kv_length=kv_length, int8=int8),
                       implementation=implementation, backend=backend, config=config,
                       interpret=interpret)
