"""Bad inputs to the Hugging Face Llama importer (`load_hf_llama`): a missing directory, no
shards, a config shallower than the files, a tensor in two shards, missing / unknown / misshapen
tensors, unreadable files. Each is refused by name; nothing loads part of a model."""

import dataclasses
import functools
import os

import numpy as np
import pytest
from flax import nnx

from moska_jax import checkpoint
from moska_jax.config import tiny
from moska_jax.model import Decoder

st = pytest.importorskip("safetensors.numpy")

CFG = tiny()  # 2 layers


def _tensors(model) -> dict[str, np.ndarray]:
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for name, (path, transpose) in checkpoint._hf_names(model.cfg).items():
    value = np.asarray(flat[path][...], np.float32)
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out


@functools.cache
def _source() -> dict[str, np.ndarray]:
  """The tensors of the model the tests import, in the Hugging Face names, built at first use:
  not while every xdist worker collects. Read only."""
  return _tensors(Decoder(CFG, rngs=nnx.Rngs(5)))


def _write(directory, *shards):
  os.makedirs(directory, exist_ok=True)
  for i, shard in enumerate(shards):
    st.save_file(shard, os.path.join(directory, f"model-{i:05d}.safetensors"))
  return str(directory)


def _halves(tensors):
  names = sorted(tensors)
  return ({n: tensors[n] for n in names[:len(names) // 2]},
          {n: tensors[n] for n in names[len(names) // 2:]})


def test_two_shards_load_exactly(tmp_path):
  model = checkpoint.load_hf_llama(_write(tmp_path, *_halves(_source())), CFG)
  np.testing.assert_equal(_tensors(model), _source())


def test_rotary_buffers_are_recomputed_not_refused(tmp_path):
  extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
  checkpoint.load_hf_llama(_write(tmp_path, _source(), extra), CFG)


@pytest.mark.parametrize("make,match", [
    pytest.param(lambda p: None, "no directory", id="missing"),
    pytest.param(lambda p: open(p, "w").close(), "no directory", id="a-file"),
    pytest.param(os.mkdir, r"no \*.safetensors file", id="empty"),
    pytest.param(lambda p: _write(p, {}) and os.rename(
        os.path.join(p, "model-00000.safetensors"), os.path.join(p, "model.bin")),
                 r"no \*.safetensors file", id="other-format"),
])
def test_missing_files_are_reported_as_missing(tmp_path, make, match):
  path = str(tmp_path / "hf")
  make(path)
  with pytest.raises(FileNotFoundError, match=match):
    checkpoint.load_hf_llama(path, CFG)


def test_a_too_shallow_config_is_refused(tmp_path):
  """Files of 2 layers, a config of 1: loading would silently drop a layer."""
  path = _write(tmp_path, _source())
  with pytest.raises(ValueError) as e:
    checkpoint.load_hf_llama(path, tiny(layers=1))
  message = str(e.value)
  assert "model.layers.1." in message and "layers up to 1 but cfg.layers = 1" in message, message


def test_a_too_deep_config_is_a_missing_tensor(tmp_path):
  with pytest.raises(ValueError, match="tensor model.layers.2.self_attn.q_proj.weight is missing"):
    checkpoint.load_hf_llama(_write(tmp_path, _source()), tiny(layers=3))


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
                                  "lm_head.weight"])
def test_a_tensor_in_two_shards_is_refused(tmp_path, name):
  first, second = _halves(_source())
  (first if name not in first else second)[name] = _source()[name]  # now in both
  with pytest.raises(ValueError) as e:
    checkpoint.load_hf_llama(_write(tmp_path, first, second), CFG)
  message = str(e.value)
  assert (f"tensor {name} is in two shards" in message and "model-00000.safetensors" in message
          and "model-00001.safetensors" in message), message


@pytest.mark.parametrize("drop", ["model.norm.weight", "lm_head.weight",
                                  "model.layers.0.input_layernorm.weight"])
def test_a_missing_tensor_is_named(tmp_path, drop):
  tensors = {n: t for n, t in _source().items() if n != drop}
  with pytest.raises(ValueError, match=f"tensor {drop} is missing in"):
    checkpoint.load_hf_llama(_write(tmp_path, tensors), CFG)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.q_proj.bias", "model.vision.weight",
                                   "model.layers.0.mlp.experts.0.weight"])
def test_an_unknown_tensor_is_refused(tmp_path, extra):
  tensors = dict(_source(), **{extra: np.ones(4, np.float32)})
  with pytest.raises(ValueError, match=f"1 tensors in .* are not part of a Decoder.*{extra}"):
    checkpoint.load_hf_llama(_write(tmp_path, tensors), CFG)


@pytest.mark.parametrize("cfg,name", [
    pytest.param(dataclasses.replace(CFG, hidden=32), "model.embed_tokens.weight", id="hidden"),
    pytest.param(dataclasses.replace(CFG, vocab=300), "model.embed_tokens.weight", id="vocab"),
    pytest.param(dataclasses.replace(CFG, mlp_hidden=64), "mlp.gate_proj.weight", id="mlp"),
])
def test_a_misshapen_tensor_is_named(tmp_path, cfg, name):
  with pytest.raises(ValueError, match=f"{name} has shape"):
    checkpoint.load_hf_llama(_write(tmp_path, _source()), cfg)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_shard_is_named(tmp_path, damage):
  path = _write(tmp_path, *_halves(_source()))
  shard = os.path.join(path, "model-00001.safetensors")
  data = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(b"\x07not a safetensors file" if damage == "garbage" else data[:len(data) // 2])
  with pytest.raises(ValueError, match="model-00001.safetensors is not a readable safetensors"):
    checkpoint.load_hf_llama(path, CFG)
