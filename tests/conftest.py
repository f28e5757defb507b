"""Test-session setup that must happen before jax is imported.

Multi-device tests need 8 devices; on CPU, XLA emulates them. Setting the flag here (unless the
caller chose a count) makes a plain `python -m pytest tests` run them too. Subprocesses the tests
start (launcher runs, README blocks, the notebook, multi-process jobs) inherit XLA_FLAGS.
"""

import os


def _add_xla_flag(name: str, value) -> None:
  """Appends --name=value to XLA_FLAGS unless the caller set that flag."""
  if name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{name}={value}".strip()


def _cpu_only() -> bool:
  """Whether jax will run on the CPU: JAX_PLATFORMS says so, or no GPU / TPU plugin is installed
  (decided without importing jax, which must see XLA_FLAGS first)."""
  import importlib.util
  import pkgutil

  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  try:
    import jax_plugins
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


_add_xla_flag("xla_force_host_platform_device_count", 8)
# On the CPU the suite compiles thousands of small programs and runs most of them a few times, and
# LLVM's optimization passes took most of the compile time. Level 0 changes how fast the machine
# code runs; XLA's HLO passes still run and CPU fast math stays off, so results can differ only in
# rounding (e.g. where level 3 fuses a multiply-add), far inside every test's tolerance.
if _cpu_only():
  _add_xla_flag("xla_backend_optimization_level", 0)
  # XLA's newer MLIR fusion emitters took ~40% of an engine step's compile time (measured on this
  # suite's tiny engines); the classic emitters compute the same operations.
  _add_xla_flag("xla_cpu_use_fusion_emitters", "false")
  # Splitting each module for parallel LLVM codegen cost more than it gained on the two cores the
  # suite runs on (-n 2 keeps both busy): one part compiled engine steps ~20% faster.
  _add_xla_flag("xla_cpu_parallel_codegen_split_count", 1)
else:
  # A GPU runs float32 XLA dots as TF32 unless told otherwise, and the tests that compare two
  # float32 paths of the library (engine vs decoder, one context vs several) check them to ~1e-5.
  # Kernels set their own dot precision; this reaches only the XLA dots around them.
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

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
