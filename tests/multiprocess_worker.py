"""One process of a multi-process test (`tests/test_multiprocess.py` launches it N times).

    python -m tests.multiprocess_worker OUT_DIR NUM_SHARED STEP_MODES ENGINE_MODE

Joins the `jax.distributed` job (`moska_jax.sharding.launch.initialize`), splits every process's
devices into groups (the last NUM_SHARED devices shared: whole processes of them), runs the
cross-group shared step (STEP_MODES, comma-separated: dense, ids = handed-off chunk ids, routed)
and the engine (ENGINE_MODE: dense, sparse or none) on the inputs `cases` builds, and writes what it
got to OUT_DIR/process{i}.npz. The test runs the same cases in one process and compares.
"""

from __future__ import annotations

import sys

import numpy as np

from moska_jax.sharding import launch


def cases():
  """The inputs, the same in every process (NumPy and fixed seeds only)."""
  rng = np.random.default_rng(0)
  B, T, Hq, Hkv, D, C, S, K = 4, 2, 4, 2, 16, 16, 200, 4
  n_chunks = -(-S // C)
  ids = np.stack([rng.permutation(n_chunks)[:K] for _ in range(B * Hkv)]).reshape(B, Hkv, K)
  ids[-1, :, -1] = -1
  return dict(q=rng.standard_normal((B, T, Hq, D), np.float32),
              k=rng.standard_normal((S, Hkv, D), np.float32),
              v=rng.standard_normal((S, Hkv, D), np.float32), ids=ids.astype(np.int32),
              chunk_size=C, kv_length=170, top_k=3,
              prompts=[list(rng.integers(0, 256, n)) for n in (3, 8, 5, 2)])


def engine_parts(mode: str):
  """A one-layer tiny decoder, a random shared store (C=32) and the engine's `MoskaConfig`."""
  from flax import nnx

  from moska_jax.config import ModelConfig, MoskaConfig
  from moska_jax.kv_cache import SharedKVStore
  from moska_jax.model import Decoder

  cfg = ModelConfig(vocab=256, layers=1, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    mlp_hidden=96, rope_theta=10000.0)
  rng = np.random.default_rng(1)
  k, v = (rng.standard_normal((1, 256, 2, 16), np.float32) for _ in range(2))
  mcfg = {"dense": MoskaConfig(backend="xla"),
          "sparse": MoskaConfig(mode="sparse", sparsity=0.5, chunk_size=32, always_include=(0,),
                                backend="xla")}[mode]
  store = SharedKVStore(tuple(k), tuple(v), (), np.int32(250), cfg, 32).with_summaries(32)
  return Decoder(cfg, rngs=nnx.Rngs(0)), store, mcfg


def run(groups, step_modes: list[str], engine_mode: str) -> dict[str, np.ndarray]:
  """Every case on `groups` -> named results (host arrays)."""
  import jax.numpy as jnp

  from moska_jax import routing
  from moska_jax.engine import MoskaEngine
  from moska_jax.sharding import place_shared_kv, shared_attention_step

  c = cases()
  C, n = c["chunk_size"], c["kv_length"]
  summaries = routing.chunk_summaries(jnp.asarray(c["k"]), C, kv_length=n)
  store = place_shared_kv(groups, c["k"], c["v"], summaries, chunk_size=C, kv_length=n)
  out = {}
  step_args = {"dense": {}, "ids": dict(chunk_ids=c["ids"], chunk_size=C),
               "routed": dict(summaries=store.summaries, top_k=c["top_k"], chunk_size=C)}
  for name in step_modes:
    o, lse, _ = shared_attention_step(groups, c["q"], store.k, store.v,
                                      kv_length=store.kv_length, backend="xla", **step_args[name])
    out[f"step_{name}_o"], out[f"step_{name}_lse"] = np.asarray(o), np.asarray(lse)
  if engine_mode == "none":
    return out
  model, shared_store, mcfg = engine_parts(engine_mode)
  engine = MoskaEngine(model, shared_store, mcfg, max_batch=2, num_pages=8, page_size=8,
                       prefill_chunk=8, groups=groups)
  results = engine.generate(c["prompts"], 3, return_logits=True)
  out["engine_tokens"] = np.array([r.tokens for r in results])
  out["engine_logits"] = np.stack([np.stack(r.logits) for r in results])
  return out


def main(out_dir: str, num_shared: int, step_modes: list[str], engine_mode: str) -> None:
  launch.initialize()
  import jax

  from moska_jax.sharding import make_device_groups

  groups = make_device_groups(num_shared=num_shared)
  np.savez(f"{out_dir}/process{jax.process_index()}.npz", **run(groups, step_modes, engine_mode))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4])
