"""Bad inputs to every public kernel op: each is refused with a ValueError naming the argument
(before any kernel is traced), on every implementation; what cannot be seen under jit is not
refused there. And what must never leak: NaN / inf in keys a row does not attend to (past
kv_length, unselected chunks, pages past a length) changes no output on any implementation; a NaN
or +inf partial lse poisons a merge instead of vanishing from it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import sketch
from tests import kernel_cases as kc

B, T, G, HKV, D, S, C = 2, 1, 2, 2, 64, 512, 128  # N = 4 chunks
N = S // C
HQ = G * HKV
RNG = np.random.default_rng(0)
Q = kc.random_normal(RNG, (B, T, HQ, D), jnp.float32)
K = kc.random_normal(RNG, (S, HKV, D), jnp.float32)
V = kc.random_normal(RNG, (S, HKV, D), jnp.float32)
IDS = jnp.asarray([[[0, 2], [1, 3]], [[3, -1], [2, 0]]], jnp.int32)  # [B, Hkv, K=2]
TILES = jnp.asarray([[[0, 1, 3], [2, -1, -1]]], jnp.int32)  # one tile of both requests
PAGED = kc.paged_inputs(1, T, G, HKV, D, 16, (20, 33), jnp.float32)  # q, k, v, tables, lengths
P = PAGED[1].shape[0]
CODES = sketch.pack(jnp.asarray(RNG.integers(-7, 8, (S, HKV, D))))
SCALE = jnp.asarray(RNG.uniform(0.1, 1.0, (S, HKV)), jnp.float32)

SHARED_OPS = {
    "shared_attention": lambda q, k, v, **kw: pk.shared_attention(q, k, v, **kw),
    "chunk_attention": lambda q, k, v, **kw: pk.chunk_attention(q, k, v, IDS, chunk_size=C, **kw),
    "tile_chunk_attention": lambda q, k, v, **kw: pk.tile_chunk_attention(q, k, v, TILES,
                                                                          chunk_size=C, **kw),
}

# (id, q, k, v, kwargs, message fragment): bad arguments every shared-KV op refuses the same way.
_SHARED_BAD = [
    ("q-list", Q.tolist(), K, V, {}, "q must be an array"),
    ("k-list", Q, K.tolist(), V, {}, "k must be an array"),
    ("v-none", Q, K, None, {}, "v must be an array"),
    ("q-rank3", Q[0], K, V, {}, "q must have shape [B, T, Hq, D]"),
    ("q-rank5", Q[None], K, V, {}, "q must have shape [B, T, Hq, D]"),
    ("k-rank2", Q, K[:, 0], V[:, 0], {}, "k must have shape [S, Hkv, D]"),
    ("k-rank4", Q, K[None], V[None], {}, "k must have shape [S, Hkv, D]"),
    ("k-other-D", Q, K[..., :32], V[..., :32], {}, "(D of q)"),
    ("v-shorter", Q, K, V[:10], {}, "v must have the shape of k"),
    ("v-other-heads", Q, K, V[:, :1], {}, "v must have the shape of k"),
    ("gqa-3-heads", Q, jnp.ones((S, 3, D)), jnp.ones((S, 3, D)), {}, "multiple of Hkv=3"),
    ("q-int", Q.astype(jnp.int32), K, V, {}, "q must be float32, bfloat16 or float16"),
    ("q-f64", np.asarray(Q, np.float64), K, V, {}, "q must be float32, bfloat16 or float16"),
    ("k-int8", Q, K.astype(jnp.int8), V.astype(jnp.int8), {}, "k must be float32"),
    ("kv-mixed", Q, K, V.astype(jnp.bfloat16), {}, "k and v must share a dtype"),
    ("q-bf16-kv-f32", Q.astype(jnp.bfloat16), K, V, {}, "q and k, v must share a dtype"),
    ("B=0", Q[:0], K, V, {}, "must have no empty axis"),
    ("T=0", Q[:, :0], K, V, {}, "must have no empty axis"),
    ("S=0", Q, K[:0], V[:0], {}, "must have no empty axis"),
    ("D=0", Q[..., :0], K[..., :0], V[..., :0], {}, "must have no empty axis"),
    ("sm_scale-nan", Q, K, V, dict(sm_scale=float("nan")), "sm_scale must be None or a finite"),
    ("sm_scale-inf", Q, K, V, dict(sm_scale=float("inf")), "sm_scale must be None or a finite"),
    ("sm_scale-str", Q, K, V, dict(sm_scale="0.1"), "sm_scale must be None or a finite"),
    ("sm_scale-bool", Q, K, V, dict(sm_scale=True), "sm_scale must be None or a finite"),
    ("sm_scale-array", Q, K, V, dict(sm_scale=jnp.ones(2)), "sm_scale must be None or a finite"),
    ("kv_length-neg", Q, K, V, dict(kv_length=-1), "kv_length must be in [0, S=512], got -1"),
    ("kv_length-past-S", Q, K, V, dict(kv_length=S + 1),
     "kv_length must be in [0, S=512], got 513"),
    ("kv_length-np-past-S", Q, K, V, dict(kv_length=np.int64(10**6)), "got 1000000"),
    ("kv_length-past-int32", Q, K, V, dict(kv_length=2**31), "got 2147483648"),
    ("kv_length-past-int64", Q, K, V, dict(kv_length=10**20), "got 100000000000000000000"),
    ("kv_length-jnp-neg", Q, K, V, dict(kv_length=jnp.int32(-5)), "got -5"),
    ("kv_length-float", Q, K, V, dict(kv_length=1.5), "kv_length must be an integer scalar"),
    ("kv_length-bool", Q, K, V, dict(kv_length=True), "kv_length must be an integer scalar"),
    ("kv_length-vector", Q, K, V, dict(kv_length=jnp.ones(2, jnp.int32)), "integer scalar"),
    ("implementation-unknown", Q, K, V, dict(implementation="cudnn"),
     "implementation must be 'auto' or one of"),
    ("backend-unknown", Q, K, V, dict(backend="cuda"), "backend must be one of"),
    ("implementation-and-backend", Q, K, V, dict(implementation="xla", backend="gpu"),
     "not both"),
    ("xla-interpret", Q, K, V, dict(backend="xla", interpret=True),
     "the 'xla' implementation has none"),
    ("config-for-xla", Q, K, V, dict(implementation="xla", config=pk.TritonSharedConfig(
        block_m=16, block_k=64)), "it takes no config"),
    ("config-wrong-type", Q, K, V, dict(implementation="triton", interpret=True,
                                        config=pk.TritonUniqueConfig(pages_per_block=1)),
     "must be Triton"),
]


@pytest.mark.parametrize("op", sorted(SHARED_OPS))
@pytest.mark.parametrize("q,k,v,kwargs,match", [pytest.param(*c[1:], id=c[0])
                                                for c in _SHARED_BAD])
def test_shared_kv_ops_refuse(op, q, k, v, kwargs, match):
  with pytest.raises(ValueError) as e:
    SHARED_OPS[op](q, k, v, **kwargs)
  assert match in str(e.value) and str(e.value).startswith(f"{op}: "), str(e.value)


# Duplicate chunk ids: refused on every implementation, naming the row and the id.
_DUPLICATES = [
    ("first-row", [[[0, 0], [1, 3]], [[3, -1], [2, 0]]], "chunk_ids[0, 0]", "chunk 0 twice"),
    ("last-head", [[[0, 2], [1, 3]], [[3, -1], [2, 2]]], "chunk_ids[1, 1]", "chunk 2 twice"),
    ("apart", [[[0, 2, 1, 2], [1, 3, -1, -1]], [[3, -1, 0, 1], [2, 0, 1, 3]]], "chunk_ids[0, 0]",
     "chunk 2 twice"),
    ("int64", np.asarray([[[1, 0], [1, 3]], [[3, 3], [2, 0]]], np.int64), "chunk_ids[1, 0]",
     "chunk 3 twice"),
]


@pytest.mark.parametrize("implementation,interpret", kc.implementations("chunk_attention",
                                                                        compiled=False))
@pytest.mark.parametrize("ids,where,what", [pytest.param(*c[1:], id=c[0]) for c in _DUPLICATES])
def test_chunk_attention_refuses_duplicate_ids(implementation, interpret, ids, where, what):
  with pytest.raises(ValueError, match=r"chunk_attention: ") as e:
    pk.chunk_attention(Q, K, V, jnp.asarray(ids), chunk_size=C, implementation=implementation,
                       interpret=interpret)
  assert where in str(e.value) and what in str(e.value), str(e.value)


def test_chunk_ids_past_int32_are_refused():
  """The kernels read int32 ids: a wider id would wrap around onto a real chunk."""
  ids = np.asarray([[[2**32 + 1, 0], [1, 3]], [[3, -1], [2, 0]]], np.int64)
  with pytest.raises(ValueError, match=r"chunk_ids must fit int32 .* got values in \[-1, "
                     r"4294967297\]"):
    pk.chunk_attention(Q, K, V, ids, chunk_size=C)


@pytest.mark.parametrize("implementation,interpret", kc.implementations("tile_chunk_attention",
                                                                        compiled=False))
@pytest.mark.parametrize("tiles,where", [
    ([[[0, 1, 1], [2, -1, -1]]], "tile_chunk_ids[0, 0]"),
    ([[[0, 1, 3], [3, 2, 3]]], "tile_chunk_ids[0, 1]"),
    ([[[0, -1]], [[1, 1]]], "tile_chunk_ids[1, 0]"),  # two tiles of one request, Hkv = 1 below
])
def test_tile_chunk_attention_refuses_duplicate_ids(implementation, interpret, tiles, where):
  tiles = jnp.asarray(tiles, jnp.int32)
  k, v = (K, V) if tiles.shape[1] == HKV else (K[:, :1], V[:, :1])
  with pytest.raises(ValueError, match="tile_chunk_attention: ") as e:
    pk.tile_chunk_attention(Q, k, v, tiles, chunk_size=C, implementation=implementation,
                            interpret=interpret)
  assert where in str(e.value) and "twice" in str(e.value), str(e.value)


def test_ids_that_select_nothing_may_repeat_and_traced_ids_are_not_read():
  """-1 padding and ids past N repeat freely; traced ids cannot be checked (documented)."""
  ids = jnp.asarray([[[-1, -1, 0], [7, 7, 1]], [[4, 9, 9], [-3, -3, -3]]], jnp.int32)
  o, _ = pk.chunk_attention(Q, K, V, ids, chunk_size=C, implementation="xla")
  assert np.all(np.asarray(o)[1, :, :G] == 0)  # request 1, kv head 0 selected nothing
  dup = jnp.asarray([[[0, 0], [1, 1]], [[2, 2], [3, 3]]], jnp.int32)
  jax.jit(lambda i: pk.chunk_attention(Q, K, V, i, chunk_size=C, implementation="xla"))(dup)


_CHUNK_BAD = [
    ("ids-float", lambda: pk.chunk_attention(Q, K, V, IDS.astype(jnp.float32), chunk_size=C),
     "chunk_ids must be an integer array"),
    ("ids-list", lambda: pk.chunk_attention(Q, K, V, [[[0]]], chunk_size=C),
     "chunk_ids must be an array"),
    ("ids-rank2", lambda: pk.chunk_attention(Q, K, V, IDS[:, :, 0], chunk_size=C),
     "chunk_ids must be an integer array of shape [B=2, Hkv=2, K]"),
    ("ids-other-B", lambda: pk.chunk_attention(Q, K, V, IDS[:1], chunk_size=C), "[B=2, Hkv=2, K]"),
    ("ids-other-Hkv", lambda: pk.chunk_attention(Q, K, V, IDS[:, :1], chunk_size=C),
     "[B=2, Hkv=2, K]"),
    ("chunk_size-0", lambda: pk.chunk_attention(Q, K, V, IDS, chunk_size=0),
     "chunk_size must be a positive int"),
    ("chunk_size-neg", lambda: pk.chunk_attention(Q, K, V, IDS, chunk_size=-128),
     "chunk_size must be a positive int"),
    ("chunk_size-float", lambda: pk.chunk_attention(Q, K, V, IDS, chunk_size=128.0),
     "chunk_size must be a positive int"),
    ("chunk_size-bool", lambda: pk.chunk_attention(Q, K, V, IDS, chunk_size=True),
     "chunk_size must be a positive int"),
    ("tpu-chunk-not-block", lambda: pk.chunk_attention(Q, K, V, IDS, chunk_size=100,
                                                       implementation="mosaic_tpu",
                                                       interpret=True),
     "chunk_size must be a multiple of config.block_k"),
    ("tiles-float", lambda: pk.tile_chunk_attention(Q, K, V, TILES.astype(jnp.float32),
                                                    chunk_size=C),
     "tile_chunk_ids must be an integer array"),
    ("tiles-list", lambda: pk.tile_chunk_attention(Q, K, V, [[[0]]], chunk_size=C),
     "tile_chunk_ids must be an array"),
    ("tiles-not-dividing-B", lambda: pk.tile_chunk_attention(
        Q[:1].repeat(3, 0), K, V, jnp.zeros((2, HKV, 1), jnp.int32), chunk_size=C),
     "n_tiles dividing B=3"),
    ("tiles-zero", lambda: pk.tile_chunk_attention(Q, K, V, TILES[:0], chunk_size=C),
     "tile_chunk_ids must be an integer array"),
    ("tiles-other-Hkv", lambda: pk.tile_chunk_attention(Q, K, V, TILES[:, :1], chunk_size=C),
     "Hkv=2"),
    ("tiles-chunk_size-0", lambda: pk.tile_chunk_attention(Q, K, V, TILES, chunk_size=0),
     "chunk_size must be a positive int"),
    ("tiles-mosaic-tpu", lambda: pk.tile_chunk_attention(Q, K, V, TILES, chunk_size=C,
                                                         implementation="mosaic_tpu"),
     "implementation must be 'auto' or one of"),
]


@pytest.mark.parametrize("fn,match", [pytest.param(*c[1:], id=c[0]) for c in _CHUNK_BAD])
def test_chunk_ops_refuse(fn, match):
  with pytest.raises(ValueError) as e:
    fn()
  assert match in str(e.value), str(e.value)


# Paged inputs: live page ids and lengths are checked when concrete.
def _bad_table(b, i, page):
  q, k, v, tables, lengths = PAGED
  return q, k, v, tables.at[b, i].set(page), lengths


_PAGES_BAD = [
    ("id-past-pool", _bad_table(1, 0, 999), "block_tables[1, 0] = 999 must be a page id in [0, P="),
    ("id-negative", _bad_table(0, 1, -3), "block_tables[0, 1] = -3"),
    ("id-equals-P", _bad_table(1, 2, P), f"block_tables[1, 2] = {P}"),
    ("last-live-page", _bad_table(0, 1, -1), "one of the 2 pages request 0 reads"),
]


@pytest.mark.parametrize("implementation,interpret", kc.implementations("unique_attention",
                                                                        compiled=False))
@pytest.mark.parametrize("args,match", [pytest.param(*c[1:], id=c[0]) for c in _PAGES_BAD])
def test_unique_attention_refuses_live_pages_out_of_the_pool(implementation, interpret, args,
                                                             match):
  with pytest.raises(ValueError) as e:
    pk.unique_attention(*args, implementation=implementation, interpret=interpret)
  assert match in str(e.value) and str(e.value).startswith("unique_attention"), str(e.value)


def test_junk_past_live_pages_is_fine_and_traced_tables_are_not_read():
  q, k, v, tables, lengths = PAGED
  junk = tables.at[0, 2:].set(10**6).at[1, 3:].set(-7)  # request 0 owns 2 pages, request 1 owns 3
  o, _ = pk.unique_attention(q, k, v, junk, lengths, implementation="xla")
  o_ref, _ = pk.unique_attention(q, k, v, tables, lengths, implementation="xla")
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))
  jax.jit(lambda t: pk.unique_attention(q, k, v, t, lengths, implementation="xla"))(
      tables.at[1, 0].set(999))  # not refused: documented as undefined under jit


_q, _k, _v, _t, _n = PAGED
_UNIQUE_BAD = [
    ("q-list", (_q.tolist(), _k, _v, _t, _n), {}, "q must be an array"),
    ("tables-list", (_q, _k, _v, _t.tolist(), _n), {}, "block_tables must be an array"),
    ("lengths-list", (_q, _k, _v, _t, [20, 33]), {}, "lengths must be an array"),
    ("q-rank3", (_q[0], _k, _v, _t, _n), {}, "q must have shape [B, T, Hq, D]"),
    ("pages-rank3", (_q, _k[0], _v[0], _t, _n), {}, "k_pages must have shape [P, page_size"),
    ("pages-other-D", (_q, _k[..., :32], _v[..., :32], _t, _n), {}, "D=64] (D of q)"),
    ("v-pages-shape", (_q, _k, _v[:2], _t, _n), {}, "v_pages must have the shape of k_pages"),
    ("gqa", (_q, jnp.ones((P, 16, 3, D)), jnp.ones((P, 16, 3, D)), _t, _n), {},
     "multiple of Hkv=3"),
    ("pages-dtypes", (_q, _k, _v.astype(jnp.bfloat16), _t, _n), {}, "must share a dtype"),
    ("q-int", (_q.astype(jnp.int32), _k, _v, _t, _n), {}, "q must be float32"),
    ("tables-float", (_q, _k, _v, _t.astype(jnp.float32), _n), {}, "block_tables must be an "
     "integer array"),
    ("tables-other-B", (_q, _k, _v, _t[:1], _n), {}, "block_tables must be an integer array of "
     "shape [B=2"),
    ("tables-rank1", (_q, _k, _v, _t[0], _n), {}, "block_tables must be an integer array"),
    ("lengths-float", (_q, _k, _v, _t, _n.astype(jnp.float32)), {}, "lengths must be an integer"),
    ("lengths-other-B", (_q, _k, _v, _t, _n[:1]), {}, "lengths must be an integer array of shape "
     "[B=2]"),
    ("lengths-2d", (_q, _k, _v, _t, _n[:, None]), {}, "lengths must be an integer array"),
    ("no-pages", (_q, _k[:0], _v[:0], _t, _n), {}, "must have no empty axis"),
    ("page_size-0", (_q, _k[:, :0], _v[:, :0], _t, _n), {}, "must have no empty axis"),
    ("max_pages-0", (_q, _k, _v, _t[:, :0], _n), {}, "must have no empty axis"),
    ("length-neg", (_q, _k, _v, _t, _n.at[0].set(-1)), {}, "lengths[0] = -1 must be in [0, "
     "max_pages * page_size"),
    ("length-past-table", (_q, _k, _v, _t, _n.at[1].set(10**4)), {}, "lengths[1] = 10000"),
    ("sm_scale-nan", (_q, _k, _v, _t, _n), dict(sm_scale=float("nan")), "sm_scale must be"),
    ("backend-unknown", (_q, _k, _v, _t, _n), dict(backend="cuda"), "backend must be one of"),
    ("triton-pages_per_block", (_q, _k, _v, _t, _n), dict(
        implementation="triton", interpret=True, config=pk.TritonUniqueConfig(pages_per_block=3)),
     "must be a power of two >= 16"),
    ("tpu-page_size-12", (_q, _k[:, :12], _v[:, :12], _t, _n), dict(backend="tpu",
                                                                   interpret=True),
     "page_size must be a multiple of 8"),
]


@pytest.mark.parametrize("args,kwargs,match", [pytest.param(*c[1:], id=c[0])
                                               for c in _UNIQUE_BAD])
def test_unique_attention_refuses(args, kwargs, match):
  with pytest.raises(ValueError) as e:
    pk.unique_attention(*args, **kwargs)
  assert match in str(e.value), str(e.value)


_new = jnp.ones((B, 3, HKV, D), jnp.float32)
_WRITE_BAD = [
    ("lengths-neg", (_k, _v, _t, jnp.asarray([-1, 0], jnp.int32), _new, _new),
     "lengths_before[0] = -1 must be in [0"),
    ("lengths-past-table", (_k, _v, _t, jnp.asarray([0, 10**4], jnp.int32), _new, _new),
     "lengths_before[1] = 10000"),
    ("written-page-neg", (_k, _v, _t.at[0, 1].set(-2), jnp.asarray([15, 0], jnp.int32), _new,
                          _new), "block_tables[0, 1] = -2 must be a page id"),
    ("written-page-past-P", (_k, _v, _t.at[1, 0].set(P + 5), jnp.asarray([15, 0], jnp.int32),
                             _new, _new), f"block_tables[1, 0] = {P + 5}"),
    ("tables-float", (_k, _v, _t.astype(jnp.float32), _n, _new, _new),
     "block_tables must be an integer array"),
    ("lengths-float", (_k, _v, _t, _n.astype(jnp.float32), _new, _new),
     "lengths_before must be an integer array"),
    ("k_new-heads", (_k, _v, _t, _n, _new[:, :, :1], _new[:, :, :1]), "k_new must have shape"),
    ("v_new-shape", (_k, _v, _t, _n, _new, _new[:, :1]), "v_new must have the shape of k_new"),
    ("pages-rank3", (_k[0], _v[0], _t, _n, _new, _new), "k_pages must have shape"),
    ("k_new-list", (_k, _v, _t, _n, _new.tolist(), _new), "k_new must be an array"),
]


@pytest.mark.parametrize("args,match", [pytest.param(*c[1:], id=c[0]) for c in _WRITE_BAD])
def test_write_pages_refuses(args, match):
  with pytest.raises(ValueError) as e:
    pk.write_pages(*args)
  assert match in str(e.value) and str(e.value).startswith("write_pages"), str(e.value)


def test_write_pages_drops_negative_page_ids_under_jit():
  """Traced tables are not checked; a negative id is dropped, never wrapped onto another page."""
  k, v, tables, _, new = _k, _v, _t.at[0, 0].set(-1), _n, _new
  out_k, _ = jax.jit(pk.write_pages)(k, v, tables, jnp.asarray([0, 0], jnp.int32), new, new)
  a, b = np.asarray(out_k), np.asarray(k)
  changed = ~np.all((a == b) | (np.isnan(a) & np.isnan(b)), axis=(1, 2, 3))  # the pool has NaN
  assert np.flatnonzero(changed).tolist() == [int(tables[1, 0])]  # request 1's page only


_SCORES_BAD = [
    ("q-odd-D", (Q[..., :63], CODES, SCALE), {}, "with D even"),
    ("q-list", (Q.tolist(), CODES, SCALE), {}, "q must be an array"),
    ("codes-uint8", (Q, CODES.astype(jnp.uint8), SCALE), {}, "codes must be an int8 array"),
    ("codes-width", (Q, jnp.zeros((S, HKV, D // 4), jnp.int8), SCALE), {},
     "[S, Hkv, D/2=32] (packed 4-bit) or [S, Hkv, D=64] (8-bit)"),
    ("codes-gqa", (Q, jnp.zeros((S, 3, D // 2), jnp.int8), jnp.ones((S, 3))), {},
     "multiple of Hkv=3"),
    ("scale-shape", (Q, CODES, SCALE[:10]), {}, "scale must be a float array of shape [S=512"),
    ("scale-int", (Q, CODES, SCALE.astype(jnp.int32)), {}, "scale must be a float array"),
    ("q-int", (Q.astype(jnp.int32), CODES, SCALE), {}, "q must be float32"),
    ("S=0", (Q, CODES[:0], SCALE[:0]), {}, "must have no empty axis"),
    ("B=0", (Q[:0], CODES, SCALE), {}, "must have no empty axis"),
    ("chunk_size-0", (Q, CODES, SCALE), dict(chunk_size=0), "chunk_size must be a positive int"),
    ("kv_length-neg", (Q, CODES, SCALE), dict(kv_length=-2), "kv_length must be in [0, S=512]"),
    ("kv_length-past-S", (Q, CODES, SCALE), dict(kv_length=600), "got 600"),
    ("kv_length-float", (Q, CODES, SCALE), dict(kv_length=2.0), "integer scalar"),
]


@pytest.mark.parametrize("args,kwargs,match", [pytest.param(*c[1:], id=c[0])
                                               for c in _SCORES_BAD])
def test_chunk_scores_refuses(args, kwargs, match):
  kwargs = dict(dict(chunk_size=C), **kwargs)
  with pytest.raises(ValueError) as e:
    pk.chunk_scores(*args, **kwargs)
  assert match in str(e.value) and str(e.value).startswith("chunk_scores"), str(e.value)


# Partial states.
_O = kc.random_normal(RNG, (3, 4, 8), jnp.float32)
_L = jnp.asarray(RNG.standard_normal((3, 4)), jnp.float32)
_MERGE_BAD = [
    ("lse-shape", lambda: pk.merge_partials(_O, _L[:, :2]), "lse must have shape"),
    ("axis-out-of-range", lambda: pk.merge_partials(_O, _L, axis=2), "axis must be an int in"),
    ("axis-negative-out", lambda: pk.merge_partials(_O, _L, axis=-3), "axis must be an int in"),
    ("axis-float", lambda: pk.merge_partials(_O, _L, axis=0.0), "axis must be an int in"),
    ("o-int", lambda: pk.merge_partials(_O.astype(jnp.int32), _L), "o must be a float array"),
    ("lse-list", lambda: pk.merge_partials(_O, _L.tolist()), "lse must be a float array"),
    ("states-shapes", lambda: pk.merge_attention_states(_O[0], _L[0], _O[1, :2], _L[1, :2]),
     "shapes differ"),
    ("states-list", lambda: pk.merge_attention_states(_O[0].tolist(), _L[0], _O[1], _L[1]),
     "o_a must be an array"),
]


@pytest.mark.parametrize("fn,match", [pytest.param(*c[1:], id=c[0]) for c in _MERGE_BAD])
def test_merge_refuses(fn, match):
  with pytest.raises(ValueError) as e:
    fn()
  assert match in str(e.value), str(e.value)


def test_merge_poisoned_lse_gives_nan_not_unnormalized_values():
  """NaN lse -> o NaN, lse NaN; +inf lse -> o NaN, lse +inf; other rows exact; -inf ignored."""
  o_a, o_b = _O[0], _O[1]
  lse_a = _L[0].at[0].set(jnp.nan).at[1].set(jnp.inf).at[3].set(-jnp.inf)
  lse_b = _L[1].at[2].set(jnp.nan)
  o, lse = pk.merge_attention_states(o_a, lse_a, o_b, lse_b)
  o, lse = np.asarray(o), np.asarray(lse)
  assert np.all(np.isnan(o[:3])) and np.isnan(lse[0]) and np.isnan(lse[2])
  assert lse[1] == np.inf
  np.testing.assert_array_equal(o[3], np.asarray(o_b[3]))  # the empty side drops out
  np.testing.assert_allclose(lse[3], float(lse_b[3]))
  # A NaN o behind a finite lse poisons its row; behind -inf it is ignored.
  o, _ = pk.merge_attention_states(o_a.at[0].set(jnp.nan), _L[0], o_b.at[1].set(jnp.nan),
                                   _L[1].at[1].set(-jnp.inf))
  assert np.all(np.isnan(np.asarray(o)[0])) and np.all(np.isfinite(np.asarray(o)[1:]))
  # ... even when its weight against the other partial underflows to 0.
  o, _ = pk.merge_partials(jnp.stack([o_a, o_b.at[0].set(jnp.nan)]),
                           jnp.stack([_L[0], _L[1].at[0].set(_L[0][0] - 200.0)]))
  assert np.all(np.isnan(np.asarray(o)[0])) and np.all(np.isfinite(np.asarray(o)[1:]))


def test_merge_partials_across_devices_poisons_too():
  """The same semantics for partials spread over a shard_map axis (pmax / psum)."""
  n = min(4, jax.device_count())
  if n < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("x",))
  o = kc.random_normal(RNG, (n, 3, 8), jnp.float32)
  lse = jnp.asarray(RNG.standard_normal((n, 3)), jnp.float32)
  lse = lse.at[n - 1, 0].set(jnp.nan).at[0, 1].set(jnp.inf)
  spec = jax.sharding.PartitionSpec("x")
  merged = jax.shard_map(lambda o, l: pk.merge_partials(o[0], l[0], axis_name="x"), mesh=mesh,
                         in_specs=(spec, spec), out_specs=jax.sharding.PartitionSpec())
  out, out_lse = (np.asarray(x) for x in merged(o, lse))
  ref, ref_lse = (np.asarray(x) for x in pk.merge_partials(o, lse, axis=0))
  assert np.all(np.isnan(out[:2])) and np.isnan(out_lse[0]) and out_lse[1] == np.inf
  np.testing.assert_allclose(out[2], ref[2], rtol=1e-6)
  np.testing.assert_allclose(out_lse[2], ref_lse[2], rtol=1e-6)


# Masked-out keys: poisoned with NaN and inf they change no output on any implementation.
def _poison(x, keep, kind):
  values = {"nan": jnp.nan, "inf": jnp.inf, "-inf": -jnp.inf}
  keep = np.asarray(keep)
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim)), x, values[kind])


def _same_outputs(fn, clean, poisoned):
  (o, lse), (o_p, lse_p) = fn(*clean), fn(*poisoned)
  assert np.all(np.isfinite(np.asarray(o)))
  np.testing.assert_array_equal(np.asarray(o_p), np.asarray(o))
  np.testing.assert_array_equal(np.asarray(lse_p), np.asarray(lse))


KV_LENGTH = 400  # inside the last chunk


@pytest.mark.parametrize("implementation,interpret", kc.implementations("shared_attention",
                                                                        compiled=False))
def test_shared_attention_never_reads_past_kv_length(implementation, interpret):
  fn = jax.jit(lambda q, k, v: pk.shared_attention(
      q, k, v, kv_length=KV_LENGTH, implementation=implementation, interpret=interpret))
  keep = np.arange(S) < KV_LENGTH
  _same_outputs(fn, (Q, K, V), (Q, _poison(K, keep, "inf"), _poison(V, keep, "nan")))
  _same_outputs(fn, (Q, K, V), (Q, _poison(K, keep, "nan"), _poison(V, keep, "-inf")))


@pytest.mark.parametrize("implementation,interpret", kc.implementations("chunk_attention",
                                                                        compiled=False))
def test_chunk_attention_never_reads_unselected_chunks(implementation, interpret):
  ids = jnp.asarray([[[3, -1], [1, 3]], [[0, 3], [3, 0]]], jnp.int32)  # chunk 2: nobody
  fn = jax.jit(lambda q, k, v: pk.chunk_attention(
      q, k, v, ids, chunk_size=C, kv_length=KV_LENGTH, implementation=implementation,
      interpret=interpret))
  keep = (np.arange(S) < KV_LENGTH) & (np.arange(S) // C != 2)
  _same_outputs(fn, (Q, K, V), (Q, _poison(K, keep, "inf"), _poison(V, keep, "nan")))
  _same_outputs(fn, (Q, K, V), (Q, _poison(K, keep, "nan"), _poison(V, keep, "inf")))


@pytest.mark.parametrize("implementation,interpret", kc.implementations("tile_chunk_attention",
                                                                        compiled=False))
def test_tile_chunk_attention_never_reads_unselected_chunks(implementation, interpret):
  tiles = jnp.asarray([[[3, 0], [1, -1]], [[0, -1], [3, 1]]], jnp.int32)  # chunk 2: nobody
  fn = jax.jit(lambda q, k, v: pk.tile_chunk_attention(
      q, k, v, tiles, chunk_size=C, kv_length=KV_LENGTH, implementation=implementation,
      interpret=interpret))
  keep = (np.arange(S) < KV_LENGTH) & (np.arange(S) // C != 2)
  _same_outputs(fn, (Q, K, V), (Q, _poison(K, keep, "inf"), _poison(V, keep, "nan")))


@pytest.mark.parametrize("implementation,interpret", kc.implementations("unique_attention",
                                                                        compiled=False))
def test_unique_attention_never_reads_past_a_length(implementation, interpret):
  q, k, v, tables, lengths = kc.paged_inputs(3, 2, G, HKV, D, 16, (20, 33, 0), jnp.float32,
                                             poison=False)
  owned = np.zeros(k.shape[:2], bool)  # the slots each request's length covers
  for b, n in enumerate(np.asarray(lengths)):
    for pos in range(n):
      owned[int(tables[b, pos // 16]), pos % 16] = True
  fn = jax.jit(lambda k, v: pk.unique_attention(q, k, v, tables, lengths,
                                                implementation=implementation,
                                                interpret=interpret))
  (o, lse), (o_p, lse_p) = fn(k, v), fn(_poison(k, owned, "inf"), _poison(v, owned, "nan"))
  np.testing.assert_array_equal(np.asarray(o_p), np.asarray(o))
  np.testing.assert_array_equal(np.asarray(lse_p), np.asarray(lse))
  assert np.all(np.isfinite(np.asarray(o)))


@pytest.mark.parametrize("implementation,interpret", kc.implementations("chunk_scores",
                                                                        compiled=False))
def test_chunk_scores_never_read_past_kv_length(implementation, interpret):
  fn = jax.jit(lambda scale: pk.chunk_scores(Q, CODES, scale, chunk_size=C, kv_length=KV_LENGTH,
                                             implementation=implementation,
                                             interpret=interpret))
  keep = np.arange(S) < KV_LENGTH
  clean, poisoned = fn(SCALE), fn(_poison(SCALE, keep, "nan"))
  np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))
  assert np.all(np.isfinite(np.asarray(clean)))


def test_interpret_is_a_bool_for_a_pallas_implementation():
  """Named or by family, XLA has no interpret mode; a truthy stand-in is refused."""
  for kwargs in (dict(implementation="xla"), dict(backend="xla")):
    with pytest.raises(ValueError, match="shared_attention: interpret=True runs a Pallas kernel"):
      pk.shared_attention(Q, K, V, interpret=True, **kwargs)
  with pytest.raises(ValueError, match="shared_attention: interpret must be True or False, got "
                     "'yes'"):
    pk.shared_attention(Q, K, V, interpret="yes")


def test_triton_refuses_a_1_byte_array_past_its_32_bit_offsets():
  """Compiled Pallas Triton offsets into an array of at most 4 GiB with 32-bit integers: a float8
  store of more than 2^31 elements (S = 2^21 + 8 keys of 8 x 128) is refused by name on every
  Triton op taking it, left out of sweeps, and planned elsewhere ("auto" on Hopper: Mosaic GPU;
  interpret mode);
  2^31 elements exactly, or 2-byte arrays past 4 GiB (64-bit offsets), are fine. The widening
  pass gives such an array to XLA's convert."""
  from pallas_kernels import checks
  from pallas_kernels.gpu import widen

  sds = jax.ShapeDtypeStruct
  e4m3 = jnp.float8_e4m3fn
  assert checks.offsets_32bit_unsupported([sds((1 << 31,), e4m3)]) is None
  assert checks.offsets_32bit_unsupported([sds(((1 << 31) + 1,), jnp.bfloat16)]) is None
  assert "32-bit offsets" in checks.offsets_32bit_unsupported([sds(((1 << 31) + 1,), e4m3)])
  q, kv = sds((4, 1, 32, 128), jnp.bfloat16), sds(((1 << 21) + 8, 8, 128), e4m3)
  scales = dict(k_scale=sds((8,), jnp.float32), v_scale=sds((8,), jnp.float32))
  with pytest.raises(ValueError, match=r"shared_attention: implementation 'triton' cannot run "
                     r"this call: Pallas Triton indexes an array of 2147491840 float8_e4m3fn"):
    pk.plan("shared_attention", q, kv, kv, implementation="triton", target="h100", **scales)
  ids = sds((4, 8, 2), jnp.int32)
  with pytest.raises(ValueError, match="chunk_attention: implementation 'triton' cannot run"):
    pk.plan("chunk_attention", q, kv, kv, ids, chunk_size=1024, implementation="triton",
            target="h100", **scales)
  assert pk.plan("shared_attention", q, kv, kv, backend="gpu", target="h100",
                 **scales).implementation == "mosaic_gpu"
  sweep = lambda kv: {p.implementation for p in pk.sweep("shared_attention", q, kv, kv,
                                                         backend="gpu", target="h100", **scales)}
  assert sweep(kv) == {"mosaic_gpu"}
  assert sweep(sds((1 << 20, 8, 128), e4m3)) == {"mosaic_gpu", "triton"}
  pk.plan("shared_attention", q, kv, kv, implementation="triton", interpret=True, **scales)
  jaxpr = str(jax.make_jaxpr(lambda v: widen.widen(v, jnp.float16))(kv))
  assert "pallas_call" not in jaxpr and "convert_element_type" in jaxpr
  assert "pallas_call" in str(jax.make_jaxpr(lambda v: widen.widen(v, jnp.float16))(
      sds((1 << 20, 8, 128), e4m3)))


