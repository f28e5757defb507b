"""The README's code runs: every ```python block is a complete program, run from a folder outside
the repository, and the two commands .ci/run reads follow their markers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
  README = f.read()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.M | re.S)

# The blocks run in turn in one process, each as a program of its own (fresh globals, run as
# __main__; an uncaught exception or exit ends only that block): the Python, jax and library
# imports are paid once. Each block's output follows SEP + its index on stdout and on stderr;
# the exit codes come last.
SEP = "\n=== README block: "
DRIVER = f"""
import json, sys, traceback
codes = {{}}
for i, block in enumerate(json.loads(sys.argv[1])):
  for stream in (sys.stdout, sys.stderr):
    stream.write({SEP!r} + str(i) + "\\n")
    stream.flush()
  try:
    exec(compile(block, f"<README block {{i}}>", "exec"), {{"__name__": "__main__"}})
    codes[i] = 0
  except SystemExit as e:
    codes[i] = e.code or 0
  except BaseException:
    traceback.print_exc()
    codes[i] = 1
  sys.stdout.flush()
  sys.stderr.flush()
print({SEP!r} + "exit codes\\n" + json.dumps(codes), flush=True)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """index -> (exit code, stdout, stderr) of each block."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(BLOCKS)],
                       cwd=tmp_path_factory.mktemp("readme"), env=env, capture_output=True,
                       text=True, timeout=600)
  parts = lambda text: dict(p.split("\n", 1) for p in text.split(SEP)[1:])
  stdout, stderr = parts(res.stdout), parts(res.stderr)
  codes = json.loads(stdout.pop("exit codes", "{}"))
  return {i: (codes.get(str(i), res.returncode or 1), stdout.get(str(i), ""),
              stderr.get(str(i), res.stderr)) for i in range(len(BLOCKS))}


def test_readme_has_the_first_five_minutes():
  assert "## The first five minutes" in README and len(BLOCKS) >= 3


def test_ci_markers_precede_the_two_commands():
  # .ci/run runs the first line of the ```bash block after each marker.
  for marker, must in (("ci:install", "pip install -e"), ("ci:test", "pytest")):
    after = README.split(f"<!-- {marker} -->\n", 1)[1]
    assert after.startswith("```bash\n"), marker
    assert must in after.splitlines()[1], marker


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, runs):
  code, _, stderr = runs[index]
  assert code == 0, f"README python block {index}:\n{BLOCKS[index]}\n{stderr[-3000:]}"
  # Quiet: nothing on stderr but what the block asked for (no library warnings).
  assert "Warning" not in stderr and "WARNING" not in stderr, stderr[-3000:]
