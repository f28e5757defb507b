"""The README's code runs: every ```python block is a complete program, run from a folder outside
the repository, and the two commands .ci/run reads follow their markers."""

from __future__ import annotations

import os
import re

import pytest

from tests import one_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
  README = f.read()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.M | re.S)

# How a block runs: as a program of its own (fresh globals, run as __main__), in one process with
# the others (`one_process`: the Python, jax and library imports are paid once).
RUN = """
def run(run_id, block):
  exec(compile(block, f"<README block {run_id}>", "exec"), {"__name__": "__main__"})
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """index -> (exit code, stdout, stderr) of each block, run from a folder outside the
  repository."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  results = one_process.run_all(RUN, {str(i): block for i, block in enumerate(BLOCKS)},
                                cwd=tmp_path_factory.mktemp("readme"), env=env, timeout=600)
  return {int(i): result for i, result in results.items()}


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
