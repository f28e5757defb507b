"""Device groups across processes: 2 and 4 local processes of one `jax.distributed` job (gloo on
CPU) give what one process gives with the same group layout.

Each launch runs `tests/multiprocess_worker.py` in every process: the cross-group shared step
(dense and handed-off chunk ids with 2 processes, routed with 4) and, with 4, the engine (sparse:
its step holds the routed step; greedy, 4 prompts over 2 slots, requests and the store each
split over 2 processes); every process must read the same results, equal to the one-process run
of the same layout (8 emulated devices here) and, for the step, to the one-device kernels. The
dense engine on groups runs in one process (tests/test_engine_sharding.py, 1+1 among them).
"""

import os
import sys
import time

import jax
import numpy as np
import pytest

from moska_jax.sharding import launch, make_device_groups
from tests import multiprocess_worker as worker

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (processes, devices each, shared devices (the last processes'), step modes, engine mode)
LAYOUTS = {"2x1, 1+1": (2, 1, 1, ("dense", "ids"), "none"),
           "4x1, 2+2": (4, 1, 2, ("routed",), "sparse")}


@pytest.fixture(scope="module")
def references():
  """One process: the worker's cases on each layout's group split, and the one-device kernels."""
  from pallas_kernels import chunk_attention, shared_attention

  from moska_jax import routing
  c = worker.cases()
  C, n = c["chunk_size"], c["kv_length"]

  @jax.jit  # run eagerly, each of their ops would compile on its own (~6x slower)
  def one_device(q, k, v, given):
    ids = routing.route(q, routing.chunk_summaries(k, C, kv_length=n), c["top_k"])
    return {"dense": shared_attention(q, k, v, kv_length=n, backend="xla"),
            "ids": chunk_attention(q, k, v, given, chunk_size=C, kv_length=n, backend="xla"),
            "routed": chunk_attention(q, k, v, ids, chunk_size=C, kv_length=n, backend="xla")}

  kernels = one_device(c["q"], c["k"], c["v"], c["ids"])
  layouts = {}
  for name, (procs, per_proc, num_shared, steps, mode) in LAYOUTS.items():
    groups = make_device_groups(jax.devices()[:procs * per_proc], num_shared=num_shared)
    layouts[name] = worker.run(groups, steps, mode)
  return kernels, layouts


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_processes_equal_one_process(layout, references, tmp_path):
  kernels, layouts = references
  procs, per_proc, num_shared, steps, mode = LAYOUTS[layout]
  results = launch.launch([sys.executable, "-m", "tests.multiprocess_worker", str(tmp_path),
                           str(num_shared), ",".join(steps), mode], procs,
                          devices_per_process=per_proc, timeout_s=100,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  for r in results:
    assert r.returncode == 0, f"process {r.process_id} failed:\n{r.output[-3000:]}"
  got = [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(procs)]
  one = layouts[layout]
  for out in got:
    assert set(out) == set(one)
    for name, want in one.items():
      if name.endswith("tokens"):
        np.testing.assert_array_equal(out[name], want, err_msg=name)
      else:
        np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
  for mode in steps:
    o, lse = kernels[mode]
    np.testing.assert_allclose(got[0][f"step_{mode}_o"], np.asarray(o), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0][f"step_{mode}_lse"], np.asarray(lse), rtol=1e-5,
                               atol=1e-5)


def test_a_failing_process_stops_the_launch(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text("import os, sys, time\n"
                    f"if os.environ['{launch.ENV_PROCESS_ID}'] == '1':\n"
                    "  sys.exit(3)\n"
                    "time.sleep(60)\n")
  results = launch.launch([sys.executable, str(script)], 2, timeout_s=40, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  assert [r.returncode for r in results] == [None, 3]  # process 0 stopped, not waited for


def test_a_stopped_process_takes_its_children_along(tmp_path):
  """A process stopped at the timeout is stopped with what it started (a shell wrapper's job)."""
  script, pid_file = tmp_path / "parent.py", tmp_path / "child.pid"
  script.write_text("import subprocess, sys, time\n"
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; "
                    "time.sleep(120)'])\n"
                    f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                    "time.sleep(120)\n")
  results = launch.launch([sys.executable, str(script)], 1, timeout_s=5, cwd=ROOT)
  assert results[0].returncode is None  # stopped at the timeout
  child = int(pid_file.read_text())

  def running():  # a killed orphan may stay a zombie until init reaps it
    try:
      with open(f"/proc/{child}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
      return False

  for _ in range(100):
    if not running():
      return
    time.sleep(0.05)
  os.kill(child, 9)
  pytest.fail("the launched process's child outlived the launch")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_processes=0), "num_processes must be an int >= 1"),
    (dict(num_processes=2, devices_per_process=0), "devices_per_process must be"),
    (dict(num_processes=2, platform="tpu"), "platform must be one of"),
    (dict(num_processes=2, devices_per_process=True), "devices_per_process must be an int >= 1"),
    (dict(num_processes=2, timeout_s=0), "timeout_s must be a number of seconds > 0, got 0"),
    (dict(num_processes=2, timeout_s=-5.0), "timeout_s must be a number of seconds > 0"),
])
def test_bad_launch_args_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    launch.launch(["true"], **kwargs)
