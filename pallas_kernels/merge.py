"""Exact log-sum-exp merge of partial attention states.

A partial attention over a key set K_i is (o_i, lse_i) with o_i = softmax(s_i) V_i and
lse_i = logsumexp(s_i). For disjoint key sets the attention over their union is

    lse = log(sum_i exp(lse_i)),   o = sum_i exp(lse_i - lse) * o_i.

An empty key set has lse_i = -inf and contributes nothing (whatever its o_i holds); if every set is
empty the result is o = 0, lse = -inf. A partial that is not a number poisons the merge, never
silently drops out: a NaN lse_i gives o = NaN, lse = NaN; an lse_i = +inf (an overflowed sum,
whose weight against the others is unknown) gives o = NaN, lse = +inf; a NaN in an o_i whose
lse_i is finite gives o = NaN. The partials are stacked along an array axis, or held one
per device of a `shard_map` axis (`axis_name`: the same merge as max-then-sum collectives). Plain
jnp: XLA fuses it into its neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_partials(o: jax.Array, lse: jax.Array, axis: int = 0, *,
                   axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Merges partial states stacked along `axis`, or spread over the devices of `axis_name`.

  Args:
    o: partial outputs [..., D] (the partials along `axis`, which must not be o's last axis).
    lse: partial log-sum-exps, the shape of `o` without its last axis; float32.
    axis: the axis of `lse` (and of `o`) that holds the partials (ignored with axis_name).
    axis_name: a mesh axis of the enclosing `shard_map`; each device holds one partial and all
      devices get the merged state (pmax of lse, then psum of the weights and weighted outputs).

  Returns:
    (o, lse) with `axis` reduced (or replicated over axis_name); o in o's dtype, lse float32.
    Rows with a NaN or +inf partial lse give o = NaN and lse NaN / +inf (module docstring).
  """
  for name, x in (("o", o), ("lse", lse)):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"merge_partials: {name} must be a float array, got "
                       f"{getattr(x, 'dtype', type(x).__name__)}")
  if o.shape[:-1] != lse.shape:
    raise ValueError(f"merge_partials: lse must have shape o.shape[:-1]={o.shape[:-1]}, "
                     f"got {lse.shape}")
  if axis_name is None and (isinstance(axis, bool) or not isinstance(axis, int)
                            or not -lse.ndim <= axis < lse.ndim):
    raise ValueError(f"merge_partials: axis must be an int in [-{lse.ndim}, {lse.ndim}) (an axis "
                     f"of lse), got {axis!r}")
  lse = lse.astype(jnp.float32)
  if axis_name is None:
    axis = axis % lse.ndim
    m = jnp.max(lse, axis=axis, keepdims=True)
    total_of = lambda x: jnp.sum(x, axis=axis)
  else:
    m = jax.lax.pmax(lse, axis_name)
    total_of = lambda x: jax.lax.psum(x, axis_name)
  # NaN and +inf partials: counted (a NaN's max is not reliably NaN across a pmax), then the
  # merged row is poisoned instead of normalizing the rest by a meaningless total.
  nan_rows = total_of(jnp.isnan(lse).astype(jnp.int32)) > 0
  inf_rows = total_of((lse == jnp.inf).astype(jnp.int32)) > 0
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # all-empty rows: keep exp() finite
  w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)  # exactly 0 for empty partials
  total = total_of(w)
  # Gated on lse, not on w: a weight that underflows to 0 still passes its o_i's NaN on.
  w_o = jnp.where(jnp.isfinite(lse)[..., None], w[..., None] * o.astype(jnp.float32), 0.0)
  out = total_of(w_o) / jnp.where(total > 0, total, 1.0)[..., None]
  m = jnp.squeeze(m, axis) if axis_name is None else m
  out_lse = jnp.where(total > 0, m + jnp.log(total), -jnp.inf)
  out = jnp.where((nan_rows | inf_rows)[..., None], jnp.nan, out)
  out_lse = jnp.where(nan_rows, jnp.nan, jnp.where(inf_rows, jnp.inf, out_lse))
  return out.astype(o.dtype), out_lse


def merge_attention_states(o_a: jax.Array, lse_a: jax.Array, o_b: jax.Array,
                           lse_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Combines two partial attentions over disjoint key sets into the attention over their union.

  Args:
    o_a, o_b: partial outputs [..., D] of one shape.
    lse_a, lse_b: their natural-log log-sum-exps [...], float32; -inf marks an empty side.

  Returns:
    (o, lse): o in the promoted dtype of o_a and o_b, lse float32. A NaN lse on either side
    gives o = NaN, lse = NaN; a +inf one o = NaN, lse = +inf (see `merge_partials`).
  """
  for name, x in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
    if not hasattr(x, "shape"):
      raise ValueError(f"merge_attention_states: {name} must be an array, got "
                       f"{type(x).__name__}")
  if o_a.shape != o_b.shape or lse_a.shape != lse_b.shape:
    raise ValueError(f"merge_attention_states: shapes differ: o_a {o_a.shape} vs o_b {o_b.shape}, "
                     f"lse_a {lse_a.shape} vs lse_b {lse_b.shape}")
  dtype = jnp.result_type(o_a.dtype, o_b.dtype)
  o = jnp.stack([o_a.astype(dtype), o_b.astype(dtype)])
  lse = jnp.stack([lse_a, lse_b])
  return merge_partials(o, lse, axis=0)
