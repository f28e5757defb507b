"""The decoder with MoSKA attention equals a plain decoder over [shared + unique].

The engines run one geometry (`ENGINE`) with `_setup`'s model and store, so engines of one
MoskaConfig share their compiled steps across tests.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moska_jax import routing
from moska_jax.attention import apply_rope, rope_frequencies
from moska_jax.config import (DEFAULT_SUMMARY, ModelConfig, MoskaConfig, RopeScaling,
                              llama3_1_8b, tiny)
from moska_jax.engine import MoskaEngine
from moska_jax.model import Decoder, plain_logits, stateless
from moska_jax.prefill import build_shared_store
from moska_jax.step import Part, Routes, SharedContext, moska_step


def _int32_parts(parts):
  """Parts of int32 NumPy arrays, as the engine hands them to the step."""
  return tuple(Part(*(np.asarray(a, np.int32) for a in p)) for p in parts)


@functools.cache
def _model_and_store(num_heads, num_kv_heads, S, chunk_size, seed, layers):
  cfg = ModelConfig(vocab=256, layers=layers, hidden=64, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, head_dim=16, mlp_hidden=96, rope_theta=10000.0)
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  shared = np.random.default_rng(seed).integers(0, 256, S)
  store = build_shared_store(model, shared, chunk_size=chunk_size, prefill_chunk=128,
                             backend="xla")
  return cfg, model, shared, store


def _setup(num_heads=4, num_kv_heads=1, S=300, chunk_size=64, seed=0, layers=2):
  """The model and store, built once per arguments (tests only read them), and a fresh rng past
  the shared tokens' draws."""
  cfg, model, shared, store = _model_and_store(num_heads, num_kv_heads, S, chunk_size, seed,
                                               layers)
  rng = np.random.default_rng(seed)
  rng.integers(0, 256, S)
  return cfg, model, rng, shared, store


# Two slots, a prefill chunk that splits the longer prompts, pages that cut every request.
ENGINE = dict(max_batch=2, num_pages=12, page_size=8, prefill_chunk=8)


def _engine(model, store, mcfg):
  return MoskaEngine(model, store, mcfg, **ENGINE)


@functools.cache
def _summarized(summary):
  """_setup()'s store routed by `summary` summaries."""
  return _setup()[4].with_summaries(64, summary)


@functools.cache
def _other_store():
  """A second context for _setup()'s model: 200 other tokens."""
  _, model, rng, _, _ = _setup()
  return build_shared_store(model, rng.integers(0, 256, 200), chunk_size=64, prefill_chunk=128,
                            backend="xla")


def _dense(prompts, new_tokens):
  """The dense engine's results (tokens, logits) on _setup()'s store, computed once per
  arguments. Dense attention reads every shared key and no summary, and `with_summaries` keeps
  the store's K/V: these are the dense results on any `_summarized` store too, from the steps
  the dense tests compiled (one geometry, one store)."""
  return _dense_cached(tuple(map(tuple, prompts)), new_tokens)


@functools.cache
def _dense_cached(prompts, new_tokens):
  _, model, _, _, store = _setup()
  return _engine(model, store, MoskaConfig(backend="xla")).generate(
      [list(p) for p in prompts], new_tokens, return_logits=True)


# Half the chunks, chunk 0 always: the routed tests' MoskaConfig (one set of compiled steps).
ROUTED = MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=64, always_include=(0,),
                     summary="mean", backend="xla")


def _check_against_reference(model, shared, results, tol=2e-5):
  refs = plain_logits(model, [list(shared) + r.prompt + r.tokens[:-1] for r in results])
  for r, ref in zip(results, refs):
    start = len(shared) + len(r.prompt) - 1
    for j, lg in enumerate(r.logits):
      np.testing.assert_allclose(lg, ref[start + j], rtol=tol, atol=tol)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 1), (4, 4), (8, 1)])
