"""The Colab notebook runs top to bottom on CPU (needs the `notebooks` extra)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_executes():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  path = os.path.join(ROOT, "experiments", "notebooks", "moska_colab_tpu.ipynb")
  nb = nbformat.read(path, as_version=4)
  # Raises CellExecutionError (with the failing cell) on any error.
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "max |logit diff| =" in outputs and "devices:" in outputs
  # The TPU kernel cells: interpret mode against the reference, lowering for every generation.
  assert "max |o - reference| =" in outputs
  assert outputs.count("lowers to a Mosaic kernel: True") == 4, outputs


def test_notebook_and_readme_say_the_same():
  # Where they overlap (what the notebook does, the model and engine cells), the same words.
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(os.path.join(ROOT, "experiments", "notebooks", "moska_colab_tpu.ipynb"),
                     as_version=4)
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  flat = lambda text: " ".join(text.split())
  intro = flat(nb.cells[0].source)
  end = "GPU, or CPU)."
  what = intro[intro.index("installs moska-jax"):intro.index(end) + len(end)]
  assert what in flat(readme), what
  shared = ("cfg = ", "model = ", "shared_tokens = ", "prompts = ", "# MoSKA-dense equals")
  lines = [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
           if line.startswith(shared)]
  assert len(lines) == len(shared)
  for line in lines:
    assert line in readme.splitlines(), line
