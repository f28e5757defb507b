"""Model weights on disk: orbax save/restore of params, and import of local Llama safetensors; the
atomic, checksummed directories that params and shared KV stores (`kv_cache`) are saved as.

A save writes a hidden sibling directory (`.NAME.partial-*`), makes it durable (fsync) and renames
it to NAME; `overwrite=True` moves an existing NAME aside (`.NAME.replaced-*`) only once the new
one is complete, renames the new one in and then deletes the old one. A process killed at any
point leaves the old or the new directory loadable: a load that finds NAME missing but an aside
copy moves the aside back (the swap did not finish), and the next save deletes leftovers. One
writer per path at a time, and no load of a path while it is being replaced (the load could read
files of both).

`checksums.json` (written last) holds the size and sha256 of every file. A load checks them all
before orbax reads anything and refuses a missing, truncated or altered file with a one-line
`ValueError` that names it.

No network access: `load_hf_llama` reads a local directory of `*.safetensors` files with Hugging
Face Llama names (needs the optional `hf` extra: `pip install moska-jax[hf]`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moska_jax.config import ModelConfig
from moska_jax.model import Decoder

CHECKSUMS = "checksums.json"
_PARTIAL = ".partial-"
_REPLACED = ".replaced-"


def _sibling(path: str, kind: str) -> str:
  parent, base = os.path.split(path)
  return os.path.join(parent, f".{base}{kind}{time.time_ns()}-{uuid.uuid4().hex[:8]}")


def _leftovers(path: str, kind: str) -> list[str]:
  """The hidden siblings of `path` a killed save left, oldest first (names sort by time)."""
  parent, base = os.path.split(path)
  name = re.compile(re.escape(f".{base}{kind}") + r"\d{19}-[0-9a-f]{8}")
  try:
    names = os.listdir(parent)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(os.path.join(parent, n) for n in names if name.fullmatch(n))


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  """Makes every file and directory under root durable (files first, each directory after)."""
  for directory, _, files in os.walk(root, topdown=False):
    for f in files:
      _fsync(os.path.join(directory, f))
    _fsync(directory)


def settle(path: str) -> None:
  """Undoes a replacement killed between its two renames: `path` is missing but the old
  directory lies aside, so it is moved back. Nothing happens when `path` exists."""
  path = os.path.abspath(path)
  if os.path.lexists(path):
    return
  aside = _leftovers(path, _REPLACED)
  if aside:
    with contextlib.suppress(OSError):
      os.rename(aside[-1], path)  # a concurrent load may have moved it back already


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool, marker: str, what: str) -> Iterator[str]:
  """Yields an empty temporary sibling of `path` to write into; when the block succeeds, makes
  it durable and renames it to `path` (module docstring). A failure removes it, leaving `path`
  as it was.

  Args:
    path: the directory to create or replace.
    overwrite: replace an existing `path`; it must hold `marker` (a directory of the same kind:
      nothing else is ever deleted).
    marker: a file name every directory of this kind holds.
    what: the caller's name, for errors.

  Raises:
    FileExistsError: `path` exists and overwrite is False, or it is not a directory of this kind
      (a symbolic link included: the rename would replace the link, and the old directory, set
      aside as a link, could never be removed, so a later load could bring it back).
    NotADirectoryError: the parent of `path` is a file.
  """
  if not isinstance(overwrite, bool):
    raise ValueError(f"{what}: overwrite must be True or False, got {overwrite!r}")
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise NotADirectoryError(f"{what}: cannot write {path}: {parent} is a file, not a directory")
  settle(path)
  if os.path.lexists(path):
    if not overwrite:
      raise FileExistsError(f"{what}: {path} already exists; pass overwrite=True to replace it "
                            "(the old one is kept until the new one is complete)")
    if os.path.islink(path):
      raise FileExistsError(f"{what}: refusing to replace {path}: it is a symbolic link (to "
                            f"{os.readlink(path)}); write to the directory it names, or remove "
                            "the link first")
    if not os.path.isfile(os.path.join(path, marker)):
      raise FileExistsError(f"{what}: refusing to replace {path}: it holds no {marker}, so it "
                            "was not written by this function")
  for leftover in _leftovers(path, _PARTIAL) + _leftovers(path, _REPLACED):
    shutil.rmtree(leftover, ignore_errors=True)
  os.makedirs(parent, exist_ok=True)
  tmp = _sibling(path, _PARTIAL)
  os.mkdir(tmp)
  try:
    yield tmp
    _fsync_tree(tmp)
    aside = None
    if os.path.lexists(path):
      aside = _sibling(path, _REPLACED)
      os.rename(path, aside)
      _fsync(parent)
    try:
      os.rename(tmp, path)
    except BaseException:
      if aside is not None and not os.path.lexists(path):
        os.rename(aside, path)
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync(parent)
  if aside is not None:
    shutil.rmtree(aside, ignore_errors=True)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 23):
      h.update(block)  # releases the GIL: files hash in parallel
  return h.hexdigest()


def _files(directory: str) -> list[str]:
  """Every file under directory but its checksums.json, as sorted paths relative to it."""
  names = (os.path.relpath(os.path.join(d, f), directory)
           for d, _, files in os.walk(directory) for f in files)
  return sorted(n for n in names if n != CHECKSUMS)


def _hash_all(directory: str, names: list[str]) -> list[str]:
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(_sha256, (os.path.join(directory, n) for n in names)))


def write_checksums(directory: str) -> None:
  """Writes `checksums.json` into a directory whose other files are all written: the size and
  sha256 of every file."""
  names = _files(directory)
  table = {n: dict(size=os.path.getsize(os.path.join(directory, n)), sha256=h)
           for n, h in zip(names, _hash_all(directory, names))}
  with open(os.path.join(directory, CHECKSUMS), "w") as f:
    json.dump(dict(algorithm="sha256", files=table), f, indent=1)


def read_json(directory: str, name: str, what: str) -> Any:
  """The JSON file `name` of a saved directory; a clear error if it is missing or damaged."""
  path = os.path.join(directory, name)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{what}: {directory} has no {name}: not a directory this library "
                            "saved, or one whose save did not finish") from None
  except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
    raise ValueError(f"{what}: {path} is damaged (not valid JSON: {e})") from None


def verify_files(directory: str, what: str) -> None:
  """Checks every file `checksums.json` lists: present, of its size (all sizes first: a
  truncated file is found without reading anything), then of its sha256. Files it does not list
  (added after the save) are ignored.

  Raises:
    FileNotFoundError: no checksums.json (saved before checksums existed, or not finished): load
      with verify=False, then save again.
    ValueError: checksums.json is damaged, or a file is missing, truncated or altered (named).
  """
  try:
    table = read_json(directory, CHECKSUMS, what)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; a directory saved before checksums existed loads with "
                            "verify=False (then save it again)") from None
  files = table.get("files") if isinstance(table, dict) else None
  if not isinstance(files, dict) or table.get("algorithm") != "sha256" or not all(
      isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()):
    raise ValueError(f"{what}: {os.path.join(directory, CHECKSUMS)} is damaged (no sha256 'files' "
                     "table of sizes and sha256s)")
  for name, saved in files.items():
    full = os.path.join(directory, name)
    try:
      size = os.path.getsize(full)
    except OSError:
      raise ValueError(f"{what}: {full} is missing: the directory is incomplete") from None
    if size != saved["size"]:
      raise ValueError(f"{what}: {full} has {size} bytes, {saved['size']} were saved: the file "
                       f"is {'truncated' if size < saved['size'] else 'damaged'}")
  names = sorted(files)
  for name, got in zip(names, _hash_all(directory, names)):
    if got != files[name]["sha256"]:
      raise ValueError(f"{what}: {os.path.join(directory, name)} does not match its checksum "
                       f"(sha256 {got[:16]}..., saved {files[name]['sha256'][:16]}...): the file "
                       "is damaged")


def restore_arrays(path: str, abstract: Any, what: str = "restore_arrays") -> Any:
  """Restores an orbax pytree onto the default device, whatever devices it was saved from.

  abstract: the tree's shapes and dtypes (arrays or jax.ShapeDtypeStruct). Giving orbax a target
  sharding is what lets a checkpoint written on a GPU load on a CPU (or another topology).

  Raises:
    ValueError: the files are damaged, incomplete or hold other shapes (orbax / TensorStore
      errors as one line).
  """
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract)
  if not os.path.isdir(path):
    raise ValueError(f"{what}: {path} is missing: the directory is incomplete")
  try:
    return ocp.StandardCheckpointer().restore(path, target)
  except MemoryError:
    raise
  except Exception as e:  # orbax and TensorStore raise many types, with pages of spec dumps
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise ValueError(f"{what}: cannot read the arrays in {path}: the files are damaged, "
                     f"incomplete or of other shapes ({type(e).__name__}: {first})") from None


def save_params(path: str, model: Decoder, *, overwrite: bool = False) -> None:
  """Saves the model's parameters and its config under directory `path`, atomically.

  Layout: `path/model_config.json`, `path/params` (orbax) and `path/checksums.json` (the size
  and sha256 of every file).

  Args:
    path: the directory to write; it must not exist unless overwrite=True.
    model: the Decoder.
    overwrite: replace an existing checkpoint at `path`, once the new one is complete.

  Raises:
    FileExistsError: `path` exists (and overwrite is False, or it is not a checkpoint).
    TypeError: model is not a Decoder.
  """
  if not isinstance(model, Decoder):
    raise TypeError(f"save_params: model must be a moska_jax Decoder, got {type(model).__name__}")
  state = nnx.state(model, nnx.Param)
  with atomic_directory(path, overwrite=overwrite, marker="model_config.json",
                        what="save_params") as tmp:
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
      json.dump(model.cfg.to_dict(), f, indent=1)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, "params"), state)
    ckpt.wait_until_finished()
    write_checksums(tmp)


def _model_config(directory: str, d: Any, what: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what}: the model config in {directory} is damaged: {e}") from None


def saved_config(path: str) -> ModelConfig:
  """The config a checkpoint written by `save_params` was saved with."""
  path = os.path.abspath(path)
  settle(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"saved_config: no checkpoint directory at {path}")
  return _model_config(path, read_json(path, "model_config.json", "saved_config"),
                       "saved_config")


def load_params(path: str, cfg: ModelConfig | None = None, *, verify: bool = True) -> Decoder:
  """The Decoder saved at `path`, optionally in another dtype.

  Args:
    path: a directory written by `save_params`.
    cfg: None for the saved config; otherwise it must equal the saved config up to `dtype`
      (parameters are cast, e.g. a bfloat16 checkpoint served in float32).
    verify: check every file against `checksums.json` before reading it (each file is read
      once more to hash it); False only to load a checkpoint saved before checksums existed
      (damage is then found only where orbax cannot read it).

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: cfg differs from the saved config in anything but dtype, or the checkpoint is
      damaged or incomplete (the error names the file).
  """
  path = os.path.abspath(path)
  settle(path)
  if verify and os.path.isdir(path):
    verify_files(path, "load_params")
  saved = saved_config(path)
  cfg = cfg or saved
  if dataclasses.replace(cfg, dtype=saved.dtype) != saved:
    raise ValueError(f"load_params: the checkpoint at {path} holds a model of {saved}, not {cfg}")
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(saved, rngs=nnx.Rngs(0))))
  state = restore_arrays(os.path.join(path, "params"), abstract, "load_params")
  return cast(nnx.merge(graphdef, state), cfg.dtype)


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
    for hf, ours in (("self_attn.q_proj", ("attn", "q_proj")),
                     ("self_attn.k_proj", ("attn", "k_proj")),
                     ("self_attn.v_proj", ("attn", "v_proj")),
                     ("self_attn.o_proj", ("attn", "o_proj")),
                     ("mlp.gate_proj", ("mlp", "gate")), ("mlp.up_proj", ("mlp", "up")),
                     ("mlp.down_proj", ("mlp", "down"))):
      names[p + hf + ".weight"] = (("blocks", i, *ours, "kernel"), True)
    names[p + "input_layernorm.weight"] = (("blocks", i, "attn_norm", "scale"), False)
    names[p + "post_attention_layernorm.weight"] = (("blocks", i, "mlp_norm", "scale"), False)
  return names


# Buffers some exports carry that are recomputed from the config, never loaded.
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _read_shards(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors shards; a tensor in two shards is refused."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load_hf_llama: no directory {directory}")
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"load_hf_llama: no *.safetensors file in {directory}")
  tensors, source = {}, {}
  for f in files:
    try:
      shard = load_file(f)
    except SafetensorError as e:
      raise ValueError(f"load_hf_llama: {f} is not a readable safetensors file: {e}") from None
    for name, value in shard.items():
      if name in source:
        raise ValueError(f"load_hf_llama: tensor {name} is in two shards, "
                         f"{os.path.basename(source[name])} and {os.path.basename(f)}, of "
                         f"{directory}; remove the stale one")
      tensors[name], source[name] = value, f
  return tensors


def load_hf_llama(directory: str, cfg: ModelConfig) -> Decoder:
  """Builds a Decoder of `cfg` from the Llama safetensors files in a local directory.

  Every tensor of the directory must be one of `cfg`'s (rotary `inv_freq` buffers aside, which
  are recomputed): a config with fewer layers than the files, or tensors this Decoder has no
  place for (biases, another architecture), is refused rather than loading part of a model.

  Raises:
    ImportError: safetensors is not installed (the `hf` extra).
    FileNotFoundError: the directory does not exist or holds no *.safetensors file.
    ValueError: a tensor is missing, extra (named), in two shards (named with both files), has
      the wrong shape for `cfg`, or a file is not valid safetensors.
  """
  try:
    import safetensors  # noqa: F401
  except ImportError as e:
    raise ImportError("load_hf_llama needs safetensors: pip install 'moska-jax[hf]'") from e
  tensors = _read_shards(directory)
  expected = _hf_names(cfg)
  extra = sorted(n for n in tensors if n not in expected and not _DERIVED.fullmatch(n))
  if extra:
    layers = sorted({int(m.group(1)) for n in extra
                     if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m.group(1)) >=
                     cfg.layers})
    hint = (f"; the files hold layers up to {layers[-1]} but cfg.layers = {cfg.layers}"
            if layers else "")
    raise ValueError(f"load_hf_llama: {len(extra)} tensors in {directory} are not part of a "
                     f"Decoder of {cfg}: {', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}"
                     f"{hint}")
  # An abstract model: no random initialization of weights that are all about to be replaced.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  flat = dict(nnx.to_flat_state(abstract))
  assert set(flat) == {path for path, _ in expected.values()}, "_hf_names misses a parameter"
  for name, (path, transpose) in expected.items():
    if name not in tensors:
      raise ValueError(f"load_hf_llama: tensor {name} is missing in {directory}")
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transpose else value
    target = flat[path]
    if value.shape != target.shape:
      raise ValueError(f"load_hf_llama: {name} has shape {value.shape}, expected "
                       f"{target.shape} for {cfg}")
    target.set_value(jnp.asarray(value, target.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
