"""N local JAX processes joined by `jax.distributed`: the launcher of multi-process tests and runs.

    python -m moska_jax.sharding.launch --processes=2 [--devices_per_process=1] [--platform=cpu]
        -- python -m experiments.run --experiment=disaggregation ...

starts the command once per process with a free local coordinator port in its environment
(`MOSKA_COORDINATOR`, `MOSKA_NUM_PROCESSES`, `MOSKA_PROCESS_ID`), waits for all of them, prints
each one's output under a `[process i]` header and exits with the first failing exit status. The
command calls `initialize()` before it touches a device; `jax.devices()` then lists every process's
devices and `make_device_groups()` splits that global list (`moska_jax.sharding.groups`).

Platforms: "cpu" gives each process `devices_per_process` emulated CPU devices (cross-process
collectives run on gloo, jax's default for CPU); "gpu" gives process i the GPUs
[i * devices_per_process, (i + 1) * devices_per_process) (`local_device_ids`; NCCL between them,
`NCCL_NVLS_ENABLE=0` unless set).

One process that fails or hangs must not hang the others: they are stopped (by process id) once
one exits with an error or the timeout passes, and `initialize` bounds the wait for peers.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

ENV_COORDINATOR = "MOSKA_COORDINATOR"
ENV_NUM_PROCESSES = "MOSKA_NUM_PROCESSES"
ENV_PROCESS_ID = "MOSKA_PROCESS_ID"
ENV_LOCAL_DEVICES = "MOSKA_LOCAL_DEVICE_IDS"
ENV_TIMEOUT = "MOSKA_DISTRIBUTED_TIMEOUT"
PLATFORMS = ("cpu", "gpu")
GRACE_S = 3  # after one process fails, the others' time to exit on their own (and say why)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, *, devices_per_process: int = 1,
                platform: str = "cpu", timeout_s: int = 60,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of process `process_id` of a local launch (see the module docstring)."""
  env = dict(os.environ if base is None else base)
  env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
              ENV_PROCESS_ID: str(process_id), ENV_TIMEOUT: str(timeout_s)})
  if platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
  else:
    first = process_id * devices_per_process
    env[ENV_LOCAL_DEVICES] = ",".join(str(first + d) for d in range(devices_per_process))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
  return env


def initialize() -> bool:
  """Joins the launch this process belongs to (`jax.distributed.initialize` from the
  environment `launch` sets); returns False, doing nothing, outside a launch.

  Call it before anything touches a device. Peers that do not show up within the launch's timeout
  (`MOSKA_DISTRIBUTED_TIMEOUT`, seconds) make it raise instead of hanging.
  """
  if ENV_COORDINATOR not in os.environ:
    return False
  import jax

  timeout = int(os.environ.get(ENV_TIMEOUT, "60"))
  local = os.environ.get(ENV_LOCAL_DEVICES)
  jax.distributed.initialize(
      coordinator_address=os.environ[ENV_COORDINATOR],
      num_processes=int(os.environ[ENV_NUM_PROCESSES]),
      process_id=int(os.environ[ENV_PROCESS_ID]),
      local_device_ids=[int(d) for d in local.split(",")] if local else None,
      initialization_timeout=timeout, heartbeat_timeout_seconds=max(10, timeout),
      shutdown_timeout_seconds=timeout)
  atexit.register(jax.distributed.shutdown)
  return True


@dataclasses.dataclass(frozen=True)
class ProcessResult:
  """One launched process: its id, exit status (None: stopped by the launcher, at the timeout
  or after a peer failed; negative: killed by that signal) and output."""

  process_id: int
  returncode: int | None
  output: str


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: int = 1,
           platform: str = "cpu", timeout_s: float = 600, cwd: str | None = None,
           env: Mapping[str, str] | None = None) -> list[ProcessResult]:
  """Runs `command` as `num_processes` local processes of one `jax.distributed` job.

  Args:
    command: the program and its arguments (it calls `initialize()` first).
    num_processes: >= 1.
    devices_per_process: CPU devices each process emulates, or GPUs each process takes.
    platform: "cpu" or "gpu".
    timeout_s: wall-clock limit for the whole job; processes still running then are stopped.
    cwd, env: the processes' working directory and base environment (default: this process's).

  Returns:
    One `ProcessResult` per process, in process order. Once one process fails, the others get
    GRACE_S seconds to finish and are then stopped.
  """
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"launch: num_processes must be an int >= 1, got {num_processes!r}")
  if (isinstance(devices_per_process, bool) or not isinstance(devices_per_process, int)
      or devices_per_process < 1):
    raise ValueError(f"launch: devices_per_process must be an int >= 1, got "
                     f"{devices_per_process!r}")
  if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
      or not 0 < timeout_s < math.inf):
    raise ValueError(f"launch: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
  if platform not in PLATFORMS:
    raise ValueError(f"launch: platform must be one of {PLATFORMS}, got {platform!r}")
  if not command:
    raise ValueError("launch: command is empty")
  port = free_port()
  peer_timeout = int(max(10, min(timeout_s, 300)))
  procs, outputs, readers = [], [], []
  for i in range(num_processes):
    proc_env = process_env(i, num_processes, port, devices_per_process=devices_per_process,
                           platform=platform, timeout_s=peer_timeout, base=env)
    # A session of its own: stopping it stops what it started too (a shell wrapper's children
    # would otherwise keep their devices and the coordinator port).
    procs.append(subprocess.Popen(list(command), cwd=cwd, env=proc_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs.append([])
    # Drain each pipe on its own thread: a full pipe would block its process.
    readers.append(threading.Thread(target=lambda p=procs[-1], out=outputs[-1]:
                                    out.extend(p.stdout), daemon=True))
    readers[-1].start()
  deadline = time.monotonic() + timeout_s
  failed_at = None
  stopped = set()
  try:
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]  # every one, each time: a failure anywhere is seen
      if all(c is not None for c in codes):
        break
      if failed_at is None and any(c not in (None, 0) for c in codes):
        failed_at = time.monotonic()
      if failed_at is not None and time.monotonic() > failed_at + GRACE_S:
        break
      time.sleep(0.05)
  finally:  # also on Ctrl-C: no process group outlives the launch
    for i, p in enumerate(procs):
      if p.poll() is None:
        stopped.add(i)
        os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and its children
        p.wait()
  for r in readers:
    r.join(timeout=5)
  return [ProcessResult(i, None if i in stopped else p.returncode, "".join(out))
          for i, (p, out) in enumerate(zip(procs, outputs))]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moska_jax.sharding.launch",
      description="Run a command as N local processes of one jax.distributed job.")
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--platform", choices=PLATFORMS, default="cpu")
  parser.add_argument("--timeout_s", type=float, default=3600)
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="the command, after --")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  results = launch(command, args.processes, devices_per_process=args.devices_per_process,
                   platform=args.platform, timeout_s=args.timeout_s)
  for r in results:
    status = "stopped (timeout or a peer failed)" if r.returncode is None else r.returncode
    print(f"[process {r.process_id}] exit {status}\n{r.output}", flush=True)
  return next((1 if r.returncode is None else r.returncode for r in results
               if r.returncode != 0), 0)


if __name__ == "__main__":
  sys.exit(main())
