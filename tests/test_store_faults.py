"""Faults injected into saving and loading shared stores and checkpoints: a saving process killed
(SIGKILL) at random moments, a failure at every step of a save, every file of a saved store
flipped, truncated or deleted. Nothing is lost: a load gives the old or the new store, bit for
bit, or a one-line error that names the damaged file.

MOSKA_FAULT_KILLS=N runs N kills instead of the CI's few (e.g. 50 for a release).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from moska_jax import checkpoint, routing
from moska_jax.config import tiny
from moska_jax.kv_cache import SharedKVStore, load_shared_store, save_shared_store
from moska_jax.model import Decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = int(os.environ.get("MOSKA_FAULT_KILLS", "3"))


def random_store(seed: int, rows: int = 256, chunk_size: int = 64) -> SharedKVStore:
  """A store of tiny()'s shapes with fresh random K/V (no model run: fast to build)."""
  cfg = tiny()
  rng = np.random.default_rng(seed)
  kv = lambda: jnp.asarray(rng.standard_normal((rows, cfg.num_kv_heads, cfg.head_dim)),
                           jnp.float32)
  k, v = tuple(kv() for _ in range(cfg.layers)), tuple(kv() for _ in range(cfg.layers))
  length = jnp.int32(rows - 7)
  summaries = tuple(routing.chunk_summaries(x, chunk_size, kv_length=length) for x in k)
  return SharedKVStore(k, v, summaries, length, cfg, chunk_size)


def assert_same(a: SharedKVStore, b: SharedKVStore) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def which(store: SharedKVStore, candidates: dict[str, SharedKVStore]) -> str:
  """The name of the candidate `store` equals bit for bit (AssertionError if none)."""
  for name, c in candidates.items():
    if all(np.array_equal(np.asarray(x), np.asarray(y))
           for x, y in zip(jax.tree.leaves(store), jax.tree.leaves(c))):
      return name
  raise AssertionError("the loaded store is neither the old nor the new one")


def leftovers(path: str) -> list[str]:
  parent, base = os.path.split(path)
  return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


# A child process that saves stores "a" and "b" in turn over one path until it is killed.
_SAVER = """
import sys, time
from tests.test_store_faults import random_store
from moska_jax.kv_cache import save_shared_store
path, scratch = sys.argv[1], sys.argv[2]
stores = [random_store(1), random_store(2)]  # "a", "b"
t = time.perf_counter()
save_shared_store(scratch, stores[1])  # warm-up: imports, first-save costs
save_shared_store(scratch, stores[0], overwrite=True)
print(f"ready {(time.perf_counter() - t) / 2:.4f}", flush=True)
i = 1
while True:
  save_shared_store(path, stores[i % 2], overwrite=True)
  i += 1
"""


