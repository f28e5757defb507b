"""`chunk_attention`: each request attends to its routed chunks of the shared KV, grouped by chunk.

The shared k, v[S, Hkv, D] are cut into N = ceil(S / C) chunks; chunk c is rows [c*C, (c+1)*C).
`chunk_ids[B, Hkv, K]` lists the chunks each (request, kv head) attends to. Like MoE token
dispatch, the (request, chunk) pairs of a kv head are grouped by chunk (`grouping.group_by_chunk`):
the stacked query rows (T tokens x G heads) of every request that chose chunk c form one GEMM
against chunk c's K/V, cut into tiles of block_m rows. Each tile is one work item of the kernels,
so a chunk is read from HBM once per tile (the tiles of one chunk are adjacent in the work list,
so re-reads of a chunk that spans several tiles hit L2), and a chunk nobody chose is never read.
Each work item writes a partial (o, lse) per (request, chunk) pair, merged over the K pairs of
each request.

Implementations: "xla" (the reference, a dense masked attention), "triton" (any GPU),
"mosaic_gpu" (Hopper), "mosaic_tpu".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import checks, dispatch, grouping, layout, targets
from pallas_kernels.dispatch import Implementation, Partials
from pallas_kernels.gpu import mosaic_attention, triton_chunk
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.gpu.configs import MosaicGpuChunkConfig, TritonChunkConfig
from pallas_kernels.numerics import default_sm_scale
from pallas_kernels.reference import chunk_attention_ref
from pallas_kernels.shared_attention import SharedProblem
from pallas_kernels.tpu import mosaic_chunk
from pallas_kernels.tpu import tuning as tpu_tuning
from pallas_kernels.tpu.configs import MosaicTpuChunkConfig

OP_NAME = "chunk_attention"
# Mosaic GPU tiles of grouped rows: a ping-pong pair of consumers (128 rows), since a chunk goes
# to Mosaic GPU only when many rows chose it (`gpu.tuning.chunk_implementation`).
CHUNK_CONSUMERS = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkedProblem(SharedProblem):
  """Shared attention restricted to chunks of C keys (N of them)."""

  chunk_size: int
  num_chunks: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkProblem(ChunkedProblem):
  chunk_ids: Any  # [B, Hkv, K]

  @property
  def top_k(self) -> int:
    return self.chunk_ids.shape[2]


def _problem(q, k, v, chunk_ids, *, chunk_size, sm_scale=None, kv_length=None, k_scale=None,
             v_scale=None) -> ChunkProblem:
  dims = checks.check_shared_kv_inputs(q, k, v, op=OP_NAME)
  return ChunkProblem(q=q, k=k, v=v, dims=dims,
                      **checks.check_scales(dims, sm_scale, k_scale, v_scale, op=OP_NAME),
                      kv_length=checks.check_kv_length(kv_length, dims.S, op=OP_NAME),
                      chunk_ids=chunk_ids, chunk_size=chunk_size,
                      num_chunks=checks.check_chunk_ids(chunk_ids, dims, chunk_size, op=OP_NAME))


def _pallas(kernel):
  """Wraps a Pallas implementation's run: the work list in, per-pair partials out.

  kernel(p, groups, q_rows, n, scale, config, interpret) -> (o, lse) per pair row
  [Hkv, B*K*R, (D)]. Rows of pairs whose chunk id is outside [0, N) are never written (or hold
  another tile's slot): their lse becomes -inf here, so the merge over each request's K pairs
  ignores them (`dispatch.finish`: with K = 1 their o becomes 0).
  """

  def run(p: ChunkProblem, config, interpret):
    B, T, _, Hkv, D, S = p.dims
    K, R = p.top_k, T * p.dims.G
    if K == 0:
      return jnp.zeros(p.q.shape, p.dtype), jnp.full(p.q.shape[:3], -jnp.inf, jnp.float32)
    block_m = getattr(config, "block_m", mosaic_attention.rows_per_cta(CHUNK_CONSUMERS))
    groups = grouping.group_by_chunk(p.chunk_ids, num_chunks=p.num_chunks, rows_per_pair=R,
                                     block_m=block_m)
    n = jnp.int32(S) if p.kv_length is None else jnp.clip(p.kv_length, 0, S)
    o, lse = kernel(p, groups, layout.fold_queries(p.q, Hkv), n,
                    default_sm_scale(p.sm_scale, D), config, interpret)
    lse = jnp.where(jnp.repeat(groups.valid, R, axis=1), lse, -jnp.inf)
    return Partials(o.reshape(Hkv, B, K, R, D), lse.reshape(Hkv, B, K, R), 2)

  return run


def _triton(p, groups, q_rows, n, scale, c: TritonChunkConfig, interpret):
  return triton_chunk.chunk_attention_partials(
      q_rows, p.k, p.v, n, groups.tile_chunk, groups.rows, rows_per_pair=p.dims.T * p.dims.G,
      pairs_per_request=p.top_k, scale=scale, chunk_size=p.chunk_size,
      block_m=c.block_m, block_k=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages,
      interpret=interpret)


def _tile_rows(p, groups, q_rows):
  return grouping.gather_tile_rows(q_rows, groups, pairs_per_request=p.top_k,
                                   rows_per_pair=p.dims.T * p.dims.G)


def _mosaic_gpu(p, groups, q_rows, n, scale, c: MosaicGpuChunkConfig, interpret):
  del interpret
  start = groups.tile_chunk.T * p.chunk_size  # [NT, Hkv]
  end = jnp.where(groups.tile_chunk.T >= 0, jnp.minimum(start + p.chunk_size, n), 0)
  ranges = jnp.stack([jnp.maximum(start, 0), end], axis=-1)[:, :, None, :]
  o_t, lse_t = mosaic_attention.attention_over_ranges(
      _tile_rows(p, groups, q_rows), p.k, p.v, ranges, scale=scale, block_k=c.block_k,
      num_stages=c.num_stages, consumers=CHUNK_CONSUMERS)
  return grouping.scatter_to_pairs(o_t[0], lse_t[0], groups)


def _mosaic_tpu(p, groups, q_rows, n, scale, c: MosaicTpuChunkConfig, interpret):
  o_t, lse_t = mosaic_chunk.chunk_attention_tiles(
      _tile_rows(p, groups, q_rows), p.k, p.v, n, groups.tile_chunk, groups.num_tiles,
      scale=scale, chunk_size=p.chunk_size, block_m=c.block_m, block_k=c.block_k,
      interpret=dispatch.tpu_interpret(interpret),
      vmem_limit_bytes=tpu_tuning.vmem_limit(tpu_tuning.chunk_vmem(p.dims, p.dtype, c),
                                             targets.current("tpu")))
  return grouping.scatter_to_pairs(o_t, lse_t, groups)


def _run_xla(p: ChunkProblem, config, interpret):
  del config, interpret
  return chunk_attention_ref(p.q, p.k, p.v, p.chunk_ids, chunk_size=p.chunk_size,
                             sm_scale=p.sm_scale, kv_length=p.kv_length)


def _choose(p: ChunkProblem, platform: str, target, interpret: bool) -> str:
  if platform == "tpu":
    return "mosaic_tpu"
  return gpu_tuning.chunk_implementation(p.dims, p.dtype, p.top_k, p.chunk_size, target,
                                         interpret, kv_dtype=p.k.dtype)


def _mosaic_gpu_unsupported(p: ChunkProblem, c: MosaicGpuChunkConfig, target, interpret):
  if p.chunk_size % c.block_k:
    return (f"chunk_size must be a multiple of config.block_k, got chunk_size={p.chunk_size}, "
            f"block_k={c.block_k}")
  return gpu_tuning.mosaic_unsupported(p.dims, p.dtype, c.block_k, c.num_stages, target,
                                       interpret, kv_dtype=p.k.dtype, consumers=CHUNK_CONSUMERS)


OP = dispatch.register(dispatch.Op(OP_NAME, _problem, {
    "xla": Implementation("xla", None, _run_xla),
    "triton": Implementation(
        "triton", "gpu", _pallas(_triton), TritonChunkConfig,
        default_config=lambda p, t: gpu_tuning.triton_chunk(p.dims, p.top_k, p.chunk_size,
                                                            p.dtype, t),
        candidates=lambda p, t: gpu_tuning.triton_chunk_candidates(p.dims, p.top_k,
                                                                   p.chunk_size, p.dtype, t),
        unsupported=lambda p, c, t, i: gpu_tuning.triton_smem_unsupported(
            c.block_m, c.block_k, p.dims.D, p.dtype, c.num_stages, t),
        offsets_32bit=True),
    "mosaic_gpu": Implementation(
        "mosaic_gpu", "gpu", _pallas(_mosaic_gpu), MosaicGpuChunkConfig,
        default_config=lambda p, t: gpu_tuning.mosaic_chunk(p.dims, p.dtype, t,
                                                            kv_dtype=p.k.dtype),
        unsupported=_mosaic_gpu_unsupported, interpretable=False),
    "mosaic_tpu": Implementation(
        "mosaic_tpu", "tpu", _pallas(_mosaic_tpu), MosaicTpuChunkConfig,
        default_config=lambda p, t: tpu_tuning.chunk(p.dims, p.top_k, p.chunk_size, p.dtype, t),
        unsupported=lambda p, c, t, i: tpu_tuning.chunk_unsupported(p.chunk_size, c)),
}, _choose))


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_ids: jax.Array, *,
                    chunk_size: int, sm_scale: float | None = None, kv_length=None,
                    k_scale=None, v_scale=None,
                    implementation: str = "auto", config: Any = None, interpret: bool = False,
                    backend: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each request's queries over the union of its selected chunks of the shared KV.

  Args:
    q: [B, T, Hq, D] queries; query head h reads kv head h // G.
    k, v: [S, Hkv, D] the shared keys / values; chunk c is rows [c*C, (c+1)*C) (the last chunk
      may be partial).
    chunk_ids: [B, Hkv, K] integer chunk ids per (request, kv head), duplicate-free; ids outside
      [0, N) (e.g. -1 padding from the router) select nothing and may repeat. A concrete array
      that lists a chunk twice in one (request, kv head) row is refused; under jit (traced ids)
      a repeat cannot be seen and its result is undefined (the implementations differ: the XLA
      reference attends to the chunk once, Mosaic TPU counts it twice, Triton returns garbage).
    chunk_size: C.
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar: keys [0, kv_length) are valid; in [0, S] (traced: clamped).
    k_scale, v_scale: optional [Hkv] float32 dequantization scales of scaled K/V (e.g. float8:
      k = k_scale[h] * stored; `pallas_kernels.quant`); give both or neither.
    implementation, config, interpret, backend: which kernel runs, see `dispatch.call`
      (implementations: `implementations("chunk_attention")`; configs: e.g. `TritonChunkConfig`).

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32; rows with no valid key give o = 0,
    lse = -inf. With every chunk selected it equals `shared_attention`. Keys of unselected
    chunks are never read; keys past kv_length reach no output, except that "mosaic_gpu" reads
    the key tile holding kv_length whole (as `shared_attention` says): they must be finite there.
  """
  return dispatch.call(OP, (q, k, v, chunk_ids),
                       dict(chunk_size=chunk_size, sm_scale=sm_scale, kv_length=kv_length,
                            k_scale=k_scale, v_scale=v_scale),
                       implementation=implementation, backend=backend, config=config,
                       interpret=interpret)
