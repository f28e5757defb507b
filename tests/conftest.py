"""Test-session setup that must happen before jax is imported.

Multi-device tests need 8 devices; on CPU, XLA emulates them. Setting the flag here (unless the
caller chose a count) makes a plain `python -m pytest tests` run them too.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the whole run, shared by the xdist workers and the
# subprocesses tests start (they inherit the environment): the same small programs are compiled
# by many tests. Removed when the run ends; a caller's own cache directory is left alone.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = _CACHE_ENV not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _OWN_CACHE:
  import tempfile

  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="moska-jax-test-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    import shutil

    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
