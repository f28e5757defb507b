"""The 4-bit key sketches the chunk scorer reads: two signed nibbles a byte, D split in halves.

A sketch code is an integer in [-7, 7] per key dimension. Byte j of a key's packed codes holds
dimension j in its low nibble and dimension j + D/2 in its high nibble, two's complement, stored
as int8: a kernel unpacks a [keys, D/2] byte tile into the two halves of the key with three
arithmetic shifts (low = (b << 4) >> 4, high = b >> 4, both already sign-extended int8), and
q . code = q[:D/2] . low + q[D/2:] . high: two dots of width D/2, no interleaving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = 7  # codes in [-7, 7]: symmetric, 15 of the 16 nibble values


def pack(codes: jax.Array) -> jax.Array:
  """Integer codes [..., D] in [-8, 7] (D even) -> packed int8 [..., D/2]."""
  if codes.shape[-1] % 2:
    raise ValueError(f"sketch.pack: the last axis (D) must be even, got {codes.shape}")
  half = codes.shape[-1] // 2
  nib = codes.astype(jnp.int32) & 0xF
  byte = nib[..., :half] | (nib[..., half:] << 4)
  return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.int8)


def unpack(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Packed int8 [..., D/2] -> the signed codes of dims [0, D/2) and [D/2, D), each int8.

  Plain jnp shifts (arithmetic on int8): the kernels call it on loaded tiles too.
  """
  return jnp.right_shift(jnp.left_shift(packed, 4), 4), jnp.right_shift(packed, 4)
