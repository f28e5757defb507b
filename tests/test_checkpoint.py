"""Model weights: orbax round trip, and the local Hugging Face Llama importer."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moska_jax import checkpoint
from moska_jax.config import tiny
from moska_jax.model import Decoder, plain_logits


def test_params_round_trip_is_exact(tmp_path):
  cfg = tiny()
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  checkpoint.save_params(str(tmp_path / "params"), model)
  assert checkpoint.saved_config(str(tmp_path / "params")) == cfg
  tokens = [list(range(12))]
  for restored in (checkpoint.load_params(str(tmp_path / "params"), cfg),
                   checkpoint.load_params(str(tmp_path / "params"))):
    np.testing.assert_array_equal(plain_logits(model, tokens), plain_logits(restored, tokens))


def test_load_casts_dtype_and_refuses_another_model(tmp_path):
  cfg = tiny()
  model = Decoder(cfg, rngs=nnx.Rngs(4))
  half = checkpoint.cast(model, "bfloat16")
  checkpoint.save_params(str(tmp_path / "params"), half)
  back = checkpoint.load_params(str(tmp_path / "params"), cfg)  # bf16 on disk, served in f32
  assert back.cfg == cfg
  w, w_half = back.blocks[0].attn.q_proj.kernel[...], half.blocks[0].attn.q_proj.kernel[...]
  assert w.dtype == jnp.float32 and w_half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(w), np.asarray(w_half.astype(jnp.float32)))
  with pytest.raises(ValueError, match="holds a model of"):
    checkpoint.load_params(str(tmp_path / "params"), dataclasses.replace(cfg, layers=3))


def test_load_hf_llama_from_local_safetensors(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  cfg = tiny()
  source = Decoder(cfg, rngs=nnx.Rngs(5))
  flat = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
  names = checkpoint._hf_names(cfg)
  # Pin the Hugging Face Llama names themselves, not only the round trip through our table.
  for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
               "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
               "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.0.input_layernorm.weight",
               "model.layers.1.post_attention_layernorm.weight"):
    assert name in names, name
  assert len(names) == 3 + 9 * cfg.layers
  tensors = {}
  for name, (path, transpose) in names.items():
    value = np.asarray(flat[path][...], np.float32)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  names = sorted(tensors)
  half = len(names) // 2  # two shards, as HF writes them
  st.save_file({n: tensors[n] for n in names[:half]}, os.path.join(tmp_path, "a.safetensors"))
  st.save_file({n: tensors[n] for n in names[half:]}, os.path.join(tmp_path, "b.safetensors"))
  loaded = checkpoint.load_hf_llama(str(tmp_path), cfg)
  tokens = [list(range(9))]
  np.testing.assert_allclose(plain_logits(loaded, tokens), plain_logits(source, tokens), atol=1e-6)
  os.remove(os.path.join(tmp_path, "b.safetensors"))
  with pytest.raises(ValueError, match="missing"):
    checkpoint.load_hf_llama(str(tmp_path), cfg)
