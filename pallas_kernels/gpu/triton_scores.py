"""The chunk scorer on GPU (Pallas Triton lowering): every query row against every key sketch.

Grid (Hkv, M blocks, chunk blocks). A program holds block_m folded query rows of one kv head (both
halves of D for packed 4-bit sketches, all of D for 8-bit ones) and streams the sketches of
`chunks_per_program` chunks in block_k-key tiles: unpack the two nibbles of each byte and take two
dots of width D/2 (packed), or one dot of width D (8-bit), on the tensor cores, scale each key's
logit, and keep the running max per row. The sketches of a chunk are read once for all the
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
            width: int, packed: bool):
  *q_refs, codes_ref, scale_ref, out_ref = refs
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

    def keys(i, best):
      s0 = start + i * block_k
      valid = s0 + jnp.arange(block_k) < end
      mask = valid[:, None] if real_lanes is None else valid[:, None] & real_lanes
      codes = pltriton.load(codes_ref.at[pl.ds(s0, block_k), :], mask=mask, other=0)
      s = functools.reduce(jnp.add, [
          jnp.dot(q, c.astype(operand).T, preferred_element_type=acc, precision=precision)
          for q, c in zip(q_parts, sketch.parts(codes, packed))]).astype(jnp.float32)
      scale = pltriton.load(scale_ref.at[pl.ds(s0, block_k)], mask=valid, other=0.0)
      s = jnp.where(valid[None, :], s * scale[None, :].astype(jnp.float32), -jnp.inf)
      return jnp.maximum(best, s.max(axis=1))

    n_tiles = pl.cdiv(jnp.maximum(end - start, 0), block_k)
    best = jax.lax.fori_loop(0, n_tiles, keys, jnp.full((block_m,), -jnp.inf, jnp.float32))
    return jnp.where(col == j, best[:, None], tile)

  out_ref[...] = jax.lax.fori_loop(0, chunks_per_program, chunk,
                                   jnp.full((block_m, chunks_per_program), -jnp.inf, jnp.float32))


def chunk_scores(q_parts: tuple[jax.Array, ...], codes: jax.Array, scale: jax.Array,
                 kv_length: jax.Array, *, chunk_size: int, block_m: int, block_k: int,
                 chunks_per_program: int, num_warps: int, num_stages: int, precision=None,
                 interpret: bool = False) -> jax.Array:
  """Largest sketched logit of each folded query row in each chunk.

  Args:
    q_parts: the folded query rows [Hkv, M, W] (M a multiple of block_m) as `sketch.split`
      makes them: its two halves of D (W = D/2) for packed codes, or all of D (W = D) for 8-bit
      codes; bfloat16/float16/float32, or int8 (quantized rows).
    codes: [S, Hkv, W] int8 sketches; scale: [S, Hkv] per-key scales.
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
                             width=W, packed=len(q_parts) == 2)
  Dp = softmax.padded(W)  # blocks span the padded width (`softmax.padded`)
  q_spec = pl.BlockSpec((None, block_m, Dp), lambda h, i, j: (h, i, 0))
  return pl.pallas_call(
      kernel,
      grid=(Hkv, M // block_m, n_blocks),
      in_specs=[
          pl.BlockSpec((1,), lambda h, i, j: (0,)),
          *[q_spec] * len(q_parts),
          pl.BlockSpec((S, None, Dp), lambda h, i, j: (0, h, 0)),
          pl.BlockSpec((S, None), lambda h, i, j: (0, h)),
      ],
      out_specs=pl.BlockSpec((None, block_m, chunks_per_program), lambda h, i, j: (h, i, j)),
      out_shape=jax.ShapeDtypeStruct((Hkv, M, n_blocks * chunks_per_program), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moska_chunk_scores",
  )(kv_length.reshape(1), *q_parts, codes, scale)
