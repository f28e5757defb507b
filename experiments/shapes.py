"""Named attention shapes (Hq, Hkv, D) shared by the benchmarks (`--shape`) and the tests.

A shape is the part of a model an attention kernel sees: query heads, kv heads and head dim.
Everything else (B, S, U, C, dtype) is a benchmark's own sweep. `parse` also takes an unnamed
"Hq/Hkv/D", so a one-off shape needs no entry here. Pure Python: importing it needs no jax.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
  """Attention heads of one model: Hq query heads, Hkv kv heads (GQA), head dim D."""

  name: str
  num_heads: int  # Hq
  num_kv_heads: int  # Hkv
  head_dim: int  # D

  def __post_init__(self):
    if min(self.num_heads, self.num_kv_heads, self.head_dim) < 1:
      raise ValueError(f"shape {self.name}: Hq, Hkv and D must be >= 1, got {self.heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"shape {self.name}: Hq={self.num_heads} must be a multiple of "
                       f"Hkv={self.num_kv_heads}")

  @property
  def heads(self) -> tuple[int, int, int]:
    """(Hq, Hkv, D)."""
    return self.num_heads, self.num_kv_heads, self.head_dim

  def __str__(self) -> str:
    return (f"{self.name} (Hq={self.num_heads}, Hkv={self.num_kv_heads}, "
            f"D={self.head_dim})")


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama3_1_8b", 32, 8, 128),  # the paper's model; moska_jax.config.llama3_1_8b
    Shape("llama2_7b", 32, 32, 128),  # multi-head attention (G = 1)
    Shape("gemma2_9b", 16, 8, 256),  # D = 256
    Shape("tiny", 4, 1, 16),  # moska_jax.config.tiny: CPU smoke runs
)}


def parse(spec: str) -> Shape:
  """A name of `SHAPES`, or "Hq/Hkv/D" for an unnamed shape."""
  if spec in SHAPES:
    return SHAPES[spec]
  parts = spec.split("/")
  if len(parts) != 3 or not all(p.isdigit() for p in parts):
    raise ValueError(f"shape must be one of {sorted(SHAPES)} or Hq/Hkv/D, got {spec!r}")
  return Shape(spec, *map(int, parts))