def test_dense_moska_logits_equal_plain_decoder(num_heads, num_kv_heads):
  _, model, rng, shared, store = _setup(num_heads, num_kv_heads)
  engine = _engine(model, store, MoskaConfig(backend="xla"))
  prompts = [list(rng.integers(0, 256, n)) for n in (1, 8, 13)]  # ragged unique lengths
  _check_against_reference(model, shared, engine.generate(prompts, 5, return_logits=True))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_kernels_in_the_engine_at_the_page_budget_edge(backend):
  """The engine's Pallas path (interpret mode) equals the plain decoder, with a prompt that ends
  inside a prefill chunk of a request that fills its whole page budget (the padding writes must
  not push any length past the block table). One layer: the interpreted kernels compile once
  per layer, and the layers' plumbing is the XLA path's (the tests above)."""
  _, model, rng, shared, store = _setup(S=200, layers=1)
  mcfg = MoskaConfig(backend=backend, interpret=True)
  engine = MoskaEngine(model, store, mcfg, max_batch=1, num_pages=4, page_size=16,
                       prefill_chunk=32)
  # 46 + 2 tokens: the budget's 3 pages; one decode step (interpret mode runs slowly).
  results = engine.generate([list(rng.integers(0, 256, 46))], 2, return_logits=True)
  assert engine.cache.block_tables.shape[1] * 16 >= 46 + 2 + 31
  _check_against_reference(model, shared, results, tol=1e-4)


# (summary, reroute_every, top_k): every summary kind and both step forms (routes reused or not,
# the same for any summary: pairwise); top_k all 6 chunks of the store's rows, the padding one
# too, or the 5 that hold tokens (the router must never pick the padding chunk).
@pytest.mark.parametrize("summary,reroute_every,top_k",
                         [("mean", 1, 6), ("envelope", 1, 6), (DEFAULT_SUMMARY, 4, 5)])
def test_sparse_with_every_chunk_equals_dense(summary, reroute_every, top_k):
  _, model, rng, _, _ = _setup()
  store = _summarized(summary)
  assert store.summaries[0].num_chunks == 6
  # One prefill step for both (two compiled step shapes, not three): a router that keeps every
  # chunk chooses alike in any step.
  prompts = [list(rng.integers(0, 256, n)) for n in (3, 8)]
  mcfg = MoskaConfig(mode="sparse", top_k=top_k, chunk_size=64, summary=summary,
                     reroute_every=reroute_every, backend="xla")
  outs = [_dense(prompts, 6), _engine(model, store, mcfg).generate(prompts, 6,
                                                                   return_logits=True)]
  for dense, sparse in zip(*outs):
    assert dense.tokens == sparse.tokens
    np.testing.assert_allclose(np.stack(dense.logits), np.stack(sparse.logits), atol=2e-5)


