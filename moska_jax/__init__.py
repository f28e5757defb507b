"""moska-jax: serving many requests that share one huge context with MoSKA (arXiv 2511.06010).

The public API, importable from here:

    from moska_jax import Decoder, MoskaConfig, MoskaEngine, build_shared_store, tiny

Names load on first use (PEP 562), so `import moska_jax` stays fast and pulls in neither Flax,
orbax nor any kernel module until one is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # config
    "ModelConfig": "moska_jax.config",
    "MoskaConfig": "moska_jax.config",
    "RopeScaling": "moska_jax.config",
    "SUMMARY_KINDS": "moska_jax.config",
    "llama3_1_8b": "moska_jax.config",
    "tiny": "moska_jax.config",
    # model and its attention
    "Decoder": "moska_jax.model",
    "stateless": "moska_jax.model",
    "kv_weights_fingerprint": "moska_jax.model",
    "SharedLayer": "moska_jax.attention",
    "moska_step": "moska_jax.step",
    "moska_attend": "moska_jax.step",
    # shared store and unique cache
    "SharedKVStore": "moska_jax.kv_cache",
    "UniqueKVCache": "moska_jax.kv_cache",
    "unique_kv_scales": "moska_jax.kv_cache",
    "save_shared_store": "moska_jax.kv_cache",
    "load_shared_store": "moska_jax.kv_cache",
    "build_shared_store": "moska_jax.prefill",
    # serving
    "MoskaEngine": "moska_jax.engine",
    "Sampling": "moska_jax.engine",
    "Result": "moska_jax.engine",
    "ByteTokenizer": "moska_jax.engine",
    "sample": "moska_jax.engine",
    "Scheduler": "moska_jax.scheduler",
    # device groups
    "DeviceGroups": "moska_jax.sharding",
    "ShardingRules": "moska_jax.sharding",
    "make_device_groups": "moska_jax.sharding",
    # weights
    "save_params": "moska_jax.checkpoint",
    "load_params": "moska_jax.checkpoint",
    "saved_config": "moska_jax.checkpoint",
    "load_hf_llama": "moska_jax.checkpoint",
}
_SUBMODULES = ("checkpoint", "routing", "serve_core", "serve_setup", "sharding")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
  if name in _SUBMODULES:
    value = importlib.import_module(f"moska_jax.{name}")
  elif name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    raise AttributeError(f"module 'moska_jax' has no attribute {name!r}")
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
