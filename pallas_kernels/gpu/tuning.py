"""Default tilings and sweep candidates of the GPU implementations (Triton and Mosaic GPU).

Every function takes the problem's static shape and a `GpuTarget` (never the running device), so
a tiling can be planned for any GPU. The measured reasons behind the rules live in
experiments/results (shared_attention.md, unique_attention.md, sparse_attention.md).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels import quant
from pallas_kernels.gpu import mosaic_attention, softmax
from pallas_kernels.gpu import mosaic_scores
from pallas_kernels.gpu.configs import (MosaicGpuChunkConfig, MosaicGpuScoresConfig,
                                        MosaicGpuSharedConfig, MosaicGpuTileConfig,
                                        MosaicGpuUniqueConfig,
                                        TritonChunkConfig, TritonScoresConfig,
                                        TritonSharedConfig, TritonUniqueConfig)
from pallas_kernels.layout import AttentionDims
from pallas_kernels.targets import GpuTarget

# shared_attention on Hopper goes to Mosaic GPU (wgmma, TMA; a single consumer warpgroup for
# M <= 64) when it can run the call: for more rows than one consumer holds (M > 64, a ping-pong
# pair) it was 1.3-1.8x faster than the Triton kernel for every shape measured, narrow K/V
# included (in-program times on an H200, S=128K: M=128 with D=64 and two kv heads 35 vs 46 us,
# D=80 76 vs 103 us; kernel_coverage_crossover.md). At M <= 64 the two were within 2% wherever the
# K/V stream is long, and Mosaic GPU was up to 3x faster for head dims Triton pads (192). Under
# MOSAIC_MIN_KV_BYTES of K/V a small-M call is bound by launch and merge latency, where the
# Triton kernel was faster at M=16 (27 vs 31 us: D=64, two kv heads, 67 MB) and level at M=32-64.
# Head dims that fill only 32-byte swizzled rows (D=80) stay on Triton at M <= 64: it was 15-25%
# faster at M <= 16 and level at 32-64 (kernel_coverage_crossover.md).
MOSAIC_MIN_KV_BYTES = 128 * 2**20
# Chunk attention goes to Mosaic GPU for chunks of at least MOSAIC_MIN_CHUNK keys chosen by at
# least MOSAIC_CHUNK_MIN_ROWS rows each: shorter chunks spend their time filling its pipeline.
MOSAIC_CHUNK_MIN_ROWS = 128
MOSAIC_MIN_CHUNK = 1024
# Float8 shared K/V are widened in HBM before the kernel (`widen_kv` of the Mosaic GPU and Triton
# configs) from this many rows of a kv head: a kernel that widens the tiles it reads pays a cost
# that grows with M, while one widening pass reads the float8 K/V once and writes them at twice
# the bytes (2.6 ms at S=1M, Llama-3.1-8B heads, H200). Triton in-kernel against widened: 9.35
# vs 8.12 ms at M=512, 36.6 vs 23.2 at M=2048 (fp8_triton_widened.md).
FP8_WIDEN_MIN_ROWS = 512
# Mosaic GPU where it reads float8 tiles itself in 128-key tiles (128-byte float8 rows: QK^T on
# the FP8 tensor cores, only V widened in shared memory) keeps them float8 up to more rows. Same
# setting, fp8_widen.md: 4.83 vs 6.06 ms at M=512, 9.51 vs 9.35 at M=1024. From there it widens
# only V (to float16; K stays float8 for QK^T): at M=1024 8.73-8.79 ms against 9.44-9.45 with
# both widened and 8.82-8.93 in the kernel, at M=2048 15.95-16.06 against 16.12-16.14 and
# 17.40-17.45 (fp8_widen_v.md).
FP8_WIDEN_MIN_ROWS_MOSAIC = 1024
# Unique attention: keys per compute block (128 keys x D=128 in bf16 is 32 KiB of K and of V per
# stage), and the fewest blocks per split (below it the partials cost more than the split gains).
UNIQUE_BLOCK_KEYS = 128
UNIQUE_MIN_BLOCKS_PER_SPLIT = 4
# Rows per unique-attention program at most: decode's T*G (<= 128 for T <= 8, G <= 16) stays one
# tile; a prefill chunk's T*G rows are cut into tiles of this many (each reads the request's pages;
# 128 rows over a 128-key tile keep the tensor cores, not HBM, the limit).
UNIQUE_MAX_ROWS = 128


def _pow2_at_least(x: float, minimum: int = 16) -> int:
  return max(minimum, 1 << math.ceil(math.log2(max(x, 1))))


def _pow2_at_most(x: float, minimum: int = 16) -> int:
  return max(minimum, 1 << math.floor(math.log2(max(x, 1))))


def triton_smem_bytes(block_m: int, block_k: int, D: int, itemsize: int, num_stages: int) -> int:
  """Shared memory one Triton attention program asks for, at the padded head dim
  (`softmax.padded`). (a) num_stages - 1 tiles each of K and V in flight (at least one) plus the
  two dots' first operands, q [block_m, D] and p [block_m, block_k] -- twice over for float32,
  whose 3xTF32 dots split each operand in a high and a low part; (b) for row blocks of 64 or
  more (Hopper's wgmma reads its operands from shared memory while the next tiles land) and for
  float32, num_stages tiles each of K and V plus q (its two parts for float32 on wgmma), when
  that is larger. What the compiler asked for on an H200: 262,144 bytes for float32,
  block_m=128, block_k=64, 2 stages (a and b, exactly); 262,144 for float32 D=256 (and 192,
  padded), block_m=64, block_k=32, 2 stages (b, exactly; a gives 208 KiB); 262,144 for bf16
  D=256, block_m=128, block_k=64, 3 stages (b, exactly); 262,144 for float32 D=128, block_m=32,
  block_k=128, 2 stages (b gives 16 KiB more); bf16 D=256, block_m=16, block_k=128, 2 stages
  compiled (a: 140 KiB; b would be 264 KiB)."""
  D = softmax.padded(D)
  operands = (2 if itemsize == 4 else 1) * block_m * (D + block_k)
  need = 2 * max(num_stages - 1, 1) * block_k * D + operands
  if block_m >= 64 or itemsize == 4:
    q_parts = 2 if itemsize == 4 and block_m >= 64 else 1
    need = max(need, 2 * num_stages * block_k * D + q_parts * block_m * D)
  return need * itemsize


# The share of a block's shared memory a default tiling may plan for: the model counts the
# pipeline and the dot operands, not the compiler's small scratch (barriers, reductions).
SMEM_USE = 0.95


def _halvings(x: int, minimum: int = 16) -> list[int]:
  return [x >> i for i in range(x.bit_length()) if x >> i >= minimum] or [minimum]


def _fit_triton(block_m: int, block_k: int, num_stages: int, D: int, itemsize: int,
                target: GpuTarget, min_block_m: int = 16, min_block_k: int = 16,
                min_stages: int = 2) -> tuple[int, int, int]:
  """The largest tiling at most (block_m, block_k, num_stages) whose shared memory fits the
  target: fewer pipeline stages first, then fewer keys per tile, then fewer rows. At each row
  count, fewer than `min_stages` stages only where no key tile of >= 32 keys allows them: a
  load in flight during the dots pays over a larger key tile for contiguous K/V (on an H200,
  float32, D=128, 16 rows, S=128K, shared attention ran 1.3x (B=1) and 1.7x (B=8) faster as 64
  keys x 3 stages than as 128 keys x 1); paged unique attention, whose pages are gathered, ran
  1.2-1.5x slower as 64 keys x 2 stages than 128 x 1 (results/tiling_probes.md), so it passes
  min_stages=1. Rows are never traded for stages. Measured only there (H200, float32); the rule
  also moves wide heads (D=192, 256) and smaller-memory chips (A100, L4) from one stage to two
  or three over half the keys, unmeasured."""
  budget = SMEM_USE * target.smem_per_block
  pipelined = min(block_k, max(32, min_block_k))
  for bm in _halvings(block_m, min_block_m):
    for floor, keys in ((min(min_stages, num_stages), pipelined), (1, min_block_k)):
      for bk in _halvings(block_k, keys):
        for st in range(num_stages, floor - 1, -1):
          if triton_smem_bytes(bm, bk, D, itemsize, st) <= budget:
            return bm, bk, st
  return min_block_m, min_block_k, 1


def triton_smem_unsupported(block_m: int, block_k: int, D: int, dtype, num_stages: int,
                            target: GpuTarget) -> str | None:
  """Why a Triton tiling does not fit the target's shared memory, or None."""
  smem = triton_smem_bytes(block_m, block_k, D, jnp.dtype(dtype).itemsize, num_stages)
  if smem > target.smem_per_block:
    return (f"its tiling needs {smem} bytes of shared memory per block; {target.name} allows "
            f"{target.smem_per_block} (fewer num_stages, block_k or block_m fit)")
  return None


def splits_to_fill(target: GpuTarget, programs: int, n_tiles: int) -> int:
  """Splits of S so that programs x splits fill the chip in about one wave (fewer, longer
  programs measured best: a partly filled second wave costs more than merging more splits)."""
  return max(1, min(n_tiles, target.num_cores // programs))


# ------------------------------------------------------------------ Mosaic GPU (shared + chunk)


def mosaic_unsupported(dims: AttentionDims, dtype, block_k: int, num_stages: int,
                       target: GpuTarget, interpret: bool, *, kv_dtype, consumers: int,
                       page_size: int | None = None, ragged_keys: bool = False,
                       v_dtype=None) -> str | None:
  """Why the Mosaic GPU kernel cannot run this problem (queries in `dtype`, K/V in `kv_dtype`
  or V in `v_dtype` if given, in pages of `page_size` for unique attention) with this tiling
  and this many consumer warpgroups, or None. ragged_keys: the kernel reads K/V[S, Hkv, D] as
  one array, so S need be a multiple of 8 only (TMA's tiling of the array), not of block_k:
  TMA fills a tile's rows past S with zeros, and they lie past kv_length, weighed by 0. The
  chunk kernels view the store as pages of whole tiles."""
  if interpret:
    return "it has no interpret mode"
  if not target.is_hopper:
    return (f"it needs a Hopper GPU (sm_90); the target {target.name} is "
            f"sm_{target.compute_capability[0]}{target.compute_capability[1]}")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"it needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
  fp8 = quant.is_fp8(kv_dtype)
  if jnp.dtype(kv_dtype) != jnp.dtype(dtype) and not fp8:
    return f"it needs K/V in the query dtype or float8, got {jnp.dtype(kv_dtype).name}"
  if dims.D % (128 if fp8 else 16) or dims.D > 256:
    return (f"it needs head_dim D a multiple of {128 if fp8 else 16} up to 256"
            f"{' with float8 K/V (128-byte rows)' if fp8 else ''}, got D={dims.D}")
  if num_stages > mosaic_attention.MAX_STAGES:
    return (f"it keeps at most {mosaic_attention.MAX_STAGES} K/V ring slots, got "
            f"config.num_stages={num_stages}")
  if page_size is None and dims.S % (8 if ragged_keys else block_k):
    step = "8" if ragged_keys else f"config.block_k={block_k}"
    return f"it needs S={dims.S} a multiple of {step}"
  if page_size is not None:
    if dims.T * dims.G > mosaic_attention.BLOCK_Q:
      return (f"it needs a request's T * G query rows to fit one 64-row tile, got "
              f"T * G = {dims.T * dims.G}")
    if problem := mosaic_attention.paging_problem(page_size, block_k):
      return f"it needs {problem}"
  smem = mosaic_attention.smem_bytes_used(dims.D, block_k, jnp.dtype(dtype).itemsize,
                                          num_stages=num_stages, consumers=consumers,
                                          kv_dtype=kv_dtype, v_dtype=v_dtype)
  if smem > target.smem_per_block:
    return (f"its tiling needs {smem} bytes of shared memory per block; {target.name} allows "
            f"{target.smem_per_block}")
  return None


def _mosaic_tiling(dims: AttentionDims, dtype, wanted_stages: int, target: GpuTarget, *,
                   consumers: int, kv_dtype, multiple: int = 1,
                   v_dtype=None) -> tuple[int, int]:
  """(block_k, num_stages) of the Mosaic GPU kernel: 128-key tiles, or 64 where two slots of
  128 keys do not fit (D=256), with up to `wanted_stages` ring slots (twice as many for float8
  K/V: a slot holds half the bytes), a multiple of `multiple` (consumers splitting the keys);
  V in `v_dtype` if given."""
  itemsize, kv_itemsize = jnp.dtype(dtype).itemsize, jnp.dtype(kv_dtype).itemsize
  if v_dtype is None:
    wanted_stages *= itemsize // kv_itemsize
  for block_k in (128, 64):
    fit = mosaic_attention.max_stages(dims.D, block_k, itemsize, target.smem_per_block,
                                      consumers=consumers, kv_dtype=kv_dtype, v_dtype=v_dtype)
    stages = min(wanted_stages, fit)
    stages -= stages % multiple
    if stages >= max(2, multiple):
      return block_k, stages
  return 64, 2  # refused by mosaic_unsupported


# ------------------------------------------------------------------ shared_attention


def shared_implementation(dims: AttentionDims, dtype, target: GpuTarget, interpret: bool, *,
                          kv_dtype) -> str:
  """"mosaic_gpu" on Hopper where it can run the call, unless M fits one 64-row consumer and
  either the K/V stream is short (launch-bound) or its rows fill only 32-byte swizzles; else
  "triton"."""
  kv_bytes = 2 * dims.S * dims.Hkv * dims.D * jnp.dtype(kv_dtype).itemsize
  wide_rows = (mosaic_attention.swizzle_bytes(dims.D, jnp.dtype(dtype).itemsize) or 0) >= 64
  if dims.M > mosaic_attention.BLOCK_Q or (kv_bytes >= MOSAIC_MIN_KV_BYTES and wide_rows):
    c = mosaic_shared(dims, dtype, target, kv_dtype=kv_dtype)
    if mosaic_shared_unsupported(dims, dtype, c, target, interpret, kv_dtype=kv_dtype) is None:
      return "mosaic_gpu"
  return "triton"


def mosaic_shared_unsupported(dims: AttentionDims, dtype, c: MosaicGpuSharedConfig,
                              target: GpuTarget, interpret: bool, *, kv_dtype) -> str | None:
  """Why the Mosaic GPU shared-attention kernel cannot run this problem with config `c` (with
  widen_kv, on K/V in the query dtype; with widen_v, on V in it), or None."""
  if why := _widen_unsupported(c, kv_dtype):
    return why
  why = mosaic_unsupported(dims, dtype, c.block_k, c.num_stages, target, interpret,
                           kv_dtype=dtype if c.widen_kv else kv_dtype, consumers=c.consumers,
                           ragged_keys=True, v_dtype=jnp.float16 if c.widen_v else None)
  if why and (c.widen_kv or c.widen_v):
    knob_name, widened = ("widen_kv", "K/V") if c.widen_kv else ("widen_v", "V")
    to = jnp.dtype(dtype if c.widen_kv else jnp.float16).name
    return f"{why} (config.{knob_name}: {widened} widened to {to})"
  return why


def _widen_unsupported(c, kv_dtype) -> str | None:
  for knob_name in ("widen_kv", "widen_v"):
    if getattr(c, knob_name, False) and not quant.is_fp8(kv_dtype):
      return f"config.{knob_name} needs float8 K/V, got {jnp.dtype(kv_dtype).name}"
  return None


def plan_widen_kv(dims: AttentionDims, dtype, kv_dtype, widen_kv: bool | None, *,
                  min_rows: int = FP8_WIDEN_MIN_ROWS) -> bool:
  """A shared-attention plan's widen_kv: None picks it for float8 K/V under 16-bit queries (the
  measured case: a copy of twice the float8 bytes; float32 queries would need four times) from
  `min_rows` rows of a kv head; True is refused for K/V that are not float8."""
  if widen_kv is None:
    return (quant.is_fp8(kv_dtype) and jnp.dtype(dtype).itemsize == 2
            and dims.M >= min_rows)
  if widen_kv and not quant.is_fp8(kv_dtype):
    raise ValueError(f"widen_kv needs float8 K/V, got {jnp.dtype(kv_dtype).name}")
  return widen_kv


def triton_shared(dims: AttentionDims, dtype, target: GpuTarget, *, kv_dtype=None,
                  widen_kv: bool | None = None) -> TritonSharedConfig:
  """M tiled first (16..128 rows), then S split to fill the chip; the tiling shrinks until it
  fits the target's shared memory (its tiles are sized in the query dtype, which float8 K/V are
  widened to in registers or, from FP8_WIDEN_MIN_ROWS rows, in one pass first: `widen_kv`)."""
  M = dims.M
  block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
  block_m, block_k, stages = _fit_triton(block_m, 64 if block_m >= 128 else 128, 3, dims.D,
                                         jnp.dtype(dtype).itemsize, target)
  warps = 8 if block_m >= 128 else 4
  programs = dims.Hkv * math.ceil(M / block_m)
  splits = splits_to_fill(target, programs, math.ceil(dims.S / block_k))
  return TritonSharedConfig(block_m=block_m, block_k=block_k, num_splits=splits,
                            num_warps=warps, num_stages=stages,
                            widen_kv=plan_widen_kv(dims, dtype, kv_dtype or dtype, widen_kv))


def triton_shared_unsupported(dims: AttentionDims, dtype, c: TritonSharedConfig,
                              target: GpuTarget, *, kv_dtype) -> str | None:
  """Why the Triton shared-attention kernel cannot run this problem with config `c`, or None."""
  return _widen_unsupported(c, kv_dtype) or triton_smem_unsupported(
      c.block_m, c.block_k, dims.D, dtype, c.num_stages, target)


def _pair_reads_float8(dims: AttentionDims, dtype, target: GpuTarget, kv_dtype) -> bool:
  """Whether the 128-row ping-pong pair reads float8 K/V (in `kv_dtype`, else e4m3) in 128-key
  tiles, both with V float8 (widened in shared memory) and with V widened first to float16:
  not where rows are not 128 bytes, a ring, query terms and V or o tiles do not fit, or only
  64-key tiles do (D=256 on an H200, S=1M, Hq=16: in the kernel 6.93 ms against 9.05 widened
  at 256 rows, 14.0 against 12.1 at 512: fp8_unique.md)."""
  fp8 = kv_dtype if quant.is_fp8(kv_dtype) else quant.FP8_DTYPES[0]
  for v_dtype in (None, jnp.float16):
    block_k, stages = _mosaic_tiling(dims, dtype, 1 if v_dtype is None else 2, target,
                                     consumers=2, kv_dtype=fp8, v_dtype=v_dtype)
    if block_k != 128 or mosaic_unsupported(dims, dtype, block_k, stages, target, False,
                                            kv_dtype=fp8, consumers=2, ragged_keys=True,
                                            v_dtype=v_dtype):
      return False
  return True


def mosaic_shared(dims: AttentionDims, dtype, target: GpuTarget, *, kv_dtype,
                  widen_kv: bool | None = None,
                  widen_v: bool | None = None) -> MosaicGpuSharedConfig:
  """For K/V in the query dtype: one 64-row consumer per CTA while M <= 64 (split-S,
  bandwidth-bound: a second consumer on other rows would multiply padding), else 128-row CTAs
  of a ping-pong pair. For float8 K/V while M <= 64: two consumers taking turns over the key
  tiles of 64 rows (on an H200, S=1M, Llama-3.1-8B heads: 0.68-0.76 ms against 0.82 ms with
  one consumer at B=1-16; at B=32 the ping-pong pair takes 1.17 ms against their 1.42 ms on
  two row tiles: fp8_widen.md). Widened in HBM first: where the pair reads them as float8 in
  128-key tiles (`_pair_reads_float8`) from FP8_WIDEN_MIN_ROWS_MOSAIC rows, V only for e4m3
  keys (widen_v), K/V for e5m2 (widen_kv); elsewhere K/V from FP8_WIDEN_MIN_ROWS rows, tiled as
  K/V in the query dtype. widen_kv / widen_v None: by that rule; widen_kv given alone: widened
  or not as it says (V too). Two ring slots of 128-key tiles (64 where they do not fit; twice
  the slots for float8 tiles of both K and V read by split keys); S split to fill the chip."""
  reads = _pair_reads_float8(dims, dtype, target, kv_dtype)
  min_rows = FP8_WIDEN_MIN_ROWS_MOSAIC if reads else FP8_WIDEN_MIN_ROWS
  if widen_v is None:
    widen = plan_widen_kv(dims, dtype, kv_dtype, widen_kv, min_rows=min_rows)
    # (Measured with e4m3 keys: two query terms. e5m2's three cost 1.5x the QK^T multiply-adds
    # of a compute-bound call: widened whole, as before.)
    widen_v = (widen and widen_kv is None and reads
               and mosaic_attention.Q_TERMS[jnp.dtype(kv_dtype)] == 2)
    widened = widen and not widen_v
  else:
    if widen_v and not quant.is_fp8(kv_dtype):
      raise ValueError(f"widen_v needs float8 K/V, got {jnp.dtype(kv_dtype).name}")
    widened = bool(widen_kv) if widen_v else plan_widen_kv(dims, dtype, kv_dtype, widen_kv,
                                                           min_rows=min_rows)
  if widened:
    kv_dtype = dtype
  split_keys = quant.is_fp8(kv_dtype) and dims.M <= mosaic_attention.BLOCK_Q
  consumers = 1 if dims.M <= mosaic_attention.BLOCK_Q and not split_keys else 2
  # Float8 tiles under a ping-pong pair: two ring slots (`_mosaic_tiling` doubles what it is
  # asked for float8), 5-8% faster than three at M = 128-512 (fp8_widen.md).
  pair_fp8 = quant.is_fp8(kv_dtype) and not split_keys and not widen_v
  block_k, stages = _mosaic_tiling(dims, dtype, 1 if pair_fp8 else 2, target, consumers=consumers,
                                   kv_dtype=kv_dtype, multiple=2 if split_keys else 1,
                                   v_dtype=jnp.float16 if widen_v else None)
  programs = dims.Hkv * math.ceil(dims.M / mosaic_attention.rows_per_cta(consumers, split_keys))
  splits = splits_to_fill(target, programs, math.ceil(dims.S / block_k))
  return MosaicGpuSharedConfig(block_k=block_k, num_splits=splits, num_stages=stages,
                               consumers=consumers, split_keys=split_keys, widen_kv=widened,
                               widen_v=widen_v)


def _with_splits(base, factors=(0.5, 2.0)) -> list:
  return [dataclasses.replace(base, num_splits=max(1, int(base.num_splits * f))) for f in factors]


def triton_shared_candidates(dims: AttentionDims, dtype, target: GpuTarget, *,
                             kv_dtype=None) -> list[TritonSharedConfig]:
  """Neighbours of the default: keys per tile, warps, stages, and half / double the splits; for
  float8 K/V also the default with the other widen_kv."""
  base = triton_shared(dims, dtype, target, kv_dtype=kv_dtype)
  out = [dataclasses.replace(base, block_k=bk, num_warps=w, num_stages=st)
         for bk, w, st in ((64, 4, 2), (64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 2))]
  other = ([dataclasses.replace(base, widen_kv=not base.widen_kv)]
           if quant.is_fp8(kv_dtype or dtype) else [])
  return [base, *out, *_with_splits(base), *other]


def mosaic_shared_candidates(dims: AttentionDims, dtype, target: GpuTarget, *,
                             kv_dtype) -> list[MosaicGpuSharedConfig]:
  """Neighbours of the default (`_mosaic_candidates`) over every schedule of
  `MosaicGpuSharedConfig`, a CTA per row tile of each kv head; for float8 K/V also those of the
  default planned with each other widening (none, K/V, V only)."""
  programs = lambda c, k: dims.Hkv * math.ceil(dims.M / mosaic_attention.rows_per_cta(c, k))
  base = mosaic_shared(dims, dtype, target, kv_dtype=kv_dtype)
  out = _mosaic_candidates(base, dims.S, target, programs)
  if quant.is_fp8(kv_dtype):
    for widen_kv, widen_v in ((False, False), (True, False), (False, True)):
      if (widen_kv, widen_v) != (base.widen_kv, base.widen_v):
        other = mosaic_shared(dims, dtype, target, kv_dtype=kv_dtype, widen_kv=widen_kv,
                              widen_v=widen_v)
        out += _mosaic_candidates(other, dims.S, target, programs)
  return out


# The Mosaic GPU schedules a sweep tries beside the default's, (consumers, split_keys, block_k or
# None for the default's, ring slots): three consumers have 152 registers each
# (`mosaic_attention.consumer_registers`): 64-key tiles, whose scores take half the registers.
_MOSAIC_SCHEDULES = ((1, False, None, 2), (1, False, None, 3), (2, False, None, 2),
                     (2, False, None, 3), (2, True, None, 2), (2, True, None, 4),
                     (3, True, 64, 3), (3, True, 64, 6))


def _mosaic_candidates(base, S: int, target: GpuTarget, programs, *,
                       one_consumer: bool = False) -> list:
  """base, 64-key tiles with 2-4 slots (even with split_keys), half / double the splits, and the
  other schedules of `_MOSAIC_SCHEDULES` (none if `one_consumer`), their splits refitted to the
  chip for programs(consumers, split_keys) CTAs per split."""
  tiles = [dataclasses.replace(base, block_k=64, num_stages=st)
           for st in ((2, 4) if base.split_keys else (2, 3, 4))]
  swaps = []
  for consumers, split_keys, block_k, stages in () if one_consumer else _MOSAIC_SCHEDULES:
    if (consumers, split_keys) == (base.consumers, base.split_keys):
      continue
    block_k = block_k or base.block_k
    swaps.append(dataclasses.replace(
        base, consumers=consumers, split_keys=split_keys, block_k=block_k, num_stages=stages,
        num_splits=splits_to_fill(target, programs(consumers, split_keys),
                                  math.ceil(S / block_k))))
  return [base, *tiles, *_with_splits(base), *swaps]


# ------------------------------------------------------------------ unique_attention


def unique_rows(T: int, G: int) -> int:
  """Query rows of one (request, kv head) padded for tl.dot: a power of two >= 16."""
  return _pow2_at_least(T * G)


def unique_block_m(T: int, G: int, config: TritonUniqueConfig) -> int:
  """Rows per program: config.block_m, or fewer where a request has fewer (padded) rows."""
  return min(config.block_m, unique_rows(T, G))


def triton_unique(dims: AttentionDims, page_size: int, dtype, target: GpuTarget, *,
                  kv_dtype=None) -> TritonUniqueConfig:
  """~UNIQUE_BLOCK_KEYS keys per block and row tiles of at most UNIQUE_MAX_ROWS rows, two
  pipeline stages (three for float8 pages: 8-11% faster on an H200, fp8_unique.md; fewer
  stages, keys, then rows where shared memory is short), then split each request's pages until
  ~4 programs per SM. dims.S is the padded capacity max_pages * page_size;
  the splits follow each request's own length at run time, so the padded size only caps how many
  splits are worth having."""
  rows = min(unique_rows(dims.T, dims.G), UNIQUE_MAX_ROWS)
  keys = max(UNIQUE_BLOCK_KEYS, _pow2_at_least(page_size))
  stages = 3 if kv_dtype is not None and quant.is_fp8(kv_dtype) else 2
  # A program holds whole pages; rows go only where no tiling of them fits.
  rows, keys, stages = _fit_triton(rows, keys, stages, dims.D, jnp.dtype(dtype).itemsize, target,
                                   min_block_k=_pow2_at_least(page_size), min_stages=1)
  pages_per_block = max(1, keys // page_size)
  max_blocks = math.ceil(dims.S / (page_size * pages_per_block))
  programs = dims.B * dims.Hkv * math.ceil(dims.T * dims.G / rows)
  splits = min(math.ceil(4 * target.num_cores / programs),
               max_blocks // UNIQUE_MIN_BLOCKS_PER_SPLIT)
  return TritonUniqueConfig(pages_per_block=pages_per_block, num_splits=max(1, splits),
                            block_m=rows, num_warps=8 if rows >= 128 else 4, num_stages=stages)


def mosaic_unique_min_keys(page_size: int) -> int:
  """Table capacity (max_pages * page_size: lengths are traced, so the capacity is what a plan
  knows) from which float8 pages run faster on Mosaic GPU than on Triton. H200, B in {8, 64,
  256}, in a program: with pages of 64 Mosaic GPU is 1.0-1.15x faster from 16K keys, and
  1.0-1.9x slower at 1K-4K (not profiled: each CTA fills a four-slot ring for a few tiles);
  with pages of 16 1.01-1.10x faster at 64K, within 4% either way at 16K
  (unique_crossover.md)."""
  return 16384 if page_size >= 64 else 65536


def unique_implementation(dims: AttentionDims, page_size: int, dtype, target: GpuTarget,
                          interpret: bool, *, kv_dtype) -> str:
  """"mosaic_gpu" for float8 pages on Hopper where it can run the call and the tables hold at
  least `mosaic_unique_min_keys` keys (QK^T on the FP8 tensor cores straight from its TMA ring;
  on an H200 at L=64K 1.06-1.20x faster than Triton's default, which widens K and V in
  registers, with pages of 64, 1.01-1.10x with pages of 16: unique_crossover.md), else
  "triton" (short tables; K/V in the query dtype, where Mosaic GPU was 2-13% slower:
  unique_mosaic_sweep.md)."""
  if quant.is_fp8(kv_dtype) and dims.S >= mosaic_unique_min_keys(page_size):
    c = mosaic_unique(dims, page_size, dtype, target, kv_dtype=kv_dtype)
    if mosaic_unsupported(dims, dtype, c.block_k, c.num_stages, target, interpret,
                          kv_dtype=kv_dtype, consumers=c.consumers, page_size=page_size) is None:
      return "mosaic_gpu"
  return "triton"


def triton_unique_unsupported(dims: AttentionDims, page_size: int, dtype,
                              config: TritonUniqueConfig, target: GpuTarget) -> str | None:
  block_k = config.pages_per_block * page_size
  if block_k < 16 or block_k & (block_k - 1):
    return (f"page_size * config.pages_per_block must be a power of two >= 16, got "
            f"{page_size} * {config.pages_per_block}")
  return triton_smem_unsupported(unique_block_m(dims.T, dims.G, config), block_k, dims.D, dtype,
                                 config.num_stages, target)


def mosaic_unique(dims: AttentionDims, page_size: int, dtype, target: GpuTarget, *,
                  kv_dtype) -> MosaicGpuUniqueConfig:
  """One 64-row CTA per (request, kv head, split) with one consumer (`MosaicGpuUniqueConfig`);
  tiles and ring as `mosaic_shared`; each request's tokens split to fill the chip."""
  block_k, stages = _mosaic_tiling(dims, dtype, 2, target, consumers=1, kv_dtype=kv_dtype)
  splits = splits_to_fill(target, dims.B * dims.Hkv, math.ceil(dims.S / block_k))
  return MosaicGpuUniqueConfig(block_k=block_k, num_splits=splits, num_stages=stages)


def mosaic_unique_candidates(dims: AttentionDims, page_size: int, dtype, target: GpuTarget, *,
                             kv_dtype) -> list[MosaicGpuUniqueConfig]:
  """Neighbours of the default (`_mosaic_candidates`: tiles, ring and splits; one consumer, as
  `MosaicGpuUniqueConfig` allows), a CTA per request and kv head."""
  base = mosaic_unique(dims, page_size, dtype, target, kv_dtype=kv_dtype)
  return _mosaic_candidates(base, dims.S, target, lambda c, k: dims.B * dims.Hkv,
                            one_consumer=True)


def triton_unique_candidates(dims: AttentionDims, page_size: int, dtype, target: GpuTarget, *,
                             kv_dtype=None) -> list[TritonUniqueConfig]:
  """Neighbours of the default: keys per block, warps, stages, half the rows per tile (where a
  tile has more than 16), and half / double the splits."""
  base = triton_unique(dims, page_size, dtype, target, kv_dtype=kv_dtype)
  out = [dataclasses.replace(base, pages_per_block=max(1, keys // page_size), num_warps=w,
                             num_stages=st)
         for keys, w, st in ((64, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2), (256, 8, 3),
                             (128, 4, 4))]
  if (rows := unique_block_m(dims.T, dims.G, base)) > 16:
    out.append(dataclasses.replace(base, block_m=rows // 2, num_warps=4))
  return [base, *out, *_with_splits(base)]


# ------------------------------------------------------------------ chunk_attention


def rows_per_chunk(dims: AttentionDims, top_k: int, chunk_size: int) -> float:
  """Query rows a chosen chunk gets on average under uniform routing: B*T*G*K / N."""
  return dims.B * dims.T * dims.G * top_k / math.ceil(dims.S / chunk_size)


def chunk_implementation(dims: AttentionDims, dtype, top_k: int, chunk_size: int,
                         target: GpuTarget, interpret: bool, *, kv_dtype) -> str:
  """"mosaic_gpu" for long chunks chosen by many rows on Hopper, else "triton"."""
  if (rows_per_chunk(dims, top_k, chunk_size) >= MOSAIC_CHUNK_MIN_ROWS
      and chunk_size % 128 == 0 and chunk_size >= MOSAIC_MIN_CHUNK):
    c = mosaic_chunk(dims, dtype, target, kv_dtype=kv_dtype)
    if mosaic_unsupported(dims, dtype, c.block_k, c.num_stages, target, interpret,
                          kv_dtype=kv_dtype, consumers=2) is None:
      return "mosaic_gpu"
  return "triton"


def triton_chunk(dims: AttentionDims, top_k: int, chunk_size: int, dtype,
                 target: GpuTarget) -> TritonChunkConfig:
  """block_m near the rows a chosen chunk gets (B*T*G*K/N) up to 64, 64-key steps, 4 warps,
  shrunk until the tiling fits the target's shared memory (the work list, not the chip, sets
  the grid: one program per tile of a chunk). On an H200 (S=1M, C=512, uniform ids) this beat
  the previous 128-row / 128-key tilings by 13% at B=8 and 9-32% at B=128 and 512; tiles of
  128 rows pad a chunk's binomial row count to a second, mostly empty tile (sparse_probes.md)."""
  block_m = min(64, _pow2_at_least(rows_per_chunk(dims, top_k, chunk_size)))
  block_m, block_k, stages = _fit_triton(block_m, min(64, _pow2_at_least(chunk_size)), 3, dims.D,
                                         jnp.dtype(dtype).itemsize, target)
  return TritonChunkConfig(block_m=block_m, block_k=block_k, num_warps=4, num_stages=stages)


def mosaic_chunk(dims: AttentionDims, dtype, target: GpuTarget, *,
                 kv_dtype) -> MosaicGpuChunkConfig:
  """Ring of up to 4 slots for the 128-row tiles of a chunk (a ping-pong pair per CTA)."""
  block_k, stages = _mosaic_tiling(dims, dtype, 4, target, consumers=2, kv_dtype=kv_dtype)
  return MosaicGpuChunkConfig(block_k=block_k, num_stages=stages)


def triton_chunk_candidates(dims: AttentionDims, top_k: int, chunk_size: int, dtype,
                            target: GpuTarget) -> list[TritonChunkConfig]:
  base = triton_chunk(dims, top_k, chunk_size, dtype, target)
  return [base, *(dataclasses.replace(base, block_m=bm, block_k=bk)
                  for bm in (16, 32, 64, 128) for bk in (32, 64, 128)
                  if (bm, bk) != (base.block_m, base.block_k))]


# ------------------------------------------------------------------ chunk_scores


def _rows_block(M: int) -> int:
  return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128


def triton_scores(dims: AttentionDims, chunk_size: int, target: GpuTarget) -> TritonScoresConfig:
  """Row blocks as in shared_attention; key tiles up to 128 keys, no wider than a chunk needs
  nor than the S keys; 8 chunks per program. A program carries its [block_m,
  chunks_per_program] maxima in registers: at 64 chunks the kernel took all 255 registers a
  thread may have (12.5% occupancy in Nsight
  Compute, issue slots 32% busy) and 8 chunks ran 7-16% faster at every B (H200, S=1M, C=512,
  64-wide codes: B=8 0.244 -> 0.227 ms, B=128 1.63 -> 1.39, B=512 6.34 -> 5.33;
  results/sparse_probes.md)."""
  del target
  n_chunks = math.ceil(dims.S / chunk_size)
  return TritonScoresConfig(block_m=_rows_block(dims.M),
                            block_k=min(128, _pow2_at_least(chunk_size), _pow2_at_most(dims.S)),
                            chunks_per_program=min(8, _pow2_at_least(n_chunks)))


def triton_scores_candidates(dims: AttentionDims, chunk_size: int,
                             target: GpuTarget) -> list[TritonScoresConfig]:
  base = triton_scores(dims, chunk_size, target)
  return [base, *(dataclasses.replace(base, num_warps=w, num_stages=st)
                  for w, st in ((4, 2), (8, 2), (8, 3), (4, 4))),
          *(dataclasses.replace(base, chunks_per_program=c) for c in (16, 32)
            if c != base.chunks_per_program)]


def mosaic_scores_block_k(chunk_size: int) -> int:
  """Keys per code tile: the largest multiple of 16 up to 128 that divides the chunk size (0 if
  none does): the integer wgmma's N (ptxas refused n40 for s8 on the H200)."""
  return next((b for b in range(128, 15, -16) if chunk_size % b == 0), 0)


def mosaic_scores_config(dims: AttentionDims, chunk_size: int,
                         target: GpuTarget) -> MosaicGpuScoresConfig:
  """One 64-row consumer while M <= 64, else two on their own rows reading the same tiles (at
  B=8 two were 1.24x slower, at B=128 one was 1.55x slower); tiles of up to 128 keys; 8 ring
  slots (a tile of 64-wide codes is 8 KiB; 4 and 16 within 3%); runs of about 128 tiles (at
  most 64 chunks, whose maxima stay in shared memory: 32 chunks of 512 keys were 3-5% faster
  than 16 or 8 at B = 8 and 128), shortened until the CTAs fill the chip twice. Measured on an
  H200, S=1M, 64-wide codes (experiments/results/sparse_mosaic_scorer.md)."""
  consumers = 1 if dims.M <= mosaic_attention.BLOCK_Q else 2
  block_k = mosaic_scores_block_k(chunk_size) or 128
  n_chunks = math.ceil(dims.S / chunk_size)
  per_cta = max(1, min(64, n_chunks, 128 * block_k // chunk_size))
  row_tiles = dims.Hkv * math.ceil(dims.M / (consumers * mosaic_attention.BLOCK_Q))
  while per_cta > 1 and row_tiles * math.ceil(n_chunks / per_cta) < 2 * target.num_cores:
    per_cta //= 2
  return _scores_slots(MosaicGpuScoresConfig(block_k=block_k, chunks_per_cta=per_cta,
                                             num_stages=8, consumers=consumers), dims, target)


def _scores_slots(c: MosaicGpuScoresConfig, dims: AttentionDims,
                  target: GpuTarget) -> MosaicGpuScoresConfig:
  """c with its ring cut to the slots that fit the target's shared memory (at least two)."""
  stages = c.num_stages
  while stages > 2 and mosaic_scores.smem_bytes_used(
      dims.D, c.block_k, num_stages=stages, consumers=c.consumers,
      chunks_per_cta=c.chunks_per_cta) > target.smem_per_block:
    stages -= 1
  return dataclasses.replace(c, num_stages=stages)


def mosaic_scores_candidates(dims: AttentionDims, chunk_size: int,
                             target: GpuTarget) -> list[MosaicGpuScoresConfig]:
  """The default, the other consumer count, 4 / 16 ring slots (as many as fit), half / double
  the run."""
  base = mosaic_scores_config(dims, chunk_size, target)
  others = [dataclasses.replace(base, consumers=3 - base.consumers),
            *(dataclasses.replace(base, num_stages=st) for st in (4, 16)),
            *(dataclasses.replace(base, chunks_per_cta=max(1, int(base.chunks_per_cta * f)))
              for f in (0.5, 2.0))]
  return list(dict.fromkeys([base, *(_scores_slots(c, dims, target) for c in others)]))


def mosaic_scores_unsupported(dims: AttentionDims, chunk_size: int, c: MosaicGpuScoresConfig,
                              target: GpuTarget, interpret: bool) -> str | None:
  """Why the Mosaic GPU scorer cannot run this shape with config `c`, or None (the problem's
  kind of codes and rows is checked by the op)."""
  if interpret:
    return "it has no interpret mode"
  if not target.is_hopper:
    return (f"it needs a Hopper GPU (sm_90); the target {target.name} is "
            f"sm_{target.compute_capability[0]}{target.compute_capability[1]}")
  if mosaic_attention.swizzle_bytes(dims.D, 1) is None:
    return f"it needs a sketch width W a multiple of 32, got W={dims.D}"
  if dims.S % 8:
    return f"it needs S={dims.S} a multiple of 8"
  if chunk_size % c.block_k:
    return f"it needs config.block_k={c.block_k} to divide chunk_size={chunk_size}"
  if c.num_stages > mosaic_attention.MAX_STAGES:
    return (f"it keeps at most {mosaic_attention.MAX_STAGES} ring slots, got "
            f"config.num_stages={c.num_stages}")
  smem = mosaic_scores.smem_bytes_used(dims.D, c.block_k, num_stages=c.num_stages,
                                       consumers=c.consumers, chunks_per_cta=c.chunks_per_cta)
  if smem > target.smem_per_block:
    return (f"its tiling needs {smem} bytes of shared memory per block; {target.name} allows "
            f"{target.smem_per_block} (fewer num_stages or chunks_per_cta fit)")
  return None


# ------------------------------------------------------------------ tile_chunk_attention


def mosaic_tiles(dims: AttentionDims, requests_per_tile: int, list_width: int, chunk_size: int,
                 dtype, target: GpuTarget, *, kv_dtype) -> MosaicGpuTileConfig:
  """shared_attention's tilings over a tile's rows: one consumer on 64 rows where a tile's rows
  fit them, else ping-pong pairs on 128 rows, whose two warpgroups multiply each gathered K/V
  tile, so a tile's chunks are read half as often (H200, S=1M, C=512, correlated routing, 75%:
  tiles of 32 requests x G=4 took 2.72 ms at B=128 with one consumer per 64 rows, the time of
  their reads, and 1.88 ms as pairs; sparse_tile_requests.md, sparse_tile_pair.md); 128-key
  tiles, two ring slots (twice as many for float8); the chunk list split to fill the chip twice:
  the tiles' lists differ in length, and a second wave evens them out (B=128 in 8 tiles of 16
  requests: 4 splits 2.52 ms, the one wave of 2 splits 2.92 ms; B=8 and 512 level or slower
  past two waves: sparse_tile_sweep.md)."""
  rows = requests_per_tile * dims.T * dims.G
  return _mosaic_tiles(dims, requests_per_tile, list_width, chunk_size, dtype, target,
                       kv_dtype=kv_dtype, consumers=1 if rows <= mosaic_attention.BLOCK_Q else 2)


def _mosaic_tiles(dims: AttentionDims, requests_per_tile: int, list_width: int, chunk_size: int,
                  dtype, target: GpuTarget, *, kv_dtype, consumers: int) -> MosaicGpuTileConfig:
  block_k, stages = _mosaic_tiling(dims, dtype, 2, target, consumers=consumers,
                                   kv_dtype=kv_dtype)
  programs = dims.Hkv * dims.B // requests_per_tile * math.ceil(
      requests_per_tile * dims.T * dims.G / mosaic_attention.rows_per_cta(consumers))
  splits = max(1, min(list_width * math.ceil(chunk_size / block_k),
                      2 * target.num_cores // programs))
  return MosaicGpuTileConfig(block_k=block_k, num_stages=stages, num_splits=splits,
                             consumers=consumers)


def mosaic_tiles_candidates(dims: AttentionDims, requests_per_tile: int, list_width: int,
                           chunk_size: int, dtype, target: GpuTarget, *,
                           kv_dtype) -> list[MosaicGpuTileConfig]:
  """Neighbours of the default: 64-key tiles with 2-4 slots, 3-4 slots, half to 4x the splits
  (the lists of a call differ in length per kv head and tile, which more and shorter CTAs even
  out), and the other number of consumers."""
  base = mosaic_tiles(dims, requests_per_tile, list_width, chunk_size, dtype, target,
                      kv_dtype=kv_dtype)
  other = _mosaic_tiles(dims, requests_per_tile, list_width, chunk_size, dtype, target,
                        kv_dtype=kv_dtype, consumers=3 - base.consumers)
  return [base, *(dataclasses.replace(base, block_k=64, num_stages=st) for st in (2, 3, 4)),
          *(dataclasses.replace(base, num_stages=st) for st in (3, 4) if st != base.num_stages),
          *_with_splits(base, (0.5, 2.0, 4.0)), other]


def mosaic_tiles_unsupported(dims: AttentionDims, chunk_size: int, dtype, c: MosaicGpuTileConfig,
                             target: GpuTarget, interpret: bool, *, kv_dtype) -> str | None:
  """Why the Mosaic GPU tile kernel cannot run this problem with config c, or None: the
  kernel's limits (`mosaic_unsupported`), and chunks that are whole pages of its key tiles."""
  if mosaic_attention.paging_problem(chunk_size, c.block_k):  # a chunk is pages of the tiles
    return (f"it needs chunk_size a multiple of 8 that config.block_k={c.block_k} divides or "
            f"that divides it, got chunk_size={chunk_size}")
  return mosaic_unsupported(dims, dtype, c.block_k, c.num_stages, target, interpret,
                            kv_dtype=kv_dtype, consumers=c.consumers)


def triton_tiles(dims: AttentionDims, requests_per_tile: int, list_width: int, chunk_size: int,
                 dtype, target: GpuTarget) -> TritonSharedConfig:
  """shared_attention's tiling over a tile's rows (padded to whole row blocks per tile), its
  chunk list split to fill the chip."""
  rows = requests_per_tile * dims.T * dims.G
  block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
  block_m, block_k, stages = _fit_triton(block_m, 64 if block_m >= 128 else 128, 3, dims.D,
                                         jnp.dtype(dtype).itemsize, target)
  n_tiles = dims.B // requests_per_tile
  programs = dims.Hkv * n_tiles * math.ceil(rows / block_m)
  splits = splits_to_fill(target, programs, list_width * math.ceil(chunk_size / block_k))
  return TritonSharedConfig(block_m=block_m, block_k=block_k,
                            num_splits=max(1, min(splits, list_width)),
                            num_warps=8 if block_m >= 128 else 4, num_stages=stages)
