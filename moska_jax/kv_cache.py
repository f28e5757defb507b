"""The shared KV store (built once by `prefill.build_shared_store`, saved with orbax) and the
paged unique KV cache.

Every layer's K, V (and page pool) is its own array, so a jitted step reads a layer without
slicing a copy out of a stacked array and updates pools in place.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moska_jax import checkpoint, routing
from moska_jax.attention import SharedLayer
from moska_jax.config import DEFAULT_SUMMARY, ModelConfig, check_int
from pallas_kernels import quant
from pallas_kernels.checks import check_kv_scales

KV_DTYPES = (None, "float8_e4m3fn", "float8_e5m2")  # None: the model's dtype, unscaled
# A float8 unique cache's scales leave this much room above the largest magnitude of the shared
# store's keys (values) of the same layer and kv head; see `unique_kv_scales`.
UNIQUE_HEADROOM = 2.0


def check_kv_dtype(kv_dtype, what: str, name: str = "kv_dtype"):
  """kv_dtype as a float8 jnp.dtype, or None (the model's dtype).

  Raises:
    ValueError: kv_dtype (the argument `name` of `what`) is not one of `KV_DTYPES` (names or the
      dtypes themselves).
  """
  if kv_dtype is None:
    return None
  try:
    dtype = jnp.dtype(kv_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not quant.is_fp8(dtype):
    raise ValueError(f"{what}: {name} must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
  return dtype


def zero_kv(cfg: ModelConfig, rows: tuple[int, ...],
            dtype=None) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """Per layer a zero (k, v) pair of shape [*rows, Hkv, D] in `dtype` (default the model's)."""
  dtype = cfg.jnp_dtype if dtype is None else dtype
  zeros = lambda: jnp.zeros((*rows, cfg.num_kv_heads, cfg.head_dim), dtype)
  return tuple((zeros(), zeros()) for _ in range(cfg.layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedKVStore:
  """Per-layer shared K, V [S_pad, Hkv, D] (RoPE applied), chunk summaries, token count.

  Keys sit at positions 0..S-1; S_pad rounds S up (to the routing chunk and the kernels' tiles)
  and the padding is masked by `length`. K, V are in the model's dtype (k_scale = v_scale =
  None) or float8 with per-layer [Hkv] float32 dequantization scales (k = k_scale[h] * stored;
  `quantized`, `prefill.build_shared_store(kv_dtype=...)`); the summaries are always those of
  the full-precision (or dequantized) keys. weights_fingerprint: the
  `moska_jax.kv_weights_fingerprint` of the decoder that built it (None for a store built
  another way, e.g. random K/V, or saved before fingerprints existed); an engine refuses a
  store whose fingerprint is not its model's.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  summaries: tuple[routing.ChunkSummaries, ...]
  length: jax.Array  # int32 scalar: valid shared tokens S
  model_config: ModelConfig = dataclasses.field(metadata=dict(static=True))
  chunk_size: int = dataclasses.field(metadata=dict(static=True))
  k_scale: tuple[jax.Array, ...] | None = None  # per layer [Hkv] float32, float8 K only
  v_scale: tuple[jax.Array, ...] | None = None
  weights_fingerprint: str | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def kv_dtype(self) -> str | None:
    """The K/V storage format: a float8 dtype's name, or None (the model's dtype, unscaled)."""
    return None if self.k_scale is None else jnp.dtype(self.k[0].dtype).name

  def _scales(self) -> list:
    """Per layer (k_scale, v_scale), (None, None) when unscaled."""
    if self.k_scale is None:
      return [(None, None)] * len(self.k)
    return list(zip(self.k_scale, self.v_scale, strict=True))

  @property
  def layers(self) -> tuple[SharedLayer, ...]:
    """Each layer's K, V, summaries, length (and float8 scales) as the attention reads them."""
    return tuple(SharedLayer(k, v, s, self.length, ks, vs)
                 for k, v, s, (ks, vs) in zip(self.k, self.v, self.summaries, self._scales(),
                                              strict=True))

  def dequantized(self, kv: str) -> tuple[jax.Array, ...]:
    """Per layer the keys (kv="k") or values (kv="v") in the model's dtype, dequantized when
    stored in float8."""
    x, scales = (self.k, self.k_scale) if kv == "k" else (self.v, self.v_scale)
    if scales is None:
      return x
    return tuple(quant.dequantize(a, s, self.model_config.jnp_dtype) for a, s in zip(x, scales))

  def with_summaries(self, chunk_size: int, summary: str = DEFAULT_SUMMARY) -> SharedKVStore:
    """The same K/V routed at another chunk size or summary kind (summaries recomputed from the
    dequantized keys of a float8 store)."""
    summaries = tuple(routing.chunk_summaries(k, chunk_size, kv_length=self.length,
                                              summary=summary) for k in self.dequantized("k"))
    return dataclasses.replace(self, summaries=summaries, chunk_size=chunk_size)

  def quantized(self, kv_dtype) -> SharedKVStore:
    """This store with K, V in float8 `kv_dtype`, one scale per layer and kv head (the largest
    magnitude of the head's valid rows to the format's largest finite value,
    `pallas_kernels.quant.quantize`); the padding rows past `length` are stored as zeros. The
    summaries stay those of the full-precision keys.

    Raises:
      ValueError: kv_dtype is not a float8 name of `KV_DTYPES`, or the store is float8 already.
    """
    dtype = check_kv_dtype(kv_dtype, "SharedKVStore.quantized")
    if dtype is None or self.k_scale is not None:
      raise ValueError(f"SharedKVStore.quantized: needs a store in the model's dtype and a "
                       f"float8 kv_dtype ({list(KV_DTYPES[1:])}); got a store in "
                       f"{self.kv_dtype or 'the model dtype'} and kv_dtype {kv_dtype!r}")
    valid = lambda x: jnp.where((jnp.arange(x.shape[0]) < self.length)[:, None, None], x, 0)
    k, ks = zip(*(quant.quantize(valid(x), dtype) for x in self.k))
    v, vs = zip(*(quant.quantize(valid(x), dtype) for x in self.v))
    return dataclasses.replace(self, k=k, v=v, k_scale=ks, v_scale=vs)


def _arrays(store: SharedKVStore) -> dict:
  """The tree of arrays a store is saved as (orbax)."""
  scales = {} if store.k_scale is None else dict(k_scale=list(store.k_scale),
                                                 v_scale=list(store.v_scale))
  projections = [s.projection for s in store.summaries]
  projections = {} if projections[0] is None else dict(projections=projections)
  return dict(k=list(store.k), v=list(store.v), length=store.length,
              summaries=[list(s.arrays) for s in store.summaries],
              num_valid_chunks=[s.num_valid_chunks for s in store.summaries], **scales,
              **projections)


def save_shared_store(path: str, store: SharedKVStore, *, overwrite: bool = False) -> None:
  """Saves the store under directory `path`, atomically and with a checksum per file.

  Layout: `path/store.json` (the config, chunk size, summary kind, rows, kv_dtype, weights
  fingerprint),
  `path/arrays` (orbax; float8 K/V as they are, bit-exact, with their float32 scales)
  and `path/checksums.json` (the size and sha256 of every file). The directory is written beside
  `path` and renamed into place once complete and durable (`checkpoint.atomic_directory`): a save
  that fails or is killed leaves the old store (or none) loadable, never a half-written one.

  Args:
    path: the directory to write; it must not exist unless overwrite=True.
    store: the store.
    overwrite: replace an existing store at `path`, only once the new one is complete.

  Raises:
    FileExistsError: `path` exists (and overwrite is False, or it is not a store).
    TypeError: store is not a SharedKVStore.
  """
  if not isinstance(store, SharedKVStore):
    raise TypeError(f"save_shared_store: store must be a SharedKVStore, got "
                    f"{type(store).__name__}")
  meta = dict(model_config=store.model_config.to_dict(), chunk_size=store.chunk_size,
              summary=store.summaries[0].kind, rows=store.k[0].shape[0],
              kv_dtype=store.kv_dtype, weights_fingerprint=store.weights_fingerprint)
  arrays = _arrays(store)
  with checkpoint.atomic_directory(path, overwrite=overwrite, marker="store.json",
                                   what="save_shared_store") as tmp:
    with open(os.path.join(tmp, "store.json"), "w") as f:
      json.dump(meta, f, indent=1)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, "arrays"), arrays)
    ckpt.wait_until_finished()
    checkpoint.write_checksums(tmp)


def load_shared_store(path: str, model_config: ModelConfig | None = None, *,
                      verify: bool = True) -> SharedKVStore:
  """Restores a store saved by `save_shared_store`.

  Args:
    path: the store's directory.
    model_config: if given, the config the store must have been built with.
    verify: check every file against `checksums.json` before reading it (each file is read
      once more to hash it); False only to load a store saved before checksums existed
      (damage is then found only where orbax cannot read it).

  Raises:
    FileNotFoundError: no store at `path`.
    ValueError: `model_config` is given and differs from the config the store was built with,
      or the store is damaged or incomplete (the error names the file).
  """
  what = "load_shared_store"
  path = os.path.abspath(path)
  checkpoint.settle(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}: no shared store at {path} (no such directory)")
  if verify:
    checkpoint.verify_files(path, what)
  meta = checkpoint.read_json(path, "store.json", what)
  try:
    built_for = ModelConfig.from_dict(meta["model_config"])
    C, summary, rows = meta["chunk_size"], meta["summary"], meta["rows"]
    if summary not in routing.SUMMARIES or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (C, rows)):
      raise ValueError(f"summary {summary!r}, chunk_size {C!r}, rows {rows!r}")
    kv_dtype = check_kv_dtype(meta.get("kv_dtype"), "store.json")  # absent: saved unscaled
    fingerprint = meta.get("weights_fingerprint")  # absent: saved before fingerprints
    if fingerprint is not None and not isinstance(fingerprint, str):
      raise ValueError(f"weights_fingerprint {fingerprint!r}")
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{what}: {os.path.join(path, 'store.json')} is damaged: "
                     f"{type(e).__name__}: {e}") from None
  if model_config is not None:
    if not isinstance(model_config, ModelConfig):
      raise TypeError(f"{what}: model_config must be a ModelConfig (e.g. model.cfg), got "
                      f"{type(model_config).__name__}")
    differ = {f.name: (getattr(built_for, f.name), getattr(model_config, f.name))
              for f in dataclasses.fields(ModelConfig)
              if getattr(built_for, f.name) != getattr(model_config, f.name)}
    if differ:
      raise ValueError(f"{what}: the store at {path} was built for another model config; "
                       + ", ".join(f"{k}: {a!r} in the store, {b!r} given"
                                   for k, (a, b) in differ.items()))
  cfg = built_for
  full = jax.ShapeDtypeStruct((rows, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
  kv = full if kv_dtype is None else jax.ShapeDtypeStruct(full.shape, kv_dtype)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = jax.eval_shape(lambda k: routing.chunk_summaries(k, C, summary=summary), full)
  projections = ({} if shapes.projection is None else
                 dict(projections=[shapes.projection] * cfg.layers))
  scale = [jax.ShapeDtypeStruct((cfg.num_kv_heads,), jnp.float32)] * cfg.layers
  scales = {} if kv_dtype is None else dict(k_scale=scale, v_scale=scale)
  a = checkpoint.restore_arrays(os.path.join(path, "arrays"),
                                dict(k=[kv] * cfg.layers, v=[kv] * cfg.layers, length=scalar,
                                     summaries=[list(shapes.arrays)] * cfg.layers,
                                     num_valid_chunks=[scalar] * cfg.layers, **scales,
                                     **projections), what)
  summaries = tuple(routing.ChunkSummaries(tuple(arr), n, summary, C, p) for arr, n, p in zip(
      a["summaries"], a["num_valid_chunks"], a.get("projections", [None] * cfg.layers)))
  scales = {} if kv_dtype is None else dict(k_scale=tuple(a["k_scale"]),
                                            v_scale=tuple(a["v_scale"]))
  return SharedKVStore(tuple(a["k"]), tuple(a["v"]), summaries, a["length"], built_for, C,
                       **scales, weights_fingerprint=fingerprint)


def unique_kv_scales(store: SharedKVStore, kv_dtype,
                     headroom: float = UNIQUE_HEADROOM) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """Default per-layer (k_scale, v_scale) [Hkv] float32 of a float8 unique cache, from `store`.

  A page pool's scales are fixed when the cache is made (tokens are quantized as they are
  written), so they come from the best estimate at hand of the range of the new K/V: the shared
  store's, of the same layer and kv head, since the same k/v projections (and RoPE) produce both.
  The headroom (default 2) keeps a unique token up to twice the store's largest magnitude of its
  head exact to float8 rounding; it costs one binade at the bottom of the format (values below
  2^-6 * scale of e4m3 lose relative precision as subnormals, a negligible share of attention),
  and larger values saturate to the format's largest (a bounded error, never inf or NaN).

  Args:
    store: the shared store (float8 or the model's dtype).
    kv_dtype: the unique cache's float8 format (a float8 name of `KV_DTYPES`).
    headroom: the factor > 0 above the store's per-head largest magnitude.
  """
  dtype = check_kv_dtype(kv_dtype, "unique_kv_scales")
  if dtype is None:
    raise ValueError(f"unique_kv_scales: kv_dtype must be a float8 name of {list(KV_DTYPES[1:])}, "
                     f"got None")
  if isinstance(headroom, bool) or not isinstance(headroom, (int, float, np.number)) or not (
      0 < headroom < float("inf")):
    raise ValueError(f"unique_kv_scales: headroom must be a finite number > 0, got "
                     f"{headroom!r}")
  top = float(jnp.finfo(dtype).max)

  def scale(x, s):  # the head's largest magnitude (of the valid rows) -> the new format
    # (read from the data, float8 too: an all-zero head's stored scale is 1, not its range)
    valid = (jnp.arange(x.shape[0]) < store.length)[:, None, None]
    amax = jnp.max(jnp.where(valid, jnp.abs(x.astype(jnp.float32)), 0.0), axis=(0, 2))
    if s is not None:
      amax = amax * s
    return jnp.where(amax > 0, amax * headroom / top, 1.0).astype(jnp.float32)

  return tuple((scale(k, ks), scale(v, vs))
               for k, v, (ks, vs) in zip(store.k, store.v, store._scales()))


class UniqueKVCache:
  """The paged unique KV of up to `max_batch` requests: one page pool per layer.

  pools: per layer (k_pages, v_pages) [num_pages, page_size, Hkv, D], the state a MoSKA step
  takes and returns (`moska_jax.step`), in the model's dtype or in float8 (`kv_dtype`) with the
  fixed per-layer scales `scales` (k = k_scale[h] * stored; new tokens are quantized as they are
  written). block_tables [max_batch, max_pages_per_request] and lengths [max_batch] (tokens
  cached per slot) are host arrays.

  Page 0 is a scratch page no request owns: unused block-table entries point at it, so the fixed-
  shape step can write padding tokens anywhere without touching another request's pages.
  Allocation is host-side (a free list); the pools live on the device.

  Args:
    cfg: the model's config.
    max_batch, num_pages, page_size, max_pages_per_request: the slots and the page budget.
    kv_dtype: None (the model's dtype) or a float8 name of `KV_DTYPES`.
    scales: float8 only (then required): per layer (k_scale, v_scale) [Hkv] float32, e.g.
      `unique_kv_scales(store, kv_dtype)`.
  """

  def __init__(self, cfg: ModelConfig, *, max_batch: int, num_pages: int, page_size: int,
               max_pages_per_request: int, kv_dtype=None, scales=None):
    num_pages = check_int(num_pages, "num_pages (page 0 is scratch)", "UniqueKVCache", 2)
    page_size = check_int(page_size, "page_size", "UniqueKVCache")
    max_batch = check_int(max_batch, "max_batch", "UniqueKVCache")
    max_pages_per_request = check_int(max_pages_per_request, "max_pages_per_request",
                                      "UniqueKVCache")
    dtype = check_kv_dtype(kv_dtype, "UniqueKVCache")
    if dtype is not None:
      if scales is None or len(scales) != cfg.layers or any(len(pair) != 2 for pair in scales):
        raise ValueError(f"UniqueKVCache: a {dtype.name} cache needs scales, per layer "
                         f"({cfg.layers}) a (k_scale, v_scale) pair of shape "
                         f"[Hkv={cfg.num_kv_heads}]")
      scales = tuple(tuple(map(jnp.asarray, check_kv_scales(*pair, cfg.num_kv_heads,
                                                            op="UniqueKVCache")))
                     for pair in scales)
    elif scales is not None:
      raise ValueError("UniqueKVCache: scales are for a float8 kv_dtype; got kv_dtype None")
    self.kv_dtype, self.scales = dtype, scales
    self.page_size, self.num_pages = page_size, num_pages
    self._cfg = cfg
    self.pools = self.zero_pools()
    self.block_tables = np.zeros((max_batch, max_pages_per_request), np.int32)
    self.lengths = np.zeros((max_batch,), np.int32)
    self.free_pages = list(range(num_pages - 1, 0, -1))
    self.owned: dict[int, list[int]] = {}

  def zero_pools(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Per layer fresh zero (k_pages, v_pages) in the cache's dtype."""
    return zero_kv(self._cfg, (self.num_pages, self.page_size), self.kv_dtype)

  def pages_for(self, tokens: int) -> int:
    return -(-tokens // self.page_size)

  def fits(self, tokens: int) -> bool:
    """Whether a request of `tokens` tokens fits in an empty cache."""
    return self.pages_for(tokens) <= min(self.num_pages - 1, self.block_tables.shape[1])

  def can_allocate(self, tokens: int) -> bool:
    return self.pages_for(tokens) <= min(len(self.free_pages), self.block_tables.shape[1])

  def _check_slot(self, slot, where: str) -> int:
    slots = self.block_tables.shape[0]
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < slots:
      raise ValueError(f"UniqueKVCache.{where}: slot must be an int in [0, {slots}), got "
                       f"{slot!r}")
    return int(slot)

  def allocate(self, slot: int, tokens: int) -> None:
    """Gives `slot` pages for `tokens` tokens (its length restarts at 0).

    Raises:
      ValueError: a slot outside [0, max_batch) or one that holds pages, or too few pages.
    """
    slot = self._check_slot(slot, "allocate")
    tokens = check_int(tokens, "tokens", "UniqueKVCache.allocate", 0)
    n = self.pages_for(tokens)
    if slot in self.owned:
      raise ValueError(f"UniqueKVCache: slot {slot} already holds pages")
    if not self.can_allocate(tokens):
      raise ValueError(f"UniqueKVCache: {tokens} tokens need {n} pages; {len(self.free_pages)} "
                       f"free, at most {self.block_tables.shape[1]} per request")
    pages = [self.free_pages.pop() for _ in range(n)]
    self.owned[slot] = pages
    self.block_tables[slot] = 0
    self.block_tables[slot, :n] = pages
    self.lengths[slot] = 0

  def free(self, slot: int) -> None:
    """Returns the slot's pages to the pool.

    Raises:
      ValueError: a slot outside [0, max_batch) or one that holds no pages.
    """
    slot = self._check_slot(slot, "free")
    if slot not in self.owned:
      raise ValueError(f"UniqueKVCache.free: slot {slot} holds no pages")
    self.free_pages.extend(reversed(self.owned.pop(slot)))
    self.block_tables[slot] = 0
    self.lengths[slot] = 0
