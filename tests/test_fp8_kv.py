"""FP8 K/V in the library: the float8 shared store (build, quantize, save / load bit-exact), the
float8 unique page pools (`write_pages` with scales), and the engine over both against the plain
decoder run on the dequantized K/V.

The model has two kv heads, and the store's per-head scales differ: a scale applied to the wrong
head shows in the logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from moska_jax import checkpoint, routing
from moska_jax.attention import SharedLayer, shared_partial
from moska_jax.config import ModelConfig, MoskaConfig
from moska_jax.engine import MoskaEngine
from moska_jax.kv_cache import (SharedKVStore, UniqueKVCache, load_shared_store,
                                save_shared_store, unique_kv_scales)
from moska_jax.model import Decoder, stateless
from moska_jax.prefill import build_shared_store
from moska_jax.sharding import make_device_groups
from pallas_kernels import quant
from tests.np_reference import rel_err

E4M3 = "float8_e4m3fn"
C = 64


def _model(layers: int) -> Decoder:
  """The file's model, whose two kv heads' magnitudes differ by 4x (so do their scales)."""
  cfg = ModelConfig(vocab=256, layers=layers, hidden=64, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_hidden=96, rope_theta=10000.0)
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  for blk in model.blocks:
    for proj in (blk.attn.k_proj, blk.attn.v_proj):
      gain = jnp.repeat(jnp.asarray([1.0, 4.0]), cfg.head_dim)
      proj.kernel[...] = proj.kernel[...] * gain
  return model


@pytest.fixture(scope="module")
def setup():
  model = _model(layers=2)
  rng = np.random.default_rng(3)
  shared = rng.integers(0, 256, 200)
  full = build_shared_store(model, shared, chunk_size=C, prefill_chunk=128, backend="xla")
  fp8 = build_shared_store(model, shared, chunk_size=C, prefill_chunk=128, backend="xla",
                           kv_dtype=E4M3)
  return model, shared, full, fp8, rng


def test_build_quantizes_each_layer_per_kv_head(setup):
  model, shared, full, fp8, _ = setup
  S = len(shared)
  assert fp8.kv_dtype == E4M3 and full.kv_dtype is None
  for layer, (k, v, ks, vs) in enumerate(zip(fp8.k, fp8.v, fp8.k_scale, fp8.v_scale)):
    assert k.dtype == v.dtype == jnp.float8_e4m3fn
    assert ks.shape == vs.shape == (2,) and ks.dtype == vs.dtype == jnp.float32
    assert float(ks[1]) > 2 * float(ks[0])  # the heads got their own scales
    for stored, ref in ((fp8.dequantized("k")[layer], full.k[layer]),
                        (fp8.dequantized("v")[layer], full.v[layer])):
      assert rel_err(np.asarray(stored[:S]), np.asarray(ref[:S])) < 0.07
  # Routing summaries come from the full-precision keys.
  for a, b in zip(jax.tree.leaves(fp8.summaries), jax.tree.leaves(full.summaries)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # with_summaries recomputes them from the dequantized keys.
  again = fp8.with_summaries(C, "envelope")
  for got, k in zip(again.summaries, fp8.dequantized("k")):
    want = routing.chunk_summaries(k, C, kv_length=fp8.length, summary="envelope")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_kv_dtype_is_refused(setup):
  model, shared, full, fp8, _ = setup
  for bad in ("bfloat16", "int8", "fp8"):
    with pytest.raises(ValueError, match=r"build_shared_store: kv_dtype must be one of \[None, "
                       r"'float8_e4m3fn', 'float8_e5m2'\]"):
      build_shared_store(model, shared, chunk_size=C, kv_dtype=bad)
  with pytest.raises(ValueError, match="quantized: needs a store in the model's dtype"):
    fp8.quantized(E4M3)
  with pytest.raises(ValueError, match=r"MoskaEngine: unique_kv_dtype must be one of"):
    MoskaEngine(model, full, MoskaConfig(backend="xla"), max_batch=1, num_pages=4,
                unique_kv_dtype="float16")


@pytest.mark.parametrize("kv_dtype", [E4M3, "float8_e5m2"])
def test_save_load_is_bit_exact(setup, tmp_path, kv_dtype):
  model, _, full, _, _ = setup
  store = full.quantized(kv_dtype)
  path = str(tmp_path / "store")
  save_shared_store(path, store)
  with open(os.path.join(path, "store.json")) as f:
    assert json.load(f)["kv_dtype"] == kv_dtype
  back = load_shared_store(path, model.cfg)
  assert back.kv_dtype == kv_dtype
  for a, b in zip(store.k + store.v, back.k + back.v, strict=True):
    assert b.dtype == jnp.dtype(kv_dtype)
    assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  for a, b in zip(store.k_scale + store.v_scale, back.k_scale + back.v_scale, strict=True):
    assert b.dtype == jnp.float32 and np.array_equal(np.asarray(a), np.asarray(b))


def test_a_store_saved_without_kv_dtype_still_loads(setup, tmp_path):
  model, _, full, _, _ = setup
  path = str(tmp_path / "old")
  save_shared_store(path, full)
  meta_path = os.path.join(path, "store.json")
  with open(meta_path) as f:
    meta = json.load(f)
  del meta["kv_dtype"]  # as written before FP8 stores existed
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  checkpoint.write_checksums(path)
  back = load_shared_store(path, model.cfg)
  assert back.kv_dtype is None and back.k_scale is None
  np.testing.assert_array_equal(np.asarray(back.k[1]), np.asarray(full.k[1]))


def test_write_pages_quantizes_with_fixed_scales_and_saturates():
  rng = np.random.default_rng(0)
  pools = [jnp.zeros((4, 8, 2, 16), jnp.float8_e4m3fn) for _ in range(2)]
  tables = jnp.asarray([[1, 2], [3, 0]], jnp.int32)
  lengths = jnp.asarray([5, 0], jnp.int32)
  k, v = (jnp.asarray(rng.standard_normal((2, 3, 2, 16)), jnp.float32) for _ in range(2))
  k = k.at[0, 0, 1, 0].set(1e6)  # far past scale * 448: saturates, never NaN
  ks, vs = jnp.asarray([0.01, 0.05]), jnp.asarray([0.02, 0.5])
  kp, vp = pk.write_pages(*pools, tables, lengths, k, v, k_scale=ks, v_scale=vs)
  got = quant.dequantize(kp, ks)
  np.testing.assert_allclose(np.asarray(got[1, 5:8]), np.asarray(
      quant.dequantize(quant.quantize_with(k[0], ks, E4M3), ks)))
  assert float(got[1, 5, 1, 0]) == pytest.approx(448 * 0.05, rel=1e-6)
  assert np.all(np.isfinite(np.asarray(got)))
  big = np.abs(np.asarray(k[1])) > 0.1  # elementwise within e4m3's relative step
  assert np.all(np.abs(np.asarray(got[3, :3]) - np.asarray(k[1]))[big]
                <= 2 ** -3 * np.abs(np.asarray(k[1]))[big])
  assert rel_err(np.asarray(quant.dequantize(vp, vs)[1, 5:8]), np.asarray(v[0])) < 0.07
  # Unscaled, as before: a cast to the pools' dtype.
  plain = [jnp.zeros((4, 8, 2, 16), jnp.float32) for _ in range(2)]
  kp, _ = pk.write_pages(*plain, tables, lengths, k, v)
  np.testing.assert_array_equal(np.asarray(kp[3, :3]), np.asarray(k[1]))
  with pytest.raises(ValueError, match="k_scale and v_scale need float8 pools"):
    pk.write_pages(*plain, tables, lengths, k, v, k_scale=ks, v_scale=vs)
  with pytest.raises(ValueError, match="give k_scale and v_scale together"):
    pk.write_pages(*pools, tables, lengths, k, v, k_scale=ks)


def _reference(model, store, sequences, unique_scales=None):
  """Logits [n, L, vocab] of the plain decoder over n token sequences (shared + unique, padded
  at the end to the longest, L) in which every layer's shared K/V are the store's dequantized
  ones and, with unique_scales, the unique K/V are rounded as a float8 page pool stores them
  (`quant.quantize_with`, then dequantized)."""
  S = int(store.length)
  K, V = store.dequantized("k"), store.dequantized("v")

  def attention(i, q, k, v):
    if unique_scales is not None:
      k, v = (quant.dequantize(quant.quantize_with(x, s, E4M3), s, x.dtype)
              for x, s in zip((k, v), unique_scales[i]))
    k = k.at[:, :S].set(K[i][:S].astype(k.dtype))
    v = v.at[:, :S].set(V[i][:S].astype(v.dtype))
    B, L, Hq, D = q.shape
    qg = q.reshape(B, L, 2, Hq // 2, D)
    s = jnp.einsum("blhgd,bshd->bhgls", qg, k, precision="highest") * D**-0.5
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
    o = jnp.einsum("bhgls,bshd->blhgd", jax.nn.softmax(s, axis=-1), v, precision="highest")
    return o.reshape(B, L, Hq, D)

  L = max(len(x) for x in sequences)
  tokens = jnp.asarray([list(x) + [0] * (L - len(x)) for x in sequences])
  positions = jnp.broadcast_to(jnp.arange(L), tokens.shape)
  graphdef, state = nnx.split(model)  # one jitted forward: eagerly, each op compiles alone
  forward = jax.jit(lambda state: nnx.merge(graphdef, state).forward(
      tokens, positions, stateless(attention))[0])
  return np.asarray(forward(state))


def _check(model, store, shared, results, unique_scales=None, tol=2e-4):
  """Each result's logits vs the reference's at its sampled positions."""
  ref = _reference(model, store, [list(shared) + r.prompt + r.tokens[:-1] for r in results],
                   unique_scales)
  for r, row in zip(results, ref):
    start = len(shared) + len(r.prompt) - 1
    got = np.stack(r.logits)
    np.testing.assert_allclose(got, row[start:start + len(r.logits)], rtol=tol, atol=tol)


def test_dense_engine_over_fp8_store_equals_decoder_on_dequantized_kv(setup):
  """(Kernels that ignored the scales would read K/V 100x too large and be far off.)"""
  model, shared, _, fp8, rng = setup
  engine = MoskaEngine(model, fp8, MoskaConfig(backend="xla"), max_batch=2, num_pages=12,
                       page_size=8, prefill_chunk=8)
  prompts = [list(rng.integers(0, 256, n)) for n in (3, 7)]
  _check(model, fp8, shared, engine.generate(prompts, 2, return_logits=True))


@pytest.mark.parametrize("batch_aware", [0, 2])
def test_routed_attention_over_fp8_layer_equals_the_dequantized_layer(setup, batch_aware):
  """The sparse paths (`chunk_attention`; `tile_chunk_attention` when batch-aware) get the
  layer's scales: a float8 `SharedLayer` gives the (o, lse) of the same layer dequantized to the
  model's dtype (the same summaries, so the same routing)."""
  _, _, _, fp8, rng = setup
  mcfg = MoskaConfig(mode="sparse", top_k=2, chunk_size=C, backend="xla", batch_aware=batch_aware)
  q = jnp.asarray(rng.standard_normal((4, 2, 4, 16)), jnp.float32)
  partial = jax.jit(shared_partial, static_argnums=2)  # eagerly, each op compiles on its own
  for layer, k, v in zip(fp8.layers, fp8.dequantized("k"), fp8.dequantized("v")):
    deq = SharedLayer(k, v, layer.summaries, layer.length)
    o, lse = partial(q, layer, mcfg)
    o_ref, lse_ref = partial(q, deq, mcfg)
    assert rel_err(np.asarray(o), np.asarray(o_ref)) < 1e-5
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), rtol=1e-5, atol=1e-5)


