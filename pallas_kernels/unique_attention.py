"""`unique_attention`: each request's newest queries against its own paged, ragged KV cache.

Every request owns a list of pages (`block_tables[b]`) in one pool `k_pages, v_pages[P, page_size,
Hkv, D]` and a length. This path reads every valid page once per step and is bandwidth-bound; the
kernels fold the G query heads and T tokens of a request's kv head into the rows of one matmul,
read several pages per compute block, skip pages past each request's length, and split each
request's pages across programs (flash decoding) when there are few requests, merging the partial
states by log-sum-exp. `write_pages` appends new tokens to the pages (in place when the caller
donates the pool).

Implementations: "xla" (the reference), "triton" (any GPU), "mosaic_gpu" (Hopper: pages by TMA,
wgmma; T * G <= 64; "auto" runs it for float8 pages in long tables, where it is faster),
"mosaic_tpu".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import checks, dispatch, layout, quant, targets
from pallas_kernels.dispatch import Implementation, Partials
from pallas_kernels.gpu import mosaic_attention, triton_unique
from pallas_kernels.gpu import tuning as gpu_tuning
from pallas_kernels.gpu.configs import MosaicGpuUniqueConfig, TritonUniqueConfig
from pallas_kernels.numerics import default_sm_scale
from pallas_kernels.reference import unique_attention_ref
from pallas_kernels.tpu import mosaic_unique
from pallas_kernels.tpu import tuning as tpu_tuning
from pallas_kernels.tpu.configs import MosaicTpuUniqueConfig

OP_NAME = "unique_attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniqueProblem(dispatch.Problem):
  k_pages: Any  # [P, page_size, Hkv, D]; dims.S = max_pages * page_size
  v_pages: Any
  block_tables: Any  # [B, max_pages]
  lengths: Any  # [B]
  page_size: int


def _problem(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None, k_scale=None,
             v_scale=None) -> UniqueProblem:
  dims, page_size = checks.check_paged_inputs(q, k_pages, v_pages, block_tables, lengths,
                                              op=OP_NAME)
  return UniqueProblem(q=q, k_pages=k_pages, v_pages=v_pages, block_tables=block_tables,
                       lengths=lengths, dims=dims, page_size=page_size,
                       **checks.check_scales(dims, sm_scale, k_scale, v_scale, op=OP_NAME))


def _kernel_args(p: UniqueProblem, rows: int) -> tuple:
  """(q_rows[Hkv, B, rows, D] padded past T*G, pools, int32 tables, lengths clamped to the
  tables)."""
  B, T, _, Hkv, D, S = p.dims
  q_rows = layout.fold_queries(p.q, Hkv).reshape(Hkv, B, T * p.dims.G, D)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - T * p.dims.G), (0, 0)))
  lengths = jnp.clip(p.lengths.astype(jnp.int32), 0, S)
  return q_rows, p.k_pages, p.v_pages, p.block_tables.astype(jnp.int32), lengths


def _tiled_rows(p: UniqueProblem, block_m: int) -> int:
  """A request's T*G rows padded to whole tiles of block_m."""
  return block_m * -(-p.dims.T * p.dims.G // block_m)


def _partials(p: UniqueProblem, o, lse) -> Partials:
  """Per-split [P, Hkv, B, rows, ...] -> the request rows only (padded rows are never written)."""
  R = p.dims.T * p.dims.G
  return Partials(o[..., :R, :], lse[..., :R], 0)


def _run_xla(p: UniqueProblem, config, interpret):
  del config, interpret
  return unique_attention_ref(p.q, p.k_pages, p.v_pages, p.block_tables, p.lengths,
                              sm_scale=p.sm_scale)


def _run_triton(p: UniqueProblem, c: TritonUniqueConfig, interpret):
  block_m = gpu_tuning.unique_block_m(p.dims.T, p.dims.G, c)
  args = _kernel_args(p, _tiled_rows(p, block_m))
  o, lse = triton_unique.unique_attention_partials(
      *args, T=p.dims.T, G=p.dims.G, scale=default_sm_scale(p.sm_scale, p.dims.D),
      pages_per_block=c.pages_per_block, num_splits=c.num_splits, block_m=block_m,
      num_warps=c.num_warps, num_stages=c.num_stages, interpret=interpret)
  return _partials(p, o, lse)


def _run_mosaic_gpu(p: UniqueProblem, c: MosaicGpuUniqueConfig, interpret):
  del interpret
  args = _kernel_args(p, mosaic_attention.BLOCK_Q)
  o, lse = mosaic_attention.unique_attention_partials(
      *args, T=p.dims.T, G=p.dims.G, scale=default_sm_scale(p.sm_scale, p.dims.D),
      block_k=c.block_k, num_splits=c.num_splits, num_stages=c.num_stages)
  return _partials(p, o, lse)


def _run_mosaic_tpu(p: UniqueProblem, c: MosaicTpuUniqueConfig, interpret):
  block_m = tpu_tuning.unique_block_m(p.dims.T, p.dims.G, c)
  args = _kernel_args(p, _tiled_rows(p, block_m))
  o, lse = mosaic_unique.unique_attention_partials(
      *args, T=p.dims.T, G=p.dims.G, scale=default_sm_scale(p.sm_scale, p.dims.D),
      pages_per_block=c.pages_per_block, num_splits=c.num_splits, block_m=block_m,
      interpret=dispatch.tpu_interpret(interpret),
      vmem_limit_bytes=tpu_tuning.vmem_limit(
          tpu_tuning.unique_vmem(p.dims, p.page_size, p.dtype, c), targets.current("tpu")))
  return _partials(p, o, lse)


def _choose(p: UniqueProblem, platform: str, target, interpret: bool) -> str:
  if platform == "tpu":
    return "mosaic_tpu"
  return gpu_tuning.unique_implementation(p.dims, p.page_size, p.dtype, target, interpret,
                                          kv_dtype=p.k_pages.dtype)


OP = dispatch.register(dispatch.Op(OP_NAME, _problem, {
    "xla": Implementation("xla", None, _run_xla),
    "triton": Implementation(
        "triton", "gpu", _run_triton, TritonUniqueConfig,
        default_config=lambda p, t: gpu_tuning.triton_unique(p.dims, p.page_size, p.dtype, t,
                                                             kv_dtype=p.k_pages.dtype),
        candidates=lambda p, t: gpu_tuning.triton_unique_candidates(
            p.dims, p.page_size, p.dtype, t, kv_dtype=p.k_pages.dtype),
        unsupported=lambda p, c, t, i: gpu_tuning.triton_unique_unsupported(
            p.dims, p.page_size, p.dtype, c, t),
        offsets_32bit=True),
    "mosaic_gpu": Implementation(
        "mosaic_gpu", "gpu", _run_mosaic_gpu, MosaicGpuUniqueConfig,
        default_config=lambda p, t: gpu_tuning.mosaic_unique(p.dims, p.page_size, p.dtype, t,
                                                             kv_dtype=p.k_pages.dtype),
        candidates=lambda p, t: gpu_tuning.mosaic_unique_candidates(
            p.dims, p.page_size, p.dtype, t, kv_dtype=p.k_pages.dtype),
        unsupported=lambda p, c, t, i: gpu_tuning.mosaic_unsupported(
            p.dims, p.dtype, c.block_k, c.num_stages, t, i, kv_dtype=p.k_pages.dtype,
            consumers=c.consumers, page_size=p.page_size),
        interpretable=False),
    "mosaic_tpu": Implementation(
        "mosaic_tpu", "tpu", _run_mosaic_tpu, MosaicTpuUniqueConfig,
        default_config=lambda p, t: tpu_tuning.unique(p.dims, p.page_size, p.dtype, t),
        candidates=lambda p, t: tpu_tuning.unique_candidates(p.dims, p.page_size, p.dtype, t),
        unsupported=lambda p, c, t, i: tpu_tuning.unique_unsupported(p.dims, p.page_size,
                                                                     p.dtype, c, t)),
}, _choose))


def unique_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                     block_tables: jax.Array, lengths: jax.Array, *,
                     sm_scale: float | None = None, k_scale=None, v_scale=None,
                     implementation: str = "auto",
                     config: Any = None, interpret: bool = False,
                     backend: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each request's T newest queries over its own paged KV cache.

  Args:
    q: [B, T, Hq, D] the T newest tokens of each request (T = 1 in decode); query head h reads
      kv head h // G. Query t of request b sits at position lengths[b] - T + t and attends
      causally to the positions <= its own.
    k_pages, v_pages: [P, page_size, Hkv, D] one pool of pages shared by all requests.
    block_tables: [B, max_pages] int page ids of each request in order. The first
      ceil(lengths[b] / page_size) entries of row b are its live pages and must lie in [0, P);
      entries past them may hold anything (never read, but by "mosaic_gpu" within the tile
      holding a request's last token: see Returns). A concrete table with a live id
      out of range is refused; under jit (traced tables or lengths) it is not seen: the XLA and
      Mosaic TPU implementations clamp the id into [0, P) and read that page (possibly another
      request's), the Triton kernel reads outside the pool (undefined values, or a fault).
    lengths: [B] int tokens in each request's cache including the T new ones (already written,
      see `write_pages`); 0 marks an empty batch slot. Concrete lengths must lie in
      [0, max_pages * page_size]; traced ones are clamped to it.
    sm_scale: score scale, default 1/sqrt(D).
    k_scale, v_scale: optional [Hkv] float32 dequantization scales of scaled K/V (e.g. float8:
      k = k_scale[h] * stored; `pallas_kernels.quant`); give both or neither.
    implementation, config, interpret, backend: which kernel runs, see `dispatch.call`
      (implementations: `implementations("unique_attention")`; configs: e.g. `TritonUniqueConfig`).

  Returns:
    o [B, T, Hq, D] in q.dtype and lse [B, T, Hq] float32 (natural log); a query with no key
    (length 0) gives o = 0, lse = -inf. Slots past a request's length (the tail of its last
    page, pages it does not own) are never read: NaN or inf there reaches no output. Except
    with "mosaic_gpu" (what "auto" runs for float8 pages on Hopper in tables of >= 16K keys
    (64K with pages under 64) where a request's T*G rows fit 64): it reads the key tile
    holding a request's last token whole (the pages its table names there, ids clamped into
    the pool) and weighs the slots past the length by 0, so they must be finite (0 * NaN is
    NaN); pools that start as zeros are.
  """
  return dispatch.call(OP, (q, k_pages, v_pages, block_tables, lengths),
                       dict(sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale),
                       implementation=implementation, backend=backend, config=config,
                       interpret=interpret)


def write_pages(k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                lengths_before: jax.Array, k_new: jax.Array, v_new: jax.Array, *,
                k_scale=None, v_scale=None) -> tuple[jax.Array, jax.Array]:
  """Writes the T new tokens of each request into its pages; returns the updated pools.

  Token t of request b goes to position lengths_before[b] + t, i.e. page
  block_tables[b, pos // page_size], slot pos % page_size. Positions past the table
  (>= max_pages * page_size) are dropped. Two tokens aimed at one (page, slot) (tables that
  share a page, e.g. a scratch page for padding rows) leave one of them there, which one is
  unspecified. Afterwards call `unique_attention` with
  lengths = lengths_before + T.

  The update is in place only when the caller donates the pools to a jitted step, e.g.::

      write = jax.jit(write_pages, donate_argnums=(0, 1))
      k_pages, v_pages = write(k_pages, v_pages, block_tables, lengths, k_new, v_new)

  (without donation XLA copies both pools every step).

  Args:
    k_pages, v_pages: [P, page_size, Hkv, D] the page pools.
    block_tables: [B, max_pages] int page ids of each request.
    lengths_before: [B] int tokens already in each request's cache.
    k_new, v_new: [B, T, Hkv, D] the new keys and values (cast to the pools' dtype).
    k_scale, v_scale: optional [Hkv] float32 dequantization scales of float8 pools (give both or
      neither; `unique_attention` takes the same): k_new / k_scale[h] is written, saturated to
      the format's finite range (`quant.quantize_with`); float8 pools without scales are
      written saturated too (scale 1).

  Concrete lengths_before must lie in [0, max_pages * page_size] and the table ids of the pages
  they and the new tokens cover in [0, P) (ValueError otherwise). Under jit nothing is checked:
  tokens at a negative position or on a page id outside [0, P) are dropped.
  """
  where = "write_pages"
  for name, x in (("k_pages", k_pages), ("v_pages", v_pages), ("block_tables", block_tables),
                  ("lengths_before", lengths_before), ("k_new", k_new), ("v_new", v_new)):
    checks.check_array(name, x, where)
  if k_pages.ndim != 4:
    raise ValueError(f"{where}: k_pages must have shape [P, page_size, Hkv, D], got "
                     f"{k_pages.shape}")
  if block_tables.ndim != 2 or not jnp.issubdtype(block_tables.dtype, jnp.integer):
    raise ValueError(f"{where}: block_tables must be an integer array of shape [B, max_pages], "
                     f"got {block_tables.shape} {block_tables.dtype}")
  P, page_size, Hkv, D = k_pages.shape
  B, max_pages = block_tables.shape
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"write_pages: v_pages must have the shape of k_pages {k_pages.shape}, "
                     f"got {v_pages.shape}")
  if k_new.ndim != 4 or k_new.shape[0] != B or k_new.shape[2:] != (Hkv, D):
    raise ValueError(f"write_pages: k_new must have shape [B={B}, T, Hkv={Hkv}, D={D}], got "
                     f"{k_new.shape}")
  if v_new.shape != k_new.shape:
    raise ValueError(f"write_pages: v_new must have the shape of k_new {k_new.shape}, got "
                     f"{v_new.shape}")
  if lengths_before.shape != (B,) or not jnp.issubdtype(lengths_before.dtype, jnp.integer):
    raise ValueError(f"write_pages: lengths_before must be an integer array of shape [B={B}], "
                     f"got {lengths_before.shape} {lengths_before.dtype}")
  checks.check_live_pages(block_tables, lengths_before, num_pages=P, page_size=page_size,
                          op=where, lengths_name="lengths_before", new_tokens=k_new.shape[1])
  k_scale, v_scale = checks.check_kv_scales(k_scale, v_scale, Hkv, op=where)
  if k_scale is not None:
    if not (quant.is_fp8(k_pages.dtype) and quant.is_fp8(v_pages.dtype)):
      raise ValueError(f"{where}: k_scale and v_scale need float8 pools "
                       f"({[d.name for d in quant.FP8_DTYPES]}), got {k_pages.dtype} and "
                       f"{v_pages.dtype}")
  elif quant.is_fp8(k_pages.dtype) and quant.is_fp8(v_pages.dtype):
    # Unscaled float8 pools: saturate, as scaled ones do (e4m3fn has no inf: a plain cast of an
    # out-of-range value is NaN).
    k_scale = v_scale = jnp.ones((Hkv,), jnp.float32)
  if k_scale is not None:
    k_new = quant.quantize_with(k_new, k_scale, k_pages.dtype)
    v_new = quant.quantize_with(v_new, v_scale, v_pages.dtype)
  pos = lengths_before.astype(jnp.int32)[:, None] + jnp.arange(k_new.shape[1])  # [B, T]
  slot = pos // page_size
  page = jnp.take_along_axis(block_tables.astype(jnp.int32), jnp.clip(slot, 0, max_pages - 1),
                             axis=1)
  # P is out of range: dropped (a negative id would wrap around the pool onto another page)
  page = jnp.where((pos >= 0) & (slot < max_pages) & (page >= 0), page, P)
  offset = pos % page_size
  k_pages = k_pages.at[page, offset].set(k_new.astype(k_pages.dtype), mode="drop")
  v_pages = v_pages.at[page, offset].set(v_new.astype(v_pages.dtype), mode="drop")
  return k_pages, v_pages
