"""Runs several programs in turn in one Python process, each as a process of its own would run
it, so that the Python, jax and library imports (and the compilations the runs share) are paid
once: the launcher runs (tests/test_launcher.py) and the README blocks (tests/test_readme.py).

A caller gives the source of `run(run_id, item)`, which runs one item; the driver runs it for
each item in turn. An uncaught exception or exit ends only that run. Each run's output follows
SEP + its id on stdout and on stderr; the exit codes come last.
"""

from __future__ import annotations

import json
import subprocess
import sys

SEP = "\n=== one-process run: "
DRIVER = f"""
import json, sys, traceback
codes = {{}}
for run_id, item in json.loads(sys.argv[1]):
  for stream in (sys.stdout, sys.stderr):
    stream.write({SEP!r} + run_id + "\\n")
    stream.flush()
  try:
    run(run_id, item)
    codes[run_id] = 0
  except SystemExit as e:
    codes[run_id] = e.code or 0
  except BaseException:  # what Python does with an uncaught exception
    traceback.print_exc()
    codes[run_id] = 1
  sys.stdout.flush()
  sys.stderr.flush()
print({SEP!r} + "exit codes\\n" + json.dumps(codes), flush=True)
"""


def run_all(run_source: str, items: dict[str, object], *, cwd, env: dict[str, str],
            timeout: int) -> dict[str, tuple[int, str, str]]:
  """id -> (exit code, stdout, stderr) of each item run by `run_source`'s `run(run_id, item)`,
  in turn in one process (`DRIVER`). A run the process did not finish gets the process's exit
  code and all of its stderr."""
  res = subprocess.run([sys.executable, "-c", run_source + DRIVER, json.dumps(list(items.items()))],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  parts = lambda text: dict(p.split("\n", 1) for p in text.split(SEP)[1:])
  stdout, stderr = parts(res.stdout), parts(res.stderr)
  codes = json.loads(stdout.pop("exit codes", "{}"))
  return {i: (codes.get(i, res.returncode or 1), stdout.get(i, ""), stderr.get(i, res.stderr))
          for i in items}