def test_fp8_unique_pages_and_store_in_the_pallas_engine(setup):
  """Unique pages in float8 with scales from the store (2x headroom), the Triton kernels in
  interpret mode: the reference rounds the unique K/V the same way (measured on this one-layer
  model: 2e-6 off, while a reference without that rounding is 6e-3 off, past the tolerance). Its
  K/V come from its own forward, which may differ from the engine's in the last f32 bits, so one
  element could round one float8 step (2^-4 relative for e4m3) apart: the tolerance leaves room
  for that. One layer: the interpreted kernels compile once per layer, and the layers' plumbing
  is the XLA path's (the tests above)."""
  _, shared, _, _, rng = setup
  model = _model(layers=1)
  fp8 = build_shared_store(model, shared, chunk_size=C, prefill_chunk=128, backend="xla",
                           kv_dtype=E4M3)
  engine = MoskaEngine(model, fp8, MoskaConfig(backend="gpu", interpret=True), max_batch=1,
                       num_pages=12, page_size=8, prefill_chunk=8, unique_kv_dtype=E4M3)
  assert engine.cache.pools[0][0].dtype == jnp.float8_e4m3fn
  scales = unique_kv_scales(fp8, E4M3)
  for (ks, vs), (ks_store, vs_store) in zip(engine.cache.scales, zip(fp8.k_scale, fp8.v_scale)):
    np.testing.assert_allclose(np.asarray(ks), 2 * np.asarray(ks_store), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(vs), 2 * np.asarray(vs_store), rtol=1e-6)
  results = engine.generate([list(rng.integers(0, 256, 7))], 3, return_logits=True)
  _check(model, fp8, shared, results, unique_scales=scales, tol=1e-3)