def _routed_reference(model, store, shared, prompt, generated, mcfg, top_k):
  """Logits [L, vocab] of the plain decoder over shared + prompt + generated in which every
  unique token sees, besides its own causal context, only the shared chunks that the router
  (`routing.route` on this forward's own queries, the store's summaries, the scorer mcfg names)
  picks for its engine step: the prompt as one prefill step, then each generated token alone,
  the j-th of them routing when j % mcfg.reroute_every == 0 and reusing the latest routing's
  chunks otherwise. Dense masked attention in float32, independent of the engine's paging,
  attention kernels and merge. The summaries and the scorer are the engine's own: quantized
  codes rebuilt from keys that differ in rounding, or another scorer's rounding, can move a
  near-tie between chunks (seen on a GPU), which is not what this reference checks. One jitted
  forward: run eagerly, each op compiled anew for every sequence length."""
  tokens = jnp.asarray([list(shared) + list(prompt) + list(generated)], jnp.int32)
  return np.asarray(_masked_forward(*nnx.split(model), store.summaries, tokens, len(shared),
                                    len(prompt), mcfg, top_k))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _masked_forward(graphdef, state, summaries, tokens, S, P, mcfg, top_k):
  L = tokens.shape[1]
  steps = [(S, S + P)] + [(r, r + 1) for r in range(S + P, L)]  # the rows of each engine step
  chunk_of_key = jnp.arange(S) // mcfg.chunk_size

  def attention(i, q, k, v):
    q, k, v = q[0], k[0], v[0]  # one sequence: [L, H, D]
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    shared_keys = [jnp.broadcast_to(jnp.tril(jnp.ones((S, S), bool))[:, None], (S, Hkv, S))]
    for j, (a, b) in enumerate(steps):
      if j <= 1 or (j - 1) % mcfg.reroute_every == 0:  # the prompt, then decode step j - 1
        ids = routing.route(q[a:b][None], summaries[i], top_k,
                            always_include=mcfg.always_include, int8=mcfg.int8_scorer,
                            backend=mcfg.backend, interpret=mcfg.interpret)[0]
        chosen = jnp.any(ids[:, :, None] == chunk_of_key, axis=1)  # [Hkv, S]; -1 matches none
      shared_keys.append(jnp.broadcast_to(chosen, (b - a, Hkv, S)))
    unique_keys = np.tril(np.ones((L, L), bool))[:, None, S:]
    mask = jnp.concatenate([jnp.concatenate(shared_keys),
                            jnp.broadcast_to(unique_keys, (L, Hkv, L - S))], axis=2)
    s = jnp.einsum("thgd,shd->hgts", q.reshape(L, Hkv, Hq // Hkv, D), k,
                   precision=jax.lax.Precision.HIGHEST) * D**-0.5
    p = jax.nn.softmax(jnp.where(mask.transpose(1, 0, 2)[:, None], s, -jnp.inf), axis=-1)
    o = jnp.einsum("hgts,shd->thgd", p, v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(1, L, Hq, D)

  return nnx.merge(graphdef, state).forward(tokens, jnp.arange(L)[None],
                                            stateless(attention))[0][0]


@pytest.mark.parametrize("summary", ["mean", "int4"])
def test_sparse_engine_equals_decoder_masked_to_the_routed_chunks(summary):
  _, model, rng, shared, _ = _setup()
  store = _summarized(summary)
  prompt = list(rng.integers(0, 256, 6))
  dense = _dense([prompt], 3)[0]
  mcfg = dataclasses.replace(ROUTED, summary=summary)
  sparse = _engine(model, store, mcfg).generate([prompt], 3, return_logits=True)[0]
  assert np.all(np.isfinite(np.stack(sparse.logits)))
  assert not np.allclose(np.stack(dense.logits), np.stack(sparse.logits))  # it did drop chunks
  ref = _routed_reference(model, store, shared, prompt, sparse.tokens[:-1], mcfg,
                          mcfg.chunks_kept(-(-len(shared) // 64)))
  start = len(shared) + len(prompt) - 1
  np.testing.assert_allclose(np.stack(sparse.logits), ref[start:start + 3], rtol=2e-5, atol=2e-5)


def test_moska_step_is_pure_and_equals_plain_decoder():
  """The jitted step: a ragged prefill step, then a mixed step (the two requests decode while a
  third reads its prompt beside them, packed into one forward), from fresh pools; the logits are
  the plain decoder's, the pools come back written and the pools passed in are untouched."""
  cfg, model, rng, shared, store = _setup()
  graphdef, state = nnx.split(model)
  mcfg = MoskaConfig(backend="xla")
  contexts = (SharedContext.of(store, mcfg),)
  shape = (10, 8, cfg.num_kv_heads, cfg.head_dim)
  pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))
  tables = np.asarray([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.int32)
  prompts = [list(rng.integers(0, 256, n)) for n in (5, 3, 4)]
  tokens = np.zeros((2, 5), np.int32)
  for b, p in enumerate(prompts[:2]):
    tokens[b, :len(p)] = p
  zeros = np.zeros(2, np.int32)

  @jax.jit
  def step(state, pools, parts):
    return moska_step(nnx.merge(graphdef, state), contexts, pools, parts, mcfg)

  (logits,), new_pools, ids = step(state, pools, _int32_parts(
      [Part(tokens, tables[:2], zeros, np.asarray([5, 3]), zeros)]))
  assert ids is None
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(pools))
  assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(new_pools))
  nxt = np.asarray([[7], [9]], np.int32)
  third = np.asarray([prompts[2] + [0]], np.int32)  # a lane of 5 with 4 real tokens
  decode = Part(nxt, tables[:2], np.asarray([5, 3]), np.ones(2, np.int32), zeros)
  lane = Part(third, tables[2:], np.zeros(1, np.int32), np.asarray([4]), np.zeros(1, np.int32))
  (logits2, logits3), _, _ = step(state, new_pools, _int32_parts([decode, lane]))
  assert logits2.shape == (2, 1, cfg.vocab) and logits3.shape == (1, 5, cfg.vocab)
  S = len(shared)
  refs = plain_logits(model, [list(shared) + p + [int(nxt[b, 0])]
                               for b, p in enumerate(prompts[:2])] + [list(shared) + prompts[2]])
  for b, p in enumerate(prompts[:2]):
    np.testing.assert_allclose(logits[b, :len(p)], refs[b, S:S + len(p)], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(logits2[b, 0], refs[b, S + len(p)], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(logits3[0, :4], refs[2, S:S + 4], rtol=2e-5, atol=2e-5)


def test_a_padded_part_whose_rows_run_past_its_table_equals_plain_decoder():
  """A prompt of 6 tokens in the 2 pages of 3 tokens it needs, fed 4 at a time under jit: the
  second part has 2 real tokens and 2 padding rows past the table (lengths + T = 8 > 6). The
  real rows keep their causal window (clamped to the table, it lost their newest keys)."""
  cfg, model, rng, shared, store = _setup(S=70)
  graphdef, state = nnx.split(model)
  mcfg = MoskaConfig(backend="xla")
  contexts = (SharedContext.of(store, mcfg),)
  shape = (4, 3, cfg.num_kv_heads, cfg.head_dim)  # page 0 is scratch
  pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))
  prompt = list(rng.integers(0, 256, 6))
  step = jax.jit(lambda state, pools, part: moska_step(nnx.merge(graphdef, state), contexts,
                                                       pools, [part], mcfg))
  got = []
  for start in (0, 4):
    chunk = prompt[start:start + 4]
    tokens = np.asarray([chunk + [0] * (4 - len(chunk))])
    (logits,), pools, _ = step(state, pools, _int32_parts(
        [Part(tokens, [[1, 2]], [start], [len(chunk)], [0])])[0])
    got.append(np.asarray(logits[0, :len(chunk)]))
  ref = plain_logits(model, [list(shared) + prompt])[0, len(shared):len(shared) + 6]
  np.testing.assert_allclose(np.concatenate(got), ref, rtol=2e-5, atol=2e-5)


def test_moska_step_refuses_contexts_it_cannot_read():
  cfg, model, rng, shared, store = _setup(S=70)
  shape = (4, 8, cfg.num_kv_heads, cfg.head_dim)
  pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))
  part = _int32_parts([Part([[5]], [[1]], [0], [1], [1])])[0]
  context = SharedContext.of(store, MoskaConfig(backend="xla"))
  with pytest.raises(ValueError, match=r"Part.context must index the 1 contexts \(\[0, 1\)\)"):
    moska_step(model, (context,), pools, [part], MoskaConfig(backend="xla"))
  other = Decoder(dataclasses.replace(cfg, rope_theta=5e5), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="contexts\\[0\\] holds a store built by another model"):
    moska_step(other, (context,), pools, [part._replace(context=np.zeros(1, np.int32))],
               MoskaConfig(backend="xla"))
  with pytest.raises(ValueError, match="mcfg.chunk_size=32 must match the store's chunk_size=64"):
    SharedContext.of(store, MoskaConfig(mode="sparse", chunk_size=32, sparsity=0.5,
                                        backend="xla"))


