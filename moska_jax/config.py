"""Model shapes and MoSKA knobs as frozen, validated dataclasses."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import numpy as np

from pallas_kernels import BACKENDS

def check_int(value, name: str, where: str, minimum: int = 1) -> int:
  """value as an int >= minimum (numpy ints too, never a bool), else a ValueError naming
  `where`, `name` and the value."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
  return int(value)


# The chunk summary kinds of `moska_jax.routing.SUMMARIES`, named here so that a config validates
# without importing the router (tests check that the two agree).
SUMMARY_KINDS = ("mean", "envelope", "int4", "int4-pca2", "int4-pca4", "int8-pca2", "int8-pca4")
# The kinds that keep a sketch of every key (scored by `pallas_kernels.chunk_scores`): code bits
# and the share of the key's D dimensions sketched (1 / divisor: the PCA kinds' projection).
SKETCHES = {"int4": (4, 1), "int4-pca2": (4, 2), "int4-pca4": (4, 4), "int8-pca2": (8, 2),
            "int8-pca4": (8, 4)}
# What stores are summarized with and sparse configs route by unless told: the accurate router
# (0.994 of dense answers at 75% sparsity on the trained retrieval model, where "mean" and
# "envelope" choose like random chunks: experiments/results/accuracy_pca_c64.md, accuracy.md).
DEFAULT_SUMMARY = "int8-pca2"