def test_engine_refuses_inconsistent_stores_and_fp8_on_groups(setup):
  model, _, full, fp8, _ = setup
  mcfg = MoskaConfig(backend="xla")
  engine = MoskaEngine(model, fp8, mcfg, max_batch=1, num_pages=4, page_size=8)
  with pytest.raises(ValueError, match=r"the shared store's K/V are unscaled float32; this "
                     r"engine serves float8_e4m3fn stores"):
    engine.load_context("other", full)
  with pytest.raises(ValueError, match=r"K/V are float8_e5m2"):
    engine.set_store(full.quantized("float8_e5m2"))
  with pytest.raises(ValueError, match="K/V are float8_e4m3fn; this engine serves unscaled"):
    MoskaEngine(model, {"a": full, "b": fp8}, mcfg, max_batch=1, num_pages=4, page_size=8)
  with pytest.raises(ValueError, match="a float8_e4m3fn cache needs scales"):
    UniqueKVCache(model.cfg, max_batch=1, num_pages=2, page_size=8, max_pages_per_request=1,
                  kv_dtype=E4M3)
  if jax.device_count() < 2:
    return
  groups = make_device_groups(jax.devices()[:2], num_shared=1)
  with pytest.raises(ValueError, match="float8 shared stores .* not supported on disaggregated"):
    MoskaEngine(model, fp8, mcfg, max_batch=1, num_pages=4, page_size=8, groups=groups)
  with pytest.raises(ValueError, match="unique_kv_dtype='float8_e4m3fn' is not supported on "
                     "disaggregated"):
    MoskaEngine(model, full, mcfg, max_batch=1, num_pages=4, page_size=8, groups=groups,
                unique_kv_dtype=E4M3)