def test_reused_routes_equal_the_decoder_masked_to_the_reused_chunks():
  """reroute_every=3: decode steps 0, 3, 6 route and the others attend the chunks of the latest
  routing (the masked reference reuses them the same way); the ids state stays fixed between
  re-routes; the steps that route are bit-identical to reroute_every=1 (`ROUTED`)."""
  cfg, model, rng, shared, _ = _setup()
  store = _summarized("mean")
  prompt = list(rng.integers(0, 256, 6))
  every = _engine(model, store, ROUTED)
  base = every.generate([prompt], 7, return_logits=True)[0]
  assert every.route_ids() is None  # r = 1 keeps no selections: every step routes
  mcfg = dataclasses.replace(ROUTED, reroute_every=3)
  engine = _engine(model, store, mcfg)
  engine.warmup()  # both forms of each step shape: routing, and reusing (no router, no branch)
  compiled = engine.compilations()
  request = engine.submit(prompt, 7, return_logits=True)
  seen = []
  while not request.done:
    engine.step()
    if request.tokens:
      seen.append((request.decode_steps, engine.route_ids()[1][0].copy()))  # layer 1, slot 0
  for (steps, ids), (_, before) in zip(seen[1:], seen):
    if (steps - 1) % 3:  # a step that reused the selection
      np.testing.assert_array_equal(ids, before)
  assert seen[-1][1].shape == (cfg.num_kv_heads, mcfg.chunks_kept(5))
  got = np.stack(request.logits)
  ref = _routed_reference(model, store, shared, prompt, request.tokens[:-1], mcfg,
                          mcfg.chunks_kept(5))
  start = len(shared) + len(prompt) - 1
  np.testing.assert_allclose(got, ref[start:start + 7], rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(got[:2], np.stack(base.logits[:2]))  # prefill + first decode
  assert not np.allclose(got, np.stack(base.logits))  # reuse did change later steps
  # A new store makes every row re-route: two prompts read in one mixed step of two lanes that
  # routes (the warmup's first pass per lane count), then decode steps that route and reuse.
  engine.set_store(store)
  engine.generate([prompt, prompt[:3]], 4)
  assert engine.compilations() == compiled


def test_batch_aware_tiles_of_one_request_equal_per_pair_routing():
  """batch_aware=1: every tile is one request and attends to the union of its own chunks, so
  the engine's step (two requests of two contexts, routes reused every other step) gives the
  logits of per-(request, chunk) routing; the other context's rows select nothing in a tile."""
  _, model, rng, _, store = _setup()
  other = _other_store()
  prompts = [list(rng.integers(0, 256, n)) for n in (3, 9)]
  outs = []
  for batch_aware in (0, 1):
    mcfg = MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=64, reroute_every=2,
                       batch_aware=batch_aware, backend="xla")
    engine = _engine(model, {"a": store, "b": other}, mcfg)
    outs.append(engine.generate(prompts, 5, context=["a", "b"], return_logits=True))
  for per_pair, tiled in zip(*outs):
    assert per_pair.tokens == tiled.tokens
    np.testing.assert_allclose(np.stack(tiled.logits), np.stack(per_pair.logits), rtol=2e-5,
                               atol=2e-5)