def sketch_width(kind: str, head_dim: int) -> int:
  """W, the dimensions a sketch kind codes for keys of `head_dim` (D / divisor, rounded up to
  an even number: packed codes hold two a byte)."""
  return min(head_dim, 2 * -(-head_dim // (2 * SKETCHES[kind][1])))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 frequency scaling of RoPE (factor 8, low 1, high 4, original context 8192)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if not (_positive(self.factor) and _positive(self.low_freq_factor)
            and _positive(self.high_freq_factor)
            and self.high_freq_factor > self.low_freq_factor):
      raise ValueError(f"RopeScaling: factor, low_freq_factor and high_freq_factor must be finite "
                       f"numbers > 0 with high_freq_factor > low_freq_factor, got {self}")
    check_int(self.original_max_position, "original_max_position", "RopeScaling")


def _positive(x) -> bool:
  """x is a finite real number > 0 (not a bool)."""
  return (not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))
          and 0 < x < float("inf"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-style decoder: vocab, layers, hidden size, GQA heads, MLP, RoPE, RMSNorm, dtype."""

  vocab: int
  layers: int
  hidden: int
  num_heads: int  # Hq
  num_kv_heads: int  # Hkv
  head_dim: int  # D
  mlp_hidden: int
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab", "layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_hidden"):
      check_int(getattr(self, name), name, "ModelConfig")
    if not _positive(self.rope_theta):
      raise ValueError(f"ModelConfig: rope_theta must be a finite number > 0, got "
                       f"{self.rope_theta!r}")
    if not (_positive(self.norm_eps) or self.norm_eps == 0) or isinstance(self.norm_eps, bool):
      raise ValueError(f"ModelConfig: norm_eps must be a finite number >= 0, got "
                       f"{self.norm_eps!r}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"ModelConfig: rope_scaling must be a RopeScaling or None, got "
                       f"{self.rope_scaling!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (GQA)")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"ModelConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

  def check_tokens(self, tokens, what: str) -> np.ndarray:
    """tokens as an int32 array [n], every id in [0, vocab).

    Raises:
      ValueError: naming `what`, the first offending id, its position and the allowed range.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError(f"{what}: token ids must be a flat sequence of ints, got an array of "
                       f"shape {arr.shape} and dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= self.vocab))
    if bad.size:
      raise ValueError(f"{what}: token id {int(arr[bad[0]])} at position {int(bad[0])} is "
                       f"outside the vocabulary [0, {self.vocab})")
    return arr.astype(np.int32)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def to_dict(self) -> dict:
    """A JSON-ready dict (stored beside checkpoints and shared stores)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    """Inverse of `to_dict`."""
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


def llama3_1_8b(dtype: str = "bfloat16", layers: int = 32) -> ModelConfig:
  """Llama-3.1-8B shapes (public config); `layers` may be lowered for one-GPU benchmarks."""
  return ModelConfig(vocab=128256, layers=layers, hidden=4096, num_heads=32, num_kv_heads=8,
                     head_dim=128, mlp_hidden=14336, rope_theta=500000.0,
                     rope_scaling=RopeScaling(), norm_eps=1e-5, dtype=dtype)


def tiny(dtype: str = "float32", layers: int = 2) -> ModelConfig:
  """A CPU-sized model with the same structure (GQA 4, byte vocabulary)."""
  return ModelConfig(vocab=256, layers=layers, hidden=64, num_heads=4, num_kv_heads=1,
                     head_dim=16, mlp_hidden=128, rope_theta=10000.0, rope_scaling=None,
                     norm_eps=1e-5, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class MoskaConfig:
  """How the shared KV is attended.

  mode: "dense" (every request attends to the whole shared KV, one batched GEMM) or "sparse"
    (a router keeps top_k chunks per (request, kv head); `sparsity` sets top_k as a fraction).
  chunk_size: C, tokens per routed chunk (also the granularity of chunk summaries).
  top_k / sparsity: give at most one; sparsity s keeps ceil((1 - s) * N) chunks, N = ceil(S / C)
    the chunks that hold shared tokens (never the store's empty padding chunks), so K depends on
    the store: the engine fixes it when a store is loaded (`chunks_kept`).
  always_include: chunk ids always kept (e.g. (0,), an attention sink).
  reroute_every: r >= 1 (sparse only): a decoding request runs the router on every r-th of its
    decode steps and keeps its chunk selection (per layer) in between; its first decode step
    after its prompt, and every prefill step, always route. 1 routes every step.
  summary: chunk summary kind, one of `SUMMARY_KINDS` ("mean", "envelope", "int4", and the PCA
    kinds "int{4,8}-pca{2,4}": 4- or 8-bit sketches of the D/2 or D/4 principal directions of
    the keys; the keys of `moska_jax.routing.SUMMARIES`); the store's summaries must be of this
    kind. Default `DEFAULT_SUMMARY` ("int8-pca2"); "mean" and "envelope" are cheaper but route
    like random chunks when a request needs one key of a chunk.
  int8_scorer: score sketches with int8 query rows on the int8 matrix units (a ranking within
    ~1% of the float one; on an H200 the router took 0.6-0.65x the time of bf16 rows at B >= 128,
    0.85x at B=8: experiments/results/sparse_pareto.md).
  batch_aware: requests per tile of batch-aware routing (0: off): requests routed alike share a
    tile, which attends to the union of their chunks (`moska_jax.routing.batch_aware`); a
    request then sees at least its own chunks. On Hopper a tile of more than 64 query rows
    (batch_aware * T * G) runs as ping-pong pairs of 128 rows that read its chunks once per
    128 rows: 32 requests at G=4 measured fastest from B=128 up, 16 at B=8 (sparse_pareto.md).
  backend: kernel backend passed to every pallas_kernels call.
  interpret: run the Pallas kernels in interpret mode (CPU testing of the "gpu"/"tpu" kernels).
  """

  mode: Literal["dense", "sparse"] = "dense"
  chunk_size: int = 128
  top_k: int | None = None
  sparsity: float | None = None
  always_include: tuple[int, ...] = ()
  summary: str = DEFAULT_SUMMARY
  int8_scorer: bool = False
  batch_aware: int = 0
  backend: str = "auto"
  interpret: bool = False
  reroute_every: int = 1

  def __post_init__(self):
    if self.mode not in ("dense", "sparse"):
      raise ValueError(f"MoskaConfig.mode must be 'dense' or 'sparse', got {self.mode!r}")
    check_int(self.chunk_size, "chunk_size", "MoskaConfig")
    if self.top_k is not None and self.sparsity is not None:
      raise ValueError("MoskaConfig: give top_k or sparsity, not both")
    if self.top_k is not None:
      check_int(self.top_k, "top_k", "MoskaConfig")
    if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(
        self.sparsity, (int, float, np.integer, np.floating)) or not 0.0 <= self.sparsity < 1.0):
      raise ValueError(f"MoskaConfig.sparsity must be a number in [0, 1), got "
                       f"{self.sparsity!r}")
    if self.mode == "sparse" and self.top_k is None and self.sparsity is None:
      raise ValueError("MoskaConfig: mode 'sparse' needs top_k or sparsity")
    if self.mode == "dense" and (self.top_k, self.sparsity, self.always_include) != (
        None, None, ()):
      raise ValueError(f"MoskaConfig: top_k, sparsity and always_include route chunks: give "
                       f"mode='sparse' with them (mode is 'dense', got top_k={self.top_k}, "
                       f"sparsity={self.sparsity}, always_include={self.always_include!r})")
    ids = self.always_include
    if isinstance(ids, (str, bytes)) or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0
        for c in ids) or len(set(ids)) != len(ids):
      raise ValueError(f"MoskaConfig.always_include must be distinct chunk ids >= 0 (a "
                       f"sequence of ints), got {ids!r}")
    if self.top_k is not None and len(ids) > self.top_k:
      raise ValueError(f"MoskaConfig.always_include holds {len(ids)} ids, more than "
                       f"top_k={self.top_k}")
    object.__setattr__(self, "always_include", tuple(int(c) for c in ids))  # hashable (jit)
    check_int(self.reroute_every, "reroute_every", "MoskaConfig")
    if self.backend not in BACKENDS:
      raise ValueError(f"MoskaConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
    for name in ("int8_scorer", "interpret"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"MoskaConfig.{name} must be True or False, got "
                         f"{getattr(self, name)!r}")
    if self.interpret and self.backend == "xla":
      raise ValueError("MoskaConfig: interpret=True runs the Pallas kernels in interpret mode; "
                       "backend 'xla' has none (give backend='gpu', 'tpu' or 'auto')")
    if isinstance(self.batch_aware, bool) or not isinstance(self.batch_aware, int) or (
        self.batch_aware < 0):
      raise ValueError(f"MoskaConfig.batch_aware must be an int >= 0 (requests per tile; 0 is "
                       f"off), got {self.batch_aware!r}")
    if self.summary not in SUMMARY_KINDS:
      raise ValueError(f"MoskaConfig.summary must be one of {sorted(SUMMARY_KINDS)}, got "
                       f"{self.summary!r}")

  def chunks_kept(self, num_chunks: int) -> int:
    """K for a store whose tokens fill num_chunks = ceil(S / C) chunks (at least
    len(always_include), at most num_chunks)."""
    if self.top_k is not None:
      k = self.top_k
    else:  # the epsilon keeps exact products (0.25 * 64) from rounding up
      k = math.ceil((1.0 - (self.sparsity or 0.0)) * num_chunks - 1e-9)
    return int(max(1, len(self.always_include), min(k, num_chunks)))
