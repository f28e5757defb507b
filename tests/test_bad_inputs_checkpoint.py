"""Bad inputs to `save_params` / `load_params` / `saved_config`: an existing checkpoint, what is
not one, damaged or old-format files, another model's config. Each is refused with the error type
and message the docstrings promise; the published checkpoint verifies."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from moska_jax import checkpoint
from moska_jax.config import tiny
from moska_jax.model import Decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny(layers=1)


@functools.cache
def model21():
  """The checkpointed model, built at first use: not while every xdist worker collects."""
  return Decoder(CFG, rngs=nnx.Rngs(21))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("saved") / "params")
  checkpoint.save_params(path, model21())
  return path


@pytest.fixture
def copy(saved, tmp_path):
  path = str(tmp_path / "params")
  shutil.copytree(saved, path)
  return path


def _same_params(model, like=None):
  like = model21() if like is None else like
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(like, nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saving_twice_needs_overwrite_then_replaces(copy):
  other = Decoder(CFG, rngs=nnx.Rngs(22))
  with pytest.raises(FileExistsError, match="pass overwrite=True"):
    checkpoint.save_params(copy, other)
  _same_params(checkpoint.load_params(copy))
  checkpoint.save_params(copy, other, overwrite=True)
  _same_params(checkpoint.load_params(copy), other)
  assert [n for n in os.listdir(os.path.dirname(copy)) if n.startswith(".")] == []


@pytest.mark.parametrize("content", ["store.json", "notes.txt", None])
def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path, content):
  path = tmp_path / "target"
  path.mkdir()
  if content:
    (path / content).write_text("{}")
  with pytest.raises(FileExistsError, match="holds no model_config.json"):
    checkpoint.save_params(str(path), model21(), overwrite=True)
  assert os.listdir(path) == ([content] if content else [])


@pytest.mark.parametrize("make,overwrite,error,match", [
    pytest.param(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0)), False, TypeError,
                 "model must be a moska_jax Decoder, got Linear", id="linear"),
    pytest.param(lambda: None, False, TypeError, "got NoneType", id="none"),
    pytest.param(model21, None, ValueError, "overwrite must be True or False",
                 id="overwrite-none"),
])
def test_save_refuses_bad_arguments(tmp_path, make, overwrite, error, match):
  with pytest.raises(error, match=match):
    checkpoint.save_params(str(tmp_path / "params"), make(), overwrite=overwrite)
  assert os.listdir(tmp_path) == []


def test_save_under_a_file(tmp_path):
  (tmp_path / "f").write_text("")
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    checkpoint.save_params(str(tmp_path / "f" / "params"), model21())


@pytest.mark.parametrize("fn", [checkpoint.load_params, checkpoint.saved_config])
def test_missing_directory(tmp_path, fn):
  with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
    fn(str(tmp_path / "nope"))


def test_empty_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no checksums.json"):
    checkpoint.load_params(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="has no model_config.json"):
    checkpoint.load_params(str(tmp_path), verify=False)


def _write_config(path, edit):
  full = os.path.join(path, "model_config.json")
  with open(full) as f:
    d = json.load(f)
  with open(full, "w") as f:
    f.write(edit(d) if callable(edit) else edit)


@pytest.mark.parametrize("edit,match", [
    pytest.param("{", "not valid JSON", id="not-json"),
    pytest.param(lambda d: json.dumps(dict(d, foo=1)), "model config in .* is damaged",
                 id="unknown-field"),
    pytest.param(lambda d: json.dumps(dict(d, layers=0)), "layers must be an int >= 1",
                 id="layers-0"),
    pytest.param(lambda d: json.dumps(dict(d, dtype="int8")), "dtype must be", id="dtype"),
    pytest.param(lambda d: json.dumps([d]), "is damaged", id="a-list"),
])
@pytest.mark.parametrize("verify", [True, False])
def test_damaged_config_is_refused(copy, edit, match, verify):
  _write_config(copy, edit)
  with pytest.raises(ValueError, match="model_config.json" if verify else match):
    checkpoint.load_params(copy, verify=verify)


@pytest.mark.parametrize("cfg", [
    pytest.param(tiny(layers=2), id="layers"),
    pytest.param(dataclasses.replace(CFG, hidden=128), id="hidden"),
    pytest.param(dataclasses.replace(CFG, vocab=300), id="vocab"),
])
def test_another_models_config_is_refused(saved, cfg):
  with pytest.raises(ValueError, match="holds a model of"):
    checkpoint.load_params(saved, cfg)


def test_without_checksums_only_when_asked_and_damage_is_still_one_line(copy):
  os.remove(os.path.join(copy, "checksums.json"))
  with pytest.raises(FileNotFoundError, match="verify=False"):
    checkpoint.load_params(copy)
  _same_params(checkpoint.load_params(copy, verify=False))
  metadata = os.path.join(copy, "params", "_METADATA")  # unverified, orbax meets the damage
  with open(metadata, "r+b") as f:
    f.truncate(os.path.getsize(metadata) // 2)
  with pytest.raises(ValueError, match="cannot read the arrays in .* damaged") as e:
    checkpoint.load_params(copy, verify=False)
  assert "\n" not in str(e.value)
  shutil.rmtree(os.path.join(copy, "params"))
  with pytest.raises(ValueError, match="params is missing"):
    checkpoint.load_params(copy, verify=False)


def test_the_published_checkpoint_verifies():
  path = os.path.join(ROOT, "experiments", "checkpoints", "retrieval")
  model = checkpoint.load_params(path, dataclasses.replace(checkpoint.saved_config(path),
                                                           dtype="float32"))
  assert model.cfg.layers == 4
