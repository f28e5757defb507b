"""The chunk scorer on Hopper (Pallas Mosaic GPU): int8 query rows against 8-bit key sketches on
the int8 tensor cores, fed by TMA.

The router's default case only (`chunk_scores` with int8 rows and 8-bit codes with one scale
per chunk, which the caller applies): each CTA owns `consumers` x 64 folded query rows of one kv
head and a run of chunks_per_cta chunks. A producer warpgroup streams the run's code tiles
[block_k, W] into a ring of shared-memory slots; each consumer multiplies its 64 rows by every
tile (wgmma s8 x s8 -> s32, the tile read K-major as stored, like K in attention), takes each
row's max over the tile and keeps the running max over a chunk's tiles; a chunk's maxima go to a
[chunks, 64] tile in shared memory, which leaves the CTA in one TMA copy. Consumers of one CTA
read the same tiles (half the reads per row at large M). TMA addresses the codes, so Pallas
Triton's 32-bit offsets (2^31 one-byte elements) do not bound it (not yet run past them on a
GPU: `test_codes_past_triton_offsets_run_on_mosaic_gpu` is the check).

Measured on an H200 (S=1M, 64-wide codes; experiments/results/sparse_mosaic_scorer.md): the
same scores as the Triton scorer, 1.3-1.7x its time at every B from 1 to 512 (1.7-2.0x of the
floor, Triton 1.05-1.5x): each consumer runs one serial chain per tile (wait, wgmma, wait,
convert and reduce its scores) with nothing of its own to overlap. So "auto" runs it only
where Triton cannot address the codes (`chunk_scores._choose`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import mosaic_attention
from pallas_kernels.gpu.mosaic_attention import BLOCK_Q, PRODUCER_REGISTERS

def smem_bytes_used(W: int, block_k: int, *, num_stages: int, consumers: int,
                    chunks_per_cta: int) -> int:
  """Shared memory of one CTA: each consumer's int8 rows and [chunks, 64] float32 maxima, the
  ring of code tiles, barriers (slack)."""
  per_consumer = BLOCK_Q * W + chunks_per_cta * BLOCK_Q * 4
  return consumers * per_consumer + num_stages * block_k * W + 1024


def chunk_scores(q8: jax.Array, codes: jax.Array, kv_length: jax.Array, *, chunk_size: int,
                 block_k: int, chunks_per_cta: int, num_stages: int,
                 consumers: int) -> jax.Array:
  """Largest raw code logit of each folded int8 query row in each chunk.

  Args:
    q8: [Hkv, M, W] int8 query rows, M a multiple of 64 * consumers, W a multiple of 32.
    codes: [S, Hkv, W] int8 8-bit sketches (S a multiple of 8: TMA zero-fills a tile past S,
      whose keys lie past kv_length).
    kv_length: int32 scalar in [0, S]: keys [0, kv_length) count.
    chunk_size: C, a multiple of block_k.
    block_k: keys per tile (a multiple of 16, at most 256: the integer wgmma's N).

  Returns:
    [Hkv, N', M] float32, N' = N rounded up to chunks_per_cta: per (chunk, row) the max over the
    chunk's valid keys of q8 . code; -inf for a chunk with no valid key.
  """
  Hkv, M, W = q8.shape
  S = codes.shape[0]
  rows = consumers * BLOCK_Q
  if M % rows or chunk_size % block_k or mosaic_attention.swizzle_bytes(W, 1) is None:
    raise ValueError(f"mosaic chunk_scores needs M a multiple of {rows}, chunk_size a multiple "
                     f"of block_k={block_k} and W a multiple of 32; got M={M}, "
                     f"chunk_size={chunk_size}, W={W}")
  tiles_per_chunk = chunk_size // block_k
  runs = pl.cdiv(pl.cdiv(S, chunk_size), chunks_per_cta)
  run_keys = chunks_per_cta * chunk_size
  stages = max(2, num_stages)
  transforms = mosaic_attention.smem_transforms(W, 1)  # int8 codes and rows

  def body(len_gmem, q_gmem, codes_gmem, out_gmem, scoped):
    (q_smem, ring, out_smem), (full, q_full), free = scoped
    mt, h, run = lax.axis_index("m"), lax.axis_index("h"), lax.axis_index("run")
    wg = lax.axis_index("wg")
    start = run * run_keys
    n_keys = jnp.clip(len_gmem[0] - start, 0, run_keys)
    steps = lax.div(n_keys + (block_k - 1), jnp.int32(block_k))
    n_chunks = lax.div(n_keys + (chunk_size - 1), jnp.int32(chunk_size))

    @pl.when(wg < consumers)
    def _consumer():
      plgpu.set_max_registers(mosaic_attention.consumer_registers(consumers), action="increase")
      rows_at = pl.ds(mt * rows + wg * BLOCK_Q, BLOCK_Q)
      plgpu.copy_gmem_to_smem(q_gmem.at[h, rows_at], q_smem.at[wg], q_full.at[wg])
      none = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                               plgpu.Layout.WGMMA.reduce(1))

      def empty(j, carry):  # chunks of the run past kv_length
        out_smem.at[wg, j][...] = none
        return carry

      lax.fori_loop(n_chunks, chunks_per_cta, empty, None)
      plgpu.barrier_wait(q_full.at[wg])

      def tile(t, best, *, first, masked: bool):
        i = first + t
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(full.at[slot])

        def scope(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[wg], ring.at[slot].transpose((1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(scope, plgpu.ACC((BLOCK_Q, block_k), jnp.int32))
        plgpu.barrier_arrive(free.at[slot])
        s = s.astype(jnp.float32)  # exact: |q . code| <= 127 * 127 * W < 2^24
        if masked:  # only the tile holding kv_length
          cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_k), 1,
                                        layout=plgpu.Layout.WGMMA)
          s = jnp.where(cols + i * block_k < n_keys, s, -jnp.inf)
        return jnp.maximum(best, s.max(axis=1))

      def chunk(j, carry):
        first = j * tiles_per_chunk
        n_j = jnp.minimum(n_keys - j * chunk_size, chunk_size)
        n_full = lax.div(n_j, jnp.int32(block_k))
        best = lax.fori_loop(0, n_full, lambda t, b: tile(t, b, first=first, masked=False), none)
        best = lax.fori_loop(n_full, lax.div(n_j + (block_k - 1), jnp.int32(block_k)),
                             lambda t, b: tile(t, b, first=first, masked=True), best)
        out_smem.at[wg, j][...] = best
        return carry

      lax.fori_loop(0, n_chunks, chunk, None)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[wg],
                              out_gmem.at[h, pl.ds(run * chunks_per_cta, chunks_per_cta), rows_at])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      def issue(i, slot):
        key0 = pl.multiple_of(start + i * block_k, 8)
        plgpu.copy_gmem_to_smem(codes_gmem.at[pl.ds(key0, block_k), h], ring.at[slot],
                                full.at[slot])

      for i in range(stages):
        pl.when(i < steps)(lambda i=i: issue(i, i))

      @pl.loop(0, jnp.maximum(steps - stages, 0))
      def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(free.at[slot])
        issue(i + stages, slot)

  def entry(*gmem):
    pl.run_scoped(
        lambda *scoped: body(*gmem, scoped),
        [plgpu.SMEM((consumers, BLOCK_Q, W), jnp.int8, transforms=transforms),
         plgpu.SMEM((stages, block_k, W), jnp.int8, transforms=transforms),
         plgpu.SMEM((consumers, chunks_per_cta, BLOCK_Q), jnp.float32)],
        (plgpu.Barrier(num_arrivals=1, num_barriers=stages),
         plgpu.Barrier(num_arrivals=1, num_barriers=consumers)),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),  # read by every consumer
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((Hkv, runs * chunks_per_cta, M), jnp.float32),
      grid=(M // rows, Hkv, runs),
      grid_names=("m", "h", "run"),
      num_threads=consumers + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(kv_length.astype(jnp.int32).reshape(1), q8, codes)