# Keys a row attends to: a NaN there (or in the row's query) reaches the row's o and lse on every
# implementation. A NaN sum of weights is not "no key": read as empty, the row's split once
# vanished from the merge and left attention over the other splits' keys.
def _nan_reaches(out, rows) -> None:
  o, lse = np.asarray(out[0], np.float32), np.asarray(out[1])
  np.testing.assert_array_equal(np.isnan(lse), rows)
  assert np.all(np.isnan(o[rows])) and np.all(np.isfinite(o[~rows]))


_HEAD0 = np.arange(HQ) < G  # the query heads of kv head 0


@pytest.mark.parametrize("op", sorted(SHARED_OPS))
@pytest.mark.parametrize("implementation,interpret", kc.implementations("shared_attention"))
def test_nan_in_an_attended_key_or_query_reaches_its_rows(op, implementation, interpret):
  if implementation not in pk.implementations(op):
    pytest.skip(f"{op} has no {implementation!r} implementation")
  q, k, v = (x.astype(kc.float_dtype(implementation)) for x in (Q, K, V))
  fn = jax.jit(lambda q, k: SHARED_OPS[op](q, k, v, kv_length=KV_LENGTH,
                                           implementation=implementation, interpret=interpret))
  # Key 5 (chunk 0, kv head 0): every request reads it in shared / tile attention (TILES lists
  # chunk 0 for kv head 0), request 0 only in chunk attention (IDS).
  readers = np.ones(B, bool) if op != "chunk_attention" else np.arange(B) == 0
  _nan_reaches(fn(q, k.at[5, 0, 3].set(jnp.nan)), readers[:, None, None] & _HEAD0)
  rows = np.zeros((B, T, HQ), bool)
  rows[1, 0, HQ - 1] = True
  _nan_reaches(fn(q.at[1, 0, HQ - 1, 7].set(jnp.nan), k), rows)


@pytest.mark.parametrize("implementation,interpret", kc.implementations("unique_attention"))
def test_nan_in_an_attended_page_reaches_its_rows(implementation, interpret):
  # Finite past the lengths: "mosaic_gpu" weighs the rest of a request's last tile by 0.
  q, k, v, tables, lengths = kc.paged_inputs(1, T, G, HKV, D, 16, (20, 33), jnp.float32,
                                             poison=False)
  q, k, v = (x.astype(kc.float_dtype(implementation)) for x in (q, k, v))
  page = int(tables[1, 1])  # request 1's tokens 16..31 (its length is 33)
  fn = jax.jit(lambda k: pk.unique_attention(q, k, v, tables, lengths,
                                             implementation=implementation, interpret=interpret))
  _nan_reaches(fn(k.at[page, 4, 0, 0].set(jnp.nan)), (np.arange(B) == 1)[:, None, None] & _HEAD0)
