"""Bad inputs to `save_shared_store` / `load_shared_store`: wrong paths, an existing store, a
directory that is not a store, damaged or old-format headers, another model's config. Each is
refused with the error type and message the docstrings promise, and nothing is overwritten."""

import dataclasses
import functools
import json
import os
import shutil

import pytest

from moska_jax.config import tiny
from moska_jax.kv_cache import load_shared_store, save_shared_store
from tests.test_store_faults import assert_same, random_store


@functools.cache
def _store():
  """The store the tests save and load, built at first use: not while every xdist worker
  collects."""
  return random_store(11)


_STORE = object()  # a parameter that stands for _store()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("saved") / "store")
  save_shared_store(path, _store())
  return path


@pytest.fixture
def copy(saved, tmp_path):
  path = str(tmp_path / "store")
  shutil.copytree(saved, path)
  return path


def _edit_json(path, name, edit):
  full = os.path.join(path, name)
  with open(full) as f:
    d = json.load(f)
  with open(full, "w") as f:
    json.dump(edit(d), f)


def _set(d, key, value):
  d = dict(d)
  if value is KeyError:
    del d[key]
  else:
    d[key] = value
  return d


def test_saving_twice_needs_overwrite_and_keeps_the_first(copy):
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True to replace it"):
    save_shared_store(copy, random_store(12))
  assert_same(load_shared_store(copy), _store())