def test_killed_saves_leave_the_old_or_the_new_store(tmp_path):
  """SIGKILL at a random moment of a loop of replacing saves, in several processes at once;
  each path then loads as one of the two stores, and the next save cleans up."""
  stores = {"a": random_store(1), "b": random_store(2)}
  rng = random.Random(int(os.environ.get("MOSKA_FAULT_SEED", time.time_ns() % 2**32)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  seen = []
  for wave in range(0, KILLS, 4):  # at most 4 savers at once
    runs = []
    for i in range(wave, min(wave + 4, KILLS)):
      path = str(tmp_path / f"store{i}")
      save_shared_store(path, stores["a"])
      proc = subprocess.Popen([sys.executable, "-c", _SAVER, path, str(tmp_path / f"warm{i}")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
      runs.append((path, proc))
    for path, proc in runs:
      line = proc.stdout.readline()
      assert line.startswith("ready"), proc.stderr.read()[-2000:]
      time.sleep(rng.uniform(0, 3 * float(line.split()[1])))  # a point in one of ~3 saves
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      left = [n.split(".")[2].split("-")[0] for n in leftovers(path)]
      missing = not os.path.exists(path)  # killed between the two renames of a replacement
      seen.append((which(load_shared_store(path), stores), *left, *(["moved back"] * missing)))
      save_shared_store(path, stores["b"], overwrite=True)  # a save after a kill cleans up
      assert leftovers(path) == [] and which(load_shared_store(path), stores) == "b"
  print("kills (store loaded, leftovers found):", seen)  # pytest -s shows which states were hit


def _fail(*args, **kwargs):
  raise OSError(28, "No space left on device (injected)")


def _renames_failing_at(monkeypatch, n: int, base: str):
  """Makes the n-th rename of the save's own directories (the swap) raise OSError."""
  real, calls = os.rename, []

  def rename(src, dst):
    if any(os.path.basename(str(p)).startswith(f"{base}") or
           os.path.basename(str(p)).startswith(f".{base}.") for p in (src, dst)):
      calls.append((src, dst))
      if len(calls) == n:
        _fail()
    return real(src, dst)

  monkeypatch.setattr(checkpoint.os, "rename", rename)
  return calls


@pytest.mark.parametrize("step", ["write", "checksums", "fsync", "rename-aside", "rename-in",
                                  "delete-old"])
def test_a_failure_at_any_step_keeps_the_old_store(tmp_path, monkeypatch, step):
  old, new = random_store(3), random_store(4)
  path = str(tmp_path / "store")
  save_shared_store(path, old)
  if step == "write":  # orbax writes the arrays, then the save fails (a full disk)
    real_save = ocp.StandardCheckpointer.save

    def save(self, *args, **kwargs):
      real_save(self, *args, **kwargs)
      self.wait_until_finished()
      _fail()

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
  elif step == "checksums":
    monkeypatch.setattr(checkpoint, "_hash_all", _fail)
  elif step == "fsync":
    monkeypatch.setattr(checkpoint, "_fsync_tree", _fail)
  elif step == "rename-aside":
    _renames_failing_at(monkeypatch, 1, "store")
  elif step == "rename-in":
    _renames_failing_at(monkeypatch, 2, "store")
  else:
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # old never deleted
  if step == "delete-old":
    save_shared_store(path, new, overwrite=True)
    monkeypatch.undo()
    assert_same(load_shared_store(path), new)  # the leftover old copy is ignored...
    save_shared_store(path, old, overwrite=True)
    assert leftovers(path) == []  # ...and removed by the next save
    return
  with pytest.raises(OSError, match="injected"):
    save_shared_store(path, new, overwrite=True)
  monkeypatch.undo()
  assert_same(load_shared_store(path), old)
  assert leftovers(path) == []  # a failed save removes its partial copy


def test_a_kill_between_the_two_renames_is_undone_on_load(tmp_path):
  """The state a kill leaves after moving the old store aside and before moving the new one in:
  the path is missing, the old store lies aside, the complete new one is still a partial."""
  old, new = random_store(5), random_store(6)
  path = str(tmp_path / "store")
  save_shared_store(path, old)
  save_shared_store(str(tmp_path / "new"), new)
  aside = checkpoint._sibling(path, checkpoint._REPLACED)
  os.rename(path, aside)
  os.rename(str(tmp_path / "new"), checkpoint._sibling(path, checkpoint._PARTIAL))
  assert_same(load_shared_store(path), old)  # the old one moved back
  assert len(leftovers(path)) == 1  # the partial: a load never deletes
  save_shared_store(path, new, overwrite=True)
  assert leftovers(path) == [] and which(load_shared_store(path), {"new": new}) == "new"


def test_leftovers_are_ignored_by_load_and_removed_by_save(tmp_path):
  store = random_store(7)
  path = str(tmp_path / "store")
  save_shared_store(path, store)
  for kind in (checkpoint._PARTIAL, checkpoint._REPLACED):
    os.makedirs(os.path.join(checkpoint._sibling(path, kind), "arrays"))
  other = str(tmp_path / "store.partial-x")  # another store whose name looks alike: untouched
  save_shared_store(other, store)
  assert_same(load_shared_store(path), store)
  assert len(leftovers(path)) == 2
  save_shared_store(path, store, overwrite=True)
  assert leftovers(path) == [] and os.path.isdir(other)
  assert_same(load_shared_store(other), store)


def _files(path):
  return sorted(os.path.relpath(os.path.join(d, f), path)
                for d, _, fs in os.walk(path) for f in fs if f != "checksums.json")


def _damage(path, name, how):
  full = os.path.join(path, name)
  if how == "delete":
    os.remove(full)
    return
  data = bytearray(open(full, "rb").read())
  if how == "flip":
    data[len(data) // 2] ^= 0x5A
  elif how == "truncate":
    data = data[:len(data) // 2]
  else:  # append
    data += b"\0"
  with open(full, "wb") as f:
    f.write(bytes(data))


EXPECTED = {"flip": "does not match its checksum", "truncate": "the file is truncated",
            "delete": "is missing: the directory is incomplete", "append": "the file is damaged"}


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_every_damaged_store_file_is_refused_by_name(tmp_path, how):
  """Each file of a saved store damaged in turn: a one-line ValueError that names it."""
  store = random_store(8, chunk_size=32)
  clean = str(tmp_path / "clean")
  save_shared_store(clean, store)
  names = _files(clean)
  assert any(n.startswith("arrays/") for n in names) and "store.json" in names
  for name in names:
    path = str(tmp_path / "damaged")
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(clean, path)
    _damage(path, name, how)
    with pytest.raises(ValueError) as e:
      load_shared_store(path)
    message = str(e.value)
    assert "\n" not in message and name in message and EXPECTED[how] in message, message
  assert_same(load_shared_store(clean), store)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_every_damaged_checkpoint_file_is_refused_by_name(tmp_path, how):
  model = Decoder(tiny(layers=1), rngs=nnx.Rngs(0))
  clean = str(tmp_path / "clean")
  checkpoint.save_params(clean, model)
  for name in _files(clean):
    path = str(tmp_path / "damaged")
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(clean, path)
    _damage(path, name, how)
    with pytest.raises(ValueError) as e:
      checkpoint.load_params(path)
    assert name in str(e.value) and EXPECTED[how] in str(e.value), str(e.value)
