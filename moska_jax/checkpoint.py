"""Model weights on disk: orbax save/restore of params, and import of local Llama safetensors.

No network access: `load_hf_llama` reads a local directory of `*.safetensors` files with Hugging
Face Llama names (needs the optional `hf` extra: `pip install moska-jax[hf]`). The shared KV
store has its own save/load in `kv_cache`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moska_jax.config import ModelConfig
from moska_jax.model import Decoder


def save_params(path: str, model: Decoder) -> None:
  """Saves the model's parameters and its config under directory `path` (which must not exist).

  Layout: `path/model_config.json` and `path/params` (orbax).
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=False)
  with open(os.path.join(path, "model_config.json"), "w") as f:
    json.dump(model.cfg.to_dict(), f, indent=1)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "params"), nnx.state(model, nnx.Param))
  ckpt.wait_until_finished()


def saved_config(path: str) -> ModelConfig:
  """The config a checkpoint written by `save_params` was saved with."""
  with open(os.path.join(os.path.abspath(path), "model_config.json")) as f:
    return ModelConfig.from_dict(json.load(f))


def load_params(path: str, cfg: ModelConfig | None = None) -> Decoder:
  """The Decoder saved at `path`, optionally in another dtype.

  Args:
    path: a directory written by `save_params`.
    cfg: None for the saved config; otherwise it must equal the saved config up to `dtype`
      (parameters are cast, e.g. a bfloat16 checkpoint served in float32).

  Raises:
    ValueError: cfg differs from the saved config in anything but dtype.
  """
  saved = saved_config(path)
  cfg = cfg or saved
  if dataclasses.replace(cfg, dtype=saved.dtype) != saved:
    raise ValueError(f"load_params: the checkpoint at {path} holds a model of {saved}, not {cfg}")
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(saved, rngs=nnx.Rngs(0))))
  state = restore_arrays(os.path.join(os.path.abspath(path), "params"), abstract)
  return cast(nnx.merge(graphdef, state), cfg.dtype)


def restore_arrays(path: str, abstract: Any) -> Any:
  """Restores an orbax pytree onto the default device, whatever devices it was saved from.

  abstract: the tree's shapes and dtypes (arrays or jax.ShapeDtypeStruct). Giving orbax a target
  sharding is what lets a checkpoint written on a GPU load on a CPU (or another topology).
  """
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract)
  return ocp.StandardCheckpointer().restore(path, target)


def cast(model: Decoder, dtype: str) -> Decoder:
  """The same model with parameters and compute in `dtype` ("float32" or "bfloat16")."""
  if dtype == model.cfg.dtype:
    return model
  target = nnx.eval_shape(lambda: Decoder(dataclasses.replace(model.cfg, dtype=dtype),
                                          rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(target)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)),
                                          nnx.state(model, nnx.Param)))


def _hf_names(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
  """HF tensor name -> (path in our model, whether to transpose [out, in] -> [in, out])."""
  names = {"model.embed_tokens.weight": (("embed", "embedding"), False),
           "model.norm.weight": (("norm", "scale"), False),
           "lm_head.weight": (("lm_head", "kernel"), True)}
  for i in range(cfg.layers):
    p = f"model.layers.{i}."
    for hf, ours in (("self_attn.q_proj", ("attn", "q_proj")), ("self_attn.k_proj", ("attn", "k_proj")),
                     ("self_attn.v_proj", ("attn", "v_proj")), ("self_attn.o_proj", ("attn", "o_proj")),
                     ("mlp.gate_proj", ("mlp", "gate")), ("mlp.up_proj", ("mlp", "up")),
                     ("mlp.down_proj", ("mlp", "down"))):
      names[p + hf + ".weight"] = (("blocks", i, *ours, "kernel"), True)
    names[p + "input_layernorm.weight"] = (("blocks", i, "attn_norm", "scale"), False)
    names[p + "post_attention_layernorm.weight"] = (("blocks", i, "mlp_norm", "scale"), False)
  return names


def load_hf_llama(directory: str, cfg: ModelConfig) -> Decoder:
  """Builds a Decoder of `cfg` from the Llama safetensors files in a local directory.

  Raises:
    ImportError: safetensors is not installed (the `hf` extra).
    ValueError: a tensor is missing or has the wrong shape for `cfg`.
  """
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError("load_hf_llama needs safetensors: pip install 'moska-jax[hf]'") from e
  tensors = {}
  for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    tensors.update(load_file(f))
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  flat = dict(state.flat_state())
  for name, (path, transpose) in _hf_names(cfg).items():
    if name not in tensors:
      raise ValueError(f"load_hf_llama: {name} missing in {directory}")
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transpose else value
    target = flat[path]
    if value.shape != target.shape:
      raise ValueError(f"load_hf_llama: {name} has shape {value.shape}, expected "
                       f"{target.shape} for {cfg}")
    target[...] = jnp.asarray(value, target.dtype)
  nnx.update(model, nnx.State.from_flat_path(flat))
  return model
