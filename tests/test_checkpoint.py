"""Model weights: orbax round trip, and the local Hugging Face Llama importer."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moska_jax import checkpoint
from moska_jax.config import tiny
from moska_jax.model import Decoder


def test_params_round_trip_is_exact(tmp_path):
  cfg = tiny()
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  checkpoint.save_params(str(tmp_path / "params"), model)
  restored = checkpoint.load_params(str(tmp_path / "params"), cfg)
  tokens = jnp.arange(12)[None]
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(restored(tokens)))


def test_load_hf_llama_from_local_safetensors(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  cfg = tiny()
  source = Decoder(cfg, rngs=nnx.Rngs(5))
  flat = dict(nnx.state(source, nnx.Param).flat_state())
  tensors = {}
  for name, (path, transpose) in checkpoint._hf_names(cfg).items():
    value = np.asarray(flat[path][...], np.float32)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  names = sorted(tensors)
  half = len(names) // 2  # two shards, as HF writes them
  st.save_file({n: tensors[n] for n in names[:half]}, os.path.join(tmp_path, "a.safetensors"))
  st.save_file({n: tensors[n] for n in names[half:]}, os.path.join(tmp_path, "b.safetensors"))
  loaded = checkpoint.load_hf_llama(str(tmp_path), cfg)
  tokens = jnp.arange(9)[None]
  np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(source(tokens)), atol=1e-6)
  os.remove(os.path.join(tmp_path, "b.safetensors"))
  with pytest.raises(ValueError, match="missing"):
    checkpoint.load_hf_llama(str(tmp_path), cfg)
