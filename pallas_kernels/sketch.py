"""The key sketches the chunk scorer reads: 4-bit codes packed two a byte, or 8-bit codes.

Packed (codes [..., D/2] for D-dimensional queries): a code is an integer in [-7, 7] per key
dimension. Byte j of a key's packed codes holds dimension j in its low nibble and dimension
j + D/2 in its high nibble, two's complement, stored as int8: a kernel unpacks a [keys, D/2]
byte tile into the two halves of the key with three arithmetic shifts (low = (b << 4) >> 4,
high = b >> 4, both already sign-extended int8), and q . code = q[:D/2] . low + q[D/2:] . high:
two dots of width D/2, no interleaving.

Unpacked (codes [..., D]): one int8 code in [-127, 127] per dimension, one dot. Half the density
but no unpacking, which on a GPU costs more than reading the second byte (measured on an H200:
experiments/results/sparse_tile_requests.md), and 8-bit precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = 7  # packed codes in [-7, 7]: symmetric, 15 of the 16 nibble values
LEVELS_8BIT = 127  # unpacked codes in [-127, 127]


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


def is_packed(codes_width: int, dim: int) -> bool:
  """Whether codes of last axis `codes_width` sketch `dim`-wide keys packed (D/2) or not (D)."""
  return codes_width * 2 == dim


def parts(codes: jax.Array, packed: bool) -> tuple[jax.Array, ...]:
  """The codes as the parts a scorer multiplies: the two halves of D (packed) or all of it."""
  return unpack(codes) if packed else (codes,)


def split(q: jax.Array, packed: bool) -> tuple[jax.Array, ...]:
  """q[..., D] as the parts matching `parts`: its two halves of D (packed) or all of it."""
  half = q.shape[-1] // 2
  return (q[..., :half], q[..., half:]) if packed else (q,)
