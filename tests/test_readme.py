"""The README's code runs: every ```python block is a complete program, run from a folder outside
the repository, and the two commands .ci/run reads follow their markers."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
  README = f.read()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.M | re.S)


def test_readme_has_the_first_five_minutes():
  assert "## The first five minutes" in README and len(BLOCKS) >= 3


def test_ci_markers_precede_the_two_commands():
  # .ci/run runs the first line of the ```bash block after each marker.
  for marker, must in (("ci:install", "pip install -e"), ("ci:test", "pytest")):
    after = README.split(f"<!-- {marker} -->\n", 1)[1]
    assert after.startswith("```bash\n"), marker
    assert must in after.splitlines()[1], marker


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  res = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, f"README python block {index}:\n{BLOCKS[index]}\n{res.stderr[-3000:]}"
  # Quiet: nothing on stderr but what the block asked for (no library warnings).
  assert "Warning" not in res.stderr and "WARNING" not in res.stderr, res.stderr[-3000:]