def test_the_step_routes_with_the_kernel_settings(monkeypatch):
  """The step's router runs as MoskaConfig says: the int8 scorer, the backend, interpret."""
  cfg, model, _, _, store = _setup(S=200)
  store = store.with_summaries(64, "int4")
  mcfg = MoskaConfig(mode="sparse", top_k=2, chunk_size=64, summary="int4", int8_scorer=True,
                     backend="xla")
  seen, route = [], routing.route
  monkeypatch.setattr(routing, "route", lambda *a, **kw: (seen.append(kw), route(*a, **kw))[1])
  shape = (4, 8, cfg.num_kv_heads, cfg.head_dim)
  pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))
  part = Part(*(np.asarray(a, np.int32) for a in ([[5, 6]], [[1, 2]], [0], [2], [0])))
  graphdef, state = nnx.split(model)
  contexts = (SharedContext.of(store, mcfg),)
  jax.jit(lambda state, pools, parts: moska_step(nnx.merge(graphdef, state), contexts, pools,
                                                 parts, mcfg))(state, pools, _int32_parts([part]))
  assert len(seen) == cfg.layers
  assert all(kw["int8"] is True and kw["backend"] == "xla" and kw["interpret"] is False
             for kw in seen)


def test_reused_routes_leave_no_branch_in_the_step():
  """The host decides whether a step routes (`Routes.due`): neither form holds a conditional
  (which would make a GPU host wait for the device in every layer), and a step that is not due
  returns the ids it was given."""
  cfg, model, rng, _, store = _setup()
  mcfg = MoskaConfig(mode="sparse", top_k=2, chunk_size=64, backend="xla", reroute_every=4)
  graphdef, state = nnx.split(model)
  contexts = (SharedContext.of(store, mcfg),)
  shape = (4, 8, cfg.num_kv_heads, cfg.head_dim)
  pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))
  parts = _int32_parts([Part(rng.integers(0, 256, (2, 1)), [[1, 2], [3, 4]], [3, 5], [1, 1],
                             [0, 0])])
  ids = tuple(jnp.asarray(rng.integers(0, 4, (2, cfg.num_kv_heads, 2)), jnp.int32)
              for _ in range(cfg.layers))
  for due in (False, True):
    fn = jax.jit(lambda state, pools, parts, ids, due=due: moska_step(
        nnx.merge(graphdef, state), contexts, pools, parts, mcfg,
        routes=Routes(ids, jnp.asarray([due, False]), due)))
    assert "stablehlo.case" not in fn.lower(state, pools, parts, ids).as_text()
    _, _, new_ids = fn(state, pools, parts, ids)
    for old, new in zip(ids, new_ids):
      np.testing.assert_array_equal(new[1], old[1])  # the row not due keeps its ids
      assert due or np.array_equal(new, old)


