"""`tile_chunk_attention`: each tile of requests attends to one list of chunks (batch-aware
routing).

`chunk_attention` gives every (request, kv head) its own chunks and pays for it with a partial
state per (request, chunk) pair that is written, read back and merged. When the requests of a tile
share one list of chunks -- the union of what each of them was routed to, so each still sees at
least its own chunks, and the extra ones only add exact attention -- the tile runs like
shared_attention over a subset of S: its rows stream the list's chunks with one online softmax
and write one partial per split. Routing decides the tiles (`moska_jax.routing.batch_aware`
clusters requests that chose alike); this op takes them as given.

Implementations: "xla" (the reference), "triton" (any GPU), "mosaic_gpu" (Hopper: the list's
chunks gathered by TMA into one key stream per 64 or 128 rows of a tile,
`gpu.mosaic_attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import checks, dispatch, grouping, layout
from pallas_kernels.chunk_attention import ChunkedProblem
from pallas_kernels.dispatch import Implementation, Partials
from pallas_kernels.gpu import mosaic_attention, triton_shared
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.gpu.configs import MosaicGpuTileConfig, TritonSharedConfig
from pallas_kernels.numerics import default_sm_scale
from pallas_kernels.reference import chunk_attention_ref

OP_NAME = "tile_chunk_attention"
# Shorter chunks are gathered by one TMA copy per 8-32 keys, never compiled in a test: "auto"
# leaves them to Triton (an explicit MosaicGpuTileConfig still runs them).
MOSAIC_MIN_CHUNK = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileProblem(ChunkedProblem):
  tile_ids: Any  # [n_tiles, Hkv, U]

  @property
  def requests_per_tile(self) -> int:
    return self.dims.B // self.tile_ids.shape[0]


def _problem(q, k, v, tile_chunk_ids, *, chunk_size, sm_scale=None, kv_length=None,
             k_scale=None, v_scale=None):
  dims = checks.check_shared_kv_inputs(q, k, v, op=OP_NAME)
  scales = checks.check_scales(dims, sm_scale, k_scale, v_scale, op=OP_NAME)
  checks.check_array("tile_chunk_ids", tile_chunk_ids, OP_NAME)
  if (tile_chunk_ids.ndim != 3 or tile_chunk_ids.shape[0] < 1
      or dims.B % tile_chunk_ids.shape[0] or tile_chunk_ids.shape[1] != dims.Hkv
      or not jnp.issubdtype(tile_chunk_ids.dtype, jnp.integer)):
    raise ValueError(f"{OP_NAME}: tile_chunk_ids must be an integer array of shape [n_tiles, "
                     f"Hkv={dims.Hkv}, U] with n_tiles dividing B={dims.B}, got "
                     f"{tile_chunk_ids.shape} {tile_chunk_ids.dtype}")
  n_chunks = checks.check_chunk_ids(tile_chunk_ids, dims._replace(B=tile_chunk_ids.shape[0]),
                                    chunk_size, op=OP_NAME, name="tile_chunk_ids", row="tile")
  return TileProblem(q=q, k=k, v=v, dims=dims, **scales,
                     kv_length=checks.check_kv_length(kv_length, dims.S, op=OP_NAME),
                     tile_ids=tile_chunk_ids, chunk_size=chunk_size, num_chunks=n_chunks)


def _run_xla(p: TileProblem, config, interpret):
  del config, interpret
  ids = jnp.repeat(p.tile_ids, p.requests_per_tile, axis=0)
  return chunk_attention_ref(p.q, p.k, p.v, ids, chunk_size=p.chunk_size, sm_scale=p.sm_scale,
                             kv_length=p.kv_length)


def _pallas(kernel, row_block):
  """Wraps a Pallas implementation: each tile's folded query rows padded to whole row blocks of
  row_block(config) rows (a block never straddles two tiles), the kernel's per-split partials
  cut back to the real rows; lists of no chunk attend to nothing, with no kernel.

  kernel(p, q_rows[Hkv, n_tiles * rows_pad, D], rows_pad, n (kv_length clamped), config,
  interpret) -> (o, lse) [P, Hkv, n_tiles * rows_pad, (D)].
  """

  def run(p: TileProblem, config, interpret):
    B, T, _, Hkv, D, S = p.dims
    if p.tile_ids.shape[-1] == 0:
      return jnp.zeros(p.q.shape, p.dtype), jnp.full(p.q.shape[:3], -jnp.inf, jnp.float32)
    n_tiles, rows = p.tile_ids.shape[0], p.requests_per_tile * T * p.dims.G
    block = row_block(config)
    rows_pad = -(-rows // block) * block
    q_rows = layout.fold_queries(p.q, Hkv).reshape(Hkv, n_tiles, rows, D)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    n = jnp.int32(S) if p.kv_length is None else jnp.clip(p.kv_length, 0, S)
    o, lse = kernel(p, q_rows.reshape(Hkv, n_tiles * rows_pad, D), rows_pad, n, config,
                    interpret)
    P, M = o.shape[0], B * T * p.dims.G
    o = o.reshape(P, Hkv, n_tiles, rows_pad, D)[:, :, :, :rows].reshape(P, Hkv, M, D)
    lse = lse.reshape(P, Hkv, n_tiles, rows_pad)[..., :rows].reshape(P, Hkv, M)
    return Partials(o, lse, 0)

  return run


def _triton(p: TileProblem, q_rows, rows_pad, n, c: TritonSharedConfig, interpret):
  width = 1 << max(0, (p.tile_ids.shape[-1] - 1).bit_length())  # a power of two for Triton
  ids, counts = grouping.compact_ids(p.tile_ids.transpose(1, 0, 2), p.num_chunks, width)
  return triton_shared.chunk_list_partials(
      q_rows, p.k, p.v, n, ids, counts, scale=default_sm_scale(p.sm_scale, p.dims.D),
      chunk_size=p.chunk_size, rows_per_tile=rows_pad, block_m=c.block_m, block_k=c.block_k,
      num_splits=c.num_splits, num_warps=c.num_warps, num_stages=c.num_stages,
      interpret=interpret)


def _mosaic_gpu(p: TileProblem, q_rows, rows_pad, n, c: MosaicGpuTileConfig, interpret):
  del interpret
  ids, _ = grouping.compact_ids(p.tile_ids, p.num_chunks, p.tile_ids.shape[-1])
  per_tile = rows_pad // c.rows_per_cta  # CTAs per tile, one table row each
  return mosaic_attention.list_attention_partials(
      q_rows, p.k, p.v, jnp.repeat(ids, per_tile, axis=0), n, chunk_size=p.chunk_size,
      scale=default_sm_scale(p.sm_scale, p.dims.D), block_k=c.block_k, num_splits=c.num_splits,
      num_stages=c.num_stages, consumers=c.consumers)


def _mosaic_config(p: TileProblem, target) -> MosaicGpuTileConfig:
  return gpu_tuning.mosaic_tiles(p.dims, p.requests_per_tile, p.tile_ids.shape[-1],
                                 p.chunk_size, p.dtype, target, kv_dtype=p.k.dtype)


def _mosaic_candidates(p: TileProblem, target) -> list[MosaicGpuTileConfig]:
  return gpu_tuning.mosaic_tiles_candidates(p.dims, p.requests_per_tile, p.tile_ids.shape[-1],
                                            p.chunk_size, p.dtype, target, kv_dtype=p.k.dtype)


def _mosaic_unsupported(p: TileProblem, c: MosaicGpuTileConfig, target, interpret):
  return gpu_tuning.mosaic_tiles_unsupported(p.dims, p.chunk_size, p.dtype, c, target, interpret,
                                             kv_dtype=p.k.dtype)


def _choose(p: TileProblem, platform: str, target, interpret: bool) -> str:
  """Mosaic GPU where it can run the call with chunks of at least MOSAIC_MIN_CHUNK keys, else
  Triton."""
  if platform == "tpu":  # a GPU kernel would not lower, or interpret as if it were the TPU's
    raise ValueError(f"{OP_NAME}: batch-aware tiles have no TPU kernel yet; route per pair "
                     f"(MoskaConfig(batch_aware=0)) or run the reference "
                     f"(implementation='xla')")
  if (p.chunk_size >= MOSAIC_MIN_CHUNK
      and _mosaic_unsupported(p, _mosaic_config(p, target), target, interpret) is None):
    return "mosaic_gpu"
  return "triton"


OP = dispatch.register(dispatch.Op(OP_NAME, _problem, {
    "xla": Implementation("xla", None, _run_xla),
    "triton": Implementation(
        "triton", "gpu", _pallas(_triton, lambda c: c.block_m), TritonSharedConfig,
        default_config=lambda p, t: gpu_tuning.triton_tiles(
            p.dims, p.requests_per_tile, p.tile_ids.shape[-1], p.chunk_size, p.dtype, t),
        unsupported=lambda p, c, t, i: (
            "config.widen_kv: tile_chunk_attention widens float8 K/V only in its kernel"
            if c.widen_kv else gpu_tuning.triton_smem_unsupported(
                c.block_m, c.block_k, p.dims.D, p.dtype, c.num_stages, t)),
        offsets_32bit=True),
    "mosaic_gpu": Implementation(
        "mosaic_gpu", "gpu", _pallas(_mosaic_gpu, lambda c: c.rows_per_cta),
        MosaicGpuTileConfig,
        default_config=_mosaic_config, candidates=_mosaic_candidates,
        unsupported=_mosaic_unsupported, interpretable=False),
}, _choose))


def tile_chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, tile_chunk_ids: jax.Array, *,
                         chunk_size: int, sm_scale: float | None = None, kv_length=None,
                         k_scale=None, v_scale=None,
                         implementation: str = "auto", config: Any = None,
                         interpret: bool = False,
                         backend: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each tile of requests over its tile's chunks of the shared KV.

  Args:
    q: [B, T, Hq, D] queries; request b belongs to tile b // R, R = B / n_tiles.
    k, v: [S, Hkv, D] the shared keys / values; chunk c is rows [c*C, (c+1)*C).
    tile_chunk_ids: [n_tiles, Hkv, U] integer chunk ids per (tile, kv head), duplicate-free; ids
      outside [0, N) (e.g. -1 padding) select nothing and may repeat. `grouping.tile_union`
      builds them. A concrete array that lists a chunk twice in one (tile, kv head) row is
      refused; under jit (traced ids) a repeat cannot be seen and its result is undefined (the
      XLA reference attends to the chunk once, the Triton kernel once per repeat).
    chunk_size: C.
    sm_scale: score scale, default 1/sqrt(D).
    kv_length: optional int scalar: keys [0, kv_length) are valid; in [0, S] (traced: clamped).
    k_scale, v_scale: optional [Hkv] float32 dequantization scales of scaled K/V (e.g. float8:
      k = k_scale[h] * stored; `pallas_kernels.quant`); give both or neither.
    implementation, config, interpret, backend: which kernel runs, see `dispatch.call`
      (implementations: `implementations("tile_chunk_attention")`; configs: `TritonSharedConfig`,
      `MosaicGpuTileConfig`).

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32: chunk_attention with every request
    given its tile's chunks; rows with no valid key give o = 0, lse = -inf. Keys of unselected
    chunks and past kv_length reach no output, and the implementations other than "mosaic_gpu"
    never read them; "mosaic_gpu" reads the key tile holding the end of a tile's keys whole (as
    `chunk_attention` says), so keys past kv_length in a tile's chunks must be finite.
  """
  return dispatch.call(OP, (q, k, v, tile_chunk_ids),
                       dict(chunk_size=chunk_size, sm_scale=sm_scale, kv_length=kv_length,
                            k_scale=k_scale, v_scale=v_scale),
                       implementation=implementation, backend=backend, config=config,
                       interpret=interpret)
