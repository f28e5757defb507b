"""The chunk scorer on GPU (Pallas Triton lowering): every query row against every key sketch.

Grid (Hkv, M blocks, chunk blocks). A program holds block_m folded query rows of one kv head (both
halves of D for packed 4-bit sketches, all of D for 8-bit ones) and streams the sketches of
`chunks_per_program` chunks in block_k-key tiles: unpack the two nibbles of each byte and take two
dots of width D/2 (packed), or one dot of width D (8-bit), on the tensor cores, scale each key's
logit (per-key scales; per-chunk ones factor out of the max and are left to the caller), and
keep the running max per row. The sketches of a chunk are read once for all the
program's rows (the whole batch's, stacked like shared_attention's), and what leaves the program
is one float per (row, chunk): no [rows, keys] logits reach HBM.

int8 query rows (the caller quantized them and multiplies their row scales back in) run the dots
on the int8 tensor cores: the codes are integers already.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import sketch
from pallas_kernels.gpu import softmax


def _kernel(len_ref, *refs, chunk_size: int, block_k: int, chunks_per_program: int, precision,
            width: int, packed: bool, per_key_scale: bool):
  if per_key_scale:
    *q_refs, codes_ref, scale_ref, out_ref = refs
  else:
    (*q_refs, codes_ref, out_ref), scale_ref = refs, None
  # [block_m, width padded] each (padding lanes 0, so they add nothing to the dots)
  q_parts = [softmax.load_rows(r, width) for r in q_refs]
  real_lanes = softmax.lanes(width, q_parts[0].shape[-1])
  block_m = q_parts[0].shape[0]
  first = pl.program_id(2) * chunks_per_program
  length = len_ref[0]
  operand = q_parts[0].dtype
  acc = jnp.int32 if operand == jnp.int8 else jnp.float32
  col = jnp.arange(chunks_per_program)[None, :]

  def chunk(j, tile):
    start = (first + j) * chunk_size
    end = jnp.minimum(start + chunk_size, length)

    def keys(masked: bool):
      # Only the tile holding `end` masks keys: the per-logit work of the full tiles is the dot
      # and the max (plus the multiply by per-key scales), which is what the scorer's time tracks.
      def body(i, best):
        s0 = start + i * block_k
        valid = s0 + jnp.arange(block_k) < end
        mask = valid[:, None] if masked else None
        if real_lanes is not None:
          mask = real_lanes if mask is None else mask & real_lanes
        codes = codes_ref[pl.ds(s0, block_k), :] if mask is None else pltriton.load(
            codes_ref.at[pl.ds(s0, block_k), :], mask=mask, other=0)
        s = functools.reduce(jnp.add, [
            jnp.dot(q, c.astype(operand).T, preferred_element_type=acc, precision=precision)
            for q, c in zip(q_parts, sketch.parts(codes, packed))])
        if scale_ref is not None:
          scale = (pltriton.load(scale_ref.at[pl.ds(s0, block_k)], mask=valid, other=0.0)
                   if masked else scale_ref[pl.ds(s0, block_k)])
          s = s.astype(jnp.float32) * scale[None, :].astype(jnp.float32)
        if masked:  # the tile holds a valid key, so the sentinel never wins a row's max
          s = jnp.where(valid[None, :], s, jnp.iinfo(s.dtype).min if s.dtype == jnp.int32
                        else -jnp.inf)
        return jnp.maximum(best, s.max(axis=1).astype(jnp.float32))

      return body

    n = jnp.maximum(end - start, 0)
    full = n // block_k
    best = jax.lax.fori_loop(0, full, keys(False), jnp.full((block_m,), -jnp.inf, jnp.float32))
    best = jax.lax.fori_loop(full, pl.cdiv(n, block_k), keys(True), best)
    return jnp.where(col == j, best[:, None], tile)

  out_ref[...] = jax.lax.fori_loop(0, chunks_per_program, chunk,
                                   jnp.full((block_m, chunks_per_program), -jnp.inf, jnp.float32))


def chunk_scores(q_parts: tuple[jax.Array, ...], codes: jax.Array, scale: jax.Array | None,
                 kv_length: jax.Array, *, chunk_size: int, block_m: int, block_k: int,
                 chunks_per_program: int, num_warps: int, num_stages: int, precision=None,
                 interpret: bool = False) -> jax.Array:
  """Largest sketched logit of each folded query row in each chunk.

  Args:
    q_parts: the folded query rows [Hkv, M, W] (M a multiple of block_m) as `sketch.split`
      makes them: its two halves of D (W = D/2) for packed codes, or all of D (W = D) for 8-bit
      codes; bfloat16/float16/float32, or int8 (quantized rows).
    codes: [S, Hkv, W] int8 sketches; scale: [S, Hkv] per-key scales, or None: the largest
      raw code logit of each (row, chunk) (per-chunk scales are applied by the caller).
    kv_length: int32 scalar, keys [0, kv_length) are valid.

  Returns:
    [Hkv, M, N'] float32 with N' = N rounded up to chunks_per_program; -inf where a chunk has no
    valid key.
  """
  Hkv, M, W = q_parts[0].shape
  S = codes.shape[0]
  n_blocks = pl.cdiv(pl.cdiv(S, chunk_size), chunks_per_program)
  kernel = functools.partial(_kernel, chunk_size=chunk_size, block_k=block_k,
                             chunks_per_program=chunks_per_program, precision=precision,
                             width=W, packed=len(q_parts) == 2,
                             per_key_scale=scale is not None)
  scales = () if scale is None else (scale,)
  Dp = softmax.padded(W)  # blocks span the padded width (`softmax.padded`)
  q_spec = pl.BlockSpec((None, block_m, Dp), lambda h, i, j: (h, i, 0))
  return pl.pallas_call(
      kernel,
      grid=(Hkv, M // block_m, n_blocks),
      in_specs=[
          pl.BlockSpec((1,), lambda h, i, j: (0,)),
          *[q_spec] * len(q_parts),
          pl.BlockSpec((S, None, Dp), lambda h, i, j: (0, h, 0)),
          *[pl.BlockSpec((S, None), lambda h, i, j: (0, h))] * len(scales),
      ],
      out_specs=pl.BlockSpec((None, block_m, chunks_per_program), lambda h, i, j: (h, i, j)),
      out_shape=jax.ShapeDtypeStruct((Hkv, M, n_blocks * chunks_per_program), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moska_chunk_scores",
  )(kv_length.reshape(1), *q_parts, codes, *scales)