def test_sparsity_counts_the_chunks_that_hold_tokens():
  """S=1000, C=100: the store holds 10 chunks and no padding past one chunk; sparsity 0.75
  attends ceil(0.25 * 10) = 3 chunks per (request, kv head), as the masked reference with K = 3,
  and differs from dense (the plain decoder)."""
  cfg = ModelConfig(vocab=256, layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    mlp_hidden=96, rope_theta=10000.0)
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(3)
  shared = rng.integers(0, 256, 1000)
  store = build_shared_store(model, shared, chunk_size=100, prefill_chunk=256, backend="xla")
  assert 1000 <= store.k[0].shape[0] < 1000 + 100 and store.summaries[0].num_chunks == 10
  mcfg = MoskaConfig(mode="sparse", sparsity=0.75, chunk_size=100, backend="xla")
  engine = _engine(model, store, mcfg)
  assert engine.context_top_k("default") == 3
  prompt = list(rng.integers(0, 256, 5))
  sparse = engine.generate([prompt], 3, return_logits=True)[0]
  start = len(shared) + len(prompt) - 1
  dense = plain_logits(model, [list(shared) + prompt + sparse.tokens[:-1]])[0]
  assert not np.allclose(np.stack(sparse.logits), dense[start:start + 3])
  ref = _routed_reference(model, store, shared, prompt, sparse.tokens[:-1], mcfg, 3)
  np.testing.assert_allclose(np.stack(sparse.logits), ref[start:start + 3], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("S,C,rows", [(150, 64, 256), (1000, 100, 1000), (300, 256, 512),
                                      (129, 128, 256), (40, 32, 128)])
def test_store_padding_is_less_than_a_chunk_or_a_tile(S, C, rows):
  model = Decoder(tiny(layers=1), rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 256, S)
  store = build_shared_store(model, tokens, chunk_size=C, prefill_chunk=96, backend="xla")
  assert store.k[0].shape[0] == rows and rows - S < max(C, 128)
  assert int(store.summaries[0].num_valid_chunks) == -(-S // C)


def test_forward_threads_one_state_per_layer():
  cfg, model, *_ = _setup()
  tokens = jnp.arange(6)[None]
  seen = lambda i, q, k, v, state: (jnp.zeros_like(q), state + (i,))
  logits, state = model.forward(tokens, jnp.arange(6)[None], seen, [(), ()])
  assert state == ((0,), (1,)) and logits.shape == (1, 6, cfg.vocab)
  with pytest.raises(ValueError, match=r"state must hold one entry per layer \(2\), got 3"):
    model.forward(tokens, jnp.arange(6)[None], seen, [(), (), ()])


def test_rope_scaling_and_rotation():
  cfg = llama3_1_8b(layers=1)
  inv = np.asarray(rope_frequencies(cfg))
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  assert inv[0] == pytest.approx(base[0])  # high frequencies untouched
  assert inv[-1] == pytest.approx(base[-1] / 8.0)  # low frequencies divided by the factor
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 16)), jnp.float32)
  pos = jnp.asarray([[0, 5, 9]])
  y = apply_rope(x, pos, rope_frequencies(tiny()))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[:, 0], x[:, 0])  # position 0 is the identity


