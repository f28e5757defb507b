"""The curated package namespace: every public name resolves, and `import moska_jax` is light."""

import os
import subprocess
import sys

import moska_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_resolves():
  for name in moska_jax.__all__:
    assert getattr(moska_jax, name) is not None, name
  from moska_jax import MoskaEngine, build_shared_store, engine, prefill, routing, sharding
  assert MoskaEngine is engine.MoskaEngine and build_shared_store is prefill.build_shared_store
  assert routing.oracle_route and sharding.shared_attention_step
  assert set(moska_jax.__all__) <= set(dir(moska_jax))


def test_import_loads_nothing_heavy():
  code = ("import sys, moska_jax; heavy = [m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'flax', 'orbax', 'pallas_kernels')]; print(heavy)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=True)
  assert out.stdout.strip() == "[]"
