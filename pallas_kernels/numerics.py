"""Numerical conventions every kernel shares: the score scale, matmul precision, log bases."""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOG2E = 1.4426950408889634  # kernels run the softmax in base 2: exp2 is the fast instruction
LN2 = 0.6931471805599453


def default_sm_scale(sm_scale: float | None, D: int) -> float:
  """The score scale: 1/sqrt(D) unless given."""
  return float(D) ** -0.5 if sm_scale is None else float(sm_scale)


def matmul_precision(dtype):
  """IEEE float32 matmuls for float32 inputs (GPUs would use TF32, TPUs bf16 passes); the
  default (one pass at the input width) otherwise."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