def test_config_validation():
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    ModelConfig(vocab=10, layers=1, hidden=8, num_heads=6, num_kv_heads=4, head_dim=8,
                mlp_hidden=8)
  with pytest.raises(ValueError, match="head_dim must be even"):
    ModelConfig(vocab=10, layers=1, hidden=8, num_heads=2, num_kv_heads=1, head_dim=7,
                mlp_hidden=8)
  with pytest.raises(ValueError, match="needs top_k or sparsity"):
    MoskaConfig(mode="sparse")
  with pytest.raises(ValueError, match="top_k or sparsity, not both"):
    MoskaConfig(mode="sparse", top_k=2, sparsity=0.5)
  with pytest.raises(ValueError, match="backend must be one of"):
    MoskaConfig(backend="cuda")
  assert MoskaConfig(mode="sparse", sparsity=0.75).chunks_kept(64) == 16
  assert MoskaConfig(mode="sparse", sparsity=0.9, always_include=(0, 1)).chunks_kept(10) == 2
  assert RopeScaling().factor == 8.0
  base = dict(vocab=10, layers=1, hidden=8, num_heads=2, num_kv_heads=1, head_dim=8,
              mlp_hidden=8)
  for field, value, message in (("hidden", 64.0, "hidden must be an int >= 1, got 64.0"),
                                ("vocab", True, "vocab must be an int >= 1, got True"),
                                ("layers", 0, "layers must be an int >= 1, got 0"),
                                ("rope_theta", 0.0, "rope_theta must be a finite number > 0"),
                                ("norm_eps", -1.0, "norm_eps must be a finite number >= 0"),
                                ("rope_scaling", RopeScaling, "must be a RopeScaling or None")):
    with pytest.raises(ValueError, match=message):
      ModelConfig(**{**base, field: value})
  for bad in (dict(factor=0.0), dict(low_freq_factor=4.0, high_freq_factor=1.0),
              dict(factor=float("nan")), dict(original_max_position=0)):
    with pytest.raises(ValueError, match="RopeScaling"):
      RopeScaling(**bad)