@pytest.mark.parametrize("what", ["plain-directory", "empty-directory", "file", "checkpoint"])
def test_overwrite_refuses_what_is_not_a_store(tmp_path, what):
  path = tmp_path / "target"
  if what == "file":
    path.write_text("precious")
  else:
    path.mkdir()
    if what == "plain-directory":
      (path / "notes.txt").write_text("precious")
    elif what == "checkpoint":
      (path / "model_config.json").write_text("{}")
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(FileExistsError, match="refusing to replace .* holds no store.json"):
    save_shared_store(str(path), _store(), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == before
  if what in ("file", "plain-directory"):
    assert "precious" in (path.read_text() if what == "file" else (path / "notes.txt").read_text())


@pytest.mark.parametrize("store,overwrite,error,match", [
    pytest.param({"k": []}, False, TypeError, "store must be a SharedKVStore, got dict", id="dict"),
    pytest.param(None, False, TypeError, "store must be a SharedKVStore", id="none"),
    pytest.param(_STORE, "yes", ValueError, "overwrite must be True or False, got 'yes'",
                 id="overwrite-str"),
    pytest.param(_STORE, 1, ValueError, "overwrite must be True or False", id="overwrite-int"),
])
def test_save_refuses_bad_arguments(tmp_path, store, overwrite, error, match):
  store = _store() if store is _STORE else store
  with pytest.raises(error, match=match):
    save_shared_store(str(tmp_path / "store"), store, overwrite=overwrite)
  assert os.listdir(tmp_path) == []


def test_save_under_a_file_is_a_clear_error(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    save_shared_store(str(tmp_path / "file" / "store"), _store())


def test_save_creates_missing_parents(tmp_path):
  path = str(tmp_path / "a" / "b" / "store")
  save_shared_store(path, _store())
  assert_same(load_shared_store(path), _store())


@pytest.mark.parametrize("make,error,match", [
    pytest.param(lambda p: None, FileNotFoundError, r"no shared store at .* \(no such directory\)",
                 id="missing"),
    pytest.param(lambda p: open(p, "w").close(), FileNotFoundError, "no such directory",
                 id="a-file"),
    pytest.param(os.mkdir, FileNotFoundError, "has no checksums.json.* verify=False",
                 id="empty-directory"),
])
def test_load_refuses_what_is_not_a_store(tmp_path, make, error, match):
  path = str(tmp_path / "store")
  make(path)
  with pytest.raises(error, match=match):
    load_shared_store(path)


# Headers damaged in ways that still parse: with verification a checksum names the file; without
# it (an old store), the header's own check does.
_HEADERS = [
    ("not-json", lambda p: open(os.path.join(p, "store.json"), "w").write("{oops"),
     "not valid JSON"),
    ("no-chunk_size", lambda p: _edit_json(p, "store.json", lambda d: _set(d, "chunk_size",
                                                                           KeyError)),
     "is damaged: KeyError"),
    ("unknown-summary", lambda p: _edit_json(p, "store.json", lambda d: _set(d, "summary",
                                                                             "median")),
     "summary 'median'"),
    ("rows-float", lambda p: _edit_json(p, "store.json", lambda d: _set(d, "rows", 256.0)),
     "rows 256.0"),
    ("rows-zero", lambda p: _edit_json(p, "store.json", lambda d: _set(d, "rows", 0)), "rows 0"),
    ("chunk-zero", lambda p: _edit_json(p, "store.json", lambda d: _set(d, "chunk_size", 0)),
     "chunk_size 0"),
    ("chunk-bool", lambda p: _edit_json(p, "store.json", lambda d: _set(d, "chunk_size", True)),
     "chunk_size True"),
    ("config-unknown-field", lambda p: _edit_json(
        p, "store.json", lambda d: _set(d, "model_config", dict(d["model_config"], foo=1))),
     "is damaged: TypeError"),
    ("config-zero-layers", lambda p: _edit_json(
        p, "store.json", lambda d: _set(d, "model_config", dict(d["model_config"], layers=0))),
     "layers must be an int >= 1"),
    ("header-a-list", lambda p: _edit_json(p, "store.json", lambda d: [d]), "is damaged"),
    ("fingerprint-int", lambda p: _edit_json(
        p, "store.json", lambda d: _set(d, "weights_fingerprint", 5)), "weights_fingerprint 5"),
]


@pytest.mark.parametrize("damage,match", [pytest.param(*c[1:], id=c[0]) for c in _HEADERS])
@pytest.mark.parametrize("verify", [True, False])
def test_damaged_headers_are_refused(copy, damage, match, verify):
  damage(copy)
  with pytest.raises(ValueError) as e:
    load_shared_store(copy, verify=verify)
  message = str(e.value)
  if verify:  # the header's size or sha256 differs from what was saved
    assert "store.json" in message and ("checksum" in message or "were saved" in message)
  else:
    assert match in message, message
  assert "\n" not in message, message


@pytest.mark.parametrize("damage,match", [
    pytest.param(lambda p: open(os.path.join(p, "checksums.json"), "w").write("]"),
                 "checksums.json is damaged (not valid JSON", id="not-json"),
    pytest.param(lambda p: _edit_json(p, "checksums.json", lambda d: _set(d, "files", KeyError)),
                 "no sha256 'files' table", id="no-files"),
    pytest.param(lambda p: _edit_json(p, "checksums.json", lambda d: _set(d, "files", [1])),
                 "no sha256 'files' table", id="files-a-list"),
    pytest.param(lambda p: _edit_json(p, "checksums.json", lambda d: [d]),
                 "no sha256 'files' table", id="table-a-list"),
    pytest.param(lambda p: _edit_json(p, "checksums.json", lambda d: _set(d, "algorithm", "md5")),
                 "no sha256 'files' table", id="other-algorithm"),
    pytest.param(lambda p: _edit_json(p, "checksums.json", lambda d: _set(
        d, "files", {n: {"size": v["size"]} for n, v in d["files"].items()})),
                 "table of sizes and sha256s", id="no-sha256"),
    pytest.param(lambda p: _edit_json(p, "checksums.json", lambda d: _set(
        d, "files", dict(d["files"], **{"arrays/ghost": {"size": 1, "sha256": "0"}}))),
                 "arrays/ghost is missing", id="lists-a-missing-file"),
])
def test_damaged_checksums_are_refused(copy, damage, match):
  damage(copy)
  with pytest.raises(ValueError, match=None) as e:
    load_shared_store(copy)
  assert match in str(e.value), str(e.value)


def test_a_store_without_checksums_loads_only_when_asked(copy):
  os.remove(os.path.join(copy, "checksums.json"))
  with pytest.raises(FileNotFoundError, match="loads with verify=False"):
    load_shared_store(copy)
  assert_same(load_shared_store(copy, verify=False), _store())


@pytest.mark.parametrize("cfg", [
    pytest.param(dataclasses.replace(tiny(), hidden=128), id="hidden"),
    pytest.param(tiny(layers=3), id="layers"),
    pytest.param(tiny(dtype="bfloat16"), id="dtype"),
])
def test_another_models_config_is_refused(saved, cfg):
  """The error names each field that differs, with both values."""
  field = next(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) !=
               getattr(_store().model_config, f.name))
  with pytest.raises(ValueError, match=f"was built for another model config; {field}: "
                                       f"{getattr(_store().model_config, field)!r} in the store, "
                                       f"{getattr(cfg, field)!r} given"):
    load_shared_store(saved, cfg)


def test_a_model_for_its_config_is_a_type_error(saved):
  with pytest.raises(TypeError, match="model_config must be a ModelConfig .e.g. model.cfg., got "
                                      "dict"):
    load_shared_store(saved, {"layers": 2})


def test_overwrite_refuses_a_symbolic_link(tmp_path):
  """Replacing a link would set the old directory aside as a link that is never removed, and a
  later load of a deleted path would bring it back: refused, the target untouched."""
  target = str(tmp_path / "v1")
  save_shared_store(target, _store())
  link = tmp_path / "current"
  link.symlink_to(target)
  with pytest.raises(FileExistsError, match="it is a symbolic link"):
    save_shared_store(str(link), random_store(12), overwrite=True)
  assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["current", "v1"]
  assert_same(load_shared_store(str(link)), _store())


def test_extra_files_added_after_saving_are_ignored(copy):
  with open(os.path.join(copy, "notes.txt"), "w") as f:
    f.write("added later")
  assert_same(load_shared_store(copy), _store())