def test_contexts_without_a_branch_equal_the_branching_step(monkeypatch):
  """Where a lax.cond would make a GPU host wait (`step.cond_waits_for_device`), the dense step
  runs a context no row reads with no valid key instead of branching: the same logits as the
  branching form, with a context read by every row, by none, by some, and unread but named by
  a padding row (fed 0: an idle slot or lane, which does not make its context read); the
  context no row reads gets kv_length 0, a read one its whole length; no conditional is left in
  the program."""
  from moska_jax import step as step_module

  cfg, model, rng, _, store = _setup()
  other = _other_store()
  graphdef, state = nnx.split(model)
  mcfg = MoskaConfig(backend="xla")
  contexts = (SharedContext.of(store, mcfg), SharedContext.of(other, mcfg))
  shape = (8, 8, cfg.num_kv_heads, cfg.head_dim)
  pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))
  tables = np.asarray([[1, 2], [3, 4], [5, 6]], np.int32)
  tokens = rng.integers(0, 256, (3, 4)).astype(np.int32)
  zeros = np.zeros(3, np.int32)
  S, S_other = int(store.length), int(other.length)
  cases = [  # (which, fed, the kv_length each context is read with)
      ([0, 0, 0], [4, 2, 3], [S, 0]), ([1, 0, 1], [4, 2, 3], [S, S_other]),
      ([1, 1, 1], [4, 2, 3], [0, S_other]), ([0, 0, 1], [4, 2, 0], [S, 0])]
  parts = [_int32_parts([Part(tokens, tables, zeros, np.asarray(fed), np.asarray(which))])
           for which, fed, _ in cases]
  lengths = []  # the kv_length of each shared_partial call, traced

  def form(branchless):  # a function of its own: jit would reuse another's trace
    def step(state, pools, parts):  # the logits, and the lengths the contexts were read with
      lengths.clear()
      (logits,), _, _ = moska_step(nnx.merge(graphdef, state), contexts, pools, parts, mcfg)
      return logits, jnp.stack(lengths) if branchless else None
    # Traced at its first call, while `cond_waits_for_device` says branchless.
    monkeypatch.setattr(step_module, "cond_waits_for_device", lambda mcfg: branchless)
    return jax.jit(step)

  branching = form(False)
  want = [branching(state, pools, p)[0] for p in parts]
  assert "stablehlo.case" in branching.lower(state, pools, parts[0]).as_text()
  partial = step_module.shared_partial
  monkeypatch.setattr(step_module, "shared_partial", lambda q, layer, mcfg, **kw: (
      lengths.append(layer.length), partial(q, layer, mcfg, **kw))[1])
  branchless = form(True)
  for (_, _, read), p, w in zip(cases, parts, want):
    got, kv_lengths = branchless(state, pools, p)
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
    assert kv_lengths.tolist() == read * cfg.layers
  assert "stablehlo.case" not in branchless.lower(state, pools, parts[0]).as_text()


def test_the_decoder_refuses_token_ids_outside_the_vocabulary():
  model = Decoder(tiny(layers=1), rngs=nnx.Rngs(0))
  for bad in (-1, tiny().vocab):
    with pytest.raises(ValueError, match=r"Decoder: token id .* outside the vocabulary \[0, "):
      model(jnp.asarray([[3, bad]], jnp.int32))


def test_plain_logits_pads_without_changing_logits_and_refuses_bad_sequences():
  """plain_logits over sequences of several lengths equals the decoder on each alone; no
  sequence, an empty one or an id outside [0, vocab) is a ValueError naming the problem."""
  model = Decoder(tiny(layers=1), rngs=nnx.Rngs(0))
  seqs = [list(np.random.default_rng(1).integers(0, 256, n)) for n in (5, 70)]
  refs = plain_logits(model, seqs)
  assert refs.shape == (2, 128, model.cfg.vocab)
  # The decoder on each sequence alone (unpadded), jitted: run eagerly, each of its ops compiled
  # anew for every length.
  graphdef, state = nnx.split(model)
  decoder = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  for seq, ref in zip(seqs, refs):
    alone = np.asarray(decoder(state, jnp.asarray(seq, jnp.int32)[None])[0])
    np.testing.assert_allclose(ref[:len(seq)], alone, rtol=1e-5, atol=1e-5)
  for bad, match in (([], "at least one sequence"), ([[1, 2], []], "at least one sequence"),
                     ([[1, 256]], "token id 256 at position 1")):
    with pytest.raises(ValueError, match=match):
      plain_logits(model, bad)
